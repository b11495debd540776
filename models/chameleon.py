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

from mmcompile.models import llama, vqgan

__all__ = ["CONFIGS", "TOKENIZERS", "ChameleonConfig", "Chameleon", "HeadNorm", "build", "build_with_tokenizer",
           "config_from_hf", "from_pretrained"]


@dataclass
class ChameleonConfig(llama.LlamaConfig):
    qk_norm: bool = True
    swin_norm: bool = False
    image_token_start: int = 4
    image_codes: int = 8192
    boi_token: int = 8197
    eoi_token: int = 8196
    # the token id of each image code, in code order, when they are not image_token_start + code (the
    # public checkpoints' vocabulary names image tokens, and their ids need not follow the codes' order)
    image_token_ids: tuple[int, ...] | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.image_token_ids is not None:
            ids = self.image_token_ids = tuple(int(t) for t in self.image_token_ids)
            if len(ids) != self.image_codes or len(set(ids)) != len(ids):
                raise ValueError(f"ChameleonConfig.image_token_ids must hold {self.image_codes} distinct token ids, "
                                 f"one per image code; got {len(ids)} ({len(set(ids))} distinct)")
            if min(ids) < 0 or max(ids) >= self.vocab_size:
                raise ValueError(f"ChameleonConfig.image_token_ids holds ids outside the vocabulary of {self.vocab_size}")
        elif self.image_token_start < 0 or self.image_token_start + self.image_codes > self.vocab_size:
            raise ValueError(f"ChameleonConfig: image codes {self.image_token_start}..."
                             f"{self.image_token_start + self.image_codes - 1} do not fit the vocabulary of "
                             f"{self.vocab_size} tokens")
        image = set(self.image_token_table())
        for name in ("boi_token", "eoi_token"):
            t = getattr(self, name)
            if not 0 <= t < self.vocab_size or t in image:
                raise ValueError(f"ChameleonConfig.{name}={t} must be a token of the vocabulary outside the image codes")

    @property
    def image_token_range(self) -> range:
        return range(self.image_token_start, self.image_token_start + self.image_codes)

    def image_token_table(self) -> list[int]:
        """The token id of each image code, in code order."""
        return list(self.image_token_ids) if self.image_token_ids is not None else list(self.image_token_range)


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


# The VQ-GAN image tokenizer (models/vqgan.py) each decoder config reads and writes images with.
TOKENIZERS = {"tiny": "tiny", "7b": "7b", "34b": "7b"}


def build_with_tokenizer(name: str = "tiny", *, dtype: torch.dtype | None = None, device=None, seed: int = 0,
                         **overrides) -> tuple["Chameleon", "vqgan.VQGAN"]:
    """The decoder of config ``name`` and its VQ-GAN tokenizer, both random (seeded), in ``dtype``."""
    if name not in TOKENIZERS:
        raise ValueError(f"unknown Chameleon config {name!r}; known: {', '.join(TOKENIZERS)}")
    dtype = dtype or torch.float32
    model = build(name, dtype=dtype, device=device, seed=seed, **overrides)
    return model, vqgan.build(TOKENIZERS[name], dtype=dtype, device=device, seed=seed)


def build(name: str = "tiny", *, dtype: torch.dtype = torch.float32, device=None, seed: int = 0,
          **overrides) -> Chameleon:
    """A randomly initialized Chameleon decoder of config ``CONFIGS[name]`` with fields replaced by ``overrides``."""
    config = llama._make_config(name, overrides, CONFIGS, "Chameleon")
    device = torch.get_default_device() if device is None else torch.device(device)
    model = llama._empty_model(config, dtype, device, Chameleon)
    return init_weights(model, seed).eval()


# --------------------------------------------------------------------------------------------------
# Local checkpoints in the public layout (transformers' ChameleonForConditionalGeneration)
# --------------------------------------------------------------------------------------------------

_HF_HEAD_NORMS = {"self_attn.q_norm.weight": "attention.q_norm.weight", "self_attn.q_norm.bias": "attention.q_norm.bias",
                  "self_attn.k_norm.weight": "attention.k_norm.weight", "self_attn.k_norm.bias": "attention.k_norm.bias"}


def _image_names_to_codes(vocabulary_map: dict) -> dict[int, int]:
    """code -> token id from the vocabulary's image tokens, named ``IMGIMG`` + the code's digits written
    as the letters A-J + a final character (the public tokenizer's convention)."""
    digits = {chr(ord("A") + i): str(i) for i in range(10)}
    table = {}
    for name, token in vocabulary_map.items():
        if name.startswith("IMGIMG"):
            code = "".join(digits.get(ch, ch) for ch in name[len("IMGIMG"):-1])
            if not code.isdigit():
                raise ValueError(f"image token {name!r} does not name a code (IMGIMG + letters A-J + one character)")
            table[int(code)] = int(token)
    return table


def config_from_hf(hf_config: dict) -> tuple[ChameleonConfig, "vqgan.VQGANConfig"]:
    """A ChameleonConfig and the VQ-GAN's config from transformers' Chameleon ``config.json``."""
    if hf_config.get("model_type") != "chameleon":
        raise ValueError(f"model_type {hf_config.get('model_type')!r} is not 'chameleon'")
    base = llama.config_from_hf({**hf_config, "model_type": "llama"})
    vocab_map = hf_config.get("vocabulary_map") or {}
    codes = _image_names_to_codes(vocab_map)
    vq = dict(hf_config.get("vq_config") or {})
    if vq.get("double_latent"):
        raise ValueError("vq_config.double_latent=true is not supported (Chameleon's tokenizer has a single latent)")
    if vq.get("attn_resolutions"):
        raise ValueError(f"vq_config.attn_resolutions={vq['attn_resolutions']} is not supported: this VQ-GAN has "
                         "attention only in its middle block, as Chameleon's tokenizer")
    vq_config = vqgan.VQGANConfig(**{k: vq[k] for k in ("resolution", "in_channels", "base_channels", "channel_multiplier",
                                                         "num_res_blocks", "latent_channels", "embed_dim",
                                                         "num_embeddings") if k in vq})
    n = vq_config.num_embeddings
    if codes and sorted(codes) != list(range(n)):
        raise ValueError(f"vocabulary_map names {len(codes)} image tokens, but the codebook has {n} entries")
    table = [codes[i] for i in range(n)] if codes else None
    fields = {f: getattr(base, f) for f in base.__dataclass_fields__}
    config = ChameleonConfig(
        **fields, swin_norm=bool(hf_config.get("swin_norm", False)), image_codes=n,
        image_token_start=min(table) if table else 4, image_token_ids=tuple(table) if table else None,
        boi_token=int(vocab_map.get("<racm3:break>", 8197)), eoi_token=int(vocab_map.get("<eoss>", 8196)))
    return config, vq_config


def _hf_to_ours(name: str, levels: int) -> str | None:
    if name.startswith("model.vqmodel."):
        ours = vqgan.from_taming_name(name[len("model.vqmodel."):], levels)
        return None if ours is None else "vq." + ours
    parts = name.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _HF_HEAD_NORMS:
        return f"decoder.layers.{parts[2]}.{_HF_HEAD_NORMS[parts[3]]}"
    ours = llama._hf_to_ours(name)
    return None if ours is None else "decoder." + ours


def _ours_to_hf(name: str, levels: int) -> str:
    if name.startswith("vq."):
        return "model.vqmodel." + vqgan.to_taming_name(name[3:], levels)
    name = name[len("decoder."):]
    _, i, rest = name.split(".", 2) if name.startswith("layers.") else ("", "", name)
    for theirs, ours in _HF_HEAD_NORMS.items():
        if rest == ours:
            return f"model.layers.{i}.{theirs}"
    return llama._ours_to_hf(name)


@torch.no_grad()
def from_pretrained(path, *, dtype: torch.dtype | None = None, device=None) -> tuple[Chameleon, "vqgan.VQGAN"]:
    """Load a local checkpoint in transformers' ``ChameleonForConditionalGeneration`` layout: the decoder
    and the VQ-GAN (``model.vqmodel.*``). transformers ships the tokenizer's encoder only; when the
    directory also holds its decoder (taming's names under ``model.vqmodel.decoder.*``) images can be
    generated, otherwise ``vq.has_decoder`` is False and image output is refused with the reason."""
    from pathlib import Path

    from mmcompile.models.llama import CheckpointError

    path = Path(path)
    hf_config = llama._read_hf_config(path)
    try:
        config, vq_config = config_from_hf(hf_config)
    except ValueError as e:
        raise CheckpointError(f"{path / 'config.json'}: {e}") from None
    dtype = llama._resolve_dtype(hf_config, path / "config.json") if dtype is None else dtype
    device = torch.get_default_device() if device is None else torch.device(device)
    with torch.device("meta"):
        both = nn.Module()
        both.decoder = Chameleon(config)
        both.vq = vqgan.VQGAN(vq_config)
    tied = {"decoder.output.weight"} if config.tie_word_embeddings else set()
    levels = len(vq_config.channel_multiplier)
    loaded = llama.load_safetensors(path, both, lambda n: _hf_to_ours(n, levels), lambda n: _ours_to_hf(n, levels),
                                    dtype=dtype, device=device, ignored=tied,
                                    optional=lambda n: n.startswith(("vq.decoder.", "vq.post_quant_conv.")),
                                    kind="Chameleon")
    model, vq = both.decoder, both.vq
    if config.tie_word_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.reset_rope(device)
    vq.has_decoder = any(n.startswith("vq.decoder.") for n in loaded)
    if not vq.has_decoder:  # keep the module usable for encoding; decoding is refused
        vq.decoder.to_empty(device=device)
        vq.post_quant_conv.to_empty(device=device)
        vq.to(dtype)
    return model.eval(), vq.eval()
