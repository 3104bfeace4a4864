"""ALBEF's BERT tokenizer: transformers' WordPiece tokenizer with `[CLS] A` framing.

The original forked transformers' slow tokenizer only to drop the trailing `[SEP]` of single
sequences. Here the fork is one post-processor template on transformers' own (tokenizers-backed)
`BertTokenizer`; lower-casing, accent stripping, punctuation splitting and WordPiece are theirs.
Three guards make texts and names that crashed a run late fail early or not at all: no encoding
is longer than `model_max_length` (the text encoder's position table, which the ALBEF models set),
lone surrogates are dropped, and a tokenizer name that resolves to no vocabulary is an error.
"""
import os
import re

from tokenizers import processors
from transformers import BertTokenizer as _HFBertTokenizer
from transformers.tokenization_utils_base import VERY_LARGE_INTEGER

VOCABULARY_FILES = ('vocab.txt', 'tokenizer.json')  # either holds a BERT vocabulary
_SURROGATES = re.compile('[\ud800-\udfff]')


class TokenizerNotFoundError(OSError):
    """A tokenizer name or folder that holds no vocabulary."""


def drop_surrogates(text):
    """`text` (a string or nested lists of strings) without UTF-16 surrogate code points.

    NOTE(faithful): the original's slow tokenizer deleted every character of a Unicode category
    C* in its text cleaning, surrogates (Cs) included; the tokenizers backend cannot even receive
    them (a lone "\\ud83d" from a JSON file raised in the middle of training).
    """
    if isinstance(text, str):
        return _SURROGATES.sub('', text)
    if isinstance(text, (list, tuple)):
        return [drop_surrogates(item) for item in text]
    return text


def _hub_vocabulary(name, kwargs):
    """Why `name` (not a local path) yields no vocabulary from the Hugging Face cache or hub, or
    None when it does. Cached: the tokenizer is then read from the cache alone (kwargs)."""
    import huggingface_hub
    from huggingface_hub.errors import HFValidationError
    where = dict(cache_dir=kwargs.get('cache_dir'), revision=kwargs.get('revision'))
    try:
        cached = [huggingface_hub.try_to_load_from_cache(name, file, **where)
                  for file in VOCABULARY_FILES]
    except HFValidationError:
        return 'not a folder and not a Hugging Face model name'
    if any(isinstance(path, str) for path in cached):
        # A cached vocabulary never waits on the network (retries of an unreachable hub took
        # minutes per file); the files a previous load cached are all the tokenizer reads.
        kwargs['local_files_only'] = True
        return None
    if kwargs.get('local_files_only') or huggingface_hub.constants.HF_HUB_OFFLINE:
        return 'not a folder with vocab.txt and not in the local Hugging Face cache (offline)'
    try:
        huggingface_hub.hf_hub_download(name, 'vocab.txt', token=kwargs.get('token'), **where)
    except huggingface_hub.errors.RepositoryNotFoundError:
        return 'not a folder with vocab.txt and not a model on the Hugging Face hub'
    except huggingface_hub.errors.LocalEntryNotFoundError:
        return ('not a folder with vocab.txt, not in the local Hugging Face cache, and the hub is '
                'not reachable')
    except huggingface_hub.errors.EntryNotFoundError:
        return 'the Hugging Face model has no vocab.txt'
    return None


class BertTokenizer(_HFBertTokenizer):
    """`BertTokenizer.from_pretrained('bert-base-uncased' or a folder with vocab.txt)`.

    Single sequence: `[CLS] A` (NOTE(faithful): no trailing `[SEP]`, so truncation to
    `max_length` keeps `max_length - 1` word pieces). Pair: `[CLS] A [SEP] B [SEP]`.
    Special-token strings inside the text (`[SEP]` appended to VQA answers) map to their ids.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # transformers would silently append missing special tokens after the vocabulary, giving
        # ids the model's embedding table does not have.
        base_vocab = self._tokenizer.get_vocab(with_added_tokens=False)
        special = (self.pad_token, self.unk_token, self.cls_token, self.sep_token, self.mask_token)
        missing = [str(token) for token in special if str(token) not in base_vocab]
        if missing:
            source = kwargs.get('name_or_path') or kwargs.get('vocab_file') or 'the given vocabulary'
            raise ValueError(f'BERT vocabulary of {source} lacks the special tokens {missing}')
        self.update_post_processor()

    @classmethod
    def from_pretrained(cls, name_or_path, *args, **kwargs):
        """A folder with vocab.txt (or tokenizer.json), a vocab.txt file, or a Hugging Face model
        name (from the local cache, else the hub).

        NOTE(fixed): transformers 5 returns a tokenizer of the five special tokens alone for a
        name or folder it cannot find (after minutes of hub retries without a network), which
        maps every word to [UNK]; here that is a TokenizerNotFoundError naming the name."""
        name = str(name_or_path)
        if os.path.isdir(name):
            found = any(os.path.isfile(os.path.join(name, file)) for file in VOCABULARY_FILES)
            reason = None if found else f'the folder has none of {list(VOCABULARY_FILES)}'
        else:
            reason = None if os.path.isfile(name) else _hub_vocabulary(name, kwargs)
        if reason is None:
            tokenizer = super().from_pretrained(name_or_path, *args, **kwargs)
            words = set(tokenizer._tokenizer.get_vocab(with_added_tokens=False))
            if words - set(map(str, tokenizer.all_special_tokens)):
                return tokenizer
            reason = 'it holds no vocabulary beyond the special tokens'
        raise TokenizerNotFoundError(f'tokenizer {name!r} not found: {reason}. Pass a folder with '
                                     'vocab.txt, or a Hugging Face model name (bert-base-uncased) '
                                     'that is cached or reachable')

    def __call__(self, text=None, text_pair=None, *args, **kwargs):
        return super().__call__(drop_surrogates(text), drop_surrogates(text_pair), *args, **kwargs)

    def set_truncation_and_padding(self, padding_strategy, truncation_strategy, max_length, *args,
                                   **kwargs):
        """transformers' hook before every encoding, with one addition: nothing is ever encoded
        longer than `model_max_length` (the text encoder's position table once a model is built
        with this tokenizer; 512 for bert-base-uncased).

        NOTE(fixed): a text that tokenizes longer than the position table (punctuation and
        symbols become one word piece each) crashed the text encoder. Calls without truncation
        (Retrieval and Grounding training, VQA answers and test questions, NLVR, VE) now
        truncate there, and an explicit `max_length` above it is lowered to it; every text that
        fits is encoded exactly as before. (A VQA answer cut there loses its trailing eos.)
        """
        limit = self.model_max_length if self.model_max_length < VERY_LARGE_INTEGER else None
        if limit is not None and max_length is not None:
            max_length = min(max_length, limit)
        super().set_truncation_and_padding(padding_strategy, truncation_strategy, max_length,
                                           *args, **kwargs)
        if limit is not None and self._tokenizer.truncation is None:
            self._tokenizer.enable_truncation(limit, direction=self.truncation_side)

    def update_post_processor(self):
        # transformers calls this hook whenever special tokens change (and from_pretrained may
        # install tokenizer.json's `[CLS] A [SEP]` template first); it must keep ALBEF's framing.
        if self.cls_token_id is None or self.sep_token_id is None:
            return  # still inside the parent constructor; __init__ sets the template afterwards
        cls, sep = str(self.cls_token), str(self.sep_token)
        self._tokenizer.post_processor = processors.TemplateProcessing(
            single=f'{cls}:0 $A:0',
            pair=f'{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1',
            special_tokens=[(cls, self.cls_token_id), (sep, self.sep_token_id)],
        )
