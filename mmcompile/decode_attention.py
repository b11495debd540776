"""Split-KV decode attention: one query per row over a static KV cache, reading only the visible keys.

A decode step attends one new query per row to a KV buffer of ``max_seq_len`` slots, of which only the
first ``position + 1`` hold keys; the mask says which. The fused SDPA kernels read every slot, so the
cost of attention grows with the buffer, not with the sequence. This kernel (flash-decoding):

- splits the keys of each (row, KV head) into chunks, one program per chunk, so a batch-1 step still
  fills the GPU;
- loads each ``BLOCK_N`` block of the boolean mask first and skips the block — no K or V read — when
  none of its keys is visible, so a step reads the cache up to the current position only (the grid
  keeps a static shape, so the step stays capturable in a CUDA graph);
- computes the query heads that share a KV head (grouped-query attention) together with ``tl.dot``,
  with an online softmax in fp32, and writes each chunk's output and log-sum-exp;
- combines the chunks in the same launch: each program counts itself done on an atomic counter, and
  the last one of a (row, KV head) weighs the chunks by their log-sum-exp and writes the output (no
  combining kernels after it; the counters are zeroed per call).

``decode_attention(q [B, H, 1, D], k [B, Hkv, S, D], v, mask bool broadcastable to [B, H, 1, S]?,
scale?)`` equals ``scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
enable_gqa=True)`` wherever a row sees at least one key (a row that sees none gives zeros).
``supported(...)`` says whether a call qualifies and why not. The Inductor backend rewrites
qualifying SDPA nodes of a compiled graph to this op on CUDA (option ``attention``); on a CPU it runs
only under Triton's interpreter, which the tests use.
"""

from __future__ import annotations

import threading
from typing import Optional

import torch

from mmcompile.kernels import available, registered_at_first_use, triton, tl

__all__ = ["supported", "decode_attention", "decode_attention_append", "splits_for"]

if triton is not None:
    from torch.library import wrap_triton


def supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None,
              *, dtypes=(torch.float16, torch.bfloat16)) -> tuple[bool, str]:
    """Whether an SDPA call qualifies for the decode kernel: (ok, reason)."""
    if q.dim() == 4 and k.dim() == 4 and v.dim() == 4 and q.shape[2] != 1:
        return False, f"{q.shape[2]} queries per row; the kernel is for decode (one)"
    why = operands_refusal(q, k, v, dtypes)
    if why:
        return False, why
    B, H = q.shape[:2]
    if mask is not None:
        if mask.dtype != torch.bool:
            return False, f"a {mask.dtype} mask; the kernel takes boolean masks (or none)"
        try:
            torch.broadcast_shapes(mask.shape, (B, H, 1, k.shape[2]))
        except RuntimeError:
            return False, f"mask {list(mask.shape)} does not broadcast to [B, H, 1, S]"
        if len(mask.shape) > 4:
            return False, "mask has more than 4 dimensions"
    return available(q.device)


def operands_refusal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dtypes) -> Optional[str]:
    """Why q [B, H, L, D], k and v [B, Hkv, S, D] cannot go to the attention kernels (decode and
    prefill: grouped heads, a power-of-two head dimension, dense along it), or None."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return "q, k and v must be 4-D [B, H, L, D]"
    B, H, L, D = q.shape
    if q.dtype not in dtypes or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtypes {q.dtype}/{k.dtype}/{v.dtype}; the kernel takes {', '.join(map(str, dtypes))}"
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        return f"k {list(k.shape)} and v {list(v.shape)} do not match q {list(q.shape)}"
    if H % k.shape[1]:
        return f"{H} query heads do not group over {k.shape[1]} key/value heads"
    if D < 16 or D > 256 or D & (D - 1):
        return f"head dimension {D}; the kernel takes powers of two from 16 to 256"
    if q.stride(3) != 1 or k.stride(3) != 1 or v.stride(3) != 1:
        return "q, k or v is not contiguous in the head dimension"
    return None


def splits_for(batch: int, kv_heads: int, keys: int, block_n: int, device: torch.device) -> tuple[int, int]:
    """(chunks per (row, KV head), keys per chunk): about two programs per multiprocessor in all, each
    chunk a whole number of blocks."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    blocks = -(-keys // block_n)
    splits = max(1, min(blocks, -(-2 * sms // (batch * kv_heads))))
    chunk = -(-blocks // splits) * block_n
    return -(-keys // chunk), chunk


if triton is not None:

    @triton.jit
    def _attend(q, k, v, vis, m_i, l_i, acc, scale):
        """One block of keys into the online softmax: (m_i, l_i, acc) updated with the visible keys of ``k``."""
        s = tl.dot(q, tl.trans(k)) * scale
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return m_new, l_i, acc

    @triton.jit
    def _decode_kernel(q_ptr, k_ptr, v_ptr, m_ptr, o_ptr, lse_ptr, out_ptr, count_ptr, S, CHUNK, HKV, scale,
                       sqb, sqh, skb, skh, sks, svb, svh, svs, smb, smh, sms,
                       pos_ptr, cos_ptr, sin_ptr, scb, KOFF, VOFF,
                       G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                       HAS_MASK: tl.constexpr, SPLITS: tl.constexpr, SP: tl.constexpr,
                       APPEND: tl.constexpr, ROPE: tl.constexpr, GDC: tl.constexpr):
        """One (row b, KV head, chunk): the chunk's attention output and log-sum-exp for the G query
        heads of that KV head (rows of a [GP, D] tile, GP >= 16 for tl.dot). The last chunk of a (row,
        KV head) to finish — counted in ``count_ptr``, zero when the kernel starts — combines all chunks
        into ``out [B, H, D]`` (one launch, no combining kernels after it) and sets the count back to zero.

        With ``APPEND`` the step's new key and value come in the packed q/k/v row (``q_ptr`` row b: the
        queries, then the keys at ``KOFF``, the values at ``VOFF``) and go into the cache at the row's
        position ``pos_ptr[b]``, written by the chunk that holds it, which also uses them from registers;
        a row sees the keys up to its position (no mask is read). With ``ROPE`` the queries and the new
        key are first rotated (rotate-half) by the row's ``cos``/``sin`` vectors. The chunk's first block
        of keys is read before the q/k/v row: with ``GDC`` (launched as a programmatic dependent launch on
        CUDA) the kernel waits for the kernel before — the one that computes the row — only after that
        read (``gdc_wait``), and lets the next kernel start (``gdc_launch_dependents``). Everything it
        reads before waiting was written by earlier steps or kernels: the cache's other slots, the
        positions, the rotary vectors."""
        pid = tl.program_id(0)
        split = tl.program_id(1)
        scale = tl.cast(scale, tl.float32)  # Inductor passes a float argument as fp64: scores stay fp32
        b = pid // HKV
        hk = pid % HKV
        offs_g = tl.arange(0, GP)
        g_mask = offs_g < G
        heads = hk * G + offs_g
        offs_d = tl.arange(0, D)
        start = split * CHUNK
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, D], tl.float32)
        if APPEND:
            at = tl.load(pos_ptr + b)  # the row's position: its new slot
            offs_n = start + tl.arange(0, BLOCK_N)
            seen = (offs_n < S) & (offs_n <= at)  # the first block's visible keys: only they are read
            k = tl.load(k_ptr + b * skb + hk * skh + offs_n[:, None] * sks + offs_d[None, :],
                        mask=seen[:, None], other=0.0)
            v = tl.load(v_ptr + b * svb + hk * svh + offs_n[:, None] * svs + offs_d[None, :],
                        mask=seen[:, None], other=0.0)
            if ROPE:
                sign = tl.where(offs_d < D // 2, -1.0, 1.0)
                cs = tl.load(cos_ptr + b * scb + offs_d).to(tl.float32)
                sn = tl.load(sin_ptr + b * scb + offs_d).to(tl.float32) * sign
            if GDC:
                tl.extra.cuda.gdc_wait()
                tl.extra.cuda.gdc_launch_dependents()
            q = tl.load(q_ptr + b * sqb + heads[:, None] * sqh + offs_d[None, :], mask=g_mask[:, None], other=0.0)
            kn = tl.load(q_ptr + b * sqb + KOFF + hk * D + offs_d)
            vn = tl.load(q_ptr + b * sqb + VOFF + hk * D + offs_d)
            if ROPE:  # x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x[D/2:], x[:D/2])
                half = (offs_d + D // 2) % D
                qr = tl.load(q_ptr + b * sqb + heads[:, None] * sqh + half[None, :], mask=g_mask[:, None], other=0.0)
                q = (q.to(tl.float32) * cs[None, :] + qr.to(tl.float32) * sn[None, :]).to(q.dtype)
                kr = tl.load(q_ptr + b * sqb + KOFF + hk * D + half)
                kn = (kn.to(tl.float32) * cs + kr.to(tl.float32) * sn).to(kn.dtype)
            kn = kn.to(k_ptr.dtype.element_ty)
            vn = vn.to(v_ptr.dtype.element_ty)
            pv = at + offs_d * 0  # the position per element: the store's mask is a vector
            own = (pv >= start) & (pv < start + CHUNK) & (pv < S)
            tl.store(k_ptr + b * skb + hk * skh + at * sks + offs_d, kn, mask=own)
            tl.store(v_ptr + b * svb + hk * svh + at * svs + offs_d, vn, mask=own)
            # the new slot from registers (the cache held last use's value there when it was read)
            k = tl.where(offs_n[:, None] == at, kn[None, :], k)
            v = tl.where(offs_n[:, None] == at, vn[None, :], v)
            m_i, l_i, acc = _attend(q, k, v, g_mask[:, None] & seen[None, :], m_i, l_i, acc, scale)
            first = start + BLOCK_N
        else:
            q = tl.load(q_ptr + b * sqb + heads[:, None] * sqh + offs_d[None, :], mask=g_mask[:, None], other=0.0)
            first = start
        for n0 in range(first, start + CHUNK, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < S
            if APPEND:
                vis = g_mask[:, None] & (n_ok & (offs_n <= at))[None, :]
            elif HAS_MASK:
                vis = tl.load(m_ptr + b * smb + heads[:, None] * smh + offs_n[None, :] * sms,
                              mask=g_mask[:, None] & n_ok[None, :], other=0) != 0
            else:
                vis = g_mask[:, None] & n_ok[None, :]
            if tl.max(tl.max(vis.to(tl.int32), 1), 0) > 0:  # no visible key in the block: K and V stay unread
                k = tl.load(k_ptr + b * skb + hk * skh + offs_n[:, None] * sks + offs_d[None, :],
                            mask=n_ok[:, None], other=0.0)
                v = tl.load(v_ptr + b * svb + hk * svh + offs_n[:, None] * svs + offs_d[None, :],
                            mask=n_ok[:, None], other=0.0)  # issued with K's load: one memory latency, not two
                if APPEND:
                    k = tl.where(offs_n[:, None] == at, kn[None, :], k)
                    v = tl.where(offs_n[:, None] == at, vn[None, :], v)
                m_i, l_i, acc = _attend(q, k, v, vis, m_i, l_i, acc, scale)
        out = tl.where(l_i[:, None] > 0, acc / l_i[:, None], 0.0)
        lse = tl.where(l_i > 0, m_i + tl.log(l_i), float("-inf"))
        row = b * HKV * G + heads
        tl.store(o_ptr + (row[:, None] * SPLITS + split) * D + offs_d[None, :], out, mask=g_mask[:, None])
        tl.store(lse_ptr + row * SPLITS + split, lse, mask=g_mask)
        # every thread's stores above happen before the count (barrier, then a release); the last
        # program's acquire makes all chunks' stores visible to its loads, which bypass L1
        tl.debug_barrier()
        done = tl.atomic_add(count_ptr + pid, 1, sem="acq_rel")
        if done == SPLITS - 1:
            offs_s = tl.arange(0, SP)
            gs_mask = g_mask[:, None] & (offs_s < SPLITS)[None, :]
            lses = tl.load(lse_ptr + row[:, None] * SPLITS + offs_s[None, :], mask=gs_mask, other=float("-inf"),
                           cache_modifier=".cg")
            top = tl.max(lses, 1)
            top = tl.where(top == float("-inf"), 0.0, top)
            den = tl.maximum(tl.sum(tl.exp(lses - top[:, None]), 1), 1e-30)  # chunks that saw no key weigh 0
            res = tl.zeros([GP, D], tl.float32)
            for c in tl.static_range(SPLITS):  # unrolled: the chunks' loads are issued together, not one by one
                w = tl.exp(tl.load(lse_ptr + row * SPLITS + c, mask=g_mask, other=float("-inf"),
                                   cache_modifier=".cg") - top)
                part = tl.load(o_ptr + (row[:, None] * SPLITS + c) * D + offs_d[None, :], mask=g_mask[:, None],
                               other=0.0, cache_modifier=".cg")
                res += part * w[:, None]
            res = res / den[:, None]
            tl.store(out_ptr + row[:, None] * D + offs_d[None, :], res.to(out_ptr.dtype.element_ty), mask=g_mask[:, None])
            tl.store(count_ptr + pid, 0)  # every chunk has counted: ready for the next launch


@registered_at_first_use
def register() -> None:
    """Register ``mmcompile::decode_attention`` with torch (at first use: ``kernels.registered_at_first_use``)."""
    from torch.library import triton_op

    @triton_op("mmcompile::decode_attention", mutates_args=())
    def _decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                          scale: float, block_n: int = 64) -> torch.Tensor:
        B, H, _, D = q.shape
        HKV, S = k.shape[1], k.shape[2]
        G = H // HKV
        # dense queries: traced under Inductor the strides below are fixed as numbers while Inductor keeps
        # only their order, and a view with gaps (heads sliced from a wider product) may be laid out anew
        q = q.contiguous()
        splits, chunk, o, lse, out = _split_buffers(B, H, HKV, S, D, q.dtype, q.device, block_n)
        count = torch.zeros(B * HKV, dtype=torch.int32, device=q.device)
        if mask is not None:
            mask = mask.expand(B, H, 1, S)
            smb, smh, sms = mask.stride(0), mask.stride(1), mask.stride(3)
        else:
            smb = smh = sms = 0
        wrap_triton(_decode_kernel)[(B * HKV, splits)](
            q, k, v, mask if mask is not None else q, o, lse, out, count, S, chunk, HKV, scale,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
            smb, smh, sms, q, q, q, 0, 0, 0, G=G, GP=max(16, triton.next_power_of_2(G)), D=D, BLOCK_N=block_n,
            HAS_MASK=mask is not None, SPLITS=splits, SP=triton.next_power_of_2(splits), APPEND=False, ROPE=False,
            GDC=False, num_warps=4)
        return out

    @triton_op("mmcompile::decode_attention_append", mutates_args={"cache_k", "cache_v"})
    def _decode_attention_append(qkv: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
                                 positions: torch.Tensor, cos: Optional[torch.Tensor], sin: Optional[torch.Tensor],
                                 scale: float, heads: int) -> torch.Tensor:
        B, HKV = cache_k.shape[:2]
        count = torch.zeros(B * HKV, dtype=torch.int32, device=qkv.device)
        return _launch_append(wrap_triton(_decode_kernel), qkv, cache_k, cache_v, positions, cos, sin, scale, heads,
                              count, pdl=False)

    # The same, launched as a programmatic dependent launch (sm_90 and later, see _decode_kernel's GDC): an
    # opaque op, because Inductor launches a triton_op's kernels itself, without that launch attribute. Its
    # combination counters live across calls (the kernel leaves them at zero), so no kernel zeroes them
    # between the kernel before and this one.
    @torch.library.custom_op("mmcompile::decode_attention_append_pdl", mutates_args={"cache_k", "cache_v"})
    def _decode_attention_append_pdl(qkv: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
                                     positions: torch.Tensor, cos: Optional[torch.Tensor], sin: Optional[torch.Tensor],
                                     scale: float, heads: int) -> torch.Tensor:
        B, HKV = cache_k.shape[:2]
        return _launch_append(_decode_kernel, qkv, cache_k, cache_v, positions, cos, sin, scale, heads,
                              _counters(cache_k, B * HKV), pdl=True)

    @_decode_attention_append_pdl.register_fake
    def _(qkv, cache_k, cache_v, positions, cos, sin, scale, heads):
        return qkv.new_empty(cache_k.shape[0], heads, 1, cache_k.shape[3])


_COUNTERS: dict = {}
_COUNTERS_LOCK = threading.Lock()


def _counters(cache: torch.Tensor, n: int) -> torch.Tensor:
    """Combination counters that live across calls, one set per cache buffer: launches that may run at
    once (two Generators on two streams) write different caches, so they never share counters, and the
    launches that share a set (one layer's, step after step) run one after another. Each launch leaves
    its counters at zero. The first call for a buffer should come before a CUDA graph is recorded (a
    Generator's warm-up runs do), or the zeroing is recorded too."""
    key = (str(cache.device), cache.data_ptr(), n)
    with _COUNTERS_LOCK:
        if key not in _COUNTERS:
            _COUNTERS[key] = torch.zeros(n, dtype=torch.int32, device=cache.device)
        return _COUNTERS[key]


def _split_buffers(B: int, H: int, HKV: int, S: int, D: int, dtype, device, block_n: int):
    """(chunks per (row, KV head), keys per chunk, and the kernel's buffers: each chunk's output [B, H,
    chunks, D] and log-sum-exp [B, H, chunks] in fp32, the combined output [B, H, 1, D])."""
    splits, chunk = splits_for(B, HKV, S, block_n, device)
    return (splits, chunk, torch.empty(B, H, splits, D, dtype=torch.float32, device=device),
            torch.empty(B, H, splits, dtype=torch.float32, device=device),
            torch.empty(B, H, 1, D, dtype=dtype, device=device))


def _launch_append(kernel, qkv, cache_k, cache_v, positions, cos, sin, scale, heads, count, pdl: bool,
                   block_n: int = 64):
    B, HKV, S, D = cache_k.shape
    G = heads // HKV
    qkv = qkv.reshape(B, (heads + 2 * HKV) * D).contiguous()
    positions = positions.reshape(B).contiguous()
    splits, chunk, o, lse, out = _split_buffers(B, heads, HKV, S, D, qkv.dtype, qkv.device, block_n)
    rope = cos is not None
    if rope:  # [B or 1, D]: one row per batch row, or one for all
        cos, sin = cos.reshape(-1, D).contiguous(), sin.reshape(-1, D).contiguous()
        scb = D if cos.shape[0] == B else 0
    else:
        cos = sin = qkv
        scb = 0
    gdc = pdl and qkv.is_cuda  # Triton's interpreter has no such instructions
    # every argument is passed, none left to a default: Inductor (torch 2.11) launches a user kernel with
    # the arguments of the traced call only
    kernel[(B * HKV, splits)](
        qkv, cache_k, cache_v, qkv, o, lse, out, count, S, chunk, HKV, scale,
        qkv.stride(0), D, cache_k.stride(0), cache_k.stride(1), cache_k.stride(2), cache_v.stride(0),
        cache_v.stride(1), cache_v.stride(2), 0, 0, 0, positions, cos, sin, scb, heads * D, (heads + HKV) * D,
        G=G, GP=max(16, triton.next_power_of_2(G)), D=D, BLOCK_N=block_n, HAS_MASK=False, SPLITS=splits,
        SP=triton.next_power_of_2(splits), APPEND=True, ROPE=rope, GDC=gdc, num_warps=4,
        **({"launch_pdl": True} if gdc else {}))
    return out


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None,
                     scale: Optional[float] = None) -> torch.Tensor:
    """``scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)`` for one
    query per row, with the split-KV kernel (see the module's docstring)."""
    ok, why = supported(q, k, v, mask, dtypes=(torch.float16, torch.bfloat16, torch.float32))
    if not ok:
        raise ValueError(f"decode attention kernel not applicable: {why}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    register()
    return torch.ops.mmcompile.decode_attention(q, k, v, mask, scale)


def decode_attention_append(qkv: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, positions: torch.Tensor,
                            heads: int, cos: Optional[torch.Tensor] = None, sin: Optional[torch.Tensor] = None,
                            scale: Optional[float] = None) -> torch.Tensor:
    """One decode step's attention with its cache write, in one launch: ``qkv`` [B, (heads + 2 Hkv) * D]
    holds each row's queries, new key and new value (a fused q/k/v projection); with ``cos``/``sin``
    ([B or 1, D]) the queries and the key are rotated first (rotate-half rotary embedding). The key and
    value are written into ``cache_k``/``cache_v`` [B, Hkv, S, D] at ``positions`` [B] in place, and
    each row attends to its cache up to its position: what ``index_put`` into the caches followed by
    ``scaled_dot_product_attention(q, cache_k, cache_v, attn_mask=arange(S) <= position, enable_gqa=True)``
    computes. Returns [B, heads, 1, D]."""
    B, HKV, S, D = cache_k.shape
    q = qkv.reshape(B, -1)[:, : heads * D].reshape(B, heads, 1, D)
    ok, why = supported(q, cache_k, cache_v, dtypes=(torch.float16, torch.bfloat16, torch.float32))
    if ok and qkv.numel() != B * (heads + 2 * HKV) * D:
        ok, why = False, f"qkv has {qkv.numel() // B} values per row, not (heads + 2 * kv heads) * D"
    if ok and (cos is None) != (sin is None):
        ok, why = False, "cos and sin go together"
    if not ok:
        raise ValueError(f"decode attention kernel not applicable: {why}")
    register()
    scale = D ** -0.5 if scale is None else float(scale)
    return torch.ops.mmcompile.decode_attention_append(qkv, cache_k, cache_v, positions, cos, sin, scale, heads)
