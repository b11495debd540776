"""Chameleon (Meta, 2024): an early-fusion text+image decoder, built on our Llama.

Text and images share one token stream: an image is 1024 codes of a VQ-GAN codebook (a 32 x 32 grid
for 512 x 512 pixels), and the codes are ordinary entries of the 65536-token vocabulary, so one
Llama-shaped decoder reads and writes both. What differs from Llama-2:

- **QK-norm**: after the q and k projections, each head's vector is layer-normalized over the head
  dimension (statistics over ``head_dim`` only, eps 1e-5) and scaled and shifted by a weight and bias
  *per head* — shape ``[n_heads, head_dim]`` for q and ``[n_kv_heads, head_dim]`` for k, the layout of
  transformers' ``ChameleonLayerNorm`` (the original checkpoints trained with model parallelism carry
  one set per shard; transformers repeats them per head). RoPE comes after the norm.
- **Norm placement** (``swin_norm``, the 34B model): the block normalizes the attention and
  feed-forward *outputs* before the residual add (``h = x + norm(attn(x))``) instead of their inputs.
- **Image codes**: ``image_codes`` consecutive token ids starting at ``image_token_start`` are the
  codebook entries; ``boi_token`` / ``eoi_token`` open and close an image.

Configs: ``tiny`` (tests), ``7b`` (32 layers, dim 4096, 32 heads, FFN 11008, vocabulary 65536 — the
shape the task gives and transformers' ``ChameleonConfig`` defaults) and ``34b`` (48 layers, dim 8192,
64 heads with 8 key/value heads, FFN 22016, ``swin_norm`` — the shape of the public 30B/34B
checkpoint's config as transformers converts it; its parameter count, 34.3B, matches the paper's 34B).

The generation protocol is Llama's (``forward(tokens, input_pos, cache, output_pos)``, in-place static
cache, ``empty_cache``, ``generate_reference``), so ``mmc.compile_generator`` and every pass treat it
like any decoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmcompile.models import llama

__all__ = ["CONFIGS", "ChameleonConfig", "Chameleon", "HeadNorm", "build"]


@dataclass
class ChameleonConfig(llama.LlamaConfig):
    qk_norm: bool = True
    swin_norm: bool = False
    image_token_start: int = 4
    image_codes: int = 8192
    boi_token: int = 8197
    eoi_token: int = 8196

    def __post_init__(self):
        super().__post_init__()
        if self.image_token_start < 0 or self.image_token_start + self.image_codes > self.vocab_size:
            raise ValueError(f"ChameleonConfig: image codes {self.image_token_start}..."
                             f"{self.image_token_start + self.image_codes - 1} do not fit the vocabulary of "
                             f"{self.vocab_size} tokens")
        for name in ("boi_token", "eoi_token"):
            t = getattr(self, name)
            if not 0 <= t < self.vocab_size or self.image_token_start <= t < self.image_token_start + self.image_codes:
                raise ValueError(f"ChameleonConfig.{name}={t} must be a token of the vocabulary outside the image codes")

    @property
    def image_token_range(self) -> range:
        return range(self.image_token_start, self.image_token_start + self.image_codes)


CONFIGS: dict[str, ChameleonConfig] = {
    # A small model for tests: GQA, 64 image codes (an 8 x 8 grid), room for an image and its text.
    "tiny": ChameleonConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128,
                            max_seq_len=256, image_token_start=4, image_codes=64, boi_token=70, eoi_token=71),
    "7b": ChameleonConfig(vocab_size=65536, dim=4096, n_layers=32, n_heads=32, n_kv_heads=None, ffn_dim=11008,
                          max_seq_len=4096),
    "34b": ChameleonConfig(vocab_size=65536, dim=8192, n_layers=48, n_heads=64, n_kv_heads=8, ffn_dim=22016,
                           max_seq_len=4096, swin_norm=True),
}


class HeadNorm(nn.Module):
    """LayerNorm of each head's vector over ``head_dim``, with a weight and bias per head ``[heads, head_dim]``."""

    def __init__(self, heads: int, head_dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(heads, head_dim))
        self.bias = nn.Parameter(torch.zeros(heads, head_dim))

    def forward(self, x: Tensor) -> Tensor:  # x: [B, S, heads, head_dim]
        return F.layer_norm(x, x.shape[-1:], eps=self.eps) * self.weight + self.bias


class ChameleonAttention(llama.Attention):
    def __init__(self, config: ChameleonConfig):
        super().__init__(config)
        self.qk_norm = config.qk_norm
        if config.qk_norm:
            self.q_norm = HeadNorm(config.n_heads, config.head_dim)
            self.k_norm = HeadNorm(config.kv_heads, config.head_dim)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = super().project(x)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v


class ChameleonBlock(llama.TransformerBlock):
    attention_class = ChameleonAttention

    def __init__(self, config: ChameleonConfig):
        super().__init__(config)
        self.swin_norm = config.swin_norm

    def forward(self, x, cos, sin, mask, cache_index, kv_cache):
        if not self.swin_norm:
            return super().forward(x, cos, sin, mask, cache_index, kv_cache)
        h = x + self.attention_norm(self.attention(x, cos, sin, mask, cache_index, kv_cache))
        return h + self.ffn_norm(self.feed_forward(h))


class Chameleon(llama.Llama):
    """The Chameleon decoder: Llama's generation protocol, QK-norm attention, image codes in the vocabulary."""

    block_class = ChameleonBlock


@torch.no_grad()
def init_weights(model: Chameleon, seed: int = 0) -> Chameleon:
    """Llama's random init, and QK-norm weights and biases near 1 and 0 (random, so tests see them act)."""
    llama.init_weights(model, seed)
    g = torch.Generator(device=model.tok_embeddings.weight.device).manual_seed(seed + 1)
    for module in model.modules():
        if isinstance(module, HeadNorm):
            module.weight.copy_(1 + 0.1 * torch.randn(module.weight.shape, generator=g, device=g.device))
            module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=g, device=g.device))
    return model


def build(name: str = "tiny", *, dtype: torch.dtype = torch.float32, device=None, seed: int = 0,
          **overrides) -> Chameleon:
    """A randomly initialized Chameleon decoder of config ``CONFIGS[name]`` with fields replaced by ``overrides``."""
    config = llama._make_config(name, overrides, CONFIGS, "Chameleon")
    device = torch.get_default_device() if device is None else torch.device(device)
    model = llama._empty_model(config, dtype, device, Chameleon)
    return init_weights(model, seed).eval()
