"""ALBEF's BERT tokenizer: transformers' WordPiece tokenizer with `[CLS] A` framing.

The original forked transformers' slow tokenizer only to drop the trailing `[SEP]` of single
sequences. Here the fork is one post-processor template on transformers' own (tokenizers-backed)
`BertTokenizer`; lower-casing, accent stripping, punctuation splitting and WordPiece are theirs.
"""
from tokenizers import processors
from transformers import BertTokenizer as _HFBertTokenizer


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
