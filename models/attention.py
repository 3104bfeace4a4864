"""Attention-map recording shared by the ViT and BERT attention modules (Grad-CAM)."""


class AttentionRecorder:
    """Mixin: `save_attention` switches a module to the explicit softmax path, which keeps the
    attention probabilities and, after backward, their gradient."""

    save_attention = False
    attention_map = None
    attn_gradients = None

    def save_attn_gradients(self, attn_gradients):
        self.attn_gradients = attn_gradients

    def get_attn_gradients(self):
        return self.attn_gradients

    def save_attention_map(self, attention_map):
        self.attention_map = attention_map

    def get_attention_map(self):
        return self.attention_map

    def record_attention(self, probs):
        self.save_attention_map(probs)
        if probs.requires_grad:
            probs.register_hook(self.save_attn_gradients)
