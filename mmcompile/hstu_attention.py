"""Pointwise SiLU attention (HSTU): ``mmcompile::hstu_attention`` and its Triton kernel.

HSTU's attention weighs each visible key by ``SiLU(q·k + bias) * scale`` on its own — no softmax, so
no running maximum and no normalisation across keys — and SDPA cannot express it:

    hstu_attention(q [B, H, N, Dqk], k [B, H, M, Dqk], v [B, H, M, Dv], bias?, mask?, scale)
        = (SiLU(q @ kᵀ + bias) * scale * mask) @ v                           -> [B, H, N, Dv]

``bias`` (any float dtype) and ``mask`` (bool) are 4-D and broadcast to ``[B, H, N, M]``. Scores are
computed in fp32 and cast to ``v``'s dtype before the product with ``v``.

HSTU's relative bias can instead be given by its ingredients, so that no ``[B, N, N]`` tensor is
read at all — the kernel computes it for each tile of scores (self-attention, ``N == M``):

    + pos_weight[clamp(p_j - p_i, -(P-1), P-1) + P-1]          positions p [B, N], pos_weight [2P - 1]
    + time_weight[clamp(floor(ln(max(|t_i - t_j|, 1)) / time_divisor), 0, T-1)]
                                                              timestamps t [B, N], time_weight [T]

(weights read as fp32), as ``mmcompile.models.hstu.relative_bias`` writes it. Likewise the mask can be
given as HSTU's visibility rule instead of a tensor — ``lengths`` [B] and optionally ``history`` [B]:
key j is visible from query i when ``j <= i < lengths[b]`` and, if i is a candidate (``i >=
history[b]``), j is history or i itself — and the kernel then stops each block of queries at its
diagonal and at the row's length, reading no mask at all. ``fuse_attention`` recognises both
computations and passes their ingredients. The kernel's ``log`` may differ from torch's in the last
bit, which moves a time difference lying that close to a bucket boundary into the next bucket.

- The reference (``reference``) materializes the ``[B, H, N, M]`` scores; it runs on the CPU and is
  what the ONNX Runtime backend exports (a MatMul/Sigmoid/Where decomposition).
- The Triton kernel (``supported`` says when it applies; on CUDA, or on the CPU under Triton's
  interpreter) never writes scores to memory: one program per block of ``BLOCK_M`` queries of one
  (row, head) walks the keys in blocks of ``BLOCK_N``. With the visibility rule the walk simply ends at
  the block's diagonal and at the row's length (a block of padding queries reads nothing), so no tile
  is tested; with only a mask tensor, a block none of whose keys is visible is skipped — no K, V or
  bias read — after its mask block is loaded. A causal mask halves the work; a jagged batch's padding
  costs next to nothing. (Testing every tile for a visible key on top of the rule's bounds — a
  reduction over the tile and a branch — made the kernel 3x slower on an H100; docs/benchmarks.md.)
  With ``HEADS_PER_PROGRAM`` above 1, one program takes that many heads of a block of queries and
  computes each tile's relative bias and visibility once for all of them (batched [heads, BLOCK_M,
  BLOCK_N] products); measured no faster than one head per program, so the default stays 1.

Eager runs on CUDA use the kernel; the Inductor backend uses it from ``KERNEL_MIN_LEN`` positions up and
lets Inductor fuse the reference below that, where it is unmeasured.
"""

from __future__ import annotations

from typing import Optional

import torch

from mmcompile.kernels import available, registered_at_first_use, triton, tl

__all__ = ["hstu_attention", "reference", "supported", "KERNEL_MIN_LEN"]

# Under Inductor, sequences shorter than this run the reference for Inductor to fuse instead of the kernel.
# On an H100 (ml20m shape, bf16, CUDA graphs) the kernel was 1.5-1.6x faster than Inductor's code at 216
# positions, the shortest measured; below that Inductor's code is kept.
KERNEL_MIN_LEN = 216

# Heads of one block of queries per kernel program (a power of two dividing the head count; 1: one head
# per program). With several, a tile's relative bias and visibility — which depend on positions, not on
# the head — are computed once for all of them. Read when a call is traced or launched.
HEADS_PER_PROGRAM = 1
# Warps per kernel program. Compiled for sm_90 the kernel spills a little at 4 warps and not at 8, yet on an
# H100 (ml20m shape, bf16) 4 warps measured faster: 0.466 against 0.561 ms per call at batch 32.
NUM_WARPS = 4

if triton is not None:
    from torch.library import wrap_triton


def relative_bias(positions: Optional[torch.Tensor], pos_weight: Optional[torch.Tensor],
                  timestamps: Optional[torch.Tensor], time_weight: Optional[torch.Tensor],
                  time_divisor: float) -> Optional[torch.Tensor]:
    """[B, 1, N, N] fp32: the relative position and time bias from its ingredients (None without them)."""
    total = None
    if positions is not None:
        off = (pos_weight.shape[0] - 1) // 2
        rel = (positions[:, None, :] - positions[:, :, None]).clamp(-off, off) + off
        total = pos_weight[rel].float()
    if timestamps is not None:
        dt = (timestamps[:, :, None] - timestamps[:, None, :]).abs().clamp(min=1).float()
        bucket = torch.floor(torch.log(dt) / time_divisor).long().clamp(0, time_weight.shape[0] - 1)
        part = time_weight[bucket].float()
        total = part if total is None else total + part
    return None if total is None else total[:, None]


def visibility(lengths: torch.Tensor, history: Optional[torch.Tensor], n: int) -> torch.Tensor:
    """[B, 1, N, N] bool: HSTU's visibility rule (causal, inside the row, candidates see history and self)."""
    idx = torch.arange(n, device=lengths.device)
    i, j = idx[None, :, None], idx[None, None, :]
    mask = (j <= i) & (i < lengths[:, None, None])
    if history is not None:
        h = history[:, None, None]
        mask = mask & ((i < h) | (j < h) | (j == i))
    return mask[:, None]


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor],
              mask: Optional[torch.Tensor], scale: float, positions: Optional[torch.Tensor] = None,
              pos_weight: Optional[torch.Tensor] = None, timestamps: Optional[torch.Tensor] = None,
              time_weight: Optional[torch.Tensor] = None, time_divisor: float = 0.301,
              lengths: Optional[torch.Tensor] = None, history: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The op's definition in plain torch (materializes the scores)."""
    if lengths is not None:
        rule = visibility(lengths, history, q.shape[2])
        mask = rule if mask is None else mask & rule
    s = torch.matmul(q.float(), k.float().transpose(-1, -2))
    if bias is not None:
        s = s + bias.float()
    rel = relative_bias(positions, pos_weight, timestamps, time_weight, time_divisor)
    if rel is not None:
        s = s + rel
    w = torch.nn.functional.silu(s) * scale
    if mask is not None:
        w = torch.where(mask, w, 0.0)
    return torch.matmul(w.to(v.dtype), v).to(q.dtype)


def _check(q, k, v, bias, mask, positions=None, pos_weight=None, timestamps=None, time_weight=None, lengths=None,
           history=None) -> Optional[str]:
    """Why the arguments do not describe a valid call (None when they do)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return f"q, k and v must be 4-D [B, H, N, D]; got {q.dim()}, {k.dim()} and {v.dim()} dimensions"
    B, H, N, D = q.shape
    if k.shape[:2] != (B, H) or v.shape[:2] != (B, H) or k.shape[3] != D or v.shape[2] != k.shape[2]:
        return f"q {list(q.shape)}, k {list(k.shape)} and v {list(v.shape)} do not fit together"
    full = (B, H, N, k.shape[2])
    for name, t in (("bias", bias), ("mask", mask)):
        if t is None:
            continue
        if t.dim() != 4 or any(s not in (1, f) for s, f in zip(t.shape, full)):
            return f"{name} {list(t.shape)} does not broadcast to {list(full)}"
    if mask is not None and mask.dtype != torch.bool:
        return f"the mask is {mask.dtype}; the op takes a boolean mask"
    for seq, table, what in ((positions, pos_weight, "positions"), (timestamps, time_weight, "timestamps")):
        if (seq is None) != (table is None):
            return f"{what} and their weight table come together"
        if seq is None:
            continue
        if N != k.shape[2] or tuple(seq.shape) != (B, N) or seq.dtype.is_floating_point:
            return f"{what} must be integers [B, N] = {[B, N]} of self-attention; got {seq.dtype} {list(seq.shape)}"
        if table.dim() != 1:
            return f"the {what}' weight table must be 1-D; got {list(table.shape)}"
    if pos_weight is not None and pos_weight.shape[0] % 2 == 0:
        return f"the position table must have 2P - 1 entries (offsets -(P-1)..P-1); got {pos_weight.shape[0]}"
    if history is not None and lengths is None:
        return "history lengths need the rows' lengths"
    for name, t in (("lengths", lengths), ("history", history)):
        if t is not None and (tuple(t.shape) != (B,) or t.dtype.is_floating_point or N != k.shape[2]):
            return f"{name} must be integers [B] = [{B}] of self-attention; got {t.dtype} {list(t.shape)}"
    return None


@torch.library.custom_op("mmcompile::hstu_attention", mutates_args=())
def hstu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor],
                   mask: Optional[torch.Tensor], scale: float, positions: Optional[torch.Tensor] = None,
                   pos_weight: Optional[torch.Tensor] = None, timestamps: Optional[torch.Tensor] = None,
                   time_weight: Optional[torch.Tensor] = None, time_divisor: float = 0.301,
                   lengths: Optional[torch.Tensor] = None, history: Optional[torch.Tensor] = None) -> torch.Tensor:
    rel = (positions, pos_weight, timestamps, time_weight)
    why = _check(q, k, v, bias, mask, *rel, lengths, history)
    if why:
        raise ValueError(f"hstu_attention: {why}")
    if q.device.type == "cuda" and supported(q, k, v, bias, mask, *rel, lengths, history)[0]:
        register()
        return torch.ops.mmcompile.triton_hstu_attention(q, k, v, bias, mask, scale, *rel, time_divisor, lengths, history)
    return reference(q, k, v, bias, mask, scale, *rel, time_divisor, lengths, history)


@hstu_attention.register_fake
def _(q, k, v, bias, mask, scale, positions=None, pos_weight=None, timestamps=None, time_weight=None,
      time_divisor=0.301, lengths=None, history=None):
    return q.new_empty(*q.shape[:3], v.shape[3])


def supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor] = None,
              mask: Optional[torch.Tensor] = None, positions=None, pos_weight=None, timestamps=None,
              time_weight=None, lengths=None, history=None) -> tuple[bool, str]:
    """Whether a call can run the Triton kernel: (ok, reason)."""
    why = _check(q, k, v, bias, mask, positions, pos_weight, timestamps, time_weight, lengths, history)
    if why:
        return False, why
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype or v.dtype != q.dtype:
        return False, f"dtypes {q.dtype}/{k.dtype}/{v.dtype}; the kernel takes one of float16, bfloat16, float32"
    if max(q.shape[3], v.shape[3]) > 256:
        return False, f"head dimensions {q.shape[3]}/{v.shape[3]}; the kernel takes up to 256"
    if q.stride(3) != 1 or k.stride(3) != 1 or v.stride(3) != 1:
        return False, "q, k or v is not contiguous in the head dimension"
    return available(q.device)


if triton is not None:

    @triton.jit
    def _relative_bias(p_i, t_i, offs_n, n_ok, b, p_ptr, pw_ptr, spb, spn, P_OFF, t_ptr, tw_ptr, stb, stn, T_MAX,
                       time_divisor, HAS_POS: tl.constexpr, HAS_TIME: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr):
        """The [BLOCK_M, BLOCK_N] relative position and time bias of a tile, from the rows' positions and
        timestamps (``p_i``, ``t_i``) and the columns' (read here), in fp32."""
        bias = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        if HAS_POS:  # the relative position bias, from the positions of the tile's rows and columns
            p_j = tl.load(p_ptr + b * spb + offs_n * spn, mask=n_ok, other=0)
            rel = tl.minimum(tl.maximum(p_j[None, :] - p_i[:, None], -P_OFF), P_OFF) + P_OFF
            bias += tl.load(pw_ptr + rel).to(tl.float32)
        if HAS_TIME:  # the relative time bias: log-spaced buckets of the time difference
            t_j = tl.load(t_ptr + b * stb + offs_n * stn, mask=n_ok, other=0)
            dt = tl.maximum(tl.abs(t_i[:, None] - t_j[None, :]), 1).to(tl.float32)
            bucket = tl.floor(tl.log(dt) / time_divisor).to(tl.int32)
            bucket = tl.minimum(tl.maximum(bucket, 0), T_MAX)
            bias += tl.load(tw_ptr + bucket).to(tl.float32)
        return bias

    @triton.jit
    def _rows(b, pid, offs_m, m_ok, M, p_ptr, spb, spn, t_ptr, stb, stn, len_ptr, hist_ptr, BLOCK_M: tl.constexpr,
              HAS_POS: tl.constexpr, HAS_TIME: tl.constexpr, HAS_LEN: tl.constexpr, HAS_HIST: tl.constexpr):
        """What a block of queries needs before its key loop: the rows' positions and timestamps (the block's
        own offsets where absent), where its keys end, and its row's length and history (``M`` where absent):
        with the visibility rule, keys stop at the block's last query and at the row's length."""
        p_i = offs_m
        t_i = offs_m
        if HAS_POS:
            p_i = tl.load(p_ptr + b * spb + offs_m * spn, mask=m_ok, other=0)
        if HAS_TIME:
            t_i = tl.load(t_ptr + b * stb + offs_m * stn, mask=m_ok, other=0)
        end = M
        length = M
        hist = M
        if HAS_LEN:
            length = tl.load(len_ptr + b).to(tl.int32)  # int32 loop bounds and key offsets, as with M
            end = tl.minimum(tl.minimum(M, (pid + 1) * BLOCK_M), length)
            end = tl.where(pid * BLOCK_M < length, end, 0)  # a block of padding queries reads no key
            if HAS_HIST:
                hist = tl.load(hist_ptr + b).to(tl.int32)
        return p_i, t_i, end, length, hist

    @triton.jit
    def _rule(offs_m, offs_n, length, hist, HAS_HIST: tl.constexpr):
        """HSTU's visibility rule on a tile: key j <= query i < length, and a candidate (i >= hist) sees
        the history and itself."""
        vis = (offs_n[None, :] <= offs_m[:, None]) & (offs_m[:, None] < length)
        if HAS_HIST:
            vis = vis & ((offs_m[:, None] < hist) | (offs_n[None, :] < hist) | (offs_n[None, :] == offs_m[:, None]))
        return vis

    @triton.jit
    def _hstu_kernel(q_ptr, k_ptr, v_ptr, b_ptr, m_ptr, o_ptr, N, M, H, scale,
                     sqb, sqh, sqn, skb, skh, skm, svb, svh, svm, sob, soh, son,
                     sbb, sbh, sbn, sbm, smb, smh, smn, smm,
                     p_ptr, pw_ptr, spb, spn, P_OFF, t_ptr, tw_ptr, stb, stn, T_MAX, time_divisor, len_ptr, hist_ptr,
                     DQK: tl.constexpr, DV: tl.constexpr, PQK: tl.constexpr, PV: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
                     HAS_POS: tl.constexpr, HAS_TIME: tl.constexpr, HAS_LEN: tl.constexpr, HAS_HIST: tl.constexpr,
                     IEEE: tl.constexpr):
        # the heads of one block of queries are neighbours in the grid: the bias and mask tiles they share
        # are read from memory once and from the L2 cache by the other heads
        pid = tl.program_id(0) // H
        h = tl.program_id(0) % H
        b = tl.program_id(1)
        offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, PQK)
        offs_e = tl.arange(0, PV)
        m_ok = offs_m < N
        q = tl.load(q_ptr + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :],
                    mask=m_ok[:, None] & (offs_d < DQK)[None, :], other=0.0)
        acc = tl.zeros([BLOCK_M, PV], tl.float32)
        p_i, t_i, end, length, hist = _rows(b, pid, offs_m, m_ok, M, p_ptr, spb, spn, t_ptr, stb, stn, len_ptr,
                                            hist_ptr, BLOCK_M, HAS_POS, HAS_TIME, HAS_LEN, HAS_HIST)
        for n0 in range(0, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < M
            inside = m_ok[:, None] & n_ok[None, :]
            if HAS_MASK:
                vis = tl.load(m_ptr + b * smb + h * smh + offs_m[:, None] * smn + offs_n[None, :] * smm,
                              mask=inside, other=0) != 0
            else:
                vis = inside
            if HAS_LEN:
                vis = vis & _rule(offs_m, offs_n, length, hist, HAS_HIST)
            go = True
            if HAS_MASK and not HAS_LEN:  # a block with no visible key is never read
                go = tl.max(tl.max(vis.to(tl.int32), 1), 0) > 0
            if go:
                k = tl.load(k_ptr + b * skb + h * skh + offs_n[:, None] * skm + offs_d[None, :],
                            mask=n_ok[:, None] & (offs_d < DQK)[None, :], other=0.0)
                v = tl.load(v_ptr + b * svb + h * svh + offs_n[:, None] * svm + offs_e[None, :],
                            mask=n_ok[:, None] & (offs_e < DV)[None, :], other=0.0)
                if IEEE:
                    s = tl.dot(q, tl.trans(k), input_precision="ieee")
                else:
                    s = tl.dot(q, tl.trans(k))
                if HAS_BIAS:
                    s += tl.load(b_ptr + b * sbb + h * sbh + offs_m[:, None] * sbn + offs_n[None, :] * sbm,
                                 mask=inside, other=0.0).to(tl.float32)
                if HAS_POS or HAS_TIME:
                    s += _relative_bias(p_i, t_i, offs_n, n_ok, b, p_ptr, pw_ptr, spb, spn, P_OFF, t_ptr, tw_ptr,
                                        stb, stn, T_MAX, time_divisor, HAS_POS, HAS_TIME, BLOCK_M, BLOCK_N)
                w = tl.where(vis, s * tl.sigmoid(s) * scale, 0.0)
                if IEEE:
                    acc += tl.dot(w.to(v.dtype), v, input_precision="ieee")
                else:
                    acc += tl.dot(w.to(v.dtype), v)
        tl.store(o_ptr + b * sob + h * soh + offs_m[:, None] * son + offs_e[None, :],
                 acc.to(o_ptr.dtype.element_ty), mask=m_ok[:, None] & (offs_e < DV)[None, :])

    @triton.jit
    def _hstu_heads_kernel(q_ptr, k_ptr, v_ptr, b_ptr, m_ptr, o_ptr, N, M, H, scale,
                           sqb, sqh, sqn, skb, skh, skm, svb, svh, svm, sob, soh, son,
                           sbb, sbh, sbn, sbm, smb, smh, smn, smm,
                           p_ptr, pw_ptr, spb, spn, P_OFF, t_ptr, tw_ptr, stb, stn, T_MAX, time_divisor, len_ptr,
                           hist_ptr, DQK: tl.constexpr, DV: tl.constexpr, PQK: tl.constexpr, PV: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HP: tl.constexpr, HAS_BIAS: tl.constexpr,
                           HAS_MASK: tl.constexpr, HAS_POS: tl.constexpr, HAS_TIME: tl.constexpr,
                           HAS_LEN: tl.constexpr, HAS_HIST: tl.constexpr, IEEE: tl.constexpr):
        """``_hstu_kernel`` for HP heads of a block of queries in one program: the tile's relative bias and
        visibility are computed once for all HP heads (they depend on positions, not on the head), and
        the heads' scores are [HP, BLOCK_M, BLOCK_N] batched products."""
        groups = H // HP
        pid = tl.program_id(0) // groups
        heads = (tl.program_id(0) % groups) * HP + tl.arange(0, HP)
        b = tl.program_id(1)
        offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, PQK)
        offs_e = tl.arange(0, PV)
        m_ok = offs_m < N
        hh = heads[:, None, None]
        q = tl.load(q_ptr + b * sqb + hh * sqh + offs_m[None, :, None] * sqn + offs_d[None, None, :],
                    mask=m_ok[None, :, None] & (offs_d < DQK)[None, None, :], other=0.0)
        acc = tl.zeros([HP, BLOCK_M, PV], tl.float32)
        p_i, t_i, end, length, hist = _rows(b, pid, offs_m, m_ok, M, p_ptr, spb, spn, t_ptr, stb, stn, len_ptr,
                                            hist_ptr, BLOCK_M, HAS_POS, HAS_TIME, HAS_LEN, HAS_HIST)
        for n0 in range(0, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < M
            inside = m_ok[:, None] & n_ok[None, :]
            if HAS_LEN:
                inside = inside & _rule(offs_m, offs_n, length, hist, HAS_HIST)
            if HAS_MASK:  # [HP, BLOCK_M, BLOCK_N]: a mask may differ between heads
                vis = tl.load(m_ptr + b * smb + hh * smh + offs_m[None, :, None] * smn + offs_n[None, None, :] * smm,
                              mask=inside[None, :, :], other=0) != 0
            else:
                vis = inside[None, :, :] & (hh >= 0)
            go = True
            if HAS_MASK and not HAS_LEN:
                go = tl.max(tl.max(tl.max(vis.to(tl.int32), 2), 1), 0) > 0
            if go:
                k = tl.load(k_ptr + b * skb + hh * skh + offs_n[None, :, None] * skm + offs_d[None, None, :],
                            mask=n_ok[None, :, None] & (offs_d < DQK)[None, None, :], other=0.0)
                v = tl.load(v_ptr + b * svb + hh * svh + offs_n[None, :, None] * svm + offs_e[None, None, :],
                            mask=n_ok[None, :, None] & (offs_e < DV)[None, None, :], other=0.0)
                if IEEE:
                    s = tl.dot(q, tl.permute(k, (0, 2, 1)), input_precision="ieee")
                else:
                    s = tl.dot(q, tl.permute(k, (0, 2, 1)))
                if HAS_BIAS:
                    s += tl.load(b_ptr + b * sbb + hh * sbh + offs_m[None, :, None] * sbn + offs_n[None, None, :] * sbm,
                                 mask=(m_ok[:, None] & n_ok[None, :])[None, :, :], other=0.0).to(tl.float32)
                if HAS_POS or HAS_TIME:  # once for the HP heads
                    s += _relative_bias(p_i, t_i, offs_n, n_ok, b, p_ptr, pw_ptr, spb, spn, P_OFF, t_ptr, tw_ptr,
                                        stb, stn, T_MAX, time_divisor, HAS_POS, HAS_TIME, BLOCK_M, BLOCK_N)[None, :, :]
                w = tl.where(vis, s * tl.sigmoid(s) * scale, 0.0)
                if IEEE:
                    acc += tl.dot(w.to(v.dtype), v, input_precision="ieee")
                else:
                    acc += tl.dot(w.to(v.dtype), v)
        tl.store(o_ptr + b * sob + hh * soh + offs_m[None, :, None] * son + offs_e[None, None, :],
                 acc.to(o_ptr.dtype.element_ty), mask=m_ok[None, :, None] & (offs_e < DV)[None, None, :])

    def launch(q, k, v, bias, mask, scale, positions=None, pos_weight=None, timestamps=None, time_weight=None,
               time_divisor=0.301, lengths=None, history=None) -> torch.Tensor:
        """The kernel's launch, as the op runs it: strides read from the tensors as they are at the call.

        Only through the op: traced into Inductor's own code instead (``wrap_triton`` in the backend's
        decomposition), the ml20m step at 1040 positions on an H100 differed from eager by up to 1.4 on
        scores of magnitude 15, where the op's result differs by 0.06 — also with every input copied dense
        first, so not (only) through strides baked in at trace time; a tiny model agreed. The cause is
        not known, and that launch was withdrawn."""
        B, H, N, DQK = q.shape
        M, DV = k.shape[2], v.shape[3]
        out = torch.empty(B, H, N, DV, dtype=q.dtype, device=q.device)

        def strides(t):
            if t is None:
                return (0, 0, 0, 0)
            t = t.expand(B, H, N, M)  # broadcast dimensions get stride 0
            return tuple(t.stride())

        block_m = 64 if N >= 64 else 16
        pqk, pv = max(16, triton.next_power_of_2(DQK)), max(16, triton.next_power_of_2(DV))
        hp = HEADS_PER_PROGRAM if HEADS_PER_PROGRAM > 1 and H % HEADS_PER_PROGRAM == 0 else 1
        kernel, extra = (_hstu_heads_kernel, {"HP": hp}) if hp > 1 else (_hstu_kernel, {})
        wrap_triton(kernel)[(triton.cdiv(N, block_m) * (H // hp), B)](
            q, k, v, bias if bias is not None else q, mask if mask is not None else q, out, N, M, H, float(scale),
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            *strides(bias), *strides(mask),
            positions if positions is not None else q, pos_weight if pos_weight is not None else q,
            *(positions.stride() if positions is not None else (0, 0)),
            (pos_weight.shape[0] - 1) // 2 if pos_weight is not None else 0,
            timestamps if timestamps is not None else q, time_weight if time_weight is not None else q,
            *(timestamps.stride() if timestamps is not None else (0, 0)),
            time_weight.shape[0] - 1 if time_weight is not None else 0, float(time_divisor),
            lengths if lengths is not None else q, history if history is not None else q,
            DQK=DQK, DV=DV, PQK=pqk, PV=pv, BLOCK_M=block_m, BLOCK_N=64,
            HAS_BIAS=bias is not None, HAS_MASK=mask is not None, HAS_POS=positions is not None,
            HAS_TIME=timestamps is not None, HAS_LEN=lengths is not None, HAS_HIST=history is not None,
            IEEE=q.dtype == torch.float32, num_warps=NUM_WARPS, **extra)
        return out


@registered_at_first_use
def register() -> None:
    """Register ``mmcompile::triton_hstu_attention`` with torch (at first use: ``kernels.registered_at_first_use``)."""
    from torch.library import triton_op

    @triton_op("mmcompile::triton_hstu_attention", mutates_args=())
    def _triton_hstu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor],
                               mask: Optional[torch.Tensor], scale: float, positions: Optional[torch.Tensor] = None,
                               pos_weight: Optional[torch.Tensor] = None, timestamps: Optional[torch.Tensor] = None,
                               time_weight: Optional[torch.Tensor] = None, time_divisor: float = 0.301,
                               lengths: Optional[torch.Tensor] = None, history: Optional[torch.Tensor] = None) -> torch.Tensor:
        return launch(q, k, v, bias, mask, scale, positions, pos_weight, timestamps, time_weight, time_divisor,
                      lengths, history)

    @_triton_hstu_attention.register_fake
    def _(q, k, v, bias, mask, scale, positions=None, pos_weight=None, timestamps=None, time_weight=None,
          time_divisor=0.301, lengths=None, history=None):
        return q.new_empty(*q.shape[:3], v.shape[3])
