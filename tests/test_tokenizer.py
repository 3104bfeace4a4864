"""ALBEF tokenizer wrapper: `[CLS] A` framing, truncation, padding, special-token literals."""
import json

import pytest

from models.tokenization_bert import BertTokenizer

WORDS = ['the', 'red', 'circle', 'is', 'left', 'of', 'a', 'square', '##s', 'net', 'what', 'color',
         'blue', ',', '.', '?']


@pytest.fixture(scope='module')
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp('vocab')
    vocab = (['[PAD]'] + [f'[unused{i}]' for i in range(99)] + ['[UNK]', '[CLS]', '[SEP]', '[MASK]']
             + WORDS)
    (folder / 'vocab.txt').write_text('\n'.join(vocab) + '\n', encoding='utf-8')
    (folder / 'tokenizer_config.json').write_text(json.dumps({'do_lower_case': True}))
    return BertTokenizer.from_pretrained(str(folder))


def ids(*words):
    return [104 + WORDS.index(w) for w in words]


def test_special_token_ids(tokenizer):
    assert isinstance(tokenizer, BertTokenizer)
    assert (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.cls_token_id,
            tokenizer.sep_token_id, tokenizer.mask_token_id) == (0, 100, 101, 102, 103)


def test_single_sequence_has_no_trailing_sep(tokenizer):
    assert tokenizer('The red circle').input_ids == [101] + ids('the', 'red', 'circle')


def test_pair_is_cls_a_sep_b_sep(tokenizer):
    assert tokenizer('red circle', 'blue square').input_ids == (
        [101] + ids('red', 'circle') + [102] + ids('blue', 'square') + [102])


def test_lower_casing_punctuation_wordpiece_and_unknown(tokenizer):
    out = tokenizer('What COLOR is the Circles, Zebra?').input_ids
    assert out == [101] + ids('what', 'color', 'is', 'the', 'circle', '##s', ',') + [100] + ids('?')


def test_batch_padding_longest_with_mask(tokenizer):
    batch = tokenizer(['red circle', 'the blue square is left'], padding='longest', return_tensors='pt')
    assert batch.input_ids.tolist() == [
        [101] + ids('red', 'circle') + [0, 0, 0],
        [101] + ids('the', 'blue', 'square', 'is', 'left')]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 0, 0, 0], [1] * 6]


def test_truncation_keeps_max_length_minus_one_pieces(tokenizer):
    batch = tokenizer(['the red circle is left of the blue square', 'red'], padding='longest',
                      truncation=True, max_length=5, return_tensors='pt')
    assert batch.input_ids.tolist() == [[101] + ids('the', 'red', 'circle', 'is'),
                                        [101] + ids('red') + [0, 0, 0]]


def test_padding_to_max_length(tokenizer):
    batch = tokenizer(['red'], padding='max_length', truncation=True, max_length=4, return_tensors='pt')
    assert batch.input_ids.tolist() == [[101, *ids('red'), 0, 0]]


def test_special_token_literal_stays_whole(tokenizer):
    # VQA answers get '[SEP]' appended without a space; it must map to 102, the rest lower-cased.
    assert tokenizer('Net[SEP]').input_ids == [101] + ids('net') + [102]
    assert tokenizer('blue [SEP]').input_ids == [101] + ids('blue') + [102]


def test_framing_survives_save_and_reload(tokenizer, tmp_path):
    tokenizer.save_pretrained(str(tmp_path))
    reloaded = BertTokenizer.from_pretrained(str(tmp_path))
    assert reloaded('red circle').input_ids == [101] + ids('red', 'circle')


def test_vocab_without_special_tokens_is_rejected(tmp_path):
    (tmp_path / 'vocab.txt').write_text('[PAD]\n[UNK]\nred\n', encoding='utf-8')
    with pytest.raises(ValueError, match='special tokens'):
        BertTokenizer.from_pretrained(str(tmp_path))
