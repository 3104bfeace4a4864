"""ALBEF for NLVR2 (paper section 5.3): is a sentence true of a pair of
images? The text encoder reasons over both images: every pre-trained fusion layer becomes a
pair of layers, the first cross-attending to image 0 and the second to image 1, with the
cross-attention key/value projections shared within the pair. A 2-way MLP classifier on [CLS],
momentum distillation as in SNLI-VE (`model_ve.py`, whose class this one extends).
"""
import torch

from models import model_ve
from models.albef_base import build_text_model
from models.xbert import BertModel


def two_image_layers(bert_config):
    """Layer count of the two-image encoder: the text layers, then each fusion layer twice
    (6 + 2 * 6 = 18 for BERT-base with fusion_layer 6)."""
    fusion = bert_config.fusion_layer
    return fusion + 2 * (bert_config.num_hidden_layers - fusion)


def share_cross_attention(encoder):
    """Make each pair (fusion + 2i, fusion + 2i + 1) use one cross-attention key and value.

    The even layer takes the odd layer's Parameters; both names stay in the state dict (the
    released checkpoints hold the same tensor under both).
    """
    fusion, n = encoder.config.fusion_layer, encoder.config.num_hidden_layers
    for layer_num in range(fusion, n - 1, 2):
        first = encoder.layer[layer_num].crossattention.self
        second = encoder.layer[layer_num + 1].crossattention.self
        for name in ('key', 'value'):
            linear, shared = getattr(first, name), getattr(second, name)
            linear.weight = shared.weight
            linear.bias = shared.bias


def build_two_image_text_encoder(bert_config, text_encoder=None):
    """The BertModel (no pooler) of NLVR2 and text-assignment pre-training; `bert_config` has
    the single-image layer count and is not modified."""
    bert_config = bert_config.copy()
    bert_config.num_hidden_layers = two_image_layers(bert_config)
    # From BERT weights, layers beyond bert-base's 12 and all cross-attention start random.
    model = build_text_model(BertModel, bert_config, text_encoder, add_pooling_layer=False)
    share_cross_attention(model.encoder)
    return model


class ALBEF(model_ve.ALBEF):
    num_classes = 2

    @staticmethod
    def build_text_encoder(bert_config, text_encoder=None):
        # Applied to the momentum encoder too, so both iterate over the same parameter list.
        return build_two_image_text_encoder(bert_config, text_encoder)

    def encode(self, image, text, visual_encoder, text_encoder):
        """`image` is (2B, 3, H, W): all first images, then all second images."""
        image_embeds = visual_encoder(image)  # (2B, N, Dv)
        image0_embeds, image1_embeds = image_embeds.split(image.size(0) // 2)
        image_atts = torch.ones(image0_embeds.shape[:-1], dtype=torch.long, device=image.device)
        return text_encoder(text.input_ids, attention_mask=text.attention_mask,
                            encoder_hidden_states=[image0_embeds, image1_embeds],
                            encoder_attention_mask=[image_atts, image_atts]).last_hidden_state
