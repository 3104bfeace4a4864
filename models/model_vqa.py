"""ALBEF for visual question answering (paper section 5.1): answer generation.

The multimodal encoder turns (image, question) into question states; a causal BERT decoder,
built from the pre-trained fusion layers, generates the answer while cross-attending to them.
Training: per-answer summed NLL (mixed with the momentum decoder's soft labels), weighted by
each answer's frequency among the annotators. Inference ranks a fixed answer list: top-k by the
first token, then re-scored by the full answer likelihood.
"""
import torch
import torch.nn.functional as F

from models.albef_base import ALBEFBase, build_text_model, fit_tokenizer, load_bert_config
from models.xbert import BertLMHeadModel, BertModel


def decoder_config(bert_config):
    """The answer decoder: as many layers as the encoder has fusion layers, all of them with
    cross-attention (to the question states), i.e. fusion_layer 0 (6 layers for BERT-base)."""
    config = bert_config.copy()
    config.num_hidden_layers = bert_config.num_hidden_layers - bert_config.fusion_layer
    config.fusion_layer = 0
    return config


class ALBEF(ALBEFBase):
    def __init__(self, text_encoder=None, text_decoder=None, tokenizer=None, config=None):
        super().__init__()
        self.tokenizer = tokenizer
        self.distill = config['distill']
        # NOTE(faithful): the original hard-codes 0.995 for the fine-tuning tasks.
        self.momentum = config.get('momentum', 0.995)
        self.fast_train = config.get('fast_train', True)
        bert_config = load_bert_config(config)
        fit_tokenizer(tokenizer, bert_config)
        config_decoder = decoder_config(bert_config)

        self.visual_encoder = self.build_visual_encoder(config)
        self.text_encoder = build_text_model(BertModel, bert_config, text_encoder,
                                             add_pooling_layer=False)
        self.text_decoder = build_text_model(BertLMHeadModel, config_decoder, text_decoder)
        if self.distill:
            self.visual_encoder_m = self.build_visual_encoder(config)
            self.text_encoder_m = BertModel(bert_config, add_pooling_layer=False)
            self.text_decoder_m = BertLMHeadModel(config_decoder)
            self.model_pairs = [[self.visual_encoder, self.visual_encoder_m],
                                [self.text_encoder, self.text_encoder_m],
                                [self.text_decoder, self.text_decoder_m]]
            self.copy_params()

    def forward(self, image, question, answer=None, alpha=0, k=None, weights=None, train=True):
        """Training: `answer` holds the answers of all questions, question b owning `k[b]`
        consecutive rows with `weights`; returns the weighted loss summed over answers / B.
        Inference: `answer` is the tokenised answer list and `k` the number of candidates to
        re-rank; returns (topk_ids, topk_probs), each (B, k), best first."""
        question_states = self.encode_question(image, question, self.visual_encoder,
                                               self.text_encoder)
        if not train:
            return self.rank_answer(question_states, question.attention_mask, answer.input_ids,
                                    answer.attention_mask, k)
        answer_loss = self.answer_loss(image, question, question_states, answer, k, alpha)
        return (weights * answer_loss).sum() / image.size(0)

    @staticmethod
    def encode_question(image, question, visual_encoder, text_encoder):
        """The multimodal encoder's states of the question over its image (B, Lq, D)."""
        image_embeds = visual_encoder(image)  # (B, N, Dv)
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image.device)
        return text_encoder(question.input_ids, attention_mask=question.attention_mask,
                            encoder_hidden_states=image_embeds,
                            encoder_attention_mask=image_atts).last_hidden_state

    def answer_targets(self, answer_ids):
        # [PAD] is not predicted; the leading [CLS] is dropped by the decoder's shift.
        return answer_ids.masked_fill(answer_ids == self.tokenizer.pad_token_id, -100)

    def answer_loss(self, image, question, question_states, answer, k, alpha=0):
        """Per-answer loss (A,): summed NLL, distilled from the momentum decoder if enabled."""
        counts = torch.as_tensor(k, device=question_states.device)
        states = self.answer_conditioning(self.text_decoder, question_states, counts)
        atts = question.attention_mask.repeat_interleave(counts, dim=0)
        soft_labels = None
        if self.distill:
            soft_labels = F.softmax(self.teacher_logits(image, question, answer, counts), dim=-1)
        return self.text_decoder(answer.input_ids, attention_mask=answer.attention_mask,
                                 encoder_hidden_states=states, encoder_attention_mask=atts,
                                 labels=self.answer_targets(answer.input_ids),
                                 soft_labels=soft_labels, alpha=alpha, reduction='none').loss

    def answer_conditioning(self, decoder, question_states, counts):
        """What each of the A answers cross-attends to: its question's states (A, Lq, D), or
        on the fast path the decoder's keys/values projected once per question and indexed
        per answer (equal up to float rounding; gradients flow through the shared ones)."""
        if not self.fast_train:
            return question_states.repeat_interleave(counts, dim=0)
        owner = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
        return decoder.bert.image_key_values(question_states).select(owner)

    @torch.no_grad()
    def teacher_logits(self, image, question, answer, counts):
        """The momentum decoder's next-token logits (A, La - 1, V), after one EMA step."""
        # NOTE(faithful): the EMA step runs here, before the teacher forward, every call.
        self._momentum_update()
        states_m = self.encode_question(image, question, self.visual_encoder_m, self.text_encoder_m)
        return self.text_decoder_m(answer.input_ids, attention_mask=answer.attention_mask,
                                   encoder_hidden_states=self.answer_conditioning(
                                       self.text_decoder_m, states_m, counts),
                                   encoder_attention_mask=question.attention_mask.repeat_interleave(
                                       counts, dim=0),
                                   return_logits=True)

    @torch.no_grad()
    def first_token_probs(self, question_states, question_atts, answer_ids):
        """Probability of every answer's first token after [CLS] (Q, A), and the logits (Q, V)."""
        num_questions = question_states.size(0)
        start_ids = answer_ids[0, 0].repeat(num_questions, 1)  # the [CLS] (BOS) token
        logits = self.text_decoder(start_ids, encoder_hidden_states=question_states,
                                   encoder_attention_mask=question_atts).logits[:, 0]
        return F.softmax(logits, dim=1).index_select(1, answer_ids[:, 1]), logits

    @torch.no_grad()
    def candidate_nll(self, question_states, question_atts, answer_ids, answer_atts):
        """Summed NLL (C,) of candidate answers, row c answering question c."""
        output = self.text_decoder(answer_ids, attention_mask=answer_atts,
                                   encoder_hidden_states=question_states,
                                   encoder_attention_mask=question_atts,
                                   labels=self.answer_targets(answer_ids), reduction='none')
        return output.loss

    @torch.no_grad()
    def rank_answer(self, question_states, question_atts, answer_ids, answer_atts, k):
        """Re-rank the k answers with the most likely first token by their full likelihood.

        The question states are computed once by the caller and shared by all k candidates of
        a question (repeated, not recomputed); all Q * k candidates run as one decoder batch.
        """
        num_questions = question_states.size(0)
        prob_first_token, _ = self.first_token_probs(question_states, question_atts, answer_ids)
        topk_probs, topk_ids = prob_first_token.topk(k, dim=1)  # (Q, k)
        flat_ids = topk_ids.reshape(-1)  # question-major
        nll = self.candidate_nll(question_states.repeat_interleave(k, dim=0),
                                 question_atts.repeat_interleave(k, dim=0),
                                 answer_ids[flat_ids], answer_atts[flat_ids])
        # NOTE(faithful): the NLL already contains the first token; adding its log-probability
        # again counts it twice, as the original does.
        log_probs = topk_probs.log() - nll.view(num_questions, k)
        topk_probs, rerank = F.softmax(log_probs, dim=1).sort(dim=1, descending=True)
        return topk_ids.gather(1, rerank), topk_probs
