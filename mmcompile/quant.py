"""Weight quantization math: int8 per output channel, int4 per group, and their exact inverses.

Layouts (``W`` is an ``nn.Linear`` weight ``[N, K]``: N outputs, K inputs):

- int8: ``q [N, K] int8`` in [-127, 127] and ``scales [N]``, symmetric: ``W ≈ q * scales[:, None]``;
  a channel of zeros gets scale 1 and stays exactly zero.
- fp8: ``q [N, K] float8_e4m3fn`` and ``scales [N]``: ``W ≈ q * scales[:, None]`` (per output row, the
  row's largest magnitude mapped to 448), or one 0-d scale for the whole weight (``per="tensor"``).
- activations (W8A8 and fp8 modes): quantized per row at run time, ``quantize_rows_int8`` /
  ``quantize_rows_fp8`` -> ``(q, scales [M, 1])``; with per-tensor fp8 weights, per tensor
  (``quantize_tensor_fp8`` -> ``(q, 0-d scale)``).
- int4: ``packed [N, K / 2] uint8`` (two 4-bit codes per byte, low nibble first), ``scales`` and
  ``zeros [N, K / group_size]``, asymmetric per group: ``W ≈ (code - 8) * scale + zero`` where
  ``zero`` is the group's midpoint. K must be a multiple of ``group_size``: a size that does not divide
  raises ``ValueError`` naming the layer's shape (never a silently padded or wrong answer).

Every function is plain torch, used by the ``quantize_linear`` pass and by tests as the reference.
"""

from __future__ import annotations

import torch

__all__ = ["quantize_int8", "dequantize_int8", "quantize_int4", "dequantize_int4", "pack_int4", "unpack_int4",
           "tinygemm_supported", "tinygemm_layout", "int4_words",
           "quantize_fp8", "quantize_tensor_fp8", "quantize_rows_int8", "quantize_rows_fp8", "INT4_GROUP_SIZES",
           "FP8_MAX"]

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448

INT4_GROUP_SIZES = (32, 64, 128)


def _check_weight(w: torch.Tensor) -> None:
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"expected a floating-point [N, K] weight, got {w.dtype} {list(w.shape)}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"weight {list(w.shape)} holds inf or nan values; they cannot be quantized")


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: ``w [N, K]`` -> ``(q int8 [N, K], scales float32 [N])``."""
    _check_weight(w)
    wf = w.float()
    amax = wf.abs().amax(dim=1)
    scales = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(wf / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scales.float()[:, None]).to(dtype)


def quantize_int4(w: torch.Tensor, group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 per group of ``group_size`` inputs: ``w [N, K]`` -> ``(packed uint8 [N, K/2],
    scales float32 [N, K/g], zeros float32 [N, K/g])``."""
    _check_weight(w)
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group_size must be one of {INT4_GROUP_SIZES}, got {group_size}")
    N, K = w.shape
    if K % group_size:
        raise ValueError(f"int4 with group_size={group_size} needs the input size K to be a multiple of it; "
                         f"this weight is [{N}, {K}]: choose a group size that divides {K}, or keep the layer in int8")
    g = w.float().view(N, K // group_size, group_size)
    lo, hi = g.amin(dim=2), g.amax(dim=2)
    scales = (hi - lo) / 15.0
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    zeros = (hi + lo) / 2  # codes 0..15 map to zero + (code - 8) * scale (code 8: the group's midpoint)
    codes = torch.round((g - zeros[..., None]) / scales[..., None] + 8).clamp(0, 15).to(torch.uint8)
    return pack_int4(codes.view(N, K)), scales, zeros


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    codes = unpack_int4(packed).float()  # [N, K]
    N, K = codes.shape
    groups = scales.shape[1]
    g = codes.view(N, groups, K // groups)
    return ((g - 8) * scales[..., None] + zeros[..., None]).view(N, K).to(dtype)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """``[N, K]`` codes in 0..15 (K even) -> ``[N, K / 2]`` uint8, low nibble = even column."""
    if codes.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even number of columns, got {codes.shape[-1]}")
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    low, high = packed & 0xF, packed >> 4
    return torch.stack([low, high], dim=-1).flatten(-2)


def tinygemm_supported(packed: torch.Tensor, scales: torch.Tensor) -> tuple[bool, str]:
    """Whether torch's tinygemm kernel (``aten._weight_int4pack_mm``, CUDA) takes these int4 weights:
    (ok, reason). It needs groups of 32, 64, 128 or 256 inputs and N a multiple of 8."""
    N, K = packed.shape[0], 2 * packed.shape[1]
    groups = scales.shape[1] if scales.dim() == 2 else 0
    if not groups or K % groups or K // groups not in (32, 64, 128, 256):
        return False, f"groups of {K // groups if groups else '?'} inputs; tinygemm takes 32, 64, 128 or 256"
    if N % 8:
        return False, f"{N} output rows; tinygemm takes multiples of 8"
    return True, ""


def tinygemm_layout(packed: torch.Tensor, scales: torch.Tensor,
                    zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Our int4 weights (``quantize_int4``: uint8 [N, K/2], the even input in the low nibble, ``w =
    (code - 8) * scale + zero`` per group) as tinygemm (``aten._weight_int4pack_mm``, CUDA) reads them:
    ``(tiled codes, scales and zeros bf16 [G, N, 2])`` — its formula is ours; the nibbles are swapped,
    the codes tiled by ``aten._convert_weight_to_int4pack`` (with the most inner K tiles that divide K),
    and the scales and zeros rounded to bf16. ``torch._weight_int4pack_mm(x bf16 [M, K], tiled, K // G,
    scales_and_zeros)`` is then ``x @ dequantize_int4(...).t()``."""
    ok, why = tinygemm_supported(packed, scales)
    if not ok:
        raise ValueError(f"tinygemm does not take these int4 weights: {why}")
    K = 2 * packed.shape[1]
    tiles = next(t for t in (8, 4, 2) if K % (16 * t) == 0)
    swapped = ((packed & 15) << 4) | (packed >> 4)
    tiled = torch.ops.aten._convert_weight_to_int4pack(swapped.contiguous(), tiles)
    return tiled, torch.stack([scales, zeros], dim=2).transpose(0, 1).contiguous().to(torch.bfloat16)


def int4_words(packed: torch.Tensor, groups: int) -> torch.Tensor:
    """Our int4 codes (``quantize_int4``: uint8 [N, K/2], the even input in the low nibble) as the one-row
    int4 kernel streams them (``mmcompile.kernels.gemv_int4_words``): int32 ``[N, K / 8]``, eight codes
    per word. Within each group of ``S = K / groups`` inputs, word ``j`` (of ``S / 8``) holds in bits
    ``4i .. 4i + 3`` the code of input ``i * S / 8 + j`` of the group: the words' i-th nibbles are a
    contiguous run of inputs, so a kernel turning them into floats multiplies runs of contiguous
    activations. Values are unchanged: scales and zeros keep their layout."""
    N, K = packed.shape[0], 2 * packed.shape[1]
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"expected packed int4 codes, uint8 [N, K / 2], got {packed.dtype} {list(packed.shape)}")
    if groups <= 0 or K % groups or (K // groups) % 8:
        raise ValueError(f"int4 words need groups of a multiple of 8 inputs; [{N}, {K}] in {groups} groups")
    size = K // groups
    codes = unpack_int4(packed).view(N, groups, 8, size // 8).transpose(2, 3).to(torch.int64)
    shifts = torch.arange(0, 32, 4, device=packed.device, dtype=torch.int64)
    words = (codes << shifts).sum(-1)  # [N, groups, size / 8], 0 .. 2^32 - 1
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32).view(N, K // 8)


def quantize_fp8(w: torch.Tensor, per: str = "row") -> tuple[torch.Tensor, torch.Tensor]:
    """Float8 e4m3 weights: ``w [N, K]`` -> ``(q float8_e4m3fn [N, K], scales float32)``, one scale per
    output row (``per="row"``, scales [N]) or one for the whole tensor (``"tensor"``, a 0-d scale)."""
    _check_weight(w)
    if per == "tensor":
        return quantize_tensor_fp8(w)
    if per != "row":
        raise ValueError(f"fp8 scales are per 'row' or per 'tensor', not {per!r}")
    q, scales = quantize_rows_fp8(w)
    return q, scales[:, 0]


def quantize_tensor_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All of ``x`` to float8 e4m3 with one scale: ``(q, scale float32, 0-d)``."""
    xf = x.float()
    amax = xf.abs().amax()
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``x [M, K]`` to float8 e4m3 with one scale per row: ``(q, scales float32 [M, 1])``."""
    xf = x.float()
    amax = xf.abs().amax(dim=1, keepdim=True)
    scales = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return (xf / scales).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scales


def quantize_rows_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``x [M, K]`` to symmetric int8 with one scale per row: ``(q int8, scales float32 [M, 1])``."""
    xf = x.float()
    amax = xf.abs().amax(dim=1, keepdim=True)
    scales = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    return torch.round(xf / scales).clamp(-127, 127).to(torch.int8), scales
