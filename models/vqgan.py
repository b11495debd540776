"""VQ-GAN image tokenizer of the Chameleon family: pixels -> a grid of codebook indices -> pixels.

The encoder is a convolutional ResNet (taming-transformers layout, as in Chameleon's released image
tokenizer and transformers' ``ChameleonVQVAE``): ``conv_in``, one level per entry of
``channel_multiplier`` with ``num_res_blocks`` residual blocks (GroupNorm(32) -> SiLU -> 3x3 conv,
twice, plus a 1x1 shortcut when the width changes) and a stride-2 downsampling between levels, a middle
of residual block -> spatial self-attention -> residual block, then GroupNorm -> SiLU -> ``conv_out`` to
``latent_channels`` and a 1x1 ``quant_conv`` to the codebook's ``embed_dim``. Each latent vector is
replaced by the index of its nearest codebook entry (squared Euclidean distance). The decoder mirrors
the encoder with nearest-neighbour 2x upsampling and maps codebook vectors back to RGB in [-1, 1].

For the ``7b`` config (shared by both Chameleon sizes): 512 x 512 pixels, base width 128, multipliers
(1, 1, 2, 2, 4) — four downsamplings, so a 32 x 32 grid of 1024 codes — from 8192 entries of
dimension 256. ``tiny`` (tests): 32 x 32 pixels -> an 8 x 8 grid of 64 codes, the image codes of
``chameleon:tiny``.

Every method is a pure tensor function (no data-dependent Python control flow), so ``encode`` and
``decode`` capture with ``torch.export`` and go through the pipeline like the decoder.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["VQGANConfig", "VQGAN", "CONFIGS", "build", "Encode", "Decode", "from_taming_name", "to_taming_name"]


@dataclass
class VQGANConfig:
    resolution: int = 512
    in_channels: int = 3
    base_channels: int = 128
    channel_multiplier: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    latent_channels: int = 256
    embed_dim: int = 256
    num_embeddings: int = 8192

    def __post_init__(self):
        self.channel_multiplier = tuple(self.channel_multiplier)
        if self.base_channels % 32:
            raise ValueError(f"VQGANConfig.base_channels={self.base_channels} must be a multiple of 32 (GroupNorm(32))")
        if self.resolution % self.downsample:
            raise ValueError(f"VQGANConfig.resolution={self.resolution} must be a multiple of {self.downsample} "
                             f"(the encoder halves it {len(self.channel_multiplier) - 1} times)")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channel_multiplier) - 1)

    @property
    def grid(self) -> int:
        """Codes per side: a ``resolution`` x ``resolution`` image becomes ``grid`` x ``grid`` codes."""
        return self.resolution // self.downsample


CONFIGS: dict[str, VQGANConfig] = {
    "tiny": VQGANConfig(resolution=32, base_channels=32, channel_multiplier=(1, 1, 2), num_res_blocks=1,
                        latent_channels=32, embed_dim=16, num_embeddings=64),
    "7b": VQGANConfig(),
}


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the spatial positions of a feature map."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q, self.k, self.v, self.proj = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (f(h).reshape(B, 1, C, H * W).transpose(2, 3) for f in (self.q, self.k, self.v))  # [B, 1, HW, C]
        y = F.scaled_dot_product_attention(q, k, v)  # [B, 1, HW, C]
        return x + self.proj(y.transpose(2, 3).reshape(B, C, H, W))


class Encoder(nn.Module):
    def __init__(self, c: VQGANConfig):
        super().__init__()
        widths = [c.base_channels * m for m in (1,) + c.channel_multiplier]
        self.conv_in = nn.Conv2d(c.in_channels, widths[0], 3, padding=1)
        self.down = nn.ModuleList()
        for level in range(len(c.channel_multiplier)):
            blocks = nn.ModuleList(ResBlock(widths[level] if i == 0 else widths[level + 1], widths[level + 1])
                                   for i in range(c.num_res_blocks))
            stage = nn.Module()
            stage.blocks = blocks
            stage.downsample = (nn.Conv2d(widths[level + 1], widths[level + 1], 3, stride=2)
                                if level < len(c.channel_multiplier) - 1 else None)
            self.down.append(stage)
        w = widths[-1]
        self.mid1, self.mid_attn, self.mid2 = ResBlock(w, w), AttnBlock(w), ResBlock(w, w)
        self.norm_out, self.conv_out = _norm(w), nn.Conv2d(w, c.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            for block in stage.blocks:
                h = block(h)
            if stage.downsample is not None:
                h = stage.downsample(F.pad(h, (0, 1, 0, 1)))  # taming's asymmetric padding
        h = self.mid2(self.mid_attn(self.mid1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, c: VQGANConfig):
        super().__init__()
        widths = [c.base_channels * m for m in c.channel_multiplier]
        w = widths[-1]
        self.conv_in = nn.Conv2d(c.latent_channels, w, 3, padding=1)
        self.mid1, self.mid_attn, self.mid2 = ResBlock(w, w), AttnBlock(w), ResBlock(w, w)
        self.up = nn.ModuleList()
        for level in reversed(range(len(widths))):
            blocks = nn.ModuleList(ResBlock(w if i == 0 else widths[level], widths[level])
                                   for i in range(c.num_res_blocks + 1))
            w = widths[level]
            stage = nn.Module()
            stage.blocks = blocks
            stage.upsample = nn.Conv2d(w, w, 3, padding=1) if level > 0 else None
            self.up.append(stage)
        self.norm_out, self.conv_out = _norm(w), nn.Conv2d(w, c.in_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid2(self.mid_attn(self.mid1(self.conv_in(z))))
        for stage in self.up:
            for block in stage.blocks:
                h = block(h)
            if stage.upsample is not None:
                h = stage.upsample(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h)))


class VQGAN(nn.Module):
    """``encode(pixels [B, 3, R, R] in [-1, 1]) -> codes [B, grid*grid]``; ``decode(codes) -> pixels``."""

    def __init__(self, config: VQGANConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.quant_conv = nn.Conv2d(config.latent_channels, config.embed_dim, 1)
        self.codebook = nn.Embedding(config.num_embeddings, config.embed_dim)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.latent_channels, 1)
        self.decoder = Decoder(config)
        self.has_decoder = True  # False when loaded from a checkpoint that ships the encoder only

    def encode(self, pixels: Tensor) -> Tensor:
        z = self.quant_conv(self.encoder(pixels))  # [B, E, g, g]
        B, E, g, _ = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(B, g * g, E)
        book = self.codebook.weight  # [N, E]
        # ||z - e||^2 = ||z||^2 - 2 z.e + ||e||^2; ||z||^2 is the same for every entry
        dist = book.pow(2).sum(-1)[None, None, :] - 2 * flat @ book.t()  # [B, g*g, N]
        return dist.argmin(-1)  # [B, g*g]

    def decode(self, codes: Tensor) -> Tensor:
        if not self.has_decoder:
            raise RuntimeError("this VQ-GAN was loaded without its decoder's weights (transformers' Chameleon "
                               "checkpoints ship the encoder only): add the tokenizer decoder's tensors under "
                               "model.vqmodel.decoder.* to the checkpoint to turn codes into pixels")
        B, n = codes.shape
        g = self.config.grid
        z = self.codebook(codes).reshape(B, g, g, -1).permute(0, 3, 1, 2)  # [B, E, g, g]
        return self.decoder(self.post_quant_conv(z)).clamp(-1, 1)

    def forward(self, pixels: Tensor) -> Tensor:
        return self.decode(self.encode(pixels))


class _Phase(nn.Module):
    """One method of a VQGAN (``phase``) as a module's forward, for capture."""

    phase = ""

    def __init__(self, vq: VQGAN):
        super().__init__()
        self.vq = vq
        self.train(vq.training)

    def forward(self, x: Tensor) -> Tensor:
        return getattr(self.vq, self.phase)(x)


class Encode(_Phase):
    """``VQGAN.encode`` (pixels -> codes) as a module's forward, for capture."""

    phase = "encode"


class Decode(_Phase):
    """``VQGAN.decode`` (codes -> pixels) as a module's forward, for capture."""

    phase = "decode"


@torch.no_grad()
def build(name: str = "tiny", *, dtype: torch.dtype = torch.float32, device=None, seed: int = 0,
          **overrides) -> VQGAN:
    """A randomly initialized VQ-GAN of config ``CONFIGS[name]`` (PyTorch's default initialization,
    seeded; codebook entries standard normal, so nearest entries are well separated)."""
    if name not in CONFIGS:
        raise ValueError(f"unknown VQ-GAN config {name!r}; known configs: {', '.join(CONFIGS)}")
    config = dataclasses.replace(CONFIGS[name], **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = VQGAN(config)
        model.codebook.weight.normal_()
    return model.to(device=device, dtype=dtype).eval()


# --------------------------------------------------------------------------------------------------
# Names of the taming-transformers layout (Chameleon's released tokenizer, transformers' ChameleonVQVAE)
# --------------------------------------------------------------------------------------------------

_TAMING_BLOCK = {"nin_shortcut": "shortcut"}
_TAMING_MID = {"block_1": "mid1", "attn_1": "mid_attn", "block_2": "mid2"}


def from_taming_name(name: str, levels: int | None = None) -> str | None:
    """Our parameter name for a taming-layout name (``encoder.down.0.block.1.nin_shortcut.weight``,
    ``quantize.embedding.weight``, ``decoder.up.3.upsample.conv.bias``, ...); None when it has no
    counterpart. Taming numbers the decoder's ``up`` levels from the highest resolution; ours are in
    the order they run, so ``levels`` (the number of resolutions) is needed for decoder names."""
    if name == "quantize.embedding.weight":
        return "codebook.weight"
    if name.startswith(("quant_conv.", "post_quant_conv.")):
        return name
    parts = name.split(".")
    if parts[0] not in ("encoder", "decoder"):
        return None
    side, rest = parts[0], parts[1:]
    if rest[0] == "mid" and len(rest) >= 3 and rest[1] in _TAMING_MID:
        inner = rest[2:]
        if rest[1] == "attn_1" and inner[0] == "proj_out":
            inner = ["proj"] + inner[1:]
        elif rest[1] != "attn_1":
            inner = [_TAMING_BLOCK.get(inner[0], inner[0])] + inner[1:]
        return ".".join([side, _TAMING_MID[rest[1]]] + inner)
    if rest[0] in ("down", "up") and len(rest) >= 4:
        level = int(rest[1])
        if rest[0] == "up":
            if levels is None:
                return None
            level = levels - 1 - level
        if rest[2] == "block":
            return ".".join([side, rest[0], str(level), "blocks", rest[3], _TAMING_BLOCK.get(rest[4], rest[4])] + rest[5:])
        if rest[2] in ("downsample", "upsample") and rest[3] == "conv":
            return ".".join([side, rest[0], str(level), rest[2]] + rest[4:])
        return None  # attention inside a level: not part of Chameleon's tokenizer
    if rest[0] in ("conv_in", "norm_out", "conv_out"):
        return name
    return None


def to_taming_name(name: str, levels: int | None = None) -> str:
    """The inverse of ``from_taming_name`` (for messages about missing tensors)."""
    if name == "codebook.weight":
        return "quantize.embedding.weight"
    parts = name.split(".")
    inverse_mid = {v: k for k, v in _TAMING_MID.items()}
    if len(parts) > 2 and parts[1] in inverse_mid:
        inner = parts[2:]
        if parts[1] == "mid_attn" and inner[0] == "proj":
            inner = ["proj_out"] + inner[1:]
        elif inner[0] == "shortcut":
            inner = ["nin_shortcut"] + inner[1:]
        return ".".join([parts[0], "mid", inverse_mid[parts[1]]] + inner)
    if len(parts) > 3 and parts[1] in ("down", "up"):
        level = int(parts[2])
        if parts[1] == "up" and levels is not None:
            level = levels - 1 - level
        if parts[3] == "blocks":
            leaf = ["nin_shortcut" if parts[5] == "shortcut" else parts[5]] + parts[6:]
            return ".".join([parts[0], parts[1], str(level), "block", parts[4]] + leaf)
        return ".".join([parts[0], parts[1], str(level), parts[3], "conv"] + parts[4:])
    return name
