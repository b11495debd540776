"""Seamless: SeamlessM4T-v2-like speech and text translation, written as plain torch.

The model of "Seamless: Multilingual Expressive and Streaming Speech Translation" (Meta, 2023) in its
M4T v2 form. Module and parameter names follow the public checkpoint's transformers layout
(``SeamlessM4Tv2Model``), so ``from_pretrained`` loads a local checkpoint without renaming:

- **speech encoder** (``speech_encoder``): log-mel filterbank features, two 10 ms frames stacked to
  160 values (``fbank``), a LayerNorm and projection, then Conformer layers — half-step feed-forward,
  self-attention with Shaw-style relative positions (a learned embedding per clamped distance, 64
  frames to the left, 8 to the right, added to the scores as ``q · e[j - i]``), a convolution module
  (pointwise conv, GLU, causal depthwise conv of 31 taps, LayerNorm, SiLU, pointwise conv) and a second
  half-step feed-forward — then a length adaptor: one Transformer layer whose two strided convolutions
  (kernel 8, stride 8) shorten the sequence eightfold.
- **text encoder** (``text_encoder``) for text input: NLLB-style pre-norm Transformer with scaled token
  embeddings and sinusoidal positions.
- **text decoder** (``text_decoder``, ``lm_head`` tied to the embeddings): pre-norm layers of causal
  self-attention, cross-attention over the encoder's states and a ReLU feed-forward.
- **text-to-unit model** (``t2u_model``), non-autoregressive: a Transformer encoder over the text
  decoder's last hidden states, then each token's state is repeated for its characters, given character
  embeddings and positions, a duration predictor says how many unit frames each character lasts, the
  states are repeated that many times and post-norm layers of self-attention and a convolutional
  feed-forward predict one discrete speech unit per frame.
- **vocoder** (``vocoder``): a unit HiFi-GAN — unit, language and speaker embeddings, a duration
  predictor for the units, then transposed convolutions (x5, x4, x4, x2, x2: 320 samples per unit frame,
  20 ms at 16 kHz) with multi-receptive-field residual blocks. Its convolutions carry weight
  normalization as ``torch.nn.utils.parametrizations.weight_norm``, as the model is trained; capture
  traces ``g * v / ||v||`` on the weights and the ``fold_constants`` pass evaluates it once, so the
  compiled vocoder convolves with plain weights.

Where this model differs from the public code, on purpose:

- the speech encoder attends over the whole utterance (the public model chunks attention every 20000
  frames, more than 6 minutes of speech, so the two agree below that) and padded frames are zeroed
  before the adaptor's strided convolutions, so an utterance's states do not depend on how a batch was
  padded;
- batches and shape buckets pad; padding never reaches a real position: attention masks it, every
  convolution of the text-to-unit model, the duration predictors and the vocoder reads zeros past a
  row's end (in the vocoder at every resolution), as an unpadded input gives them, so a batched
  utterance translates exactly as it would alone;
- the text-to-unit model takes each token's characters from a table (``SubwordChars``: character ids
  and counts per token id). The public pipeline builds it from its tokenizer's vocabulary; random
  models get a random table.

Decoding follows the generation protocol of ``mmcompile.models.llama`` so the Generator drives it:
``TextDecoderLM.forward(tokens, input_pos, cache, output_pos=None)`` with a static cache from
``empty_cache``. The cache holds, per layer, the self-attention keys and values
``[B, H, max_seq_len, D]`` (written in place at ``input_pos``) and the cross-attention keys and values
``[B, H, max_source_len, D]``, plus one additive source mask ``[B, 1, 1, max_source_len]`` (0 where a
source position is real, the dtype's minimum where it is padding). ``CrossAttentionState`` fills the
cross-attention entries from the encoder's states once per request; every decode step reads them.

Configs: ``tiny`` for tests; ``large`` — SeamlessM4T v2 large as its public configuration gives it
(transformers' ``SeamlessM4Tv2Config`` defaults, which describe ``facebook/seamless-m4t-v2-large``):
model dimension 1024; speech encoder 24 Conformer layers, 16 heads, feed-forward 4096; text encoder and
decoder 24 layers each, 16 heads, feed-forward 8192, vocabulary 256102; text-to-unit 6 + 6 layers,
feed-forward 8192, 10082 unit symbols, 10943 characters; vocoder 10000 units, unit embedding 1280,
36 languages, 200 speakers, upsampling from 512 channels by 5, 4, 4, 2, 2 with kernels 11, 8, 8, 4, 4.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SeamlessConfig", "Seamless", "TextDecoderLM", "CrossAttentionState", "SubwordChars", "CONFIGS", "build",
           "fbank", "from_pretrained", "output_frames"]


STAND_IN_LANGUAGES = ("eng", "fra", "deu", "spa")


@dataclass
class SeamlessConfig:
    vocab_size: int = 256102
    dim: int = 1024
    heads: int = 16
    ffn_dim: int = 8192
    text_encoder_layers: int = 24
    text_decoder_layers: int = 24
    # speech encoder
    speech_layers: int = 24
    speech_heads: int = 16
    speech_ffn_dim: int = 4096
    feature_dim: int = 160  # 80 mel bins x 2 stacked frames
    conv_kernel: int = 31
    left_positions: int = 64
    right_positions: int = 8
    adaptor_kernel: int = 8
    adaptor_stride: int = 8
    adaptor_layers: int = 1
    # text-to-unit
    t2u_encoder_layers: int = 6
    t2u_decoder_layers: int = 6
    t2u_heads: int = 16
    t2u_ffn_dim: int = 8192
    unit_vocab_size: int = 10082
    char_vocab_size: int = 10943
    duration_hidden: int = 256
    duration_kernel: int = 3
    # vocoder
    vocoder_units: int = 10000
    unit_embed_dim: int = 1280
    lang_embed_dim: int = 256
    speaker_embed_dim: int = 256
    vocoder_langs: int = 36
    vocoder_speakers: int = 200
    upsample_initial_channel: int = 512
    upsample_rates: tuple = (5, 4, 4, 2, 2)
    upsample_kernels: tuple = (11, 8, 8, 4, 4)
    resblock_kernels: tuple = (3, 7, 11)
    resblock_dilations: tuple = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    leaky_relu_slope: float = 0.1
    # tokens and lengths
    max_positions: int = 4096
    max_seq_len: int = 256  # the decoder's self-attention cache, target tokens
    max_source_len: int = 1024  # the cross-attention cache, encoder states
    pad_id: int = 0
    bos_id: int = 2
    eos_id: int = 3
    unit_pad_id: int = 1
    unit_eos_id: int = 2
    vocoder_offset: int = 4  # unit symbols below this are control symbols
    eps: float = 1e-5
    # "sdpa": F.scaled_dot_product_attention; "eager": the math written out as the public code does
    # (q @ kᵀ * scale + biases, fp32 softmax, @ v), which the fuse_attention pass turns back into SDPA
    attn_impl: str = "sdpa"
    sample_rate: int = 16000
    n_mels: int = 80
    # target-language tokens the decoder starts from (after eos), and the vocoder's language ids. A
    # checkpoint's generation_config.json gives the real ones; random models take the vocabulary's last
    # ids and the vocoder's first ones as stand-ins.
    languages: dict | None = None
    vocoder_languages: dict | None = None

    def __post_init__(self):
        for name in ("heads", "speech_heads", "t2u_heads"):
            if self.dim % getattr(self, name):
                raise ValueError(f"dim={self.dim} is not divisible by {name}={getattr(self, name)}")
        if self.attn_impl not in ("sdpa", "eager"):
            raise ValueError(f"attn_impl must be 'sdpa' or 'eager', got {self.attn_impl!r}")
        if self.conv_kernel % 2 == 0:
            raise ValueError(f"conv_kernel={self.conv_kernel} must be odd")
        if self.feature_dim != 2 * self.n_mels:
            raise ValueError(f"feature_dim={self.feature_dim} must be 2 * n_mels={2 * self.n_mels} (two stacked frames)")
        if self.languages is None:
            self.languages = {lang: self.vocab_size - 4 + i for i, lang in enumerate(STAND_IN_LANGUAGES)}
        if self.vocoder_languages is None:
            self.vocoder_languages = {lang: i for i, lang in enumerate(STAND_IN_LANGUAGES[:self.vocoder_langs])}
        for lang, token in self.languages.items():
            if not 0 <= token < self.vocab_size:
                raise ValueError(f"language {lang!r} token {token} is outside the vocabulary of {self.vocab_size}")
        for lang, index in self.vocoder_languages.items():
            if not 0 <= index < self.vocoder_langs:
                raise ValueError(f"vocoder language {lang!r} id {index} is outside its {self.vocoder_langs} languages")

    @property
    def samples_per_frame(self) -> int:
        return math.prod(self.upsample_rates)


CONFIGS = {
    "tiny": SeamlessConfig(vocab_size=96, dim=32, heads=4, ffn_dim=64, text_encoder_layers=2, text_decoder_layers=2,
                           speech_layers=2, speech_heads=4, speech_ffn_dim=64, feature_dim=16, n_mels=8,
                           left_positions=8, right_positions=2, conv_kernel=5, adaptor_kernel=4, adaptor_stride=4,
                           t2u_encoder_layers=1, t2u_decoder_layers=2, t2u_heads=4, t2u_ffn_dim=64,
                           unit_vocab_size=40, char_vocab_size=30, duration_hidden=16, vocoder_units=36,
                           unit_embed_dim=16, lang_embed_dim=4, speaker_embed_dim=4, vocoder_langs=4,
                           vocoder_speakers=2, upsample_initial_channel=16, upsample_rates=(4, 2),
                           upsample_kernels=(8, 4), resblock_kernels=(3, 5), resblock_dilations=((1, 3), (1, 3)),
                           max_positions=512, max_seq_len=48, max_source_len=64),
    "large": SeamlessConfig(),
}


# --------------------------------------------------------------------------------------------- pieces

def sinusoidal_table(num_positions: int, dim: int, padding_idx: int) -> Tensor:
    """The fairseq/NLLB sinusoidal position table (sin half, then cos half), row ``padding_idx`` zero."""
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    angles = torch.arange(num_positions, dtype=torch.float32)[:, None] * freq[None]
    table = torch.cat([angles.sin(), angles.cos()], dim=1)
    if dim % 2:
        table = torch.cat([table, torch.zeros(num_positions, 1)], dim=1)
    table[padding_idx] = 0
    return table


class SinusoidalPositions(nn.Module):
    """Positions ``p`` (0-based) read row ``p + padding_idx + 1`` of the table, as in NLLB."""

    def __init__(self, num_positions: int, dim: int, padding_idx: int):
        super().__init__()
        self.offset = padding_idx + 1
        self.register_buffer("weights", sinusoidal_table(num_positions + self.offset, dim, padding_idx),
                             persistent=False)

    def forward(self, positions: Tensor) -> Tensor:
        return self.weights[positions + self.offset]


def _heads(x: Tensor, heads: int) -> Tensor:
    b, s, d = x.shape
    return x.view(b, s, heads, d // heads).transpose(1, 2)


def _merge(x: Tensor) -> Tensor:
    b, h, s, d = x.shape
    return x.transpose(1, 2).reshape(b, s, h * d)


def key_padding_bias(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """[B, S] bool (True = real) -> additive [B, 1, 1, S]: 0 or the dtype's minimum."""
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    return torch.where(mask, zero, torch.finfo(dtype).min)[:, None, None, :]


def attend(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, written_out: bool = False) -> Tensor:
    """softmax(q @ kᵀ / sqrt(D) + bias) @ v; ``bias`` additive or boolean (True = visible)."""
    if not written_out:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    scores = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5
    if bias is not None:
        scores = scores.masked_fill(~bias, torch.finfo(scores.dtype).min) if bias.dtype == torch.bool else scores + bias
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)


class Attention(nn.Module):
    """Multi-head attention with biased projections (q_proj, k_proj, v_proj, out_proj)."""

    def __init__(self, dim: int, heads: int, written_out: bool = False):
        super().__init__()
        self.heads, self.written_out = heads, written_out
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: Tensor, bias: Tensor | None, states: Tensor | None = None) -> Tensor:
        states = x if states is None else states
        q, k, v = _heads(self.q_proj(x), self.heads), _heads(self.k_proj(states), self.heads), \
            _heads(self.v_proj(states), self.heads)
        return self.out_proj(_merge(attend(q, k, v, bias, self.written_out)))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.relu(self.fc1(x)))


class EncoderLayer(nn.Module):
    """Pre-norm Transformer encoder layer (text encoder, text-to-unit encoder)."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, eps: float, written_out: bool = False):
        super().__init__()
        self.self_attn = Attention(dim, heads, written_out)
        self.self_attn_layer_norm = nn.LayerNorm(dim, eps=eps)
        self.ffn = FeedForward(dim, ffn_dim)
        self.ffn_layer_norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), bias)
        return x + self.ffn(self.ffn_layer_norm(x))


class TextEncoder(nn.Module):
    """Token embeddings (scaled by sqrt(dim)) and positions, pre-norm layers, a final LayerNorm.
    Without ``embed_tokens`` (the text-to-unit encoder) it reads embeddings directly."""

    def __init__(self, config: SeamlessConfig, layers: int, heads: int, ffn_dim: int, embed: bool = True):
        super().__init__()
        self.embed_scale = math.sqrt(config.dim)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim, config.pad_id) if embed else None
        self.embed_positions = SinusoidalPositions(config.max_positions, config.dim, config.pad_id) if embed else None
        self.layers = nn.ModuleList(EncoderLayer(config.dim, heads, ffn_dim, config.eps, config.attn_impl == "eager")
                                    for _ in range(layers))
        self.layer_norm = nn.LayerNorm(config.dim, eps=config.eps)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """x: token ids [B, S] (or embeddings [B, S, D] without embed_tokens); mask [B, S] bool."""
        if self.embed_tokens is not None:
            positions = torch.arange(x.shape[1], device=x.device)[None]
            x = self.embed_tokens(x) * self.embed_scale + self.embed_positions(positions).to(self.layer_norm.weight.dtype)
        bias = key_padding_bias(mask, x.dtype)
        for layer in self.layers:
            x = layer(x, bias)
        return self.layer_norm(x)


# ------------------------------------------------------------------------------------ speech encoder

class ConformerFeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, act=F.silu):
        super().__init__()
        self.intermediate_dense, self.output_dense = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        return self.output_dense(self.act(self.intermediate_dense(x)))


class ConformerSelfAttention(nn.Module):
    """Self-attention with relative-position keys: scores gain ``q_i · e[clamp(j - i, -left, right)]``."""

    def __init__(self, config: SeamlessConfig, relative: bool = True):
        super().__init__()
        dim, self.heads = config.dim, config.speech_heads
        self.linear_q, self.linear_k, self.linear_v, self.linear_out = (nn.Linear(dim, dim) for _ in range(4))
        self.left, self.right = config.left_positions, config.right_positions
        self.written_out = config.attn_impl == "eager"
        self.distance_embedding = (nn.Embedding(self.left + self.right + 1, dim // self.heads) if relative else None)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        q, k, v = (_heads(proj(x), self.heads) for proj in (self.linear_q, self.linear_k, self.linear_v))
        if self.distance_embedding is not None:
            n = x.shape[1]
            steps = torch.arange(n, device=x.device)
            distance = (steps[None, :] - steps[:, None]).clamp(-self.left, self.right) + self.left
            table = self.distance_embedding(distance).to(q.dtype)  # [N, N, D]
            bias = bias + torch.einsum("bhld,lrd->bhlr", q, table) / math.sqrt(q.shape[-1])
        return self.linear_out(_merge(attend(q, k, v, bias, self.written_out)))


class ConformerConvolution(nn.Module):
    def __init__(self, config: SeamlessConfig):
        super().__init__()
        dim = config.dim
        self.layer_norm = nn.LayerNorm(dim)
        self.pointwise_conv1 = nn.Conv1d(dim, 2 * dim, 1, bias=False)
        self.depthwise_conv = nn.Conv1d(dim, dim, config.conv_kernel, groups=dim, bias=False)
        self.depthwise_layer_norm = nn.LayerNorm(dim)
        self.pointwise_conv2 = nn.Conv1d(dim, dim, 1, bias=False)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = self.layer_norm(x).masked_fill(~mask[..., None], 0.0).transpose(1, 2)
        x = F.glu(self.pointwise_conv1(x), dim=1)
        x = self.depthwise_conv(F.pad(x, (self.depthwise_conv.kernel_size[0] - 1, 0)))  # causal
        x = F.silu(self.depthwise_layer_norm(x.transpose(1, 2)).transpose(1, 2))
        return self.pointwise_conv2(x).transpose(1, 2)


class ConformerLayer(nn.Module):
    def __init__(self, config: SeamlessConfig):
        super().__init__()
        dim = config.dim
        self.ffn1_layer_norm, self.ffn1 = nn.LayerNorm(dim), ConformerFeedForward(dim, config.speech_ffn_dim)
        self.self_attn_layer_norm, self.self_attn = nn.LayerNorm(dim), ConformerSelfAttention(config)
        self.conv_module = ConformerConvolution(config)
        self.ffn2_layer_norm, self.ffn2 = nn.LayerNorm(dim), ConformerFeedForward(dim, config.speech_ffn_dim)
        self.final_layer_norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, bias: Tensor, mask: Tensor) -> Tensor:
        x = x + 0.5 * self.ffn1(self.ffn1_layer_norm(x))
        x = x + self.self_attn(self.self_attn_layer_norm(x), bias)
        x = x + self.conv_module(x, mask)
        x = x + 0.5 * self.ffn2(self.ffn2_layer_norm(x))
        return self.final_layer_norm(x)


class ConformerEncoder(nn.Module):
    def __init__(self, config: SeamlessConfig):
        super().__init__()
        self.layers = nn.ModuleList(ConformerLayer(config) for _ in range(config.speech_layers))
        self.layer_norm = nn.LayerNorm(config.dim, eps=config.eps)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = x.masked_fill(~mask[..., None], 0.0)
        bias = key_padding_bias(mask, x.dtype)
        for layer in self.layers:
            x = layer(x, bias, mask)
        return self.layer_norm(x)


def adaptor_lengths(lengths: Tensor, kernel: int, stride: int) -> Tensor:
    """Frames after one strided convolution of the adaptor (padding stride // 2)."""
    return torch.div(lengths + 2 * (stride // 2) - kernel, stride, rounding_mode="floor") + 1


class AdaptorLayer(nn.Module):
    """A Transformer layer whose residual and attention inputs are shortened by strided convolutions."""

    def __init__(self, config: SeamlessConfig):
        super().__init__()
        dim, k, s = config.dim, config.adaptor_kernel, config.adaptor_stride
        self.kernel, self.stride = k, s
        self.residual_layer_norm = nn.LayerNorm(dim)
        self.residual_conv = nn.Conv1d(dim, 2 * dim, k, stride=s, padding=s // 2)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.self_attn_conv = nn.Conv1d(dim, 2 * dim, k, stride=s, padding=s // 2)
        self.self_attn = ConformerSelfAttention(config, relative=False)
        self.ffn_layer_norm = nn.LayerNorm(dim)
        self.ffn = ConformerFeedForward(dim, config.speech_ffn_dim, act=F.relu)

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        x = x.masked_fill(~mask[..., None], 0.0)  # padding never reaches a real frame's window
        residual = F.glu(self.residual_conv(self.residual_layer_norm(x).transpose(1, 2)), dim=1).transpose(1, 2)
        h = F.glu(self.self_attn_conv(self.self_attn_layer_norm(x).transpose(1, 2)), dim=1).transpose(1, 2)
        lengths = adaptor_lengths(mask.sum(1), self.kernel, self.stride)
        mask = torch.arange(h.shape[1], device=h.device)[None] < lengths[:, None]
        h = self.self_attn(h, key_padding_bias(mask, h.dtype)) + residual
        return h + self.ffn(self.ffn_layer_norm(h)), mask


class SpeechEncoder(nn.Module):
    def __init__(self, config: SeamlessConfig):
        super().__init__()
        self.feature_projection = nn.Module()
        self.feature_projection.layer_norm = nn.LayerNorm(config.feature_dim, eps=config.eps)
        self.feature_projection.projection = nn.Linear(config.feature_dim, config.dim)
        self.encoder = ConformerEncoder(config)
        self.intermediate_ffn = ConformerFeedForward(config.dim, config.speech_ffn_dim, act=F.relu)
        self.adapter = nn.Module()
        self.adapter.layers = nn.ModuleList(AdaptorLayer(config) for _ in range(config.adaptor_layers))
        self.inner_layer_norm = nn.LayerNorm(config.dim)

    def forward(self, features: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """features [B, T, 160] (padded), mask [B, T] bool -> states [B, S, D] and their mask [B, S]."""
        fp = self.feature_projection
        x = fp.projection(fp.layer_norm(features))
        x = self.encoder(x, mask)
        x = x + 0.5 * self.intermediate_ffn(x)
        for layer in self.adapter.layers:
            x, mask = layer(x, mask)
        return self.inner_layer_norm(x), mask


# -------------------------------------------------------------------------------------- text decoder

class DecoderLayer(nn.Module):
    def __init__(self, config: SeamlessConfig):
        super().__init__()
        dim = config.dim
        eager = config.attn_impl == "eager"
        self.self_attn, self.self_attn_layer_norm = Attention(dim, config.heads, eager), nn.LayerNorm(dim, eps=config.eps)
        self.cross_attention = Attention(dim, config.heads, eager)
        self.cross_attention_layer_norm = nn.LayerNorm(dim, eps=config.eps)
        self.ffn, self.ffn_layer_norm = FeedForward(dim, config.ffn_dim), nn.LayerNorm(dim, eps=config.eps)

    def forward(self, x: Tensor, mask: Tensor, index: tuple, layer_cache: tuple, source_bias: Tensor) -> Tensor:
        k_cache, v_cache, cross_k, cross_v = layer_cache
        heads = self.self_attn.heads
        h = self.self_attn_layer_norm(x)
        q = _heads(self.self_attn.q_proj(h), heads)
        k_cache.index_put_(index, _heads(self.self_attn.k_proj(h), heads))
        v_cache.index_put_(index, _heads(self.self_attn.v_proj(h), heads))
        y = attend(q, k_cache, v_cache, mask, self.self_attn.written_out)
        x = x + self.self_attn.out_proj(_merge(y))
        h = self.cross_attention_layer_norm(x)
        q = _heads(self.cross_attention.q_proj(h), heads)
        y = attend(q, cross_k, cross_v, source_bias, self.cross_attention.written_out)
        x = x + self.cross_attention.out_proj(_merge(y))
        return x + self.ffn(self.ffn_layer_norm(x))


class TextDecoder(nn.Module):
    def __init__(self, config: SeamlessConfig):
        super().__init__()
        self.embed_scale = math.sqrt(config.dim)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim, config.pad_id)
        self.embed_positions = SinusoidalPositions(config.max_positions, config.dim, config.pad_id)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.text_decoder_layers))
        self.layer_norm = nn.LayerNorm(config.dim, eps=config.eps)


# ------------------------------------------------------------------------------------- text-to-unit

class VariancePredictor(nn.Module):
    """Two convolutions with ReLU and LayerNorm, then one value per position (a log duration)."""

    def __init__(self, dim: int, hidden: int, kernel: int):
        super().__init__()
        self.conv1 = nn.Conv1d(dim, hidden, kernel, padding="same")
        self.ln1 = nn.LayerNorm(hidden)
        self.conv2 = nn.Conv1d(hidden, hidden, kernel, padding="same")
        self.ln2 = nn.LayerNorm(hidden)
        self.proj = nn.Linear(hidden, 1)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        if mask is not None:
            x = x.masked_fill(~mask[..., None], 0.0)
        x = self.ln1(F.relu(self.conv1(x.transpose(1, 2))).transpose(1, 2))
        if mask is not None:
            x = x.masked_fill(~mask[..., None], 0.0)
        x = self.ln2(F.relu(self.conv2(x.transpose(1, 2))).transpose(1, 2))
        return self.proj(x).squeeze(-1)


def durations_from_log(log_duration: Tensor, mask: Tensor) -> Tensor:
    """round(exp(d) - 1), at least 1 on real positions, 0 on padding."""
    return torch.clamp(torch.round(torch.expm1(log_duration)).long(), min=1).masked_fill(~mask, 0)


class UnitDecoderLayer(nn.Module):
    """Post-norm: self-attention, then a feed-forward of two 7-tap convolutions."""

    def __init__(self, config: SeamlessConfig):
        super().__init__()
        dim = config.dim
        self.self_attn = Attention(dim, config.t2u_heads, config.attn_impl == "eager")
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.conv1 = nn.Conv1d(dim, dim, 7, padding="same")
        self.conv2 = nn.Conv1d(dim, dim, 7, padding="same")
        self.conv_layer_norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, bias: Tensor, mask: Tensor) -> Tensor:
        x = self.self_attn_layer_norm(x + self.self_attn(x, bias))
        h = self.conv1(x.masked_fill(~mask[..., None], 0.0).transpose(1, 2)).transpose(1, 2)
        h = self.conv2(F.relu(h.masked_fill(~mask[..., None], 0.0)).transpose(1, 2)).transpose(1, 2)
        return self.conv_layer_norm(x + h)


class UnitDecoder(nn.Module):
    def __init__(self, config: SeamlessConfig):
        super().__init__()
        dim = config.dim
        self.embed_scale = math.sqrt(dim)
        # unit embeddings: in the checkpoint, read by no step of the non-autoregressive decoder
        self.embed_tokens = nn.Embedding(config.unit_vocab_size, dim, config.unit_pad_id)
        self.embed_char = nn.Embedding(config.char_vocab_size, dim)
        self.embed_char_positions = SinusoidalPositions(config.max_positions, dim, config.unit_pad_id)
        self.pos_emb_alpha_char = nn.Parameter(torch.ones(1))
        self.pos_emb_alpha = nn.Parameter(torch.ones(1))
        self.duration_predictor = VariancePredictor(dim, config.duration_hidden, config.duration_kernel)
        self.embed_positions = SinusoidalPositions(config.max_positions, dim, config.unit_pad_id)
        self.layers = nn.ModuleList(UnitDecoderLayer(config) for _ in range(config.t2u_decoder_layers))
        self.layer_norm = nn.LayerNorm(dim)


class TextToUnit(nn.Module):
    def __init__(self, config: SeamlessConfig):
        super().__init__()
        self.model = nn.Module()
        self.model.encoder = TextEncoder(config, config.t2u_encoder_layers, config.t2u_heads, config.t2u_ffn_dim,
                                         embed=False)
        self.model.decoder = UnitDecoder(config)
        self.lm_head = nn.Linear(config.dim, config.unit_vocab_size, bias=False)


def _gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """x [B, N, D], index [B, M] -> x[b, index[b, m]] [B, M, D]."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


def repeat_index(durations: Tensor, total: int | None = None) -> tuple[Tensor, Tensor]:
    """Source index [B, M] and mask [B, M] that repeat position n of each row durations[b, n] times
    (``repeat_interleave`` per row, padded to ``total`` or the longest row)."""
    lengths = durations.sum(1)
    total = int(lengths.max()) if total is None else total
    ends = durations.cumsum(1)
    steps = torch.arange(total, device=durations.device)
    index = torch.searchsorted(ends, steps.expand(durations.shape[0], total).contiguous(), right=True)
    mask = steps[None] < lengths[:, None]
    return index.clamp(max=durations.shape[1] - 1).masked_fill(~mask, 0), mask


# ------------------------------------------------------------------------------------------- vocoder

def _masked(x: Tensor, mask: Tensor | None) -> Tensor:
    return x if mask is None else x * mask


class ResBlock(nn.Module):
    def __init__(self, channels: int, kernel: int, dilations: tuple, slope: float):
        super().__init__()
        self.slope = slope
        self.convs1 = nn.ModuleList(nn.Conv1d(channels, channels, kernel, dilation=d, padding=(kernel * d - d) // 2)
                                    for d in dilations)
        self.convs2 = nn.ModuleList(nn.Conv1d(channels, channels, kernel, padding=(kernel - 1) // 2)
                                    for _ in dilations)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        for conv1, conv2 in zip(self.convs1, self.convs2):
            x = x + conv2(_masked(F.leaky_relu(conv1(_masked(F.leaky_relu(x, self.slope), mask)), self.slope), mask))
        return x


class HiFiGAN(nn.Module):
    def __init__(self, config: SeamlessConfig):
        super().__init__()
        c = config.upsample_initial_channel
        self.slope, self.kernels = config.leaky_relu_slope, len(config.resblock_kernels)
        in_dim = config.unit_embed_dim + config.lang_embed_dim + config.speaker_embed_dim
        self.conv_pre = nn.Conv1d(in_dim, c, 7, padding=3)
        self.upsampler = nn.ModuleList(
            nn.ConvTranspose1d(c // 2 ** i, c // 2 ** (i + 1), k, stride=r, padding=(k - r) // 2)
            for i, (r, k) in enumerate(zip(config.upsample_rates, config.upsample_kernels)))
        self.resblocks = nn.ModuleList(
            ResBlock(c // 2 ** (i + 1), k, d, config.leaky_relu_slope)
            for i in range(len(self.upsampler)) for k, d in zip(config.resblock_kernels, config.resblock_dilations))
        self.conv_post = nn.Conv1d(c // 2 ** len(self.upsampler), 1, 7, padding=3)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x [B, C, F] -> waveform [B, F * prod(upsample_rates)]. With ``mask`` [B, F] (True = a real
        frame), every convolution reads zeros past each row's last real frame, at every resolution — what
        it reads past the end of an unpadded input — so a row's samples do not depend on the padding."""
        m = None if mask is None else mask[:, None].to(x.dtype)
        x = self.conv_pre(_masked(x, m))
        for i, up in enumerate(self.upsampler):
            x = up(_masked(F.leaky_relu(x, self.slope), m))
            if m is not None:
                m = m.repeat_interleave(up.stride[0], dim=2)
            blocks = self.resblocks[i * self.kernels:(i + 1) * self.kernels]
            x = sum(block(x, m) for block in blocks) / self.kernels
        return torch.tanh(self.conv_post(_masked(F.leaky_relu(x), m))).squeeze(1)

    def weight_normed(self) -> list[nn.Module]:
        return [self.conv_pre, *self.upsampler, *(c for b in self.resblocks for c in (*b.convs1, *b.convs2)),
                self.conv_post]


class Vocoder(nn.Module):
    def __init__(self, config: SeamlessConfig):
        super().__init__()
        self.dur_predictor = VariancePredictor(config.unit_embed_dim, config.unit_embed_dim, config.duration_kernel)
        self.unit_embedding = nn.Embedding(config.vocoder_units, config.unit_embed_dim)
        self.speaker_embedding = nn.Embedding(config.vocoder_speakers, config.speaker_embed_dim)
        self.language_embedding = nn.Embedding(config.vocoder_langs, config.lang_embed_dim)
        self.hifi_gan = HiFiGAN(config)
        for conv in self.hifi_gan.weight_normed():
            nn.utils.parametrizations.weight_norm(conv)


def output_frames(config: SeamlessConfig, frames: Tensor | int):
    """Waveform samples the vocoder writes for ``frames`` unit frames."""
    return frames * config.samples_per_frame


# --------------------------------------------------------------------------------------------- model

class Seamless(nn.Module):
    """The whole model; the ``*_phase`` methods are the pieces ``mmcompile.runtime.seamless`` compiles."""

    def __init__(self, config: SeamlessConfig):
        super().__init__()
        self.config = config
        self.speech_encoder = SpeechEncoder(config)
        self.text_encoder = TextEncoder(config, config.text_encoder_layers, config.heads, config.ffn_dim)
        self.text_decoder = TextDecoder(config)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.t2u_model = TextToUnit(config)
        self.vocoder = Vocoder(config)
        self.tie_weights()

    def tie_weights(self) -> None:
        """The public model ties the text embeddings to the LM head, and the unit embeddings to the unit head."""
        self.text_encoder.embed_tokens.weight = self.text_decoder.embed_tokens.weight
        self.lm_head.weight = self.text_decoder.embed_tokens.weight
        self.t2u_model.lm_head.weight = self.t2u_model.model.decoder.embed_tokens.weight

    # phases: plain tensors in, plain tensors out, static shapes for a given padding
    def encode_speech(self, features: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        return self.speech_encoder(features, mask)

    def encode_text(self, tokens: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        return self.text_encoder(tokens, mask), mask

    def t2u_characters(self, hidden: Tensor, token_mask: Tensor, char_index: Tensor, char_ids: Tensor,
                       char_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Text decoder states [B, N, D] -> character states [B, C, D] and their durations [B, C] in unit
        frames. ``char_index[b, c]`` is the token character c belongs to."""
        dec = self.t2u_model.model.decoder
        x = self.t2u_model.model.encoder(hidden, token_mask)
        x = _gather_rows(x, char_index)
        positions = torch.arange(x.shape[1], device=x.device)[None]
        pos = dec.embed_char_positions(positions).to(x.dtype).masked_fill(~char_mask[..., None], 0.0)
        x = dec.embed_char(char_ids) * dec.embed_scale + dec.pos_emb_alpha_char * pos + x
        return x, durations_from_log(dec.duration_predictor(x, char_mask), char_mask)

    def t2u_units(self, chars: Tensor, frame_index: Tensor, frame_mask: Tensor) -> Tensor:
        """Character states repeated to unit frames ([B, F] index and mask) -> unit ids [B, F] for the
        vocoder (control symbols and padding become the unit pad id)."""
        dec, cfg = self.t2u_model.model.decoder, self.config
        x = _gather_rows(chars, frame_index)
        positions = torch.arange(x.shape[1], device=x.device)[None]
        pos = dec.embed_positions(positions).to(x.dtype).masked_fill(~frame_mask[..., None], 0.0)
        x = x + dec.pos_emb_alpha * pos
        bias = key_padding_bias(frame_mask, x.dtype)
        for layer in dec.layers:
            x = layer(x, bias, frame_mask)
        units = self.t2u_model.lm_head(dec.layer_norm(x)).argmax(-1)
        pad = torch.full_like(units, cfg.unit_pad_id)
        keep = frame_mask & (units != cfg.unit_eos_id) & (units != cfg.unit_pad_id)
        return torch.where(keep, (units - cfg.vocoder_offset).clamp(min=0), pad)

    def unit_durations(self, units: Tensor, unit_mask: Tensor) -> Tensor:
        """Units [B, U] -> frames per unit [B, U] (0 on padding)."""
        emb = self.vocoder.unit_embedding(units)
        return durations_from_log(self.vocoder.dur_predictor(emb, unit_mask), unit_mask)

    def vocode(self, units: Tensor, frame_index: Tensor, frame_mask: Tensor, lang: Tensor, speaker: Tensor) -> Tensor:
        """Units repeated to frames -> waveform [B, F * samples_per_frame] in [-1, 1]."""
        voc = self.vocoder
        x = _gather_rows(voc.unit_embedding(units), frame_index).masked_fill(~frame_mask[..., None], 0.0)
        f = x.shape[1]
        lang_e = voc.language_embedding(lang)[:, None].expand(-1, f, -1)
        spk_e = voc.speaker_embedding(speaker)[:, None].expand(-1, f, -1)
        return voc.hifi_gan(torch.cat([lang_e, x, spk_e], dim=2).transpose(1, 2), frame_mask)


class TextDecoderLM(nn.Module):
    """The text decoder and LM head under the generation protocol (see the module docstring).

    ``output="hidden"`` returns the final LayerNorm's states instead of logits (the text-to-unit model's
    input)."""

    def __init__(self, model: Seamless, output: str = "logits"):
        super().__init__()
        if output not in ("logits", "hidden"):
            raise ValueError(f"output must be 'logits' or 'hidden', got {output!r}")
        self.model, self.output = model, output
        self.config = replace(model.config)

    def empty_cache(self, batch: int, max_seq_len: int | None = None, *, device=None, dtype=None,
                    max_source_len: int | None = None) -> list[tuple[Tensor, ...]]:
        cfg = self.config
        param = self.model.lm_head.weight
        device, dtype = device or param.device, dtype or param.dtype
        hd = cfg.dim // cfg.heads
        self_shape = (batch, cfg.heads, max_seq_len or cfg.max_seq_len, hd)
        cross_shape = (batch, cfg.heads, max_source_len or cfg.max_source_len, hd)
        layers = [tuple(torch.zeros(s, device=device, dtype=dtype) for s in (self_shape, self_shape, cross_shape,
                                                                              cross_shape))
                  for _ in range(cfg.text_decoder_layers)]
        source = torch.full((batch, 1, 1, cross_shape[2]), torch.finfo(dtype).min, device=device, dtype=dtype)
        return layers + [(source,)]

    def forward(self, tokens: Tensor, input_pos: Tensor, cache: list, output_pos: Tensor | None = None) -> Tensor:
        dec = self.model.text_decoder
        if len(cache) != len(dec.layers) + 1:
            raise ValueError(f"cache has {len(cache)} entries; the decoder needs {len(dec.layers)} layers + the "
                             "source mask (use empty_cache)")
        (source_bias,) = cache[-1]
        b, s = tokens.shape
        max_len = cache[0][0].shape[2]
        x = dec.embed_tokens(tokens) * dec.embed_scale + dec.embed_positions(input_pos).to(dec.layer_norm.weight.dtype)
        slots = torch.arange(max_len, device=tokens.device)
        mask = (slots[None, None, :] <= input_pos[:, :, None]).unsqueeze(1)  # [B, 1, S, L]
        rows = torch.arange(b, device=tokens.device)[:, None, None]
        heads = torch.arange(self.config.heads, device=tokens.device)[None, :, None]
        index = (rows, heads, input_pos[:, None, :])
        for layer, layer_cache in zip(dec.layers, cache):
            x = layer(x, mask, index, layer_cache, source_bias)
        x = dec.layer_norm(x)
        if output_pos is not None:
            x = x[torch.arange(b, device=x.device), output_pos][:, None]
        return x if self.output == "hidden" else self.model.lm_head(x)


class CrossAttentionState(nn.Module):
    """Fills the decoder cache's cross-attention keys and values and its source mask, in place, from
    encoder states [B, S, D] and their mask [B, S], padded to the cache's batch and source length.
    Returns the source mask it wrote."""

    def __init__(self, model: Seamless):
        super().__init__()
        self.model = model

    def forward(self, states: Tensor, mask: Tensor, cache: list) -> Tensor:
        dec = self.model.text_decoder
        (source_bias,) = cache[-1]
        if tuple(states.shape[:2]) != (source_bias.shape[0], source_bias.shape[-1]):
            raise ValueError(f"states of shape {tuple(states.shape)} must be padded to the cache's batch and source "
                             f"length {source_bias.shape[0], source_bias.shape[-1]}")
        source_bias.copy_(key_padding_bias(mask, source_bias.dtype))
        for layer, (_, _, ck, cv) in zip(dec.layers, cache):
            attn = layer.cross_attention
            ck.copy_(_heads(attn.k_proj(states), attn.heads))
            cv.copy_(_heads(attn.v_proj(states), attn.heads))
        return source_bias.clone()


# ------------------------------------------------------------------------------------------ features

def mel_filters(n_mels: int, n_fft: int, sample_rate: int, low: float = 20.0) -> Tensor:
    """Triangular filters on Kaldi's mel scale, [n_fft // 2 + 1, n_mels]."""
    def mel(f):
        return 1127.0 * torch.log1p(torch.as_tensor(f, dtype=torch.float64) / 700.0)

    edges = torch.linspace(float(mel(low)), float(mel(sample_rate / 2)), n_mels + 2, dtype=torch.float64)
    bins = mel(torch.arange(n_fft // 2 + 1, dtype=torch.float64) * sample_rate / n_fft)
    left, center, right = edges[:-2], edges[1:-1], edges[2:]
    up = (bins[:, None] - left) / (center - left)
    down = (right - bins[:, None]) / (right - center)
    return torch.clamp(torch.minimum(up, down), min=0).float()


def fbank(waveform: Tensor, config: SeamlessConfig) -> Tensor:
    """Log-mel features of a mono waveform [T] in [-1, 1] at ``config.sample_rate``: 25 ms Povey windows
    every 10 ms with pre-emphasis 0.97, ``config.n_mels`` bins, normalized per bin over the utterance, then
    two frames stacked -> [frames // 2, 2 * n_mels] (the model's ``feature_dim``)."""
    sr = config.sample_rate
    win, hop, n_fft = int(0.025 * sr), int(0.010 * sr), 512
    wave = waveform.double().flatten() * 32768.0  # Kaldi's scale for 16-bit audio
    if wave.numel() < win:
        raise ValueError(f"the waveform has {wave.numel()} samples; at least {win} (25 ms) are needed")
    frames = wave.unfold(0, win, hop)
    frames = frames - frames.mean(1, keepdim=True)
    frames = torch.cat([frames[:, :1] * (1 - 0.97), frames[:, 1:] - 0.97 * frames[:, :-1]], dim=1)
    window = torch.hann_window(win, periodic=False, dtype=torch.float64).pow(0.85)
    spectrum = torch.fft.rfft(frames * window, n=n_fft).abs().pow(2)
    feats = torch.log(torch.clamp(spectrum.float() @ mel_filters(config.n_mels, n_fft, sr), min=1.1920929e-07))
    feats = (feats - feats.mean(0)) / torch.sqrt(feats.var(0, unbiased=True) + 1e-7) if feats.shape[0] > 1 else feats * 0
    usable = feats.shape[0] // 2 * 2
    return feats[:usable].reshape(usable // 2, 2 * config.n_mels)


# ---------------------------------------------------------------------------------------- characters

class SubwordChars:
    """Each token id's characters: ``counts[token]`` and ``ids[token, :count]`` (character ids)."""

    def __init__(self, counts: Tensor, ids: Tensor):
        if counts.dim() != 1 or ids.dim() != 2 or ids.shape[0] != counts.shape[0]:
            raise ValueError(f"counts [V] and ids [V, C] disagree: {tuple(counts.shape)} vs {tuple(ids.shape)}")
        self.counts, self.ids = counts.long(), ids.long()

    @classmethod
    def random(cls, config: SeamlessConfig, seed: int = 0, max_chars: int = 3) -> "SubwordChars":
        g = torch.Generator().manual_seed(seed)
        counts = torch.randint(1, max_chars + 1, (config.vocab_size,), generator=g)
        return cls(counts, torch.randint(4, config.char_vocab_size, (config.vocab_size, max_chars), generator=g))

    @classmethod
    def from_vocabulary(cls, pieces: list[str], char_to_id: dict[str, int], unk_id: int = 1) -> "SubwordChars":
        """From a tokenizer's pieces (SentencePiece's word-start marker counts as a space)."""
        texts = [p.replace("\u2581", " ") for p in pieces]
        width = max(1, max(len(t) for t in texts))
        ids = torch.zeros(len(texts), width, dtype=torch.long)
        for i, t in enumerate(texts):
            if t:
                ids[i, :len(t)] = torch.tensor([char_to_id.get(c, unk_id) for c in t])
        return cls(torch.tensor([len(t) for t in texts]), ids)

    def layout(self, tokens: Tensor, token_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """For token rows [B, N] (mask: which tokens speak; others get no characters) -> char_index,
        char_ids, char_mask, each [B, C]."""
        tokens = tokens.cpu()
        counts = torch.where(token_mask.cpu(), self.counts[tokens], 0)
        index, mask = repeat_index(counts, max(1, int(counts.sum(1).max())))
        starts = counts.cumsum(1) - counts
        offset = torch.arange(index.shape[1])[None] - starts.gather(1, index)
        ids = self.ids[tokens.gather(1, index), offset.clamp(min=0, max=self.ids.shape[1] - 1)]
        return index, ids.masked_fill(~mask, 0), mask


# ------------------------------------------------------------------------------------------ building

def init_weights(model: Seamless, seed: int = 0) -> None:
    """Random weights: normal with std 1/sqrt(fan-in) (so every input moves the output of a random model,
    and durations stay a few frames), biases 0, LayerNorms 1 and 0."""
    device = next(model.parameters()).device
    g = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name or name.split(".")[-2:-1] in (["ln1"], ["ln2"]):
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif "pos_emb_alpha" in name:
                p.fill_(1.0)
            elif name.endswith("original0"):  # weight norm's g: the norm of v per output channel
                continue
            elif p.dim() == 1:
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g, device=device) / math.sqrt(math.prod(p.shape[1:])))
        for conv in model.vocoder.hifi_gan.weight_normed():
            par = conv.parametrizations.weight
            v = par.original1
            par.original0.copy_(torch.linalg.vector_norm(v, dim=tuple(range(1, v.dim())), keepdim=True))


def build(name: str, *, dtype: torch.dtype = torch.float32, device=None, seed: int = 0, **overrides) -> Seamless:
    config = replace(CONFIGS[name], **overrides)
    with torch.device(device or "cpu"):
        model = Seamless(config)
    init_weights(model, seed)
    return model.to(device=device, dtype=dtype).eval()


def from_pretrained(path, *, dtype: torch.dtype | None = None, device=None) -> Seamless:
    """A local checkpoint directory in the public transformers layout (``config.json`` of model_type
    ``seamless_m4t_v2`` and ``*.safetensors``). Vocoder convolutions stored without weight norm load as
    ``g = ||w||, v = w``, which gives back the same weights."""
    import json

    from safetensors.torch import load_file

    from mmcompile.models.llama import CheckpointError

    directory = Path(path).expanduser()
    try:
        raw = json.loads((directory / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{directory}: cannot read config.json ({e})") from e
    if raw.get("model_type") != "seamless_m4t_v2":
        raise CheckpointError(f"{directory}: model_type is {raw.get('model_type')!r}, expected 'seamless_m4t_v2'")
    generation = None
    if (directory / "generation_config.json").is_file():
        try:
            generation = json.loads((directory / "generation_config.json").read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{directory}: generation_config.json is not valid JSON ({e})") from e
    try:
        config = config_from_hf(raw, generation)
    except ValueError as e:
        raise CheckpointError(f"{directory}: {e}") from e
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory}: no *.safetensors weights")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    model = Seamless(config)
    own = model.state_dict()
    loaded = {}
    tied = {"text_decoder.embed_tokens.weight": ("shared.weight", "text_encoder.embed_tokens.weight", "lm_head.weight"),
            "t2u_model.model.decoder.embed_tokens.weight": ("t2u_model.lm_head.weight",)}
    for key, others in tied.items():  # a tied tensor is saved under one of its names
        for name in (key, *others):
            if name in state:
                loaded[key] = state[name]
                break
    skip = {name for key, others in tied.items() for name in (key, *others)}
    for key, value in state.items():
        if key in skip:
            continue
        if key in own:
            loaded[key] = value
            continue
        base = key.rsplit(".", 1)[0]
        if key.endswith(".weight") and f"{base}.parametrizations.weight.original1" in own:
            v = value.float()
            loaded[f"{base}.parametrizations.weight.original1"] = value
            loaded[f"{base}.parametrizations.weight.original0"] = torch.linalg.vector_norm(
                v, dim=tuple(range(1, v.dim())), keepdim=True).to(value.dtype)
            continue
        raise CheckpointError(f"{directory}: unexpected tensor {key!r} for a SeamlessM4T v2 model")
    missing = [k for k in own if k not in loaded and k not in skip]
    if missing:
        raise CheckpointError(f"{directory}: the checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    for key, value in loaded.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise CheckpointError(f"{directory}: {key} has shape {tuple(value.shape)}, the config implies "
                                  f"{tuple(own[key].shape)}")
    model.load_state_dict(loaded, strict=False)
    model.tie_weights()
    return model.to(device=device, dtype=dtype or torch.float32).eval()


def config_from_hf(raw: dict, generation: dict | None = None) -> SeamlessConfig:
    """A SeamlessConfig from a transformers ``seamless_m4t_v2`` config.json dict."""
    get = raw.get
    d = SeamlessConfig()
    languages = {}
    if generation:  # generation_config.json: the language tables
        text = generation.get("text_decoder_lang_to_code_id")
        voc = generation.get("vocoder_lang_code_to_id")
        if text:
            languages["languages"] = dict(text)
        if voc:
            languages["vocoder_languages"] = dict(voc)
    return SeamlessConfig(
        vocab_size=get("vocab_size", d.vocab_size), dim=get("hidden_size", d.dim),
        heads=get("decoder_attention_heads", d.heads), ffn_dim=get("decoder_ffn_dim", d.ffn_dim),
        text_encoder_layers=get("encoder_layers", d.text_encoder_layers),
        text_decoder_layers=get("decoder_layers", d.text_decoder_layers),
        speech_layers=get("speech_encoder_layers", d.speech_layers),
        speech_heads=get("speech_encoder_attention_heads", d.speech_heads),
        speech_ffn_dim=get("speech_encoder_intermediate_size", d.speech_ffn_dim),
        feature_dim=get("feature_projection_input_dim", d.feature_dim),
        n_mels=get("feature_projection_input_dim", d.feature_dim) // 2,
        conv_kernel=get("conv_depthwise_kernel_size", d.conv_kernel),
        left_positions=get("left_max_position_embeddings", d.left_positions),
        right_positions=get("right_max_position_embeddings", d.right_positions),
        adaptor_kernel=get("adaptor_kernel_size", d.adaptor_kernel), adaptor_stride=get("adaptor_stride", d.adaptor_stride),
        adaptor_layers=get("num_adapter_layers", d.adaptor_layers),
        t2u_encoder_layers=get("t2u_encoder_layers", d.t2u_encoder_layers),
        t2u_decoder_layers=get("t2u_decoder_layers", d.t2u_decoder_layers),
        t2u_heads=get("t2u_decoder_attention_heads", d.t2u_heads), t2u_ffn_dim=get("t2u_encoder_ffn_dim", d.t2u_ffn_dim),
        unit_vocab_size=get("t2u_vocab_size", d.unit_vocab_size), char_vocab_size=get("char_vocab_size", d.char_vocab_size),
        duration_hidden=get("t2u_variance_predictor_hidden_dim", d.duration_hidden),
        duration_kernel=get("t2u_variance_predictor_kernel_size", d.duration_kernel),
        vocoder_units=get("unit_hifi_gan_vocab_size", d.vocoder_units), unit_embed_dim=get("unit_embed_dim", d.unit_embed_dim),
        lang_embed_dim=get("lang_embed_dim", d.lang_embed_dim), speaker_embed_dim=get("spkr_embed_dim", d.speaker_embed_dim),
        vocoder_langs=get("vocoder_num_langs", d.vocoder_langs), vocoder_speakers=get("vocoder_num_spkrs", d.vocoder_speakers),
        upsample_initial_channel=get("upsample_initial_channel", d.upsample_initial_channel),
        upsample_rates=tuple(get("upsample_rates", d.upsample_rates)),
        upsample_kernels=tuple(get("upsample_kernel_sizes", d.upsample_kernels)),
        resblock_kernels=tuple(get("resblock_kernel_sizes", d.resblock_kernels)),
        resblock_dilations=tuple(tuple(x) for x in get("resblock_dilation_sizes", d.resblock_dilations)),
        leaky_relu_slope=get("leaky_relu_slope", d.leaky_relu_slope),
        max_positions=get("max_position_embeddings", d.max_positions), pad_id=get("pad_token_id", d.pad_id),
        bos_id=get("bos_token_id", d.bos_id), eos_id=get("eos_token_id", d.eos_id),
        unit_pad_id=get("t2u_pad_token_id", d.unit_pad_id), unit_eos_id=get("t2u_eos_token_id", d.unit_eos_id),
        vocoder_offset=get("vocoder_offset", d.vocoder_offset), eps=get("layer_norm_eps", d.eps),
        sample_rate=get("sampling_rate", d.sample_rate), **languages,
    )
