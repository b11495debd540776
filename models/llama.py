"""Llama-2 / Llama-3 reference implementation (gpt-fast style).

A decoder-only transformer: token embedding, ``n_layers`` pre-norm blocks (RMSNorm -> grouped-query
attention with rotary position embeddings -> residual; RMSNorm -> SwiGLU feed-forward -> residual),
a final RMSNorm and a linear LM head (optionally tied to the embedding).  Numerics follow Hugging
Face ``LlamaForCausalLM`` (RMSNorm in fp32, "rotate_half" RoPE), so HF checkpoints load with a plain
renaming of tensors (:func:`from_pretrained`) and give the same logits.

Generation protocol
-------------------
The model is a pure function of ``(tokens, input_pos, cache, output_pos)`` with no Python control
flow on tensor values, so the same ``forward`` exports with ``torch.export`` for both phases:

* ``cache = model.empty_cache(B)`` gives one ``(k_cache, v_cache)`` pair per layer, each of shape
  ``[B, n_kv_heads, max_cache_len, head_dim]``.  ``forward`` updates it IN PLACE.
* Every token carries its absolute position: ``input_pos[b, s]``.  The key/value of token ``(b, s)``
  are written to cache slot ``input_pos[b, s]`` of row ``b``, and the query of that token attends to
  every cache slot ``j <= input_pos[b, s]`` (whatever the slot holds, so stale slots past the current
  position are simply invisible).
* Prefill: ``tokens [B, S]`` with ``input_pos = arange(S)`` per row.  Prompts of different lengths are
  right-padded; pass ``output_pos[b] = len_b - 1`` to get the logits of each row's last real token
  (shape ``[B, 1, vocab]``).  The padding's cache slots are overwritten by later decode steps before
  any query can see them.
* Decode: ``tokens [B, 1]`` with ``input_pos[b, 0]`` = the next position of row ``b`` (rows may differ).
* Logits are returned in the model dtype, ``[B, S, vocab]`` (or ``[B, 1, vocab]`` with ``output_pos``).
* Export: ``torch.export.export(model, (tokens, input_pos, cache), {"output_pos": out_pos}, strict=False,
  dynamic_shapes={"tokens": {1: seq}, "input_pos": {1: seq}, "cache": [(None, None)] * n_layers,
  "output_pos": None})`` with ``seq = Dim("seq", min=2, max=max_seq_len)``; decode (S=1) exports with
  static shapes.  The cache mutation is kept: ``ep.module()(...)`` updates the cache it is given.
  (torch.export wants the cache spec to mirror the list structure; a bare ``None`` is rejected.)

:meth:`Llama.generate_reference` is the slow, obviously-correct greedy decoder the compiled
generators are checked against: it recomputes the whole sequence with a fresh cache at every step.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CONFIGS",
    "Attention",
    "CheckpointError",
    "FeedForward",
    "Llama",
    "LlamaConfig",
    "RMSNorm",
    "TransformerBlock",
    "build",
    "config_from_hf",
    "from_pretrained",
    "init_weights",
    "num_parameters",
]


class CheckpointError(ValueError):
    """A checkpoint directory could not be loaded; the message names the file/tensor and the fix."""


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None -> n_heads (MHA); fewer -> GQA
    ffn_dim: int = 11008
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    tie_word_embeddings: bool = False
    # "sdpa": F.scaled_dot_product_attention; "eager": the math written out (repeat_kv, matmuls, masked
    # softmax) as transformers' eager attention does — what the fuse_attention pass turns back into SDPA
    attn_impl: str = "sdpa"

    def __post_init__(self):
        if self.attn_impl not in ("sdpa", "eager"):
            raise ValueError(f"LlamaConfig.attn_impl must be 'sdpa' or 'eager', got {self.attn_impl!r}")
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "ffn_dim", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive int, got {value!r}")
        if self.n_kv_heads is not None and (not isinstance(self.n_kv_heads, int) or self.n_kv_heads <= 0):
            raise ValueError(f"LlamaConfig.n_kv_heads must be a positive int or None, got {self.n_kv_heads!r}")
        if self.dim % self.n_heads:
            raise ValueError(
                f"LlamaConfig.dim ({self.dim}) must be divisible by n_heads ({self.n_heads})"
            )
        if self.n_heads % self.kv_heads:
            raise ValueError(
                f"LlamaConfig.n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig head_dim = dim // n_heads = {self.head_dim} must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads, with ``n_kv_heads=None`` resolved to ``n_heads``."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads


CONFIGS: dict[str, LlamaConfig] = {
    # A small GQA model for tests.
    "tiny": LlamaConfig(
        vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128,
        max_seq_len=128, rope_theta=10000.0,
    ),
    # Llama-2-7B.
    "7b": LlamaConfig(
        vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=None, ffn_dim=11008,
        norm_eps=1e-5, rope_theta=10000.0, max_seq_len=4096,
    ),
    # Llama-3-8B.
    "8b": LlamaConfig(
        vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
        norm_eps=1e-5, rope_theta=500000.0, max_seq_len=8192,
    ),
}


def num_parameters(config: LlamaConfig) -> int:
    """Number of parameters of a model with this config, computed without allocating it."""
    d, hd = config.dim, config.head_dim
    attn = d * config.n_heads * hd + 2 * d * config.kv_heads * hd + config.n_heads * hd * d
    ffn = 3 * d * config.ffn_dim
    block = attn + ffn + 2 * d  # + attention_norm, ffn_norm
    embed = config.vocab_size * d
    head = 0 if config.tie_word_embeddings else config.vocab_size * d
    return embed + config.n_layers * block + d + head


# --------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalize in fp32, cast back, then scale (Hugging Face order of operations).
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_tables(head_dim: int, max_seq_len: int, theta: float, device=None) -> tuple[Tensor, Tensor]:
    """fp32 ``(cos, sin)`` tables of shape [max_seq_len, head_dim], HF "rotate_half" layout."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    freqs = torch.outer(torch.arange(max_seq_len, device=device).float(), inv_freq)  # [T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [T, D]
    return emb.cos(), emb.sin()


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # x: [B, H, S, D]; cos, sin: [B, 1, S, D] already in x.dtype
    return x * cos + rotate_half(x) * sin


def repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    # x: [B, Hkv, L, D] -> [B, Hkv * n_rep, L, D]; head h reads kv head h // n_rep
    if n_rep == 1:
        return x
    B, Hkv, L, D = x.shape
    return x[:, :, None, :, :].expand(B, Hkv, n_rep, L, D).reshape(B, Hkv * n_rep, L, D)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.kv_heads
        self.head_dim = config.head_dim
        self.wq = nn.Linear(config.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, config.dim, bias=False)
        self.attn_impl = config.attn_impl

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor,
                cache_index: tuple[Tensor, Tensor, Tensor], kv_cache: tuple[Tensor, Tensor]) -> Tensor:
        B, S, _ = x.shape  # x: [B, S, dim]
        q, k, v = (t.transpose(1, 2) for t in self.project(x))  # q: [B, H, S, D]; k, v: [B, Hkv, S, D]
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)

        # In-place cache write: cache[b, h, input_pos[b, s], :] = k[b, h, s, :]
        k_cache, v_cache = kv_cache  # [B, Hkv, L, D]
        k_cache.index_put_(cache_index, k)
        v_cache.index_put_(cache_index, v)

        # Attend over the whole cache; mask: [B, 1, S, L], True = visible.
        if self.attn_impl == "sdpa":
            y = F.scaled_dot_product_attention(
                q, k_cache, v_cache, attn_mask=mask, enable_gqa=self.n_kv_heads != self.n_heads
            )  # y: [B, H, S, D]
        else:
            y = self._eager_attention(q, k_cache, v_cache, mask)
        y = y.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim)  # [B, S, H*D]
        return self.wo(y)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q [B, S, H, D], k and v [B, S, Hkv, D] of ``x [B, S, dim]``, before RoPE."""
        B, S, _ = x.shape
        return (self.wq(x).view(B, S, self.n_heads, self.head_dim),
                self.wk(x).view(B, S, self.n_kv_heads, self.head_dim),
                self.wv(x).view(B, S, self.n_kv_heads, self.head_dim))

    def _eager_attention(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        # q: [B, H, S, D]; k, v: [B, Hkv, L, D]; mask: [B, 1, S, L] bool, True = visible
        n_rep = self.n_heads // self.n_kv_heads
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
        scores = (q @ k.transpose(2, 3)) * self.head_dim ** -0.5  # [B, H, S, L]
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        return probs @ v  # [B, H, S, D]


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x); w1 = gate, w3 = up, w2 = down."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.w3 = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.w2 = nn.Linear(config.ffn_dim, config.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    attention_class = Attention  # model families built on this one swap in their own attention

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = self.attention_class(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor,
                cache_index: tuple[Tensor, Tensor, Tensor], kv_cache: tuple[Tensor, Tensor]) -> Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, cache_index, kv_cache)
        return h + self.feed_forward(self.ffn_norm(h))


class Llama(nn.Module):
    block_class = TransformerBlock  # model families built on this one swap in their own block

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(self.block_class(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)  # [max_seq_len, head_dim] fp32
        self.register_buffer("rope_sin", sin, persistent=False)

    def reset_rope(self, device=None) -> None:
        """(Re)compute the fp32 RoPE tables, e.g. after ``to_empty`` left them uninitialized."""
        c = self.config
        device = self.tok_embeddings.weight.device if device is None else device
        self.rope_cos, self.rope_sin = rope_tables(c.head_dim, c.max_seq_len, c.rope_theta, device)

    def forward(self, tokens: Tensor, input_pos: Tensor, cache: list[tuple[Tensor, Tensor]],
                output_pos: Tensor | None = None) -> Tensor:
        """tokens, input_pos: LongTensor [B, S]; cache: per-layer (k, v) [B, Hkv, L, D], updated in
        place; output_pos: optional LongTensor [B].  Returns logits [B, S, vocab] or [B, 1, vocab]."""
        if len(cache) != len(self.layers):
            raise ValueError(f"cache has {len(cache)} layers but the model has {len(self.layers)}")
        B, S = tokens.shape
        max_cache_len = cache[0][0].shape[2]
        device = tokens.device

        h = self.tok_embeddings(tokens)  # h: [B, S, dim]
        cos = self.rope_cos[input_pos].to(h.dtype).unsqueeze(1)  # [B, 1, S, D]
        sin = self.rope_sin[input_pos].to(h.dtype).unsqueeze(1)  # [B, 1, S, D]
        # Key slot j is visible to query (b, s) iff j <= input_pos[b, s].
        slots = torch.arange(max_cache_len, device=device)
        mask = (slots[None, None, :] <= input_pos[:, :, None]).unsqueeze(1)  # [B, 1, S, L]
        # Broadcast index for cache[b, h, input_pos[b, s]]: [B, 1, 1], [1, Hkv, 1], [B, 1, S] -> [B, Hkv, S]
        cache_index = (
            torch.arange(B, device=device)[:, None, None],
            torch.arange(self.config.kv_heads, device=device)[None, :, None],
            input_pos[:, None, :],
        )

        for layer, kv_cache in zip(self.layers, cache):
            h = layer(h, cos, sin, mask, cache_index, kv_cache)

        if output_pos is not None:
            # Keep one row per batch element before the norm / LM head: [B, S, dim] -> [B, 1, dim]
            h = torch.gather(h, 1, output_pos.view(B, 1, 1).expand(B, 1, h.shape[-1]))
        return self.output(self.norm(h))  # [B, S or 1, vocab]

    def empty_cache(self, batch_size: int, max_seq_len: int | None = None, *, device=None,
                    dtype=None) -> list[tuple[Tensor, Tensor]]:
        """Zeroed KV cache: one (k, v) pair per layer, each [batch_size, n_kv_heads, max_seq_len, head_dim]."""
        c = self.config
        weight = self.tok_embeddings.weight
        shape = (batch_size, c.kv_heads, c.max_seq_len if max_seq_len is None else max_seq_len, c.head_dim)
        kw = dict(device=weight.device if device is None else device,
                  dtype=weight.dtype if dtype is None else dtype)
        return [(torch.zeros(shape, **kw), torch.zeros(shape, **kw)) for _ in range(c.n_layers)]

    @torch.no_grad()
    def generate_reference(self, prompt: Tensor, max_new_tokens: int, stop_tokens=()) -> Tensor:
        """Greedy decoding, slow and obviously correct: every step recomputes the whole sequence
        with a fresh cache.  Returns the 1-D prompt + new tokens (a stop token is included)."""
        if prompt.dim() != 1 or prompt.numel() == 0:
            raise ValueError(f"prompt must be a non-empty 1-D LongTensor, got shape {list(prompt.shape)}")
        if prompt.numel() + max_new_tokens > self.config.max_seq_len:
            raise ValueError(
                f"prompt ({prompt.numel()} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                f"max_seq_len ({self.config.max_seq_len})"
            )
        stop = {int(t) for t in stop_tokens}
        seq = prompt.to(device=self.tok_embeddings.weight.device, dtype=torch.long)
        for _ in range(max_new_tokens):
            n = seq.numel()
            cache = self.empty_cache(1, n)
            logits = self(seq[None], torch.arange(n, device=seq.device)[None], cache)
            next_token = logits[0, -1].argmax()
            seq = torch.cat([seq, next_token[None]])
            if int(next_token) in stop:
                break
        return seq


# --------------------------------------------------------------------------------------------------
# Construction
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def init_weights(model: Llama, seed: int = 0) -> Llama:
    """Random init: normal(0, 0.02) for linears and embeddings, ones for norms; RoPE tables recomputed."""
    generators: dict[torch.device, torch.Generator] = {}

    def gen(device: torch.device) -> torch.Generator:
        if device not in generators:
            generators[device] = torch.Generator(device=device).manual_seed(seed)
        return generators[device]

    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(0.0, 0.02, generator=gen(module.weight.device))
        elif isinstance(module, RMSNorm):
            module.weight.fill_(1.0)
    model.reset_rope()
    return model


def _make_config(name: str, overrides: dict, configs: dict | None = None, family: str = "Llama") -> LlamaConfig:
    """``configs[name]`` (default: this module's CONFIGS) with fields replaced by ``overrides``."""
    configs = CONFIGS if configs is None else configs
    if name not in configs:
        raise ValueError(f"unknown {family} config {name!r}; known configs: {', '.join(sorted(configs))}")
    base = configs[name]
    fields = {f.name for f in dataclasses.fields(base)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(
            f"unknown {type(base).__name__} field(s) {', '.join(map(repr, unknown))}; "
            f"valid fields: {', '.join(sorted(fields))}"
        )
    return dataclasses.replace(base, **overrides)


def _empty_model(config: LlamaConfig, dtype: torch.dtype, device, cls: type | None = None) -> Llama:
    """A model (of class ``cls``, default Llama) with uninitialized storage allocated once, directly on
    ``device`` in ``dtype``."""
    with torch.device("meta"):
        model = (cls or Llama)(config)
    model.to(dtype=dtype)  # free on meta
    model.to_empty(device=device)
    if config.tie_word_embeddings:  # to_empty makes a new Parameter per module: re-tie
        model.output.weight = model.tok_embeddings.weight
    return model


def build(name: str = "tiny", *, dtype: torch.dtype = torch.float32, device=None, seed: int = 0,
          **overrides) -> Llama:
    """A randomly initialized Llama of config ``CONFIGS[name]`` with fields replaced by ``overrides``."""
    config = _make_config(name, overrides)
    device = torch.get_default_device() if device is None else torch.device(device)
    model = _empty_model(config, dtype, device)
    init_weights(model, seed)
    return model.eval()


# --------------------------------------------------------------------------------------------------
# Hugging Face checkpoints
# --------------------------------------------------------------------------------------------------


def config_from_hf(hf_config: dict) -> LlamaConfig:
    """A LlamaConfig from a Hugging Face ``config.json`` dict (model_type "llama", or "mistral"
    without sliding window).  Unsupported features raise ValueError."""
    model_type = hf_config.get("model_type")
    if model_type not in ("llama", "mistral"):
        raise ValueError(
            f"model_type {model_type!r} is not supported; only 'llama' (and 'mistral' without sliding window) "
            "checkpoints can be loaded"
        )
    if model_type == "mistral" and hf_config.get("sliding_window") is not None:
        raise ValueError(
            f"mistral sliding_window={hf_config['sliding_window']} is not supported (only full attention); "
            "set sliding_window to null in config.json if the model never uses it"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if hf_config.get(flag):
            raise ValueError(f"{flag}=true is not supported (this Llama has no biases)")
    act = hf_config.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act {act!r} is not supported; only 'silu' (SwiGLU)")

    rope_theta = hf_config.get("rope_theta")
    for key in ("rope_scaling", "rope_parameters"):
        rope = hf_config.get(key)
        if not rope:
            continue
        if not isinstance(rope, dict):
            raise ValueError(f"{key}={rope!r} is not supported")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(
                f"rope scaling ({key} with rope_type {rope_type!r}) is not supported; only plain RoPE "
                "(rope_type 'default') is implemented"
            )
        if rope_theta is None and "rope_theta" in rope:
            rope_theta = rope["rope_theta"]

    try:
        dim = hf_config["hidden_size"]
        n_heads = hf_config["num_attention_heads"]
        kwargs = dict(
            vocab_size=hf_config["vocab_size"],
            dim=dim,
            n_layers=hf_config["num_hidden_layers"],
            n_heads=n_heads,
            ffn_dim=hf_config["intermediate_size"],
        )
    except KeyError as e:
        raise ValueError(f"config is missing the required key {e.args[0]!r}") from None
    head_dim = hf_config.get("head_dim")
    if head_dim is not None and head_dim * n_heads != dim:
        raise ValueError(
            f"head_dim={head_dim} is not supported: it must equal hidden_size / num_attention_heads "
            f"= {dim} / {n_heads}"
        )
    n_kv_heads = hf_config.get("num_key_value_heads")
    return LlamaConfig(
        **kwargs,
        n_kv_heads=None if n_kv_heads is None or n_kv_heads == n_heads else n_kv_heads,
        norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
        rope_theta=float(10000.0 if rope_theta is None else rope_theta),
        max_seq_len=hf_config.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
    )


_HF_LAYER_NAMES = {
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
_HF_TOP_NAMES = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}


def _hf_to_ours(name: str) -> str | None:
    if name in _HF_TOP_NAMES:
        return _HF_TOP_NAMES[name]
    parts = name.split(".", 3)  # model, layers, i, rest
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        rest = _HF_LAYER_NAMES.get(parts[3])
        if rest is not None:
            return f"layers.{parts[2]}.{rest}"
    return None


def _ours_to_hf(name: str) -> str:
    inverse = {v: k for k, v in _HF_TOP_NAMES.items()}
    if name in inverse:
        return inverse[name]
    _, i, rest = name.split(".", 2)
    return f"model.layers.{i}." + {v: k for k, v in _HF_LAYER_NAMES.items()}[rest]


def _names_list(names: list[str]) -> str:
    shown = ", ".join(names[:5])
    return shown + (f", ... ({len(names)} in all)" if len(names) > 5 else f" ({len(names)} in all)")


def _safetensors_files(path: Path) -> dict[str, list[str]]:
    """file name -> tensor names it holds."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index (needs a 'weight_map'): {e}") from None
        files: dict[str, list[str]] = {}
        for tensor, file in weight_map.items():
            files.setdefault(file, []).append(tensor)
        for file in files:
            if not (path / file).is_file():
                raise CheckpointError(f"{index} lists shard {file!r}, which is missing from {path}; re-download it")
        return files
    if (path / "model.safetensors").is_file():
        names = [path / "model.safetensors"]
    else:
        names = sorted(path.glob("*.safetensors"))
    if not names:
        bins = sorted(p.name for p in path.glob("*.bin"))
        hint = (f" (found {', '.join(bins)}: pickled checkpoints are not loaded; convert them to safetensors)"
                if bins else "")
        raise CheckpointError(
            f"no safetensors weights in {path}: expected model.safetensors or model.safetensors.index.json{hint}"
        )
    files = {}
    for file in names:
        with safe_open(str(file), framework="pt") as f:
            files[file.name] = list(f.keys())
    return files


def load_safetensors(path: Path, model: nn.Module, to_ours, to_theirs, *, dtype: torch.dtype, device,
                     ignored: set[str] = frozenset(), optional=lambda name: False, kind: str = "model") -> set[str]:
    """Fill ``model``'s parameters (on the meta device) from the safetensors of ``path``.

    ``to_ours`` maps a checkpoint name to a parameter name (None: not ours); ``to_theirs`` maps back for
    messages. Checkpoint tensors mapping into ``ignored`` are skipped (tied weights); parameters for
    which ``optional(name)`` holds may be missing. Names, missing and unexpected tensors and every shape
    are checked from the headers before any data is read. Returns the parameter names loaded."""
    from safetensors import safe_open

    files = _safetensors_files(path)
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}  # tied parameters once
    plan: dict[str, list[tuple[str, str]]] = {}  # file -> [(their name, our name)]
    unexpected = []
    for file, names in files.items():
        for theirs in names:
            ours = to_ours(theirs)
            if ours is None:
                if theirs.endswith("rotary_emb.inv_freq"):
                    continue  # recomputed, stored by old checkpoints
                unexpected.append(theirs)
            elif ours in expected:
                plan.setdefault(file, []).append((theirs, ours))
            elif ours not in ignored:
                unexpected.append(theirs)  # e.g. a layer index beyond num_hidden_layers
    found = {ours for entries in plan.values() for _, ours in entries}
    missing = [to_theirs(n) for n in expected if n not in found and not optional(n)]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} is missing tensors required by config.json: {_names_list(missing)}; "
            "check that the directory is complete and config.json matches the weights"
        )
    if unexpected:
        raise CheckpointError(
            f"checkpoint {path} has tensors this {kind} does not use: {_names_list(sorted(unexpected))}; "
            f"it is probably not a {kind} checkpoint"
        )
    for file, entries in plan.items():  # shapes come from the headers: no data is read yet
        with safe_open(str(path / file), framework="pt") as f:
            for theirs, ours in entries:
                shape = tuple(f.get_slice(theirs).get_shape())
                if shape != expected[ours]:
                    raise CheckpointError(
                        f"{theirs} has shape {list(shape)} but the config expects {list(expected[ours])} "
                        f"(in {file}); check that config.json matches the weights"
                    )
    for file, entries in plan.items():
        with safe_open(str(path / file), framework="pt", device=str(device)) as f:
            for theirs, ours in entries:
                module_name, _, leaf = ours.rpartition(".")
                setattr(model.get_submodule(module_name), leaf, nn.Parameter(f.get_tensor(theirs).to(dtype)))
    return found


def _resolve_dtype(hf_config: dict, config_path: Path) -> torch.dtype:
    name = hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise CheckpointError(f"{config_path}: dtype {name!r} is not a floating-point torch dtype; pass dtype=")
    return dtype


def _read_hf_config(path: Path) -> dict:
    """config.json of a local Hugging Face model directory, with clear errors for what is missing."""
    if not path.exists():
        raise CheckpointError(f"checkpoint directory {path} does not exist; pass a local Hugging Face model directory")
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory; pass the directory holding config.json and the safetensors")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"no config.json in {path}; a Hugging Face model directory needs one")
    try:
        return json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_path} is not valid JSON: {e}") from None


@torch.no_grad()
def from_pretrained(path, *, dtype: torch.dtype | None = None, device=None) -> Llama:
    """Load a local Hugging Face Llama directory (config.json + safetensors, single or sharded)."""
    path = Path(path)
    hf_config = _read_hf_config(path)
    config_path = path / "config.json"
    try:
        config = config_from_hf(hf_config)
    except ValueError as e:
        raise CheckpointError(f"{config_path}: {e}") from None
    dtype = _resolve_dtype(hf_config, config_path) if dtype is None else dtype
    device = torch.get_default_device() if device is None else torch.device(device)

    with torch.device("meta"):
        model = Llama(config)
    tied = {"output.weight"} if config.tie_word_embeddings else set()
    load_safetensors(path, model, _hf_to_ours, _ours_to_hf, dtype=dtype, device=device, ignored=tied,
                     kind="Llama")
    if config.tie_word_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.reset_rope(device)
    return model.eval()
