"""ALBEF for visual entailment (SNLI-VE, paper section 5.2): the multimodal encoder's
[CLS] state over (image, hypothesis) goes through a small MLP classifier (entailment 2,
neutral 1, contradiction 0), trained with momentum distillation.

This class is also the base of the NLVR2 model (`model_nlvr.py`), which changes only the text
encoder (two images) and the number of classes.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.albef_base import ALBEFBase, build_text_model, fit_tokenizer, load_bert_config
from models.xbert import BertModel


def classifier_head(width, num_classes):
    """Linear-ReLU-Linear on the [CLS] state (state-dict keys `0.*` and `2.*`)."""
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, num_classes))


def distilled_cross_entropy(logits, targets, logits_m=None, alpha=0.0):
    """Cross-entropy, mixed with the cross-entropy against the momentum model's softmax:
    (1 - alpha) * CE(logits, y) - alpha * mean_b sum_c log_softmax(logits) * softmax(logits_m).
    Plain CE when there is no teacher (distill off)."""
    loss = F.cross_entropy(logits, targets)
    if logits_m is None:
        return loss
    distill = -(F.log_softmax(logits, dim=1) * F.softmax(logits_m, dim=1)).sum(dim=1).mean()
    return (1 - alpha) * loss + alpha * distill


class ALBEF(ALBEFBase):
    num_classes = 3

    def __init__(self, text_encoder=None, tokenizer=None, config=None):
        super().__init__()
        self.tokenizer = tokenizer
        self.distill = config['distill']
        # NOTE(faithful): the original hard-codes 0.995 for the fine-tuning tasks.
        self.momentum = config.get('momentum', 0.995)
        bert_config = load_bert_config(config)
        fit_tokenizer(tokenizer, bert_config)

        self.visual_encoder = self.build_visual_encoder(config)
        self.text_encoder = self.build_text_encoder(bert_config, text_encoder)
        width = self.text_encoder.config.hidden_size
        self.cls_head = classifier_head(width, self.num_classes)
        if self.distill:
            self.visual_encoder_m = self.build_visual_encoder(config)
            self.text_encoder_m = self.build_text_encoder(bert_config)
            self.cls_head_m = classifier_head(width, self.num_classes)
            self.model_pairs = [[self.visual_encoder, self.visual_encoder_m],
                                [self.text_encoder, self.text_encoder_m],
                                [self.cls_head, self.cls_head_m]]
            self.copy_params()

    @staticmethod
    def build_text_encoder(bert_config, text_encoder=None):
        return build_text_model(BertModel, bert_config, text_encoder, add_pooling_layer=False)

    def encode(self, image, text, visual_encoder, text_encoder):
        """The multimodal encoder's last hidden state (B, L, D) for (image, text)."""
        image_embeds = visual_encoder(image)  # (B, N, Dv)
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image.device)
        return text_encoder(text.input_ids, attention_mask=text.attention_mask,
                            encoder_hidden_states=image_embeds,
                            encoder_attention_mask=image_atts).last_hidden_state

    def classify(self, image, text):
        return self.cls_head(self.encode(image, text, self.visual_encoder, self.text_encoder)[:, 0])

    @torch.no_grad()
    def teacher_logits(self, image, text):
        # NOTE(faithful): the EMA step runs here, before the teacher forward, every call.
        self._momentum_update()
        hidden_m = self.encode(image, text, self.visual_encoder_m, self.text_encoder_m)
        return self.cls_head_m(hidden_m[:, 0])

    def forward(self, image, text, targets, alpha=0, train=True):
        """Training: the (distilled) classification loss. Evaluation: the logits (B, C)."""
        logits = self.classify(image, text)
        if not train:
            return logits
        logits_m = self.teacher_logits(image, text) if self.distill else None
        return distilled_cross_entropy(logits, targets, logits_m, alpha)
