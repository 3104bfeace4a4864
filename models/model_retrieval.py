"""ALBEF fine-tuned for image-text retrieval (paper section 4.1); Grounding.py
uses the same class. ITC with momentum distillation where every sample sharing an image id is a
positive (in the batch and in the queue), and ITM with hard negatives that never share the
anchor's image id. No MLM, and the temperature is not clamped."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.albef_base import (ALBEFBase, build_text_model, fit_tokenizer, hard_negative_batch,
                               itc_loss, itm_labels, load_bert_config, sample_negatives,
                               sample_negatives_batched)
from models.xbert import BertModel


def idx_targets(idx, idx_queue):
    """ITC targets from image ids: uniform over every column (batch | queue) with the row's id.

    idx (B,), idx_queue (1, Q) -> (B, B + Q); each row sums to 1 (the row itself is a positive).
    """
    idx = idx.view(-1, 1)
    idx_all = torch.cat([idx.t(), idx_queue.clone().detach()], dim=1)  # (1, B + Q)
    pos_idx = torch.eq(idx, idx_all).float()
    return pos_idx / pos_idx.sum(1, keepdim=True)


class ALBEF(ALBEFBase):
    def __init__(self, text_encoder=None, tokenizer=None, config=None):
        super().__init__()
        self.tokenizer = tokenizer
        self.distill = config['distill']
        embed_dim = config['embed_dim']
        self.queue_size = config['queue_size']
        self.momentum = config['momentum']
        self.fast_train = config.get('fast_train', True)

        self.visual_encoder = self.build_visual_encoder(config)
        vision_width = self.visual_encoder.embed_dim
        bert_config = load_bert_config(config)
        fit_tokenizer(tokenizer, bert_config)
        self.text_encoder = build_text_model(BertModel, bert_config, text_encoder,
                                             add_pooling_layer=False)
        text_width = self.text_encoder.config.hidden_size
        self.vision_proj = nn.Linear(vision_width, embed_dim)
        self.text_proj = nn.Linear(text_width, embed_dim)
        self.temp = nn.Parameter(torch.ones([]) * config['temp'])
        self.itm_head = nn.Linear(text_width, 2)

        # Momentum encoders; their weights are overwritten by copy_params().
        self.visual_encoder_m = self.build_visual_encoder(config)
        self.vision_proj_m = nn.Linear(vision_width, embed_dim)
        self.text_encoder_m = BertModel(bert_config, add_pooling_layer=False)
        self.text_proj_m = nn.Linear(text_width, embed_dim)
        self.model_pairs = [[self.visual_encoder, self.visual_encoder_m],
                            [self.vision_proj, self.vision_proj_m],
                            [self.text_encoder, self.text_encoder_m],
                            [self.text_proj, self.text_proj_m]]
        self.copy_params()
        self.register_queues(embed_dim, self.queue_size, with_idx=True)

    def forward(self, image, text, alpha, idx, neg_img_idx=None, neg_txt_idx=None):
        """(loss_ita, loss_itm); the hard negatives are drawn here unless given (tests)."""
        # NOTE(faithful): unlike pre-training, `temp` is not clamped here.
        image_embeds, image_feat, text_embeds, text_feat = self.encode(image, text)
        image_feat_m, text_feat_m = self.momentum_features(image, text)
        loss_ita, sim_i2t, sim_t2i = self.forward_itc(image_feat, text_feat, image_feat_m,
                                                      text_feat_m, idx, alpha)
        self._dequeue_and_enqueue(image_feat_m, text_feat_m, idx.view(-1, 1))
        loss_itm = self.forward_itm(image_embeds, text_embeds, text.attention_mask, idx,
                                    sim_i2t, sim_t2i, neg_img_idx, neg_txt_idx)
        return loss_ita, loss_itm

    @torch.no_grad()
    def momentum_features(self, image, text):
        # NOTE(faithful): the EMA step runs here, before the teacher forward, every call.
        self._momentum_update()
        image_feat_m = self.image_features(self.encode_image(image, momentum=True), momentum=True)
        text_embeds_m = self.encode_text(text.input_ids, text.attention_mask, momentum=True)
        return image_feat_m, self.text_features(text_embeds_m, momentum=True)

    def itc_targets(self, idx, sim_i2t_m, sim_t2i_m, alpha):
        """(i2t, t2i) targets: id-based, mixed with the teacher's softmax when distilling."""
        sim_targets = idx_targets(idx, self.idx_queue)
        if not self.distill:
            return sim_targets, sim_targets
        return (alpha * F.softmax(sim_i2t_m, dim=1) + (1 - alpha) * sim_targets,
                alpha * F.softmax(sim_t2i_m, dim=1) + (1 - alpha) * sim_targets)

    def forward_itc(self, image_feat, text_feat, image_feat_m, text_feat_m, idx, alpha):
        sim_i2t, sim_t2i, sim_i2t_m, sim_t2i_m = self.itc_similarities(
            image_feat, text_feat, image_feat_m, text_feat_m)
        with torch.no_grad():
            targets_i2t, targets_t2i = self.itc_targets(idx, sim_i2t_m, sim_t2i_m, alpha)
        loss_ita = (itc_loss(sim_i2t, targets_i2t) + itc_loss(sim_t2i, targets_t2i)) / 2
        return loss_ita, sim_i2t, sim_t2i

    @torch.no_grad()
    def negative_weights(self, sim_i2t, sim_t2i, idx):
        """Hard-negative sampling weights over the batch; pairs sharing an image id get 0."""
        bs = sim_i2t.size(0)
        # NOTE(faithful): the +1e-4 is a no-op (softmax is shift-invariant); kept as written.
        weights_i2t = F.softmax(sim_i2t[:, :bs] + 1e-4, dim=1)
        weights_t2i = F.softmax(sim_t2i[:, :bs] + 1e-4, dim=1)
        idx = idx.view(-1, 1)
        same_image = torch.eq(idx, idx.t())
        weights_i2t.masked_fill_(same_image, 0)
        weights_t2i.masked_fill_(same_image, 0)
        return weights_i2t, weights_t2i

    def itm_logits(self, image_embeds, text_embeds, text_atts, neg_img_idx, neg_txt_idx):
        """ITM logits (3B, 2): B positives, then the 2B negatives of `hard_negative_batch`.

        Fast path: one fusion call over the 3B rows, each fusion layer projecting the B images
        to keys/values once and attending with the queries of each image's rows grouped
        (`select_blocks`, no host sync; gradients flow back through the shared keys/values)."""
        if self.fast_train:
            key_values = self.text_encoder.image_key_values(image_embeds).select_blocks(
                [None, neg_img_idx, None])
            hidden = self.text_encoder(
                encoder_embeds=torch.cat([text_embeds, text_embeds, text_embeds[neg_txt_idx]]),
                attention_mask=torch.cat([text_atts, text_atts, text_atts[neg_txt_idx]]),
                encoder_hidden_states=key_values, return_dict=True,
                mode='fusion').last_hidden_state
            return self.itm_head(hidden[:, 0])
        pos = self.fusion(text_embeds, text_atts, image_embeds)[:, 0]
        neg = self.fusion(*hard_negative_batch(text_embeds, text_atts, image_embeds,
                                               neg_img_idx, neg_txt_idx))[:, 0]
        return self.itm_head(torch.cat([pos, neg], dim=0))

    def forward_itm(self, image_embeds, text_embeds, text_atts, idx, sim_i2t=None, sim_t2i=None,
                    neg_img_idx=None, neg_txt_idx=None):
        """ITM loss on B positives and 2B hard negatives, drawn from the ITC similarities
        unless given as indices (neg_img_idx: an image for each text; neg_txt_idx: a text for
        each image). Every row needs a candidate with another image id (multinomial fails
        otherwise, as in the original)."""
        bs = image_embeds.size(0)
        if neg_img_idx is None or neg_txt_idx is None:
            weights_i2t, weights_t2i = self.negative_weights(sim_i2t, sim_t2i, idx)
            sample = sample_negatives_batched if self.fast_train else sample_negatives
            neg_img_idx = sample(weights_t2i)  # NOTE(faithful): texts first
            neg_txt_idx = sample(weights_i2t)
        logits = self.itm_logits(image_embeds, text_embeds, text_atts, neg_img_idx, neg_txt_idx)
        return F.cross_entropy(logits, itm_labels(bs, image_embeds.device))
