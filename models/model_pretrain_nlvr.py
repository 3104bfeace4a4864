"""Text-assignment (TA) pre-training for NLVR2 (paper section 5.3).

Before NLVR2 fine-tuning, the two-image text encoder (`model_nlvr.py`) learns to tell which of
two images a caption describes: given caption b, the pair is (image b, a similar image) -> 0,
(a similar image, image b) -> 1, or (two similar images) -> 2. Similar images are sampled in
proportion to their image-image similarity. No momentum model, no queue.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.albef_base import (ALBEFBase, finite_sampling_weights, fit_tokenizer,
                               load_bert_config)
from models.model_nlvr import build_two_image_text_encoder

# NOTE(faithful): the pair sampling uses this constant, not the (unused) `temp` parameter.
PAIR_SAMPLING_TEMP = 0.07


class ALBEF(ALBEFBase):
    def __init__(self, text_encoder=None, tokenizer=None, config=None):
        super().__init__()
        self.tokenizer = tokenizer
        self.visual_encoder = self.build_visual_encoder(config)
        bert_config = load_bert_config(config)
        fit_tokenizer(tokenizer, bert_config)
        self.text_encoder = build_two_image_text_encoder(bert_config, text_encoder)
        vision_width = self.visual_encoder.embed_dim
        text_width = self.text_encoder.config.hidden_size
        self.vision_proj = nn.Linear(vision_width, config['embed_dim'])
        self.text_proj = nn.Linear(text_width, config['embed_dim'])  # NOTE(faithful): unused
        # NOTE(faithful): `temp` is created (and saved) but never used.
        self.temp = nn.Parameter(torch.ones([]) * config.get('temp', 0.07))
        self.ta_head = nn.Linear(text_width, 3)

    @torch.no_grad()
    def pair_weights(self, image_embeds):
        """Sampling weights of the "other" image: softmax of image-image similarity, no self."""
        image_feat = F.normalize(self.vision_proj(image_embeds[:, 0]), dim=-1)  # (B, E)
        weights = F.softmax(image_feat @ image_feat.t() / PAIR_SAMPLING_TEMP, dim=1)
        weights.fill_diagonal_(0)
        return weights

    @staticmethod
    def sample_assignment(weights):
        """(img0_idx, img1_idx, labels) for each caption b, drawn sample by sample.

        NOTE(faithful): the coin flips come from the CPU generator and the image draws from the
        device of `weights` (CUDA in training), in the original order, so a seeded run repeats the
        original pairs.
        """
        img0, img1, labels = [], [], []
        for b, w in enumerate(finite_sampling_weights(weights)):
            if torch.rand(1) > 1 / 3:
                other = torch.multinomial(w, 1).item()
                if torch.rand(1) > 0.5:
                    pair, label = (b, other), 0
                else:
                    pair, label = (other, b), 1
            else:
                pair, label = tuple(torch.multinomial(w, 2).tolist()), 2
            img0.append(pair[0])
            img1.append(pair[1])
            labels.append(label)
        device = weights.device
        return (torch.tensor(img0, device=device), torch.tensor(img1, device=device),
                torch.tensor(labels, device=device))

    def forward_ta(self, image_embeds, text, img0_idx, img1_idx):
        """TA logits (B, 3) of each caption against its image pair."""
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long,
                                device=image_embeds.device)
        output = self.text_encoder(text.input_ids, attention_mask=text.attention_mask,
                                   encoder_hidden_states=[image_embeds[img0_idx],
                                                          image_embeds[img1_idx]],
                                   encoder_attention_mask=[image_atts, image_atts])
        return self.ta_head(output.last_hidden_state[:, 0])

    def forward(self, image, text):
        image_embeds = self.visual_encoder(image)  # (B, N, Dv)
        img0_idx, img1_idx, labels = self.sample_assignment(self.pair_weights(image_embeds))
        return F.cross_entropy(self.forward_ta(image_embeds, text, img0_idx, img1_idx), labels)
