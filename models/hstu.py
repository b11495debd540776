"""HSTU: the Hierarchical Sequential Transduction Unit generative recommender.

From "Actions Speak Louder than Words: Trillion-Parameter Sequential Transducers for Generative
Recommendations" (Zhai et al., ICML 2024), written as plain torch. A user's history of actions —
items with their timestamps — goes through an item embedding and ``n_layers`` HSTU blocks:

    normed = LayerNorm(x)
    u, v, q, k = split(SiLU(normed @ W_uvqk + b_uvqk))            per head: dv, dv, dqk, dqk
    A[i, j] = SiLU(q_i · k_j + pos_bias[p_j - p_i] + time_bias[bucket(t_i - t_j)]) / max_seq_len
              where j may be seen from i (below), else 0
    x = x + (u * LayerNorm(A @ v)) @ W_o + b_o

A is pointwise, not a softmax: each visible score is its own weight. The relative biases are shared by
the heads; ``bucket(dt) = floor(ln(max(|dt|, 1)) / 0.301)`` clamped to ``[0, time_buckets]`` (the
reference code's log bucketing). Dividing by the fixed ``max_seq_len`` rather than by each row's length
keeps a user's scores independent of how a batch is padded.

Histories are jagged: ``item_ids``/``timestamps`` [B, N] are padded on the right, ``lengths`` [B] gives
each row's valid positions. For ranking, the last ``num_targets[b]`` valid positions of a row are the
candidates: each sees the history and itself, never another candidate, so every candidate of a row is
scored against the same history in one pass; all candidates sit at the history's length ``p`` (the
reference's clamped positions), so a candidate's score does not depend on its slot. Position ``j`` is visible from ``i`` when
``j <= i < length`` and, for a candidate ``i``, ``j`` is history or ``j == i``.

Tasks (``HSTU.rank`` and ``HSTU.retrieve``) read the final embeddings: a candidate's score is the dot
product of its output embedding with its item's embedding; retrieval takes the last history position's
embedding, L2-normalised, against every item's L2-normalised embedding and returns the top k. Both are
the dot-product interaction of the reference's public experiments.

Configs: ``tiny`` for tests; ``ml20m`` — the public MovieLens-20M "HSTU-large" configuration of the
paper's code (``configs/ml-20m/hstu-sampled-softmax-n128-large-final.gin``: item embedding 256,
16 blocks, 8 heads, dqk = dv = 32, histories of 200; 131263 item rows, ML-20M's largest movie id + 1);
``large`` — production-shaped sequences (histories up to 4096 actions, the scale at which the paper
reports its kernels' gains) with a deeper, wider stack (24 blocks, embedding 512, 8 heads of 64); its
table is kept to one million items, which changes memory but not the work per user.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmcompile import hstu_attention

__all__ = ["HSTUConfig", "HSTU", "RankStep", "RetrieveStep", "CONFIGS", "build", "positions", "relative_bias", "visibility", "example_batch",
           "gather_targets"]

TIME_BUCKET_SCALE = 0.301  # the reference's divisor of ln|dt|: about ln(2) / ln(10)


@dataclass
class HSTUConfig:
    num_items: int = 131263
    dim: int = 256
    n_layers: int = 16
    n_heads: int = 8
    qk_dim: int = 32  # per head
    v_dim: int = 32  # per head
    max_seq_len: int = 200
    time_buckets: int = 128
    norm_eps: float = 1e-6

    def __post_init__(self):
        for name in ("num_items", "dim", "n_layers", "n_heads", "qk_dim", "v_dim", "max_seq_len", "time_buckets"):
            if getattr(self, name) < 1:
                raise ValueError(f"HSTUConfig.{name} must be >= 1, got {getattr(self, name)}")


CONFIGS = {
    "tiny": HSTUConfig(num_items=500, dim=32, n_layers=2, n_heads=2, qk_dim=8, v_dim=16, max_seq_len=64,
                       time_buckets=16),
    "ml20m": HSTUConfig(),
    "large": HSTUConfig(num_items=1_000_000, dim=512, n_layers=24, n_heads=8, qk_dim=64, v_dim=64,
                        max_seq_len=4096),
}


def positions(lengths: Tensor, num_targets: Tensor | None, n: int) -> Tensor:
    """[B, N] long: each position's place in its row, every candidate at the first one's (the history
    length), as the reference's positional encoding clamps them — candidates then differ only by item."""
    idx = torch.arange(n, device=lengths.device)[None].expand(lengths.shape[0], n)
    if num_targets is None:
        return idx
    return torch.minimum(idx, (lengths - num_targets)[:, None])


def relative_bias(timestamps: Tensor, pos: Tensor, pos_weight: Tensor, time_weight: Tensor) -> Tensor:
    """[B, 1, N, N] float32 (shared by the heads): ``pos_weight[N_max - 1 + p_j - p_i] +
    time_weight[bucket(t_i - t_j)]`` for query i and key j at positions ``p`` (``positions``).

    ``pos_weight`` has ``2 * N_max - 1`` entries (offsets ``-(N_max-1) .. N_max-1``), ``time_weight``
    ``time_buckets + 1``. The fused op's definition (``mmcompile.hstu_attention.relative_bias``), so the
    model and the op compute the bias the same way."""
    return hstu_attention.relative_bias(pos, pos_weight, timestamps, time_weight, TIME_BUCKET_SCALE)


def visibility(lengths: Tensor, num_targets: Tensor | None, n: int) -> Tensor:
    """[B, 1, N, N] bool: key j is visible from query i (causal, inside the row's length, candidates see
    the history and themselves) — the fused op's rule (``mmcompile.hstu_attention.visibility``)."""
    return hstu_attention.visibility(lengths, None if num_targets is None else lengths - num_targets, n)


class HSTUBlock(nn.Module):
    def __init__(self, c: HSTUConfig):
        super().__init__()
        self.c = c
        self.norm = nn.LayerNorm(c.dim, eps=c.norm_eps)
        self.uvqk = nn.Linear(c.dim, c.n_heads * (2 * c.v_dim + 2 * c.qk_dim))
        self.attn_norm = nn.LayerNorm(c.n_heads * c.v_dim, eps=c.norm_eps)
        self.out = nn.Linear(c.n_heads * c.v_dim, c.dim)

    def forward(self, x: Tensor, bias: Tensor, mask: Tensor) -> Tensor:
        c = self.c
        B, N, _ = x.shape
        h = F.silu(self.uvqk(self.norm(x)))
        u, v, q, k = h.split([c.n_heads * c.v_dim] * 2 + [c.n_heads * c.qk_dim] * 2, dim=-1)
        q = q.reshape(B, N, c.n_heads, c.qk_dim).transpose(1, 2)  # [B, H, N, dqk]
        k = k.reshape(B, N, c.n_heads, c.qk_dim).transpose(1, 2)
        v = v.reshape(B, N, c.n_heads, c.v_dim).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) + bias.to(q.dtype)  # [B, H, N, N]
        weights = F.silu(scores) / c.max_seq_len * mask
        attn = (weights @ v).transpose(1, 2).reshape(B, N, c.n_heads * c.v_dim)
        return x + self.out(u * self.attn_norm(attn))


class HSTU(nn.Module):
    """``forward(item_ids [B, N], timestamps [B, N], lengths [B], num_targets [B] | None) -> [B, N, dim]``."""

    def __init__(self, config: HSTUConfig):
        super().__init__()
        self.config = config
        c = config
        self.item_embedding = nn.Embedding(c.num_items, c.dim)
        self.pos_weight = nn.Parameter(torch.empty(2 * c.max_seq_len - 1))
        self.time_weight = nn.Parameter(torch.empty(c.time_buckets + 1))
        self.layers = nn.ModuleList(HSTUBlock(c) for _ in range(c.n_layers))
        self.norm = nn.LayerNorm(c.dim, eps=c.norm_eps)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.item_embedding.weight, std=self.config.dim ** -0.5)
        nn.init.normal_(self.pos_weight, std=0.02)
        nn.init.normal_(self.time_weight, std=0.02)

    def forward(self, item_ids: Tensor, timestamps: Tensor, lengths: Tensor,
                num_targets: Tensor | None = None) -> Tensor:
        c = self.config
        n = item_ids.shape[1]
        if n > c.max_seq_len:
            raise ValueError(f"sequences of {n} positions exceed max_seq_len={c.max_seq_len}")
        x = self.item_embedding(item_ids) * math.sqrt(c.dim)
        mask = visibility(lengths, num_targets, n)
        x = x * mask[:, 0].diagonal(dim1=1, dim2=2)[..., None].to(x.dtype)  # padded positions carry nothing
        bias = relative_bias(timestamps, positions(lengths, num_targets, n), self.pos_weight, self.time_weight)
        for layer in self.layers:
            x = layer(x, bias, mask)
        return self.norm(x)

    # ---------------------------------------------------------------- tasks
    def rank(self, item_ids: Tensor, timestamps: Tensor, lengths: Tensor, num_targets: Tensor) -> Tensor:
        """Scores [B, N] of every position against its own item; read the last ``num_targets[b]`` valid
        positions of row b (``gather_targets``) for the candidates' scores."""
        out = self(item_ids, timestamps, lengths, num_targets)
        return (out * self.item_embedding(item_ids)).sum(-1)

    def retrieve(self, item_ids: Tensor, timestamps: Tensor, lengths: Tensor, k: int = 10) -> tuple[Tensor, Tensor]:
        """(scores, item ids) [B, k]: the items whose normalised embedding is closest to the user's."""
        out = self(item_ids, timestamps, lengths)
        user = F.normalize(out[torch.arange(out.shape[0], device=out.device), lengths - 1], dim=-1, eps=1e-6)
        items = F.normalize(self.item_embedding.weight, dim=-1, eps=1e-6)
        return torch.topk(user @ items.t(), k, dim=-1)


class RankStep(nn.Module):
    """``HSTU.rank`` as a module of its own, for capture: ``(item_ids, timestamps, lengths, num_targets) -> [B, N]``."""

    def __init__(self, model: HSTU):
        super().__init__()
        self.model = model

    def forward(self, item_ids: Tensor, timestamps: Tensor, lengths: Tensor, num_targets: Tensor) -> Tensor:
        return self.model.rank(item_ids, timestamps, lengths, num_targets)


class RetrieveStep(nn.Module):
    """``HSTU.retrieve`` for capture: ``(item_ids, timestamps, lengths) -> (scores [B, k], ids [B, k])``."""

    def __init__(self, model: HSTU, k: int):
        super().__init__()
        self.model, self.k = model, k

    def forward(self, item_ids: Tensor, timestamps: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        return self.model.retrieve(item_ids, timestamps, lengths, self.k)


def gather_targets(scores: Tensor, lengths: Tensor, num_targets: Tensor) -> list[Tensor]:
    """Each row's candidate scores (its last ``num_targets[b]`` valid positions), as a list of tensors."""
    return [scores[b, int(lengths[b]) - int(num_targets[b]): int(lengths[b])] for b in range(scores.shape[0])]


def example_batch(config: HSTUConfig, batch: int, seq_len: int, *, num_candidates: int = 0, seed: int = 0,
                  min_len: int | None = None, device=None) -> dict:
    """A random jagged batch: histories of random lengths in ``[min_len, seq_len - num_candidates]``
    (increasing timestamps, seconds apart by up to a month), then ``num_candidates`` candidates stamped
    at the request time. Keys: item_ids, timestamps, lengths (and num_targets with candidates)."""
    g = torch.Generator().manual_seed(seed)
    longest = seq_len - num_candidates
    if longest < 1:
        raise ValueError(f"seq_len {seq_len} leaves no room for history beside {num_candidates} candidates")
    low = min(min_len or max(1, longest // 4), longest)
    hist = torch.randint(low, longest + 1, (batch,), generator=g)
    ids = torch.randint(1, config.num_items, (batch, seq_len), generator=g)
    gaps = torch.randint(1, 30 * 86400, (batch, seq_len), generator=g)
    ts = 1_600_000_000 + gaps.cumsum(1)
    lengths = hist + num_candidates
    idx = torch.arange(seq_len)[None]
    if num_candidates:
        now = ts.gather(1, (hist - 1)[:, None]) + 3600
        ts = torch.where((idx >= hist[:, None]) & (idx < lengths[:, None]), now, ts)
    valid = idx < lengths[:, None]
    ids, ts = ids * valid, ts * valid  # padding: item 0 at time 0
    out = {"item_ids": ids, "timestamps": ts, "lengths": lengths}
    if num_candidates:
        out["num_targets"] = torch.full((batch,), num_candidates, dtype=torch.long)
    return {k: v.to(device) for k, v in out.items()}


def build(name: str, *, dtype: torch.dtype = torch.float32, device=None, seed: int = 0, **overrides) -> HSTU:
    """An HSTU of config ``name`` with random weights (``overrides`` replace config fields)."""
    config = replace(CONFIGS[name], **overrides)
    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        model = HSTU(config)
    return model.to(dtype).eval()
