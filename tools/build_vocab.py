"""A WordPiece vocabulary in the BERT (uncased) format from a dataset's own texts.

    python -m tools.build_vocab data/my_captions.json data/my_vqa_train.json --out data/my_tokenizer \
        --vocab_size 8000

Reads the texts of JSON annotation files of any task (the `caption`, `question`, `answer`,
`sentence` and `text` fields of the records, at any depth, or a JSON list of strings such as
answer_list.json) and of plain text files (one text per line). The vocabulary is learnt by the
`tokenizers` library's WordPiece trainer with bert-base-uncased's text normalisation (lower-case,
accents stripped, punctuation split). Written to --out: `vocab.txt` in bert-base-uncased's
layout ([PAD] = 0, [unused0..98] = 1..99, [UNK] = 100, [CLS] = 101, [SEP] = 102, [MASK] = 103,
then the word pieces) and `tokenizer_config.json`; `tokenizer: <out>` in a config reads it
(models/tokenization_bert.py). Steps to train with it: docs/data.md.
"""
import argparse
import json
import os

TEXT_FIELDS = ('caption', 'question', 'answer', 'sentence', 'text')
# bert-base-uncased's ids: [PAD] 0, 99 unused slots (room for tokens added later), then the rest.
NUM_UNUSED = 99
SPECIAL_TOKENS = ('[UNK]', '[CLS]', '[SEP]', '[MASK]')


def _strings(node, is_text):
    if isinstance(node, str):
        if is_text:
            yield node
    elif isinstance(node, list):
        for item in node:
            yield from _strings(item, is_text)
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _strings(value, key in TEXT_FIELDS)


def read_texts(paths):
    """Every text of `paths`: the text fields of JSON files (.json), the lines of other files."""
    texts = []
    for path in paths:
        with open(path, encoding='utf-8') as f:
            if path.endswith('.json'):
                try:
                    data = json.load(f)
                except ValueError as e:
                    raise ValueError(f'{path} is not valid JSON: {e}') from e
                found = list(_strings(data, is_text=True))
                if not found:
                    raise ValueError(f'{path} holds no texts (no {", ".join(TEXT_FIELDS)} field '
                                     'with a string, and it is not a list of strings)')
                texts += found
            else:
                texts += [line.strip() for line in f if line.strip()]
    return texts


def special_tokens(num_unused=NUM_UNUSED):
    return ['[PAD]'] + [f'[unused{i}]' for i in range(num_unused)] + list(SPECIAL_TOKENS)


def _tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    tokenizer = Tokenizer(models.WordPiece(unk_token='[UNK]'))
    # bert-base-uncased's: clean control characters, lower-case and strip accents, split on
    # whitespace and punctuation.
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return tokenizer


def _alphabet(tokenizer, texts):
    chars = set()
    for text in texts:
        words = tokenizer.pre_tokenizer.pre_tokenize_str(tokenizer.normalizer.normalize_str(text))
        chars.update(''.join(word for word, _ in words))
    return sorted(chars)


def train_vocab(texts, vocab_size, min_frequency=1, num_unused=NUM_UNUSED):
    """The tokens (id order) of a WordPiece vocabulary of at most `vocab_size` learnt on `texts`:
    the special tokens, every character of the texts alone and as a `##` continuation (any word
    made of them tokenizes without [UNK]), then the learnt word pieces in the order learnt.
    """
    from tokenizers import trainers
    texts = list(texts)
    if not texts:
        raise ValueError('no texts to learn a vocabulary from')
    tokenizer = _tokenizer()
    alphabet = _alphabet(tokenizer, texts)
    specials = special_tokens(num_unused)
    continuations = [f'##{c}' for c in alphabet]
    if vocab_size < len(specials) + 2 * len(alphabet):
        raise ValueError(f'vocab_size {vocab_size} leaves no room beside the {len(specials)} '
                         f'special tokens and the {len(alphabet)} characters (alone and as ##)')
    # The ## forms are given to the trainer up front: it would create them in hash-map order and
    # break ties between merges by those ids, learning another vocabulary at every run
    # (huggingface/tokenizers#1794). Given, they get fixed ids and every run learns the same.
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                        special_tokens=specials + continuations,
                                        continuing_subword_prefix='##', show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    vocab = tokenizer.get_vocab()
    fixed = set(specials) | set(continuations) | set(alphabet)
    learnt = [t for t in sorted(vocab, key=vocab.get) if t not in fixed]
    return specials + alphabet + continuations + learnt


def write_vocab(tokens, out_dir, model_max_length=512):
    """`out_dir`/vocab.txt and tokenizer_config.json (uncased BertTokenizer)."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, 'vocab.txt'), 'w', encoding='utf-8') as f:
        f.write('\n'.join(tokens) + '\n')
    with open(os.path.join(out_dir, 'tokenizer_config.json'), 'w', encoding='utf-8') as f:
        json.dump({'do_lower_case': True, 'tokenizer_class': 'BertTokenizer',
                   'model_max_length': model_max_length}, f)
    return os.path.join(out_dir, 'vocab.txt')


def build_vocab(texts, out_dir, vocab_size, min_frequency=1):
    """Learn a vocabulary on `texts` and write it to `out_dir`; returns its size."""
    tokens = train_vocab(texts, vocab_size, min_frequency)
    write_vocab(tokens, out_dir)
    return len(tokens)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('files', nargs='+', help='JSON annotation files or text files')
    parser.add_argument('--out', required=True, help='folder for vocab.txt and tokenizer_config.json')
    parser.add_argument('--vocab_size', type=int, default=30522,
                        help="at most this many tokens, special ones included (bert-base-uncased's: 30522)")
    parser.add_argument('--min_frequency', type=int, default=1,
                        help='a word piece is learnt only from pairs seen at least this often')
    args = parser.parse_args(argv)
    texts = read_texts(args.files)
    size = build_vocab(texts, args.out, args.vocab_size, args.min_frequency)
    print(f'{len(texts)} texts -> {size} tokens in {os.path.join(args.out, "vocab.txt")}\n'
          f'set tokenizer: {args.out} and vocab_size: {size} (or more) in the bert_config JSON; '
          'then tools.unimodal_init and pre-training (docs/data.md)')
    return size


if __name__ == '__main__':
    main()
