"""Caption and question cleaning applied before tokenization.

Every caption, NLVR/VE sentence and grounding expression goes through `pre_caption`; VQA
questions go through `pre_question`. The two differ on purpose (see their docstrings): the
differences are the original's and change the token ids a checkpoint sees.
"""
import re

# The characters ALBEF deletes from every text: , . ' ! ? " ( ) * # : ; ~
_DELETED_CHARS = re.compile(r"[,.'!?\"()*#:;~]")
_WHITESPACE_RUN = re.compile(r"\s{2,}")


def _clean(text):
    text = _DELETED_CHARS.sub('', text.lower())
    return text.replace('-', ' ').replace('/', ' ')


def _truncate(text, max_words):
    words = text.split(' ')
    return ' '.join(words[:max_words]) if len(words) > max_words else text


def pre_caption(caption, max_words=30):
    """Lower-case, delete punctuation, collapse whitespace runs, keep the first `max_words` words."""
    caption = _clean(caption).replace('<person>', 'person')
    # NOTE(faithful): only runs of 2+ whitespace characters are collapsed; a lone tab or
    # newline inside the text survives (and the word split below is on single spaces).
    caption = _WHITESPACE_RUN.sub(' ', caption)
    caption = caption.rstrip('\n').strip(' ')
    return _truncate(caption, max_words)


def pre_question(question, max_words=30):
    """Like `pre_caption` but without whitespace collapsing or the `<person>` rule.

    NOTE(faithful): only trailing spaces are stripped, so a leading space or a double space
    inside the question is kept (the tokenizer ignores them anyway; the word count does not).
    """
    question = _clean(question).rstrip(' ')
    return _truncate(question, max_words)
