"""ALBEF pre-training model (paper section 3): image-text contrastive learning (ITC) with
momentum distillation and feature queues, image-text matching (ITM) with hard negatives, and
masked language modelling (MLM) with momentum distillation. Spec section 6.1."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.albef_base import (ALBEFBase, build_text_model, fit_tokenizer, hard_negative_batch,
                               itc_loss, itm_labels, load_bert_config, mask_tokens,
                               sample_negatives, sample_negatives_batched, sparse_embedding)
from models.pretrained import load_deit_weights
from models.xbert import BertForMaskedLM, gather_rows, masked_lm_loss


class ALBEF(ALBEFBase):
    def __init__(self, text_encoder=None, tokenizer=None, config=None, temp=0.07, init_deit=True):
        super().__init__()
        self.tokenizer = tokenizer
        self.mlm_probability = config['mlm_probability']
        embed_dim = config['embed_dim']
        self.queue_size = config['queue_size']
        self.momentum = config['momentum']
        self.fast_train = config.get('fast_train', True)

        self.visual_encoder = self.build_visual_encoder(config)
        if init_deit:
            load_deit_weights(self.visual_encoder, init_deit)
        vision_width = self.visual_encoder.embed_dim
        bert_config = load_bert_config(config)
        fit_tokenizer(tokenizer, bert_config)
        self.text_encoder = build_text_model(BertForMaskedLM, bert_config, text_encoder)
        text_width = self.text_encoder.config.hidden_size
        self.vision_proj = nn.Linear(vision_width, embed_dim)
        self.text_proj = nn.Linear(text_width, embed_dim)
        self.temp = nn.Parameter(torch.ones([]) * config['temp'])
        self.itm_head = nn.Linear(text_width, 2)

        # Momentum encoders; their weights are overwritten by copy_params().
        self.visual_encoder_m = self.build_visual_encoder(config)
        self.vision_proj_m = nn.Linear(vision_width, embed_dim)
        self.text_encoder_m = BertForMaskedLM(bert_config)
        self.text_proj_m = nn.Linear(text_width, embed_dim)
        self.model_pairs = [[self.visual_encoder, self.visual_encoder_m],
                            [self.vision_proj, self.vision_proj_m],
                            [self.text_encoder, self.text_encoder_m],
                            [self.text_proj, self.text_proj_m]]
        self.copy_params()
        self.register_queues(embed_dim, self.queue_size)

    def forward(self, image, text, alpha=0, neg_img_idx=None, neg_txt_idx=None, masked_ids=None,
                mlm_labels=None):
        """(loss_mlm, loss_ita, loss_itm). The random choices (hard-negative indices, MLM
        masking) are drawn here unless given (tests compare the two paths on equal draws)."""
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        if self.fast_train:
            return self.forward_fast(image, text, alpha, neg_img_idx, neg_txt_idx, masked_ids,
                                     mlm_labels)
        image_embeds, image_feat, text_embeds, text_feat = self.encode(image, text)
        image_feat_m, text_feat_m, image_embeds_m = self.momentum_features(image, text)
        loss_ita, sim_i2t, sim_t2i = self.forward_itc(image_feat, text_feat, image_feat_m,
                                                      text_feat_m, alpha)
        self._dequeue_and_enqueue(image_feat_m, text_feat_m)
        loss_itm = self.forward_itm(image_embeds, text_embeds, text.attention_mask, sim_i2t, sim_t2i,
                                    neg_img_idx=neg_img_idx, neg_txt_idx=neg_txt_idx)
        loss_mlm = self.forward_mlm(text.input_ids, text.attention_mask, image_embeds,
                                    image_embeds_m, alpha, masked_ids=masked_ids, labels=mlm_labels)
        return loss_mlm, loss_ita, loss_itm

    @torch.no_grad()
    def momentum_features(self, image, text):
        # NOTE(faithful): the EMA step runs here, before the teacher forward, every call.
        self._momentum_update()
        image_embeds_m = self.encode_image(image, momentum=True)
        image_feat_m = self.image_features(image_embeds_m, momentum=True)
        text_embeds_m = self.encode_text(text.input_ids, text.attention_mask, momentum=True)
        return image_feat_m, self.text_features(text_embeds_m, momentum=True), image_embeds_m

    def forward_itc(self, image_feat, text_feat, image_feat_m, text_feat_m, alpha):
        sim_i2t, sim_t2i, sim_i2t_m, sim_t2i_m = self.itc_similarities(
            image_feat, text_feat, image_feat_m, text_feat_m)
        with torch.no_grad():
            sim_targets = torch.zeros_like(sim_i2t_m)
            sim_targets.fill_diagonal_(1)
            sim_i2t_targets = alpha * F.softmax(sim_i2t_m, dim=1) + (1 - alpha) * sim_targets
            sim_t2i_targets = alpha * F.softmax(sim_t2i_m, dim=1) + (1 - alpha) * sim_targets
        loss_ita = (itc_loss(sim_i2t, sim_i2t_targets) + itc_loss(sim_t2i, sim_t2i_targets)) / 2
        return loss_ita, sim_i2t, sim_t2i

    @torch.no_grad()
    def negative_weights(self, sim_i2t, sim_t2i):
        bs = sim_i2t.size(0)
        weights_i2t = F.softmax(sim_i2t[:, :bs], dim=1)
        weights_t2i = F.softmax(sim_t2i[:, :bs], dim=1)
        weights_i2t.fill_diagonal_(0)
        weights_t2i.fill_diagonal_(0)
        return weights_i2t, weights_t2i

    def forward_itm(self, image_embeds, text_embeds, text_atts, sim_i2t=None, sim_t2i=None,
                    neg_img_idx=None, neg_txt_idx=None):
        """ITM on B positives and 2B hard negatives. Negatives are drawn from the ITC
        similarities unless given as indices (neg_img_idx: an image for each text;
        neg_txt_idx: a text for each image)."""
        bs = image_embeds.size(0)
        output_pos = self.fusion(text_embeds, text_atts, image_embeds)
        if neg_img_idx is None or neg_txt_idx is None:
            weights_i2t, weights_t2i = self.negative_weights(sim_i2t, sim_t2i)
            neg_img_idx = sample_negatives(weights_t2i)  # NOTE(faithful): texts first
            neg_txt_idx = sample_negatives(weights_i2t)
        text_embeds_all, text_atts_all, image_embeds_all = hard_negative_batch(
            text_embeds, text_atts, image_embeds, neg_img_idx, neg_txt_idx)
        output_neg = self.fusion(text_embeds_all, text_atts_all, image_embeds_all)
        vl_embeddings = torch.cat([output_pos[:, 0], output_neg[:, 0]], dim=0)  # (3B, D)
        vl_output = self.itm_head(vl_embeddings)
        return F.cross_entropy(vl_output, itm_labels(bs, image_embeds.device))

    def mask(self, input_ids, vocab_size, device, targets=None, masked_indices=None,
             probability_matrix=None, candidates=False):
        out = mask_tokens(input_ids, vocab_size, self.tokenizer, self.mlm_probability, targets,
                          masked_indices, probability_matrix, candidates)
        return tuple(t.to(device) for t in out) if isinstance(out, tuple) else out.to(device)

    def forward_mlm(self, input_ids, text_atts, image_embeds, image_embeds_m, alpha,
                    masked_ids=None, labels=None):
        """MLM conditioned on the image, with the momentum model's predictions as soft labels."""
        if masked_ids is None:
            masked_ids, labels = self.mask(input_ids, self.text_encoder.config.vocab_size,
                                           image_embeds.device, targets=input_ids.clone())
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        with torch.no_grad():
            logits_m = self.text_encoder_m(masked_ids, attention_mask=text_atts,
                                           encoder_hidden_states=image_embeds_m,
                                           encoder_attention_mask=image_atts, return_dict=True,
                                           return_logits=True)
        mlm_output = self.text_encoder(masked_ids, attention_mask=text_atts,
                                       encoder_hidden_states=image_embeds,
                                       encoder_attention_mask=image_atts, return_dict=True,
                                       labels=labels, soft_labels=F.softmax(logits_m, dim=-1),
                                       alpha=alpha)
        return mlm_output.loss

    def forward_fast(self, image, text, alpha, neg_img_idx=None, neg_txt_idx=None,
                     masked_ids=None, labels=None):
        """(loss_mlm, loss_ita, loss_itm) of the plain path, computed faster (fast_train).

        - The ITC captions and the masked MLM captions go through the text layers together
          (2B rows), in the online and in the momentum BERT: one pass and one weight gradient
          per layer instead of two, and the word-embedding gradient arrives sparse and is added
          into the tied MLM decoder's dense gradient (no dense zero-filled copy).
        - Every fusion row (ITM positive, ITM negative, MLM) attends to one of the batch's B
          images, so each fusion layer projects the B images to keys/values once; the rows
          paired with their own image (positive, negative-text and MLM rows) have their
          queries stacked per image, the B negative-image rows gather their drawn image's
          keys/values (one fusion call, `select_blocks`); gradients reach the image encoder
          through these shared keys/values.
        - The momentum MLM pass runs its fusion layers on the momentum text states already
          computed, and both MLM heads run only on the tokens the masking draw selected (a
          superset of the predicted tokens, the only ones either loss reads, known on the
          host). Negatives are drawn for the whole batch in one call.
        - Nothing is read back from the device (no host sync on a GPU): see mask_tokens,
          sample_negatives_batched, select_blocks, sparse_embedding, _dequeue_and_enqueue.
        Because the masking is drawn before the encoders, the random stream differs from the
        plain path; on equal draws (arguments) the losses and gradients are the same.
        """
        atts = text.attention_mask
        bs = image.size(0)
        positions = None  # flat (B * L) positions the MLM heads run on
        if masked_ids is None:
            masked_ids, labels, positions = self.mask(
                text.input_ids, self.text_encoder.config.vocab_size, image.device,
                targets=text.input_ids.clone(), candidates=True)
        else:  # draws given (tests): the predicted positions, read back from the device
            positions = (labels != -100).flatten().nonzero().squeeze(1)
        ids_both = torch.cat([text.input_ids, masked_ids])  # (2B, L): ITC rows, MLM rows
        atts_both = torch.cat([atts, atts])

        image_embeds = self.visual_encoder(image)  # (B, N, Dv)
        image_feat = F.normalize(self.vision_proj(image_embeds[:, 0]), dim=-1)
        bert = self.text_encoder.bert
        word_embeddings = bert.embeddings.word_embeddings
        text_both = bert(inputs_embeds=sparse_embedding(ids_both, word_embeddings),
                         attention_mask=atts_both, return_dict=True,
                         mode='text').last_hidden_state
        text_embeds, mlm_embeds = text_both[:bs], text_both[bs:]
        text_feat = F.normalize(self.text_proj(text_embeds[:, 0]), dim=-1)

        with torch.no_grad():
            self._momentum_update()  # NOTE(faithful): before the teacher forward, every call
            image_embeds_m = self.visual_encoder_m(image)
            image_feat_m = F.normalize(self.vision_proj_m(image_embeds_m[:, 0]), dim=-1)
            bert_m = self.text_encoder_m.bert
            text_both_m = bert_m(ids_both, attention_mask=atts_both, return_dict=True,
                                 mode='text').last_hidden_state
            text_feat_m = F.normalize(self.text_proj_m(text_both_m[:bs, 0]), dim=-1)

        loss_ita, sim_i2t, sim_t2i = self.forward_itc(image_feat, text_feat, image_feat_m,
                                                      text_feat_m, alpha)
        self._dequeue_and_enqueue(image_feat_m, text_feat_m)

        if neg_img_idx is None or neg_txt_idx is None:
            weights_i2t, weights_t2i = self.negative_weights(sim_i2t, sim_t2i)
            neg_img_idx = sample_negatives_batched(weights_t2i)  # texts first, as the plain path
            neg_txt_idx = sample_negatives_batched(weights_i2t)
        # Rows: B positives, the 2B negatives in hard_negative_batch's order, B MLM captions;
        # the images of the blocks: the rows' own, the drawn ones, the rows' own, the own.
        text_all = torch.cat([text_embeds, text_embeds, text_embeds[neg_txt_idx], mlm_embeds])
        atts_all = torch.cat([atts, atts, atts[neg_txt_idx], atts])
        key_values = bert.image_key_values(image_embeds).select_blocks(
            [None, neg_img_idx, None, None])
        hidden = bert(encoder_embeds=text_all, attention_mask=atts_all,
                      encoder_hidden_states=key_values, return_dict=True,
                      mode='fusion').last_hidden_state  # (4B, L, D)

        vl_output = self.itm_head(hidden[:3 * bs, 0])
        loss_itm = F.cross_entropy(vl_output, itm_labels(bs, image.device))

        with torch.no_grad():
            hidden_m = bert_m(encoder_embeds=text_both_m[bs:], attention_mask=atts,
                              encoder_hidden_states=image_embeds_m, return_dict=True,
                              mode='fusion').last_hidden_state
            soft_labels = F.softmax(self.text_encoder_m.cls(hidden_m.flatten(0, 1)[positions]),
                                    dim=-1)
        logits = self.text_encoder.cls(gather_rows(hidden[3 * bs:].flatten(0, 1), positions))
        loss_mlm = masked_lm_loss(logits, labels.flatten()[positions], soft_labels, alpha)
        return loss_mlm, loss_ita, loss_itm

