"""``mmcompile::`` custom ops: computations ATen lacks, as ``torch.library`` ops.

Each op has a fake (meta) implementation for tracing, a reference implementation in plain torch, and a
lowering per backend: the Inductor backend decomposes them (``inductor_decompositions``) into ops it
fuses into one kernel, instead of calling them as opaque functions.

- ``mmcompile::linear_int8(x [..., K], weight int8 [N, K], scales [N], bias [N]?) -> [..., N]``:
  int8 weight-only linear, per-output-channel scales in the activation dtype. On the CPU it runs
  ``aten._weight_int8pack_mm`` (when K is a multiple of 32); elsewhere dequantize-then-matmul.
- ``mmcompile::linear_int4(x [..., K], packed uint8 [N, K/2], scales [N, G], zeros [N, G], bias?)``:
  int4 weight-only linear, G groups of K/G inputs per output (layout: ``mmcompile.quant``).
- ``mmcompile::linear_w8a8(x, weight int8 [N, K], scales [N], bias?)``: int8 weights and int8
  activations quantized per row at run time, int32 accumulation (``aten._int_mm``).
- ``mmcompile::linear_fp8(x, weight float8_e4m3fn [N, K], scales [N], bias?)``: float8 weights and
  activations scaled per row (``aten._scaled_mm``; on a GPU, compute capability 8.9 or newer); a 0-d
  ``scales`` is one scale for the weight, and the activations are then scaled per tensor.
- ``mmcompile::embedding_int8(weight int8 [V, D], scales [V], indices int [...]) -> [..., D]``: the rows
  of an int8 table, each times its scale (``quantize_linear(embeddings=True)``), in the scales' dtype.

- ``mmcompile::rms_norm(x, weight, eps) -> weight * (x.f32 * rsqrt(mean(x.f32^2, -1) + eps)).to(x.dtype)``:
  RMSNorm in the order of operations transformers and our Llama use (``fuse_rmsnorm`` makes it), so
  ONNX Runtime gets its ``RMSNormalization`` op; Inductor decomposes it back into one fused kernel.
- ``mmcompile::skip_rms_norm(x, skip, weight, eps) -> (rms_norm(x + skip), x + skip)``: the residual add
  before a norm whose sum is also used later (every pre-norm transformer block); ONNX Runtime gets its
  ``SkipSimplifiedLayerNormalization`` contrib op, Inductor the same math.

- ``mmcompile::rotary_embedding(x [B, H, S, D], cos [P, D/2], sin [P, D/2], positions int [B, S])``:
  rotary position embedding in the rotate-half form (``x * c + cat(-x2, x1) * s`` with ``c = cat(cos,
  cos)[positions]``), from tables of P positions. The ONNX Runtime backend makes it (see
  ``mmcompile.backends.ort_fusions``) and lowers it to the ``RotaryEmbedding`` contrib op.
- ``mmcompile::cached_attention(q [B, Hq, 1, D], k [B, Hkv, 1, D], v, cache_k [B, Hkv, L, D], cache_v,
  positions int [B], scale, cos?, sin?) -> (out, cache_k', cache_v')``: one decode step of attention
  over a static KV cache: the new key and value written at each row's position, the query attending to
  the slots up to it; with tables, q and k are rotated first (as ``rotary_embedding``). With
  ``num_heads``, q, k and v are the projections' rows ([B, 1, H*D]), or one packed q/k/v row in ``q``.
  ONNX Runtime's ``GroupQueryAttention`` computes exactly this.

- ``mmcompile::hstu_attention(q, k, v, bias?, mask?, scale) -> (SiLU(q @ kᵀ + bias) * scale * mask) @ v``:
  HSTU's pointwise attention (``mmcompile.hstu_attention``: its reference, and a Triton kernel that never
  writes the scores to memory, used on CUDA).

Under Inductor every quantized linear is decomposed: int8 and int4 weight-only into a dequantizing
matmul (or the GEMV kernels), W8A8 and fp8 into the activations' per-row quantization — which Inductor
fuses into one kernel, with the producer of the activations where it can — and aten's ``_int_mm`` /
``_scaled_mm``. (Called as they are, the quantization runs as six separate kernels in fp32: on an H100
at 2048 rows it took 155-374 us per linear, against 17-64 us fused, more than the matmul saves.)
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["linear_int8", "linear_int4", "linear_w8a8", "linear_fp8", "embedding_int8", "rms_norm", "skip_rms_norm",
           "rotary_embedding", "cached_attention", "hstu_attention", "inductor_decompositions"]

aten = torch.ops.aten


@torch.library.custom_op("mmcompile::linear_int8", mutates_args=())
def linear_int8(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    # aten's CPU kernel; it crashes on bf16 inputs of several rows when K is not a multiple of 16, so it
    # is used only where K is a multiple of 32 (every real model's hidden size)
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and x.shape[-1] % 32 == 0:
        y = torch._weight_int8pack_mm(x2, weight, scales.to(x.dtype))
    else:
        y = (x2 @ weight.to(x.dtype).t()) * scales.to(x.dtype)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], weight.shape[0])



def _linear_int8_decomposed(x, weight, scales, bias=None):
    """For Inductor: few rows -> one fused reduction that reads the int8 weight once (dequantization in
    the load, fp32 accumulation); more rows -> dequantize and matmul."""
    K, N = x.shape[-1], weight.shape[0]
    x2 = x.reshape(-1, K)
    if x2.shape[0] <= 4:
        y = (x2[:, None, :].float() * weight[None].float()).sum(-1) * scales.float()
    else:
        y = (x2 @ weight.to(x.dtype).t()).float() * scales.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], N)


@torch.library.custom_op("mmcompile::linear_int4", mutates_args=())
def linear_int4(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    from mmcompile.quant import dequantize_int4

    w = dequantize_int4(packed, scales, zeros, x.dtype)  # [N, K]
    y = x.reshape(-1, x.shape[-1]) @ w.t()
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], packed.shape[0])



def _linear_int4_decomposed(x, packed, scales, zeros, bias=None):
    """For Inductor: few rows -> one reduction over the packed bytes (both nibbles of a byte against the
    even and odd inputs, dequantized in the load); more rows -> dequantize, then matmul."""
    N, Kh = packed.shape
    G = scales.shape[1]
    K = 2 * Kh
    x2 = x.reshape(-1, K)
    sc = scales.float()[:, :, None].expand(N, G, Kh // G).reshape(N, Kh)
    zr = zeros.float()[:, :, None].expand(N, G, Kh // G).reshape(N, Kh)
    w_lo = ((packed & 15).float() - 8) * sc + zr  # inputs 0, 2, 4, ...
    w_hi = ((packed >> 4).float() - 8) * sc + zr  # inputs 1, 3, 5, ...
    if x2.shape[0] <= 4:
        xe, xo = x2[:, 0::2].float(), x2[:, 1::2].float()
        y = (xe[:, None, :] * w_lo[None] + xo[:, None, :] * w_hi[None]).sum(-1)
    else:
        w = torch.stack([w_lo, w_hi], dim=-1).reshape(N, K).to(x.dtype)
        y = (x2 @ w.t()).float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], N)


def _rows(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, int]:
    """x as [M, K], padded with zero rows to a multiple of ``multiple`` (some GPU kernels need it)."""
    x2 = x.reshape(-1, x.shape[-1])
    m = x2.shape[0]
    pad = (-m) % multiple if x.device.type == "cuda" else 0
    return (torch.cat([x2, x2.new_zeros(pad, x2.shape[1])]) if pad else x2), m


def _fp8_capable(x: torch.Tensor) -> None:
    if x.device.type == "cuda" and torch.cuda.get_device_capability(x.device) < (8, 9):
        raise RuntimeError(f"fp8 matmul needs a GPU of compute capability 8.9 or newer (Ada, Hopper); "
                           f"{torch.cuda.get_device_name(x.device)} is {torch.cuda.get_device_capability(x.device)}: "
                           "quantize to int8 instead")


def _linear_w8a8_decomposed(x, weight, scales, bias=None):
    """``linear_w8a8``'s math: the op runs it, and the Inductor backend decomposes the op into it, so the
    activations' quantization fuses."""
    from mmcompile.quant import quantize_rows_int8

    x2, m = _rows(x, 32)  # cuBLAS int8 matmul wants more than 16 rows
    xq, sx = quantize_rows_int8(x2)
    y = (torch._int_mm(xq, weight.t()).float() * sx * scales.float())[:m]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


def _linear_fp8_decomposed(x, weight, scales, bias=None):
    """``linear_fp8``'s math: the op runs it, and the Inductor backend decomposes the op into it, so the
    activations' quantization fuses."""
    from mmcompile.quant import quantize_rows_fp8, quantize_tensor_fp8

    _fp8_capable(x)
    x2, m = _rows(x, 16)
    if scales.dim() == 0:  # one scale for the weight: the activations get one too (the matmul takes both or none)
        xq, sx = quantize_tensor_fp8(x2)
        sw = scales.float()
    else:
        xq, sx = quantize_rows_fp8(x2)
        sw = scales.float()[None, :]
    out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.float32
    # fast accumulation: on an H100 the 7B shape's prefill products ran 8-12% faster with it, and their
    # error against fp32 stayed the same (3.6e-2 either way, bench/fp8_matmul.py, docs/benchmarks.md)
    y = torch._scaled_mm(xq, weight.t(), scale_a=sx, scale_b=sw, out_dtype=out_dtype, use_fast_accum=True)[:m]
    if bias is not None:
        y = y + bias
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("mmcompile::linear_w8a8", mutates_args=())
def linear_w8a8(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    return _linear_w8a8_decomposed(x, weight, scales, bias)


@torch.library.custom_op("mmcompile::linear_fp8", mutates_args=())
def linear_fp8(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor,
               bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    return _linear_fp8_decomposed(x, weight, scales, bias)


def _linear_fake(x, weight, *quantization, bias=None):
    """Every quantized linear maps x [..., K] to [..., N], N the first dimension of its (packed) weight."""
    return x.new_empty(*x.shape[:-1], weight.shape[0])


for _op in (linear_int8, linear_int4, linear_w8a8, linear_fp8):
    _op.register_fake(_linear_fake)


@torch.library.custom_op("mmcompile::embedding_int8", mutates_args=())
def embedding_int8(weight: torch.Tensor, scales: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``weight[indices] * scales[indices, None]``: rows of an int8 table with one scale per row, computed
    in fp32 and rounded once to the scales' dtype."""
    return _embedding_int8(weight, scales, indices)


def _embedding_int8(weight, scales, indices):
    return (weight[indices].float() * scales[indices].float().unsqueeze(-1)).to(scales.dtype)


@embedding_int8.register_fake
def _(weight, scales, indices):
    return scales.new_empty(*indices.shape, weight.shape[1])


@torch.library.custom_op("mmcompile::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _rms_norm(x, weight, eps)


def _rms_norm(x, weight, eps):
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@rms_norm.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype))


@torch.library.custom_op("mmcompile::skip_rms_norm", mutates_args=())
def skip_rms_norm(x: torch.Tensor, skip: torch.Tensor, weight: torch.Tensor,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _skip_rms_norm(x, skip, weight, eps)


def _skip_rms_norm(x, skip, weight, eps):
    total = x + skip
    return _rms_norm(total, weight, eps), total


@skip_rms_norm.register_fake
def _(x, skip, weight, eps):
    total = torch.empty_like(x + skip)
    return total.new_empty(total.shape, dtype=torch.promote_types(weight.dtype, total.dtype)), total


@torch.library.custom_op("mmcompile::rotary_embedding", mutates_args=())
def rotary_embedding(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return _rotary_embedding(x, cos, sin, positions)


def _rotary_embedding(x, cos, sin, positions):
    c = torch.cat([cos, cos], -1)[positions].unsqueeze(1).to(x.dtype)  # [B, 1, S, D]
    s = torch.cat([sin, sin], -1)[positions].unsqueeze(1).to(x.dtype)
    half = x.shape[-1] // 2
    return x * c + torch.cat([-x[..., half:], x[..., :half]], -1) * s


@rotary_embedding.register_fake
def _(x, cos, sin, positions):
    return torch.empty_like(x)


@torch.library.custom_op("mmcompile::cached_attention", mutates_args=())
def cached_attention(q: torch.Tensor, k: Optional[torch.Tensor], v: Optional[torch.Tensor], cache_k: torch.Tensor,
                     cache_v: torch.Tensor, positions: torch.Tensor, scale: float, cos: Optional[torch.Tensor] = None,
                     sin: Optional[torch.Tensor] = None,
                     num_heads: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = _heads(q, k, v, num_heads, cache_k.shape[1], cache_k.shape[3])
    if cos is not None:
        q = _rotary_embedding(q, cos, sin, positions[:, None])
        k = _rotary_embedding(k, cos, sin, positions[:, None])
    rows = torch.arange(q.shape[0], device=q.device)
    cache_k, cache_v = cache_k.clone(), cache_v.clone()
    cache_k[rows, :, positions] = k[:, :, 0]
    cache_v[rows, :, positions] = v[:, :, 0]
    visible = torch.arange(cache_k.shape[2], device=q.device)[None, :] <= positions[:, None]
    out = torch.nn.functional.scaled_dot_product_attention(q, cache_k, cache_v, visible[:, None, None, :], scale=scale,
                                                           enable_gqa=q.shape[1] != cache_k.shape[1])
    return out, cache_k, cache_v


def _heads(q, k, v, num_heads, kv_heads, head_dim):
    """q, k, v as [B, H, 1, D]. With ``num_heads``, they arrive as the projections' rows: q [B, (1,) Hq*D]
    and k, v [B, (1,) Hkv*D], or one packed [B, (1,) (Hq + 2 Hkv)*D] in q with k and v None."""
    if not num_heads:
        return q, k, v
    B = q.shape[0]
    if k is None:
        q, k, v = q.reshape(B, -1).split([num_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1)
    return tuple(t.reshape(B, h, 1, head_dim) for t, h in ((q, num_heads), (k, kv_heads), (v, kv_heads)))


@cached_attention.register_fake
def _(q, k, v, cache_k, cache_v, positions, scale, cos=None, sin=None, num_heads=0):
    B, D = q.shape[0], cache_k.shape[3]
    out = q.new_empty(B, num_heads, 1, D) if num_heads else torch.empty_like(q)
    return out, torch.empty_like(cache_k), torch.empty_like(cache_v)


def inductor_decompositions(gemv_kernels: bool = False, base: Optional[dict] = None,
                             devices: tuple[str, ...] = ("cuda",)) -> dict:
    """The table the Inductor backend adds to Inductor's own (``base``).

    With ``gemv_kernels``, products of few rows (decode) with float16/bfloat16 activations on CUDA run
    the Triton GEMV kernels of ``mmcompile.kernels`` instead: ``aten.mm`` / ``aten.addmm`` whose second
    operand is a transposed contiguous weight, and the int8 and int4 weight-only ops. Everything else
    keeps the decompositions above (or Inductor's). ``devices``: where the kernels are used (tests call
    the table on the CPU under Triton's interpreter)."""
    from mmcompile import hstu_attention as hstu

    def pointwise_attention(q, k, v, bias, mask, scale, positions=None, pos_weight=None, timestamps=None,
                            time_weight=None, time_divisor=0.301, lengths=None, history=None):
        # the Triton kernel where it runs (it never writes the scores), else the reference for Inductor to fuse
        rel = (positions, pos_weight, timestamps, time_weight)
        # a sequence length compiled as a range (symbolic) takes the reference: no guard on its size
        if (q.device.type in devices and isinstance(q.shape[2], int) and q.shape[2] >= hstu.KERNEL_MIN_LEN
                and hstu.supported(q, k, v, bias, mask, *rel, lengths, history)[0]):
            hstu.register()
            return torch.ops.mmcompile.triton_hstu_attention(q, k, v, bias, mask, scale, *rel, time_divisor, lengths,
                                                             history)
        return hstu.reference(q, k, v, bias, mask, scale, *rel, time_divisor, lengths, history)

    table = {torch.ops.mmcompile.linear_int8.default: _linear_int8_decomposed,
             torch.ops.mmcompile.linear_int4.default: _linear_int4_decomposed,
             torch.ops.mmcompile.linear_w8a8.default: _linear_w8a8_decomposed,
             torch.ops.mmcompile.linear_fp8.default: _linear_fp8_decomposed,
             torch.ops.mmcompile.embedding_int8.default: _embedding_int8,
             torch.ops.mmcompile.rms_norm.default: _rms_norm,
             torch.ops.mmcompile.skip_rms_norm.default: _skip_rms_norm,
             torch.ops.mmcompile.hstu_attention.default: pointwise_attention}
    base = base or {}
    bmm_default, mm_default = base.get(aten.bmm.default), base.get(aten.mm.default)

    def outer(a, b):
        # a product over one index is an outer product: a pointwise multiply Inductor fuses with its
        # neighbours, not a GEMM launch (transformers' rotary embedding computes inv_freq @ positions so,
        # 3.3 us per decode step on an H100 in cuBLAS); the same single rounding of each product
        return a * b if isinstance(a.shape[-1], int) and a.shape[-1] == 1 and a.dtype == b.dtype else None

    def or_else(default):  # ``outer`` where it applies, else ``default`` (Inductor's decomposition) if any
        def product(a, b):
            out = outer(a, b)
            if out is not None:
                return out
            return NotImplemented if default is None else default(a, b)
        return product

    table[aten.bmm.default] = or_else(bmm_default)
    plain_mm = or_else(mm_default)
    if not gemv_kernels:
        table[aten.mm.default] = plain_mm
        return table
    from mmcompile import kernels

    kernels.register()
    addmm_default = base.get(aten.addmm.default)

    def fits(x, weight, *vectors):
        return x.device.type in devices and kernels.supported(x, weight, *vectors)[0]

    def weight_of(x, b):
        # b [K, N] is W.T of a contiguous W [N, K]: the layout nn.Linear's weight arrives in
        if (x.dim() == 2 and b.dim() == 2 and x.dtype == b.dtype and x.stride(1) == 1
                and b.stride() == (1, b.shape[0]) and fits(x, b.t())):
            return b.t()
        return None

    def mm(x, b):
        w = weight_of(x, b)
        return plain_mm(x, b) if w is None else kernels.gemv(x, w)

    def addmm(bias, x, b, *, beta=1, alpha=1):
        w = weight_of(x, b)
        if (w is not None and beta == 1 and alpha == 1 and bias.dim() == 1 and bias.shape[0] == w.shape[0]
                and bias.is_contiguous()):
            return kernels.gemv(x, w, bias)
        return NotImplemented if addmm_default is None else addmm_default(bias, x, b, beta=beta, alpha=alpha)

    def int8(x, weight, scales, bias=None):
        if fits(x, weight, scales, bias):
            return kernels.gemv_int8(x, weight, scales, bias)
        return _linear_int8_decomposed(x, weight, scales, bias)

    def int4(x, packed, scales, zeros, bias=None):
        # one row only: for several rows the kernel's per-group tl.dot is slower than dequantize + matmul
        if fits(x, packed, scales, zeros, bias) and x.numel() == x.shape[-1] and kernels.int4_supported(packed, scales)[0]:
            return kernels.gemv_int4(x, packed, scales, zeros, bias)
        return _linear_int4_decomposed(x, packed, scales, zeros, bias)

    table.update({aten.mm.default: mm, aten.addmm.default: addmm,
                  torch.ops.mmcompile.linear_int8.default: int8, torch.ops.mmcompile.linear_int4.default: int4})
    return table


from mmcompile.hstu_attention import hstu_attention  # noqa: E402  (registers mmcompile::hstu_attention)
