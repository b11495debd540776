"""Prefill attention over a static KV cache, reading only the keys each block of queries can see.

A prefill (or a chunk of one) attends ``S`` queries per row to a KV buffer of ``L`` slots under the
mask ``arange(L) <= positions``: query ``s`` of row ``b`` sees the keys up to its position. Positions are
an input of the compiled step, so the mask is built at run time and the fused SDPA kernels are handed
it explicitly: they then compute every (query, key) product, the masked half of a causal prefill and the
cache's empty tail included. This kernel (a flash-attention forward pass) takes the positions instead:

- each program owns ``BLOCK_M`` queries of one (row, head) and reads its positions first; keys past the
  block's greatest position are never read, so a causal prefill costs half the products and a prompt
  shorter than the cache costs nothing for the slots behind it;
- keys that every query of the block sees (up to its least position) run without a mask; only the
  blocks between the least and the greatest position apply one, per query;
- grouped-query attention reads each query head's key/value head in place (no repeat);
- an online softmax in fp32 (base 2, the scale folded in), products in the inputs' dtype.

``prefill_attention(q [B, H, S, D], k [B, Hkv, L, D], v, positions [B or 1, S], scale?)`` equals
``scaled_dot_product_attention(q, k, v, attn_mask=arange(L) <= positions[..., None], scale=scale,
enable_gqa=True)`` for positions that are any integers (not only consecutive ones); a query whose
position is negative sees no key and gives zeros (SDPA gives NaN there). The output is laid out
``[B, S, H, D]`` in memory and returned as a ``[B, H, S, D]`` view, as torch's flash kernels do, so
the usual ``transpose(1, 2).reshape(B, S, H * D)`` after it copies nothing.

``supported(...)`` says whether a call qualifies and why not. The Inductor backend rewrites qualifying
SDPA calls of a compiled graph — many queries per row, a mask it proves to be ``arange(L) <= positions``
— to this op on CUDA (option ``attention``, see ``backends.inductor.route_prefill_attention``); on a CPU
it runs only under Triton's interpreter, which the tests use.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from mmcompile.decode_attention import operands_refusal
from mmcompile.kernels import available, registered_at_first_use, triton, tl

__all__ = ["supported", "prefill_attention", "config_for", "launch"]

if triton is not None:
    from torch.library import wrap_triton


def supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
              *, dtypes=(torch.float16, torch.bfloat16)) -> tuple[bool, str]:
    """Whether a call qualifies for the prefill kernel: (ok, reason)."""
    why = operands_refusal(q, k, v, dtypes)
    if why:
        return False, why
    B, S = q.shape[0], q.shape[2]
    if positions.dtype.is_floating_point or positions.dtype == torch.bool:
        return False, f"positions are {positions.dtype}; the kernel takes integers"
    if positions.dim() != 2 or positions.shape[0] not in (1, B) or positions.shape[1] != S:
        return False, f"positions {list(positions.shape)}; the kernel takes [B or 1, S] = [{B} or 1, {S}]"
    return available(q.device)


def config_for(head_dim: int, device: torch.device) -> dict:
    """Tile, warps and stages: on CUDA 64 queries x 64 keys, 4 warps, 3 stages (2 for heads past 128,
    whose tiles would not fit shared memory three deep): the best of 36 tiles on the 7B shape's prefill of
    2048 tokens on an H100, 0.107 ms against 0.123 for the next (``bench/prefill_attention.py --sweep``,
    docs/benchmarks.md). Under Triton's interpreter small tiles, which it runs faster."""
    if device.type != "cuda":
        return {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
    return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3 if head_dim <= 128 else 2}


if triton is not None:

    @triton.jit
    def _attend(q, k, v, m_i, l_i, acc, qk_scale, vis, MASKED: tl.constexpr):
        """One block of keys into the online softmax (base 2): (m_i, l_i, acc) updated; with MASKED only
        where ``vis`` is true."""
        s = tl.dot(q, tl.trans(k)) * qk_scale
        if MASKED:
            s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a query that has seen no key yet
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return m_new, l_i, acc

    @triton.jit
    def _prefill_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, o_ptr, S, L, H, qk_scale,
                        sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, spb, sps, sob, soh, sos,
                        G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """Queries ``[start, start + BLOCK_M)`` of one (row b, head h): softmax(q kᵀ) v over the keys up to
        each query's position (``pos_ptr[b, s]``), reading keys ``[0, greatest position]`` only, the ones
        every query sees without a mask. ``qk_scale`` is the softmax scale times log2(e)."""
        # the last queries first: they see the most keys, and started early they do not finish last
        start = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        hk = h // G
        qk_scale = tl.cast(qk_scale, tl.float32)  # Inductor passes a float argument as fp64: scores stay fp32
        offs_m = start + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D)
        m_ok = offs_m < S
        pos = tl.load(pos_ptr + b * spb + offs_m * sps, mask=m_ok, other=-1)
        hi = tl.minimum(tl.max(pos, 0) + 1, L)  # keys [0, hi) hold every key a query of the block sees
        low = tl.minimum(tl.min(tl.where(m_ok, pos, L), 0) + 1, hi)  # keys [0, low) every query sees
        full = tl.maximum(low, 0) // BLOCK_N * BLOCK_N
        q = tl.load(q_ptr + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :], mask=m_ok[:, None], other=0.0)
        kb = k_ptr + b * skb + hk * skh
        vb = v_ptr + b * svb + hk * svh
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        for n0 in range(0, full, BLOCK_N):  # seen by every query: no mask, no bounds
            kk = n0 + offs_n
            k = tl.load(kb + kk[:, None] * sks + offs_d[None, :])
            v = tl.load(vb + kk[:, None] * svs + offs_d[None, :])
            m_i, l_i, acc = _attend(q, k, v, m_i, l_i, acc, qk_scale, m_ok[:, None], False)
        for n0 in range(full, hi, BLOCK_N):  # the blocks between the least and the greatest position
            kk = n0 + offs_n
            k_ok = kk < L
            k = tl.load(kb + kk[:, None] * sks + offs_d[None, :], mask=k_ok[:, None], other=0.0)
            v = tl.load(vb + kk[:, None] * svs + offs_d[None, :], mask=k_ok[:, None], other=0.0)
            vis = (kk[None, :] <= pos[:, None]) & k_ok[None, :]
            m_i, l_i, acc = _attend(q, k, v, m_i, l_i, acc, qk_scale, vis, True)
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # a query that saw no key: zeros
        tl.store(o_ptr + b * sob + h * soh + offs_m[:, None] * sos + offs_d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=m_ok[:, None])


@registered_at_first_use
def register() -> None:
    """Register ``mmcompile::prefill_attention`` with torch (at first use: ``kernels.registered_at_first_use``)."""
    from torch.library import triton_op

    @triton_op("mmcompile::prefill_attention", mutates_args=())
    def _prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                           scale: float) -> torch.Tensor:
        return launch(wrap_triton(_prefill_kernel), q, k, v, positions, scale, config_for(q.shape[3], q.device))


def launch(kernel, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, scale: float,
           config: dict) -> torch.Tensor:
    """Run ``kernel`` (``_prefill_kernel``, or it wrapped for a trace) with ``config`` (``config_for``'s
    keys); the registered op calls it, and benchmarks that try other tiles."""
    B, H, S, D = q.shape
    HKV, L = k.shape[1], k.shape[2]
    # dense operands: traced under Inductor the strides below are fixed as numbers while Inductor keeps
    # only their order. The queries keep the [B, S, H, D] memory a projection's transposed view has
    q = q.transpose(1, 2).contiguous().transpose(1, 2)
    k, v = k.contiguous(), v.contiguous()
    positions = positions.expand(B, S)
    out = torch.empty(B, S, H, D, dtype=q.dtype, device=q.device).transpose(1, 2)
    cfg = dict(config)
    block_m = cfg.pop("BLOCK_M")
    # every argument is passed, none left to a default: Inductor (torch 2.11) launches a user kernel with
    # the arguments of the traced call only
    kernel[(triton.cdiv(S, block_m), B * H)](
        q, k, v, positions, out, S, L, H, scale * math.log2(math.e),
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), positions.stride(0), positions.stride(1),
        out.stride(0), out.stride(1), out.stride(2), G=H // HKV, D=D, BLOCK_M=block_m, **cfg)
    return out


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                      scale: Optional[float] = None) -> torch.Tensor:
    """``scaled_dot_product_attention(q, k, v, attn_mask=arange(L) <= positions[..., None], scale=scale,
    enable_gqa=True)`` with the position-bounded kernel (see the module's docstring). ``positions``:
    [B, S], [1, S] or [S] integers."""
    if positions.dim() == 1:
        positions = positions[None]
    ok, why = supported(q, k, v, positions, dtypes=(torch.float16, torch.bfloat16, torch.float32))
    if not ok:
        raise ValueError(f"prefill attention kernel not applicable: {why}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    register()
    return torch.ops.mmcompile.prefill_attention(q, k, v, positions, scale)
