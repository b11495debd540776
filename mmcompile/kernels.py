"""Triton kernels for decode-time linear layers: GEMV with bf16/fp16, int8 and int4 weights.

Decode multiplies a few rows by every weight matrix, so it is bound by reading the weights once.
cuBLAS picks split-K GEMV kernels that reach about 0.75-0.85 of an H100's copy bandwidth on a 7B model's
shapes, and Inductor's own reduction, when it is handed ``sum(x * W)``, fuses the activations' producers
(RMSNorm, SiLU-gate) into the weight loop and recomputes them for every output column. These kernels
are called as opaque user kernels from Inductor's code (``torch.library.triton_op``): the activations
are materialized once, each program streams ``BLOCK_N`` weight rows with wide loads, dequantizes in
registers and accumulates in fp32.

- ``gemv(x [M, K], w [N, K], bias [N]?)`` -> ``[M, N]``: float weights.
- ``gemv_int8(x, q int8 [N, K], scales [N], bias?)``: ``y = (x @ q.T) * scales`` (``mmcompile.quant`` layout).
- ``gemv_int4(x, packed uint8 [N, K/2], scales [N, G], zeros [N, G], bias?)``: groups of ``K / G``
  inputs, ``w = (code - 8) * scale + zero``, low nibble = even input.
- ``gemv_fused(x, w, bias?, scales=, norm_weight=, eps=, up=, residual=)``: a float or int8 GEMV with
  an RMSNorm or SiLU-gate prologue and a residual-add epilogue in the same kernel (the Inductor
  backend's ``gemv_fusion``, see ``mmcompile.backends.inductor_fusions``).

``M == 1`` runs an elementwise multiply-accumulate over ``[BLOCK_N, BLOCK_K]`` tiles; ``1 < M <= 16``
runs ``tl.dot`` on rows padded to 16 (the tensor cores are idle anyway at these sizes). Activations must
be float16 or bfloat16 and contiguous in K. ``supported(...)`` says whether a call qualifies and why not.

The Inductor backend routes batch-1..``max_rows`` linears on CUDA here (``mmcompile.ops``); on a CPU the
kernels run only under Triton's interpreter (``TRITON_INTERPRET=1``), which the tests use to check them
against the reference math.
"""

from __future__ import annotations

import functools
import os
import threading
from typing import Callable, Optional

import torch

__all__ = ["available", "supported", "gemv", "gemv_int8", "gemv_int4", "gemv_int4_words", "gemv_fused", "config_for",
           "MAX_ROWS"]

MAX_ROWS = 16
# How the one-row kernel turns int8 weights into fp32 (config key ``INT8_CVT``): "cvt", the conversion
# instruction (a quarter of the fp32 rate); "bits", an integer add and a float subtraction per weight
# (the default off CUDA: Triton's interpreter runs no PTX); "prmt", four weights per XOR and four byte
# permutes, then the subtraction (PTX; the default on CUDA). On an H100 the int8 products of a 7B decode
# step took 3.14 ms with "cvt", 2.95 with "bits" and 2.90 with "prmt" (bench/gemv_chain.py --conversions).
INT8_CONVERSIONS = ("cvt", "bits", "prmt")
# How the one-row int4 word kernel turns codes into floats (config key ``INT4_CVT``, see
# ``_gemv_int4_words_kernel``): "bits" (Triton, the default off CUDA) or "prmt" (PTX, the default on CUDA).
INT4_CONVERSIONS = ("bits", "prmt")

try:  # triton ships with CUDA builds of torch; CPU builds have it only when installed by hand
    import triton
    import triton.language as tl
    from torch.library import wrap_triton

    _IMPORT_ERROR = ""
except Exception as e:  # pragma: no cover - depends on the installation
    triton = tl = None
    _IMPORT_ERROR = f"{type(e).__name__}: {e}"


def available(device: torch.device | str = "cuda") -> tuple[bool, str]:
    """Whether the kernels can run on ``device``: (ok, reason)."""
    if triton is None:
        return False, f"triton cannot be imported ({_IMPORT_ERROR}); it ships with CUDA builds of torch"
    kind = torch.device(device).type
    if kind == "cuda":
        return True, ""
    if kind == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return True, ""
    return False, f"the Triton GEMV kernels run on CUDA devices (or on the CPU under TRITON_INTERPRET=1), not {kind}"


def supported(x: torch.Tensor, weight: torch.Tensor, *vectors: Optional[torch.Tensor],
              max_rows: int = MAX_ROWS) -> tuple[bool, str]:
    """Whether ``x [..., K]`` times a weight of first dimension N (with its scales, zeros or bias in
    ``vectors``, read as contiguous arrays) qualifies for these kernels."""
    if x.dtype not in (torch.float16, torch.bfloat16):
        return False, f"activations are {x.dtype}; the kernels take float16 or bfloat16"
    if weight.stride(-1) != 1:
        return False, f"the weight's strides are {tuple(weight.stride())}; the kernels read rows contiguous in K"
    if any(v is not None and not v.is_contiguous() for v in vectors):
        return False, "a scale, zero-point or bias tensor is not contiguous"
    rows = x.numel() // max(x.shape[-1], 1)
    if not 1 <= rows <= max_rows:
        return False, f"{rows} rows; the kernels are for 1..{max_rows} (decode), larger products use matmul"
    return available(x.device)


def config_for(kind: str, m: int, n: int, k: int, prologue: Optional[str] = None) -> dict:
    """Tile sizes and warps per weight kind (and fused prologue: ``"norm"``, ``"glu"``), from sweeps on an
    H100 over a 7B model's shapes (``bench/gemv.py --sweep --kinds bf16,bf16+norm,bf16+glu``;
    docs/benchmarks.md): for one row, narrow row blocks with long K steps keep the most programs
    streaming at once; a prologue reads more activations per weight byte (the norm's weight, the up
    projection), which wider row blocks amortize. Several rows go through ``tl.dot`` in wider blocks.
    Int8 weights take 8 x 1024 tiles, 8 x 512 after a norm (``bench/gemv_chain.py --sweep`` and
    ``--sweep-each``: the whole decode step's int8 products, 2.95 ms on an H100 against 3.47 with the
    earlier 4 x 512 tiles and conversion instructions; 8 x 512 for the gate and up products alone took
    2.87). A config may also name the int8 weights' conversion to fp32, ``INT8_CVT``
    (see ``INT8_CONVERSIONS``; benchmarks compare them). One-row loops pipeline their loads (``STAGES``, 0:
    a plain loop): the dependently launched chain of a 7B decode step took 4.546 ms with two stages against
    4.627 without (bf16) and 2.713 with three against 2.749 (int8; ``bench/gemv_chain.py --stages``).
    ``VEC`` (one-row loop; default 1) sums each run of VEC inputs into one accumulator at every K step, so
    the accumulator holds BLOCK_K / VEC columns instead of BLOCK_K: 16 (int8) or 8 (bf16), one 16-byte
    load's worth per thread, lets wide tiles fit few registers (an int8 16 x 1024 tile: 96 registers
    against 226, Triton 3.9 for sm_90). Not a default: not yet timed on a card."""
    if m > 1:
        return {"BLOCK_N": 32, "BLOCK_K": 256, "num_warps": 4}
    if kind == "int4":
        return {"BLOCK_N": 8, "GROUPS": 4, "num_warps": 4}
    if kind == "int4_words":
        return {"BLOCK_N": 8, "GROUPS": 16, "num_warps": 4, "STAGES": 2}
    if kind == "int8":  # the normalized rows in shorter K steps: 8 x 512 won for both products that have them
        return {"BLOCK_N": 8, "BLOCK_K": 512 if prologue == "norm" else 1024, "num_warps": 4, "STAGES": 3}
    if prologue == "norm":
        return {"BLOCK_N": 8, "BLOCK_K": 1024, "num_warps": 4, "STAGES": 2}
    if prologue == "glu":
        return {"BLOCK_N": 4, "BLOCK_K": 512, "num_warps": 4, "STAGES": 2}
    return {"BLOCK_N": 2, "BLOCK_K": 2048, "num_warps": 8, "STAGES": 2}


if triton is not None:

    @triton.jit
    def _row_activations(x_ptr, g_ptr, u_ptr, kk, k_mask, ss, NORM: tl.constexpr, GLU: tl.constexpr):
        """One K step's activations ``a[kk]`` of the one-row GEMV's prologue, in fp32 (``ss`` sums ``x^2``
        for the norm)."""
        x = tl.load(x_ptr + kk, mask=k_mask, other=0.0).to(tl.float32)
        if NORM:
            ss += x * x
            x = x * tl.load(g_ptr + kk, mask=k_mask, other=0.0).to(tl.float32)
        if GLU:
            x = x * tl.sigmoid(x) * tl.load(u_ptr + kk, mask=k_mask, other=0.0).to(tl.float32)
        return x, ss

    @triton.jit
    def _row_product(acc, w, x, INT8_CVT: tl.constexpr, VEC: tl.constexpr):
        """``acc += w * x`` for one K step of the one-row GEMV, the weights turned into fp32."""
        if INT8_CVT == 1:  # through the bits: 2^23 + 2^22 + q is exact in fp32
            wf = (w.to(tl.int32) + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0
        elif INT8_CVT == 2:  # four at a time: q ^ 0x80 = q + 128 as a byte, placed under 2^23 + 2^22
            wf = tl.inline_asm_elementwise(
                # no escapes in the string: Inductor (torch 2.11) copies a user kernel's source
                # into a string literal unescaped, and a backslash there breaks the copy
                "{ .reg .b32 u, k; xor.b32 u, $4, 0x80808080; mov.b32 k, 0x4B400000; "
                "prmt.b32 $0, u, k, 0x7640; prmt.b32 $1, u, k, 0x7641; "
                "prmt.b32 $2, u, k, 0x7642; prmt.b32 $3, u, k, 0x7643; }",
                "=r,=r,=r,=r,r", [w], dtype=tl.float32, is_pure=True, pack=4) - 12583040.0
        else:
            wf = w.to(tl.float32)
        if VEC > 1:  # each run of VEC inputs (one thread's, from one vector load) summed into one accumulator
            acc += tl.sum(tl.reshape(wf * x[None, :], (wf.shape[0], wf.shape[1] // VEC, VEC)), 2)
        else:
            acc += wf * x[None, :]
        return acc

    @triton.jit
    def _row_step(acc, ss, kk, offs_n, n_mask, x_ptr, w_ptr, g_ptr, u_ptr, K, stride_wn,
                  NORM: tl.constexpr, GLU: tl.constexpr, INT8_CVT: tl.constexpr, PDL: tl.constexpr, VEC: tl.constexpr):
        """One K step of the one-row GEMV: the inputs ``kk`` of ``BLOCK_N`` weight rows into ``acc``."""
        k_mask = kk < K
        # the order of the two loads steers the compiler's schedule: on an H100 the dependently
        # launched bf16 chain took 4.63 ms with the weights' load first and 5.70 with it second,
        # and the ordinary kernel keeps the activations first (int8 "bits" spills otherwise)
        if PDL:
            w = tl.load(w_ptr + offs_n[:, None] * stride_wn + kk[None, :], mask=n_mask[:, None] & k_mask[None, :],
                        other=0)
        x, ss = _row_activations(x_ptr, g_ptr, u_ptr, kk, k_mask, ss, NORM, GLU)
        if not PDL:
            w = tl.load(w_ptr + offs_n[:, None] * stride_wn + kk[None, :], mask=n_mask[:, None] & k_mask[None, :],
                        other=0)
        return _row_product(acc, w, x, INT8_CVT, VEC), ss

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                     g_ptr, u_ptr, r_ptr, eps, stride_um, stride_rm,
                     HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     NORM: tl.constexpr, GLU: tl.constexpr, HAS_RES: tl.constexpr,
                     INT8_CVT: tl.constexpr, PDL: tl.constexpr, GDC: tl.constexpr, STAGES: tl.constexpr,
                     VEC: tl.constexpr):
        """y[m, n] = sum_k a[m, k] * w[n, k] (* s[n]) (+ b[n]) (+ r[m, n]); w float or int8, where the
        activations ``a`` are ``x`` or, fused into the weight loop (prologues):

        - NORM: RMSNorm of x, ``x * rsqrt(mean(x^2) + eps) * g``: the weight loop multiplies by ``x * g``
          and sums ``x^2`` on the way; the row's scale multiplies the finished dot products;
        - GLU: SiLU-gated, ``silu(x) * u`` (x the gate, u the up projection's output).

        HAS_RES adds a residual ``r [M, N]`` to the result (epilogue). INT8_CVT says how int8 weights become
        fp32 in the one-row loop (``INT8_CONVERSIONS``); every way is exact.

        PDL (launched as a programmatic dependent launch, so it may start while the kernel before it still
        runs): for one row, the programs load their first weight tile before anything else — the weights
        must be constants, never written by the kernel before — then, with GDC (CUDA; Triton's interpreter
        has no such instructions), wait for the kernel before to finish (``gdc_wait``) before they read
        activations or write, and let the next kernel start (``gdc_launch_dependents``)."""
        pid = tl.program_id(0)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        n_mask = offs_n < N
        if USE_DOT:
            if GDC:
                tl.extra.cuda.gdc_wait()
                tl.extra.cuda.gdc_launch_dependents()
            offs_m = tl.arange(0, 16)
            m_mask = offs_m < M
            acc = tl.zeros((16, BLOCK_N), dtype=tl.float32)
            ss = tl.zeros((16,), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                kk = k0 + offs_k
                k_mask = kk < K
                x = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :],
                            mask=m_mask[:, None] & k_mask[None, :], other=0.0)
                if NORM:
                    xf = x.to(tl.float32)
                    ss += tl.sum(xf * xf, 1)
                    g = tl.load(g_ptr + kk, mask=k_mask, other=0.0).to(tl.float32)
                    x = (xf * g[None, :]).to(x_ptr.dtype.element_ty)
                if GLU:
                    xf = x.to(tl.float32)
                    u = tl.load(u_ptr + offs_m[:, None] * stride_um + kk[None, :],
                                mask=m_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
                    x = (xf * tl.sigmoid(xf) * u).to(x_ptr.dtype.element_ty)
                w = tl.load(w_ptr + offs_n[:, None] * stride_wn + kk[None, :],
                            mask=n_mask[:, None] & k_mask[None, :], other=0)
                acc += tl.dot(x, tl.trans(w.to(x.dtype)))
            if NORM:
                acc *= tl.rsqrt(ss / K + eps)[:, None]
            if HAS_SCALE:
                acc *= tl.load(s_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            if HAS_BIAS:
                acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            if HAS_RES:
                acc += tl.load(r_ptr + offs_m[:, None] * stride_rm + offs_n[None, :],
                               mask=m_mask[:, None] & n_mask[None, :], other=0.0).to(tl.float32)
            tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :],
                     acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])
        else:
            acc = tl.zeros((BLOCK_N, BLOCK_K // VEC), dtype=tl.float32)
            ss = tl.zeros((BLOCK_K,), dtype=tl.float32)
            start = 0
            if PDL:
                k_mask = offs_k < K
                w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :],
                            mask=n_mask[:, None] & k_mask[None, :], other=0)
                if GDC:
                    tl.extra.cuda.gdc_wait()
                    tl.extra.cuda.gdc_launch_dependents()
                x, ss = _row_activations(x_ptr, g_ptr, u_ptr, offs_k, k_mask, ss, NORM, GLU)
                acc = _row_product(acc, w, x, INT8_CVT, VEC)
                start = BLOCK_K
            # the loads software-pipelined STAGES deep through shared memory; 0 compiles to the plain loop's
            # code (the same SASS for sm_90 as range(), read with bench/kernel_resources.py's compile)
            for k0 in tl.range(start, K, BLOCK_K, num_stages=STAGES):
                acc, ss = _row_step(acc, ss, k0 + offs_k, offs_n, n_mask, x_ptr, w_ptr, g_ptr, u_ptr, K, stride_wn,
                                    NORM, GLU, INT8_CVT, PDL, VEC)
            y = tl.sum(acc, 1)
            if NORM:
                y *= tl.rsqrt(tl.sum(ss, 0) / K + eps)
            if HAS_SCALE:
                y *= tl.load(s_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                y += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            if HAS_RES:
                y += tl.load(r_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=n_mask)

    @triton.jit
    def _gemv_int4_kernel(x_ptr, p_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, KH, G, stride_xm, stride_ym,
                          HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr, BLOCK_N: tl.constexpr,
                          GROUPS: tl.constexpr, GROUP_BYTES: tl.constexpr):
        """y[m, n] = sum_k x[m, k] * ((code[n, k] - 8) * s[n, k // gs] + z[n, k // gs]) (+ b[n]).

        The packed row holds KH = K / 2 bytes, G groups of GROUP_BYTES bytes (2 * GROUP_BYTES inputs);
        byte j carries input 2j in its low nibble and input 2j + 1 in its high nibble."""
        pid = tl.program_id(0)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        offs_j = tl.arange(0, GROUP_BYTES)
        if USE_DOT:
            # one group per step: the scale and zero are one value per weight row
            offs_m = tl.arange(0, 16)
            m_mask = offs_m < M
            acc = tl.zeros((16, BLOCK_N), dtype=tl.float32)
            for g in range(0, G):
                kh = g * GROUP_BYTES + offs_j
                p = tl.load(p_ptr + offs_n[:, None] * KH + kh[None, :], mask=n_mask[:, None], other=0)
                s = tl.load(s_ptr + offs_n * G + g, mask=n_mask, other=0.0).to(tl.float32)[:, None]
                z = tl.load(z_ptr + offs_n * G + g, mask=n_mask, other=0.0).to(tl.float32)[:, None]
                lo = ((p & 15).to(tl.float32) - 8.0) * s + z
                hi = ((p >> 4).to(tl.float32) - 8.0) * s + z
                xe = tl.load(x_ptr + offs_m[:, None] * stride_xm + 2 * kh[None, :], mask=m_mask[:, None], other=0.0)
                xo = tl.load(x_ptr + offs_m[:, None] * stride_xm + 2 * kh[None, :] + 1, mask=m_mask[:, None], other=0.0)
                acc += tl.dot(xe, tl.trans(lo.to(xe.dtype)))
                acc += tl.dot(xo, tl.trans(hi.to(xo.dtype)))
            if HAS_BIAS:
                acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :],
                     acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])
        else:
            # GROUPS groups per step, as a [BLOCK_N, GROUPS, GROUP_BYTES] tile accumulated elementwise (one
            # reduction at the end): w x = (c - 8) s x + z x = c s x + (z - 8 s) x
            offs_g = tl.arange(0, GROUPS)
            acc3 = tl.zeros((BLOCK_N, GROUPS, GROUP_BYTES), dtype=tl.float32)
            for g0 in range(0, G, GROUPS):
                gg = g0 + offs_g
                g_mask = gg < G
                kh = gg[:, None] * GROUP_BYTES + offs_j[None, :]  # [GROUPS, GROUP_BYTES]
                p = tl.load(p_ptr + offs_n[:, None, None] * KH + kh[None, :, :],
                            mask=n_mask[:, None, None] & g_mask[None, :, None], other=0)
                xe = tl.load(x_ptr + 2 * kh, mask=g_mask[:, None], other=0.0).to(tl.float32)
                xo = tl.load(x_ptr + 2 * kh + 1, mask=g_mask[:, None], other=0.0).to(tl.float32)
                gmask2 = n_mask[:, None] & g_mask[None, :]
                s = tl.load(s_ptr + offs_n[:, None] * G + gg[None, :], mask=gmask2, other=0.0).to(tl.float32)
                z = tl.load(z_ptr + offs_n[:, None] * G + gg[None, :], mask=gmask2, other=0.0).to(tl.float32)
                cx = (p & 15).to(tl.float32) * xe[None, :, :] + (p >> 4).to(tl.float32) * xo[None, :, :]
                acc3 += cx * s[:, :, None] + (z - 8.0 * s)[:, :, None] * (xe + xo)[None, :, :]
            acc = tl.sum(acc3, 2)
            y = tl.sum(acc, 1)
            if HAS_BIAS:
                y += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=n_mask)

    @triton.jit
    def _nibble_bits(w, SHIFT: tl.constexpr):
        """The nibble of each word ``w`` that ``SHIFT`` moves to bits 19..22, as the float ``1 + code / 16``
        (the nibble in the top of the mantissa of 1.0): a shift and one logic operation per weight."""
        if SHIFT >= 0:
            b = w << SHIFT
        else:
            b = w >> (-SHIFT)
        return ((b & 0x00780000) | 0x3F800000).to(tl.float32, bitcast=True)

    @triton.jit
    def _slab(part, xs, t, x_ptr, xk, g_mask):
        """One run of contiguous inputs of the word kernel: ``part += t * x``, ``xs += x``."""
        x = tl.load(x_ptr + xk, mask=g_mask[:, None], other=0.0).to(tl.float32)
        return part + t * x[None, :, :], xs + x

    @triton.jit
    def _words_tile(w_ptr, offs_n, n_mask, gg, offs_j, KW, G, WPG: tl.constexpr):
        """The words ``[BLOCK_N, GROUPS, WPG]`` of groups ``gg`` (masked past G), and the groups' mask."""
        g_mask = gg < G
        w = tl.load(w_ptr + offs_n[:, None, None] * KW + (gg[:, None] * WPG + offs_j[None, :])[None, :, :],
                    mask=n_mask[:, None, None] & g_mask[None, :, None], other=0)
        return w, g_mask

    @triton.jit
    def _words_step(acc, w, gg, g_mask, offs_n, n_mask, offs_j, x_ptr, s_ptr, z_ptr, G,
                    WPG: tl.constexpr, CVT: tl.constexpr):
        """One step of the word kernel: ``acc [BLOCK_N, GROUPS]`` plus the groups ``gg`` of the words ``w``."""
        R: tl.constexpr = 128.0 if CVT == 1 else 16.0
        if CVT == 1:
            # no escapes in the string (see _row_product)
            t0, t1, t2, t3, t4, t5, t6, t7 = tl.inline_asm_elementwise(
                "{ .reg .b32 lo, hi, m; and.b32 lo, $8, 0x0F0F0F0F; or.b32 lo, lo, 0x80808080; "
                "shr.u32 hi, $8, 4; and.b32 hi, hi, 0x0F0F0F0F; or.b32 hi, hi, 0x80808080; "
                "mov.b32 m, 0x3F000000; "
                "prmt.b32 $0, lo, m, 0x7044; prmt.b32 $1, hi, m, 0x7044; "
                "prmt.b32 $2, lo, m, 0x7144; prmt.b32 $3, hi, m, 0x7144; "
                "prmt.b32 $4, lo, m, 0x7244; prmt.b32 $5, hi, m, 0x7244; "
                "prmt.b32 $6, lo, m, 0x7344; prmt.b32 $7, hi, m, 0x7344; }",
                "=r,=r,=r,=r,=r,=r,=r,=r,r", [w], dtype=(tl.float32,) * 8, is_pure=True, pack=1)
        else:
            t0 = _nibble_bits(w, 19)
            t1 = _nibble_bits(w, 15)
            t2 = _nibble_bits(w, 11)
            t3 = _nibble_bits(w, 7)
            t4 = _nibble_bits(w, 3)
            t5 = _nibble_bits(w, -1)
            t6 = _nibble_bits(w, -5)
            t7 = _nibble_bits(w, -9)
        xk = gg[:, None] * (8 * WPG) + offs_j[None, :]  # the inputs of the words' lowest nibbles
        part = tl.zeros(w.shape, dtype=tl.float32)
        xs = tl.zeros((w.shape[1], WPG), dtype=tl.float32)
        part, xs = _slab(part, xs, t0, x_ptr, xk, g_mask)
        part, xs = _slab(part, xs, t1, x_ptr, xk + WPG, g_mask)
        part, xs = _slab(part, xs, t2, x_ptr, xk + 2 * WPG, g_mask)
        part, xs = _slab(part, xs, t3, x_ptr, xk + 3 * WPG, g_mask)
        part, xs = _slab(part, xs, t4, x_ptr, xk + 4 * WPG, g_mask)
        part, xs = _slab(part, xs, t5, x_ptr, xk + 5 * WPG, g_mask)
        part, xs = _slab(part, xs, t6, x_ptr, xk + 6 * WPG, g_mask)
        part, xs = _slab(part, xs, t7, x_ptr, xk + 7 * WPG, g_mask)
        gmask2 = n_mask[:, None] & g_mask[None, :]
        s = tl.load(s_ptr + offs_n[:, None] * G + gg[None, :], mask=gmask2, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + offs_n[:, None] * G + gg[None, :], mask=gmask2, other=0.0).to(tl.float32)
        return acc + R * s * tl.sum(part, 2) + (z - (R + 8.0) * s) * tl.sum(xs, 1)[None, :]

    @triton.jit
    def _gemv_int4_words_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, N, KW, G,
                                HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr,
                                WPG: tl.constexpr, CVT: tl.constexpr, STAGES: tl.constexpr,
                                PDL: tl.constexpr, GDC: tl.constexpr):
        """One row times int4 weights in the word layout (``mmcompile.quant.int4_words``): ``y[n] = sum_k
        x[k] * ((code[n, k] - 8) * s[n, g] + z[n, g])`` (+ b[n]), groups of ``8 * WPG`` inputs, ``KW = K / 8``
        words per row.

        Each step reads a ``[BLOCK_N, GROUPS, WPG]`` tile of words. A word's i-th nibbles across a group are
        the inputs ``i * WPG ..`` of that group, so each of the eight nibbles multiplies one contiguous run
        of activations. Codes become floats without a conversion instruction: placed in the mantissa of 1.0,
        ``t = 1 + code / R`` (CVT 0, "bits": R = 16, a shift and a logic operation per weight; CVT 1,
        "prmt": R = 128, eight byte permutes and three logic operations per word, PTX). The loop accumulates
        ``d = sum t x`` and ``sum x`` per group, and since ``code - 8 = R t - R - 8`` a group adds
        ``R s d + (z - (R + 8) s) sum x``: one fused multiply-add per weight.

        PDL: as ``_gemv_kernel``'s, the first tile of words is read before waiting for the kernel before."""
        pid = tl.program_id(0)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        offs_g = tl.arange(0, GROUPS)
        offs_j = tl.arange(0, WPG)
        acc = tl.zeros((BLOCK_N, GROUPS), dtype=tl.float32)
        start = 0
        if PDL:
            w, g_mask = _words_tile(w_ptr, offs_n, n_mask, offs_g, offs_j, KW, G, WPG)
            if GDC:
                tl.extra.cuda.gdc_wait()
                tl.extra.cuda.gdc_launch_dependents()
            acc = _words_step(acc, w, offs_g, g_mask, offs_n, n_mask, offs_j, x_ptr, s_ptr, z_ptr, G, WPG, CVT)
            start = GROUPS
        for g0 in tl.range(start, G, GROUPS, num_stages=STAGES):
            gg = g0 + offs_g
            w, g_mask = _words_tile(w_ptr, offs_n, n_mask, gg, offs_j, KW, G, WPG)
            acc = _words_step(acc, w, gg, g_mask, offs_n, n_mask, offs_j, x_ptr, s_ptr, z_ptr, G, WPG, CVT)
        y = tl.sum(acc, 1)
        if HAS_BIAS:
            y += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=n_mask)

    def _launcher(kernel, pdl: bool, cuda: bool):
        """``kernel`` as launched from an op, and the launch's PDL arguments. Every argument is passed, none
        left to a default: Inductor (torch 2.11) launches a user kernel with the arguments of the traced call
        only. The dependently launched op is opaque to tracing: it launches the kernel itself (through
        wrap_triton outside a triton_op, each call took 275 us on an H100 instead of 70)."""
        launch = {"PDL": pdl, "GDC": pdl and cuda, **({"launch_pdl": True} if pdl and cuda else {})}
        return (kernel if pdl else wrap_triton(kernel)), launch

    def _launch(x2: torch.Tensor, weight: torch.Tensor, scales: Optional[torch.Tensor],
                bias: Optional[torch.Tensor], kind: str, config: Optional[dict],
                norm_weight: Optional[torch.Tensor] = None, eps: float = 0.0,
                up: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None,
                pdl: bool = False) -> torch.Tensor:
        M, K = x2.shape
        N = weight.shape[0]
        prologue = "norm" if norm_weight is not None else "glu" if up is not None else None
        cfg = dict(config or config_for(kind, M, N, K, prologue))
        warps = cfg.pop("num_warps", 4)
        kernel, launch = _launcher(_gemv_kernel, pdl or bool(cfg.pop("PDL", False)), x2.is_cuda)
        cvt = cfg.get("INT8_CVT", "prmt" if x2.is_cuda else "bits")
        if cvt not in INT8_CONVERSIONS:
            raise ValueError(f"GEMV config INT8_CVT={cfg['INT8_CVT']!r}; choose from {', '.join(INT8_CONVERSIONS)}")
        vec = cfg.get("VEC", 1)
        if vec < 1 or cfg["BLOCK_K"] % vec:
            raise ValueError(f"GEMV config VEC={vec} must be a positive divisor of BLOCK_K={cfg['BLOCK_K']}")
        y = x2.new_empty(M, N)
        grid = (triton.cdiv(N, cfg["BLOCK_N"]),)
        some = weight  # any tensor stands in for an absent one (its branch is compiled out)
        kernel[grid](
            x2, weight, scales if scales is not None else some, bias if bias is not None else some, y,
            M, N, K, x2.stride(0), weight.stride(0), y.stride(0),
            norm_weight if norm_weight is not None else some, up if up is not None else some,
            residual if residual is not None else some, float(eps),
            up.stride(0) if up is not None else 0, residual.stride(0) if residual is not None else 0,
            HAS_SCALE=scales is not None, HAS_BIAS=bias is not None, USE_DOT=M > 1,
            BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], NORM=norm_weight is not None, GLU=up is not None,
            HAS_RES=residual is not None, INT8_CVT=INT8_CONVERSIONS.index(cvt) if scales is not None else 0,
            num_warps=warps, **launch, STAGES=cfg.get("STAGES", 0), VEC=vec)
        return y

    def _launch_int4(x2, packed, scales, zeros, bias, config):
        M, K = x2.shape
        N, KH = packed.shape
        G = scales.shape[1]
        cfg = dict(config or config_for("int4", M, N, K))
        warps = cfg.pop("num_warps", 4)
        y = x2.new_empty(M, N)
        grid = (triton.cdiv(N, cfg["BLOCK_N"]),)
        wrap_triton(_gemv_int4_kernel)[grid](
            x2, packed, scales, zeros, bias if bias is not None else scales, y, M, N, KH, G,
            x2.stride(0), y.stride(0), HAS_BIAS=bias is not None, USE_DOT=M > 1, BLOCK_N=cfg["BLOCK_N"],
            GROUPS=cfg.get("GROUPS", 1), GROUP_BYTES=KH // G, num_warps=warps)
        return y


    def _launch_int4_words(x2, words, scales, zeros, bias, config, pdl=False):
        N, KW = words.shape
        G = scales.shape[1]
        cfg = dict(config or config_for("int4_words", 1, N, 8 * KW))
        warps = cfg.pop("num_warps", 4)
        kernel, launch = _launcher(_gemv_int4_words_kernel, pdl or bool(cfg.pop("PDL", False)), x2.is_cuda)
        cvt = cfg.get("INT4_CVT", "prmt" if x2.is_cuda else "bits")
        if cvt not in INT4_CONVERSIONS:
            raise ValueError(f"GEMV config INT4_CVT={cvt!r}; choose from {', '.join(INT4_CONVERSIONS)}")
        y = x2.new_empty(1, N)
        grid = (triton.cdiv(N, cfg["BLOCK_N"]),)
        kernel[grid](
            x2, words, scales, zeros, bias if bias is not None else scales, y, N, KW, G,
            HAS_BIAS=bias is not None, BLOCK_N=cfg["BLOCK_N"], GROUPS=min(cfg["GROUPS"], triton.next_power_of_2(G)),
            WPG=KW // G, CVT=INT4_CONVERSIONS.index(cvt), STAGES=cfg.get("STAGES", 1), num_warps=warps, **launch)
        return y


def registered_at_first_use(define: Callable[[], None]) -> Callable[[], bool]:
    """``define`` (which registers a module's Triton kernels as torch ops) made into that module's
    ``register()``: run once, at the first call, under a lock (first calls from two threads define once);
    False without triton. Deferred rather than done on import because ``torch.library.triton_op`` imports
    Inductor and Dynamo to read the function's source: ``import mmcompile`` took 1.4 s instead of 0.3 on a
    CPU and several seconds on a cold start, paid by every program that only loads an artifact to run it.
    The kernels' functions and the Inductor backend's rewrites call ``register()`` before they use an op."""
    done, lock = [False], threading.Lock()

    @functools.wraps(define, assigned=("__module__", "__name__", "__qualname__", "__doc__"))
    def register() -> bool:
        if done[0] or triton is None:
            return done[0]
        with lock:
            if not done[0]:
                define()
                done[0] = True
        return True

    # Under a Dynamo trace (torch.compile of a function that calls the kernels), run register for real
    # rather than trace it (Dynamo refuses to trace triton_op): what torch.compiler.assume_constant_result
    # does, set by hand because importing that decorator imports Dynamo
    register._dynamo_marked_constant = True
    return register


@registered_at_first_use
def register() -> None:
    """Register the GEMV kernels as torch ops (``mmcompile::triton_gemv``, ``_int8``, ``_fused``,
    ``_fused_pdl``, ``_int4``, ``_int4_words``, ``_int4_words_pdl``)."""
    from torch.library import triton_op

    @triton_op("mmcompile::triton_gemv", mutates_args=())
    def _triton_gemv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        return _launch(x, weight, None, bias, "float", None)

    @triton_op("mmcompile::triton_gemv_int8", mutates_args=())
    def _triton_gemv_int8(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor,
                          bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        return _launch(x, weight, scales, bias, "int8", None)

    @triton_op("mmcompile::triton_gemv_fused", mutates_args=())
    def _triton_gemv_fused(x: torch.Tensor, weight: torch.Tensor, scales: Optional[torch.Tensor],
                           bias: Optional[torch.Tensor], norm_weight: Optional[torch.Tensor], eps: float,
                           up: Optional[torch.Tensor], residual: Optional[torch.Tensor]) -> torch.Tensor:
        return _launch(x, weight, scales, bias, "float" if scales is None else "int8", None,
                       norm_weight, eps, up, residual)

    def _fused_shape(x, weight, scales, bias, norm_weight, eps, up, residual):
        return x.new_empty(x.shape[0], weight.shape[0])

    _triton_gemv_fused.register_fake(_fused_shape)

    # The same product launched as a programmatic dependent launch (sm_90 and later, see _gemv_kernel's PDL):
    # an opaque op, because Inductor launches the kernels of a triton_op itself, without that launch
    # attribute. Its weights must be constants (the first weight tile is read before the kernel before has
    # finished); ``inductor_fusions.launch_gemvs_dependently`` checks that.
    @torch.library.custom_op("mmcompile::triton_gemv_fused_pdl", mutates_args=())
    def _triton_gemv_fused_pdl(x: torch.Tensor, weight: torch.Tensor, scales: Optional[torch.Tensor],
                               bias: Optional[torch.Tensor], norm_weight: Optional[torch.Tensor], eps: float,
                               up: Optional[torch.Tensor], residual: Optional[torch.Tensor]) -> torch.Tensor:
        return _launch(x, weight, scales, bias, "float" if scales is None else "int8", None,
                       norm_weight, eps, up, residual, pdl=True)

    _triton_gemv_fused_pdl.register_fake(_fused_shape)

    @triton_op("mmcompile::triton_gemv_int4", mutates_args=())
    def _triton_gemv_int4(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                          bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        return _launch_int4(x, packed, scales, zeros, bias, None)

    @triton_op("mmcompile::triton_gemv_int4_words", mutates_args=())
    def _triton_gemv_int4_words(x: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        return _launch_int4_words(x, words, scales, zeros, bias, None)

    def _words_shape(x, words, scales, zeros, bias=None):
        return x.new_empty(1, words.shape[0])

    # shapes without running the kernel (Triton's interpreter cannot run on fake tensors)
    _triton_gemv_int4_words.register_fake(_words_shape)

    # launched as a programmatic dependent launch (see triton_gemv_fused_pdl): its words must be constants
    @torch.library.custom_op("mmcompile::triton_gemv_int4_words_pdl", mutates_args=())
    def _triton_gemv_int4_words_pdl(x: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                                    bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        return _launch_int4_words(x, words, scales, zeros, bias, None, pdl=True)

    _triton_gemv_int4_words_pdl.register_fake(_words_shape)


def _rows(x: torch.Tensor) -> torch.Tensor:
    # Dense rows, copied when they are a view with gaps (a slice of a wider product): traced under
    # Inductor, the kernel's row strides are read from the traced tensor and passed as numbers, while
    # Inductor keeps only the order of its buffers' strides for a user kernel's arguments; a dense
    # tensor's strides follow from that order, a view's may not. One row is dense whatever its stride.
    return x.reshape(-1, x.shape[-1]).contiguous()


def _check(x: torch.Tensor, weight: torch.Tensor, *vectors: Optional[torch.Tensor]) -> None:
    ok, why = supported(x, weight, *vectors)
    if not ok:
        raise ValueError(f"Triton GEMV kernel not applicable: {why}")
    register()


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
         config: Optional[dict] = None) -> torch.Tensor:
    """``x [..., K] @ weight[N, K].T (+ bias)`` with the float-weight kernel."""
    _check(x, weight, bias)
    x2 = _rows(x)
    y = torch.ops.mmcompile.triton_gemv(x2, weight, bias) if config is None else \
        _launch(x2, weight, None, bias, "float", config)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def gemv_int8(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor] = None,
              config: Optional[dict] = None) -> torch.Tensor:
    """``(x @ q.T) * scales (+ bias)`` for int8 weights ``q [N, K]`` with per-row ``scales [N]``."""
    _check(x, weight, scales, bias)
    x2 = _rows(x)
    y = torch.ops.mmcompile.triton_gemv_int8(x2, weight, scales, bias) if config is None else \
        _launch(x2, weight, scales, bias, "int8", config)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def gemv_fused(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
               scales: Optional[torch.Tensor] = None, norm_weight: Optional[torch.Tensor] = None,
               eps: float = 1e-6, up: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None,
               config: Optional[dict] = None) -> torch.Tensor:
    """A GEMV with its neighbours in the same kernel: ``[residual +] a @ weight.T [* scales] [+ bias]``
    where ``a`` is ``rms_norm(x, norm_weight, eps)`` (given ``norm_weight``), ``silu(x) * up`` (given
    ``up``, the gate and up projections' outputs) or ``x``. ``weight`` is float or, with ``scales``, int8
    (``gemv_int8``'s layout). Saves the launches and the round trips through memory of the normalized or
    gated activations and of the product before the residual add: one kernel instead of two or three.

    The statistics and gating are computed in fp32; where eager rounds the normalized (or gated)
    activations to the input dtype before the product, this kernel keeps them in fp32 (for one row) or
    rounds once (several rows), so results differ from eager by that rounding."""
    if norm_weight is not None and up is not None:
        raise ValueError("gemv_fused: a norm prologue and a gated prologue together are not supported")
    _check(x, weight, scales, bias, norm_weight, residual)
    x2 = _rows(x)
    K, N = x2.shape[1], weight.shape[0]
    if norm_weight is not None and tuple(norm_weight.shape) != (K,):
        raise ValueError(f"gemv_fused: norm weight {list(norm_weight.shape)} for {K} inputs")
    if up is not None:
        if tuple(up.shape) != tuple(x.shape):
            raise ValueError(f"gemv_fused: up {list(up.shape)} and gate {list(x.shape)} differ")
        up = _rows(up)
    if residual is not None:
        if residual.numel() != x2.shape[0] * N:
            raise ValueError(f"gemv_fused: residual {list(residual.shape)} for a [{x2.shape[0]}, {N}] product")
        residual = _rows(residual.reshape(-1, N))
    if config is None:
        y = torch.ops.mmcompile.triton_gemv_fused(x2, weight, scales, bias, norm_weight, float(eps), up, residual)
    else:
        y = _launch(x2, weight, scales, bias, "float" if scales is None else "int8", config,
                    norm_weight, eps, up, residual)
    return y.reshape(*x.shape[:-1], N)


def int4_groups_refusal(inputs: int, groups: int) -> str:
    """Why the int4 kernels (packed codes or words) cannot take ``inputs`` in ``groups`` groups, or "": they
    take groups of a power of two of 16 or more inputs."""
    size = inputs // groups if groups and inputs % groups == 0 else 0
    if size < 16 or size & (size - 1):
        return f"int4 groups of {size} inputs; the kernels take power-of-two groups of 16 or more"
    return ""


def int4_supported(packed: torch.Tensor, scales: torch.Tensor) -> tuple[bool, str]:
    if not packed.is_contiguous():
        return False, "the packed int4 weight is not contiguous"
    why = int4_groups_refusal(2 * packed.shape[1], scales.shape[1])
    return not why, why


def int4_words_supported(x: torch.Tensor, words: torch.Tensor, scales: torch.Tensor) -> tuple[bool, str]:
    """Whether ``gemv_int4_words`` takes these: (ok, reason)."""
    rows = x.numel() // max(x.shape[-1], 1)
    if rows != 1:
        return False, f"{rows} rows; the int4 word kernel is for one row (batch-1 decode)"
    if words.dtype != torch.int32 or words.dim() != 2 or not words.is_contiguous():
        return False, f"the words are {words.dtype} {list(words.shape)}; the kernel takes contiguous int32 [N, K / 8]"
    N, KW = words.shape
    G = scales.shape[1] if scales.dim() == 2 else 0
    if x.shape[-1] != 8 * KW:
        return False, f"{x.shape[-1]} inputs against words for {8 * KW}"
    why = int4_groups_refusal(8 * KW, G)
    return not why, why


def gemv_int4_words(x: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    bias: Optional[torch.Tensor] = None, config: Optional[dict] = None) -> torch.Tensor:
    """One row times group-wise int4 weights in the word layout (``mmcompile.quant.int4_words``), scales and
    zeros as ``quantize_int4`` gives them: the same value as ``gemv_int4`` on the packed codes."""
    return _int4_product(x, words, scales, zeros, bias, config, lambda: int4_words_supported(x, words, scales),
                         "triton_gemv_int4_words", lambda *args: _launch_int4_words(*args))


def gemv_int4(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
              bias: Optional[torch.Tensor] = None, config: Optional[dict] = None) -> torch.Tensor:
    """Group-wise int4 linear in the ``mmcompile.quant`` layout."""
    return _int4_product(x, packed, scales, zeros, bias, config, lambda: int4_supported(packed, scales),
                         "triton_gemv_int4", lambda *args: _launch_int4(*args))


def _int4_product(x, weight, scales, zeros, bias, config, fits, op: str, launch) -> torch.Tensor:
    """``gemv_int4`` and ``gemv_int4_words``: the checks (``fits() -> (ok, why)`` the kernel's own), then the
    registered op ``mmcompile::<op>``, or ``launch(rows, weight, scales, zeros, bias, config)`` for an
    explicit config."""
    _check(x, weight, scales, zeros, bias)
    ok, why = fits()
    if not ok:
        raise ValueError(f"Triton GEMV kernel not applicable: {why}")
    x2 = _rows(x)
    y = getattr(torch.ops.mmcompile, op)(x2, weight, scales, zeros, bias) if config is None else \
        launch(x2, weight, scales, zeros, bias, config)
    return y.reshape(*x.shape[:-1], weight.shape[0])
