"""Golden before/after tests of fuse_attention: every variant it fuses, every reason it refuses, a property
test over generated attention blocks, and end to end on tiny transformers models.

Each test captures a tiny module with ``mmc.capture`` and canonicalizes it (the pass requires the normal
form), then ``testing.check_pass`` checks the printed IR, op counts, numerics against the Program before
the pass, the verifier and idempotence. Negative tests are named for why nothing changes and assert the
reason the pass gives in its report.
"""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from torch import nn

import mmcompile as mmc
from mmcompile import testing
from mmcompile.rewrite import val
from mmcompile.testing import _AttentionModule

try:
    import hf_zoo
except ImportError:  # run from another rootdir: tests/ is not on sys.path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import hf_zoo

aten = torch.ops.aten
SDPA = "aten.scaled_dot_product_attention.default"
SOFTMAX = "aten._softmax.default"
B, H, S, T, D = 2, 3, 5, 6, 8  # S != T: the golden self-contained cases are cross-attention shaped
FUSED = {SDPA: 1, SOFTMAX: 0, "aten.bmm.default": 0}
NOT_FUSED = "CHECK: aten._softmax\nCHECK-NOT: aten.scaled_dot_product_attention"


# ---------------------------------------------------------------------------------------- helpers
class Attention(nn.Module):
    """Attention spelled by ``fn(q, k, v)``; the graph's inputs are named q, k, v."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, q, k, v):
        return self.fn(q, k, v)


class MaskedAttention(Attention):
    def forward(self, q, k, v, mask):
        return self.fn(q, k, v, mask)


def qkv(s: int = S, t: int = T, *, heads: int = H, kv_heads: int | None = None, dtype=torch.float32):
    """q [B, heads, s, D], k and v [B, kv_heads, t, D]."""
    g = torch.Generator().manual_seed(0)
    kv_heads = heads if kv_heads is None else kv_heads
    return (torch.randn(B, heads, s, D, generator=g).to(dtype),
            torch.randn(B, kv_heads, t, D, generator=g).to(dtype),
            torch.randn(B, kv_heads, t, D, generator=g).to(dtype))


def keep_mask(t: int = T) -> torch.Tensor:
    """[B, 1, 1, t] boolean, True = attend; every query keeps at least key 0."""
    keep = torch.rand(B, 1, 1, t, generator=torch.Generator().manual_seed(1)) > 0.4
    keep[..., 0] = True
    return keep


def scores(q, k):
    return q @ k.transpose(-2, -1)


def canonical(module: nn.Module, args: tuple) -> mmc.Program:
    prog = mmc.capture(module.eval(), tuple(args), name="attn")
    return mmc.optimize(prog, ["canonicalize"]).program


def fuse(module: nn.Module, args: tuple, **kwargs):
    """canonicalize, then check_pass(fuse_attention); returns (program after, report)."""
    kwargs.setdefault("op_counts", FUSED if kwargs.get("changed") else None)
    return testing.check_pass(canonical(module, args), "fuse_attention", **kwargs)


def the_sdpa(prog: mmc.Program) -> torch.fx.Node:
    nodes = [n for n in prog.graph.nodes if n.op == "call_function" and n.target == aten.scaled_dot_product_attention.default]
    assert len(nodes) == 1, f"expected one SDPA node, found {len(nodes)}\n{prog}"
    return nodes[0]


def tags(report) -> set[str]:
    return {k for k, v in report.stats.items() if k.startswith("fused.") and v}


def assert_not_fused(module: nn.Module, args: tuple, why: str, **kwargs):
    after, report = fuse(module, args, changed=False, checks=NOT_FUSED,
                         op_counts={SOFTMAX: 1, SDPA: 0}, **kwargs)
    assert report.stats["not_fused"] == 1 and report.stats["fused"] == 0, report.stats
    assert len(report.notes) == 1 and why in report.notes[0], report.notes
    return after, report


# ---------------------------------------------------------------------------------------- scale
@pytest.mark.parametrize("fn, scale, unscaled", [
    pytest.param(lambda q, k, v: torch.softmax(scores(q, k) * 0.35, -1) @ v, "scale=0.35)", False, id="mul"),
    pytest.param(lambda q, k, v: torch.softmax(scores(q, k) / 2.0, -1) @ v, "scale=0.5)", False, id="div"),
    pytest.param(lambda q, k, v: torch.softmax(scores(q * 0.35, k), -1) @ v, "scale=0.35)", False, id="on_q"),
    pytest.param(lambda q, k, v: torch.softmax(scores(q * 0.5, k * 0.5), -1) @ v, "scale=0.25)", False, id="on_q_and_k"),
    pytest.param(lambda q, k, v: torch.softmax(scores(q, k), -1) @ v, "scale=1.0)", True, id="none_t5"),
])
def test_fuses_scale_wherever_it_is_applied(fn, scale, unscaled):
    _, report = fuse(Attention(fn), qkv(), changed=True,
                     checks=f"CHECK: aten.scaled_dot_product_attention(%q, %k, %v, None, 0.0, False, {scale}\n"
                            "CHECK-NOT: aten._softmax\nCHECK-NOT: aten.bmm\nCHECK-NOT: aten.mul\nCHECK-NOT: aten.div",
                     op_counts={**FUSED, "aten.mul.Tensor": 0, "aten.div.Tensor": 0})
    assert report.stats["fused"] == 1
    assert tags(report) == ({"fused.unscaled"} if unscaled else set())


def test_fuses_scale_applied_after_a_bias_into_the_mask():
    # softmax((s + bias) * c) == softmax(c*s + c*bias): the bias is scaled, the scale goes to SDPA
    fn = lambda q, k, v, bias: torch.softmax((scores(q, k) + bias) * 0.35, -1) @ v  # noqa: E731
    _, report = fuse(MaskedAttention(fn), (*qkv(), torch.randn(1, H, S, T)), changed=True,
                     checks="CHECK: aten.mul.Tensor(%mask, 0.35)\n"
                            "CHECK-NEXT: aten.scaled_dot_product_attention(%q, %k, %v, %mul_tensor, 0.0, False, scale=0.35)")
    assert report.stats["fused"] == 1 and tags(report) == {"fused.masked"}


# ---------------------------------------------------------------------------------------- softmax dtype
@pytest.mark.parametrize("softmax", [
    pytest.param(lambda s, dt: torch.softmax(s.float(), dim=-1).to(dt), id="float_then_to"),
    pytest.param(lambda s, dt: torch.softmax(s, dim=-1, dtype=torch.float32).to(dt), id="softmax_dtype_arg"),
])
def test_fuses_softmax_upcast_to_fp32_and_back_in_bf16_model(softmax):
    fn = lambda q, k, v: softmax(scores(q, k) * 0.35, q.dtype) @ v  # noqa: E731
    after, report = fuse(Attention(fn), qkv(dtype=torch.bfloat16), changed=True, rtol=3e-2, atol=3e-2,
                         checks="CHECK: bf16[2, 3, 5, 8] = aten.scaled_dot_product_attention(%q, %k, %v, None, 0.0, "
                                "False, scale=0.35)\nCHECK-NOT: aten._to_copy\nCHECK-NOT: aten._softmax",
                         op_counts={**FUSED, "aten._to_copy.default": 0})
    assert report.stats["fused"] == 1 and tags(report) == {"fused.softmax_upcast"}


def test_does_not_fuse_softmax_computed_in_lower_precision():
    # fp32 scores cast down to bf16 for the softmax: SDPA would compute it in fp32, not the same numbers
    fn = lambda q, k, v: torch.softmax((scores(q, k) * 0.35).bfloat16(), -1).float() @ v  # noqa: E731
    assert_not_fused(Attention(fn), qkv(), "down to torch.bfloat16 before the softmax")


# ---------------------------------------------------------------------------------------- masks
def test_boolean_mask_from_masked_fill_minus_inf_becomes_bool_attn_mask():
    fn = lambda q, k, v, mask: torch.softmax((scores(q, k) * 0.35).masked_fill(~mask, float("-inf")), -1) @ v  # noqa: E731
    after, report = fuse(MaskedAttention(fn), (*qkv(), keep_mask()), changed=True,
                         checks="CHECK: aten.scaled_dot_product_attention(%q, %k, %v, %mask, 0.0, False, "
                                "scale=0.35)\nCHECK-NOT: aten.where\nCHECK-NOT: aten._softmax")
    mask = the_sdpa(after).args[3]
    assert val(mask).dtype == torch.bool and list(val(mask).shape) == [B, 1, 1, T]
    assert report.stats["fused"] == 1 and tags(report) == {"fused.masked"}


def test_where_with_finfo_min_becomes_additive_float_mask():
    fn = lambda q, k, v, mask: torch.softmax(  # noqa: E731
        torch.where(mask, scores(q, k) * 0.35, torch.finfo(torch.float32).min), -1) @ v
    after, report = fuse(MaskedAttention(fn), (*qkv(), keep_mask()), changed=True,
                         checks="CHECK: f32[2, 1, 1, 6] = aten.where.self(%mask, %full_default, %full_default_1)\n"
                                "CHECK: aten.scaled_dot_product_attention(%q, %k, %v, %where_self, 0.0, False, scale=0.35)")
    mask = the_sdpa(after).args[3]
    assert val(mask).dtype == torch.float32  # finfo.min is not -inf: an additive mask keeps its exact value
    assert report.stats["fused"] == 1 and tags(report) == {"fused.masked"}


def test_additive_float_mask_input_becomes_attn_mask():
    fn = lambda q, k, v, mask: torch.softmax(scores(q, k) * 0.35 + mask, -1) @ v  # noqa: E731
    mask = torch.where(torch.rand(B, 1, S, T) > 0.3, 0.0, float("-inf"))
    mask[..., 0] = 0.0
    _, report = fuse(MaskedAttention(fn), (*qkv(), mask), changed=True,
                     checks="CHECK: aten.scaled_dot_product_attention(%q, %k, %v, %mask, 0.0, False, scale=0.35)\n"
                            "CHECK-NOT: aten.add")
    assert report.stats["fused"] == 1 and tags(report) == {"fused.masked"}


def _tril(s):
    n = s.shape[-1]
    return s.masked_fill(~torch.tril(torch.ones(n, n, dtype=torch.bool)), float("-inf"))


def _arange(s):
    rows, cols = s.shape[-2:]
    causal = torch.arange(cols)[None, :] <= torch.arange(rows)[:, None]
    return s.masked_fill(~causal, float("-inf"))


def _where_finfo_min(s):
    n = s.shape[-1]
    return torch.where(torch.ones(n, n, dtype=torch.bool).tril(), s, torch.finfo(s.dtype).min)


def _additive_triu(s):
    n = s.shape[-1]
    return s + torch.full((n, n), float("-inf")).triu(1)


@pytest.mark.parametrize("causal", [_tril, _arange, _where_finfo_min, _additive_triu],
                         ids=["tril", "arange", "where_finfo_min", "additive_triu"])
def test_causal_mask_on_square_scores_becomes_is_causal(causal):
    fn = lambda q, k, v: torch.softmax(causal(scores(q, k) * 0.35), -1) @ v  # noqa: E731
    _, report = fuse(Attention(fn), qkv(S, S), changed=True,
                     checks="CHECK: aten.scaled_dot_product_attention(%q, %k, %v, None, 0.0, True, scale=0.35)\n"
                            "CHECK-NOT: aten.arange\nCHECK-NOT: aten.where\nCHECK-NOT: aten.full",
                     op_counts={**FUSED, "aten.arange.start_step": 0, "aten.full.default": 0})
    assert report.stats["fused"] == 1 and tags(report) == {"fused.causal"}


def test_causal_mask_on_non_square_scores_stays_a_mask():
    # SDPA's is_causal is the top-left triangle; a bottom-right aligned mask on [S, T != S] is not that
    def fn(q, k, v):
        s = scores(q, k) * 0.35
        rows, cols = s.shape[-2:]
        return torch.softmax(s.masked_fill(~torch.ones(rows, cols, dtype=torch.bool).tril(cols - rows), float("-inf")), -1) @ v

    after, report = fuse(Attention(fn), qkv(S, T), changed=True,
                         checks="CHECK: aten.scaled_dot_product_attention(%q, %k, %v, %logical_and, 0.0, False,")
    assert list(val(the_sdpa(after).args[3]).shape) == [S, T]
    assert report.stats["fused"] == 1 and tags(report) == {"fused.masked"}


def test_square_mask_that_is_not_causal_stays_a_mask():
    # upper triangle (attend to the future): evaluates to a constant pattern that is not is_causal's
    fn = lambda q, k, v: torch.softmax(  # noqa: E731
        (scores(q, k) * 0.35).masked_fill(~torch.ones(S, S, dtype=torch.bool).triu(), float("-inf")), -1) @ v
    _, report = fuse(Attention(fn), qkv(S, S), changed=True,
                     checks="CHECK: aten.scaled_dot_product_attention(%q, %k, %v, %logical_and, 0.0, False,")
    assert report.stats["fused"] == 1 and tags(report) == {"fused.masked"}


class ALiBiAttention(nn.Module):
    """ALiBi: a per-head linear distance bias [H, S, T] in a buffer, added to the scaled scores."""

    def __init__(self):
        super().__init__()
        slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)])
        dist = (torch.arange(T)[None, :] - torch.arange(S)[:, None]).float()
        self.register_buffer("alibi", slopes[:, None, None] * dist[None])

    def forward(self, q, k, v):
        return torch.softmax(scores(q, k) * 0.35 + self.alibi, -1) @ v


def test_alibi_bias_buffer_becomes_attn_mask():
    _, report = fuse(ALiBiAttention(), qkv(), changed=True,
                     checks="CHECK: f32[3, 5, 6] = constant alibi\n"
                            "CHECK: aten.scaled_dot_product_attention(%q, %k, %v, %alibi, 0.0, False, scale=0.35)")
    assert report.stats["fused"] == 1 and tags(report) == {"fused.masked"}


class T5LikeAttention(nn.Module):
    """T5: no scale; a learned relative-position bias [1, H, S, T] and a padding mask built from a 0/1
    attention_mask with finfo.min, both added to the scores; softmax in fp32 and back."""

    def __init__(self, summed_first: bool):
        super().__init__()
        self.summed_first = summed_first
        self.rel = nn.Embedding(2 * T + 1, H)

    def forward(self, q, k, v, attention_mask):
        rows, cols = q.shape[2], k.shape[2]
        rel = torch.arange(cols)[None, :] - torch.arange(rows)[:, None] + T
        position_bias = self.rel(rel).permute(2, 0, 1)[None]                                   # [1, H, S, T]
        pad = (1.0 - attention_mask[:, None, None, :].to(q.dtype)) * torch.finfo(q.dtype).min  # [B, 1, 1, T]
        s = q @ k.transpose(3, 2)
        s = s + (position_bias + pad) if self.summed_first else s + position_bias + pad
        return torch.softmax(s.float(), dim=-1).type_as(s) @ v


@pytest.mark.parametrize("summed_first", [True, False], ids=["bias_plus_mask", "two_adds"])
def test_t5_relative_bias_and_padding_mask_become_one_attn_mask(summed_first):
    attention_mask = torch.ones(B, T, dtype=torch.long)
    attention_mask[1, -2:] = 0
    after, report = fuse(T5LikeAttention(summed_first), (*qkv(), attention_mask), changed=True,
                         checks="CHECK: aten.scaled_dot_product_attention(%q, %k, %v, %add\nCHECK-SAME: 0.0, False, scale=1.0)")
    mask = val(the_sdpa(after).args[3])
    assert mask.dtype == torch.float32 and list(mask.shape) == [B, H, S, T]
    assert report.stats["fused"] == 1 and tags(report) == {"fused.masked", "fused.unscaled"}


def test_does_not_fuse_mask_fill_that_is_not_minus_infinity():
    # -1e4 is a large negative number, not a mask: exp(-1e4 - max) need not be 0 (scores can be that large)
    fn = lambda q, k, v, mask: torch.softmax((scores(q, k) * 0.35).masked_fill(~mask, -1e4), -1) @ v  # noqa: E731
    assert_not_fused(MaskedAttention(fn), (*qkv(), keep_mask()), "fill -10000.0, not -inf or finfo.min")


def test_does_not_fuse_mask_computed_from_the_scores():
    fn = lambda q, k, v: torch.softmax((lambda s: s.masked_fill(s < 0, float("-inf")))(scores(q, k) * 0.35), -1) @ v  # noqa: E731
    assert_not_fused(Attention(fn), qkv(), "condition computed from the scores")


# ---------------------------------------------------------------------------------------- layouts
def test_fuses_bshd_layout_with_transposes():
    # q, k, v given as [B, S, H, D]: the fused op reads the [B, H, S, D] permutes, no copy
    fn = lambda q, k, v: torch.softmax(q.transpose(1, 2) @ k.permute(0, 2, 3, 1) * 0.35, -1) @ v.transpose(1, 2)  # noqa: E731
    q, k, v = (x.transpose(1, 2).contiguous() for x in qkv())
    _, report = fuse(Attention(fn), (q, k, v), changed=True,
                     checks="CHECK: aten.permute(%q, [0, 2, 1, 3])\nCHECK: aten.permute(%k, [0, 2, 1, 3])\n"
                            "CHECK: aten.scaled_dot_product_attention(%permute\nCHECK-SAME: scale=0.35)\n"
                            "CHECK-NOT: aten.clone",
                     op_counts={**FUSED, "aten.permute.default": 3, "aten.clone.default": 0})
    assert report.stats["fused"] == 1 and tags(report) == set()


def test_fuses_3d_bmm_form():
    fn = lambda q, k, v: torch.bmm(torch.softmax(torch.bmm(q, k.transpose(1, 2)) * 0.35, -1), v)  # noqa: E731
    q, k, v = (x.reshape(B * H, x.shape[2], D) for x in qkv())
    after, report = fuse(Attention(fn), (q, k, v), changed=True,
                         checks="CHECK: f32[6, 5, 8] = aten.scaled_dot_product_attention(%q, %k, %v, None, 0.0, False, "
                                "scale=0.35)\nCHECK-NOT: aten.permute")
    assert report.stats["fused"] == 1 and tags(report) == {"fused.bmm_3d"}


def block(**overrides) -> tuple[nn.Module, tuple]:
    """An ``_AttentionModule`` (projections, heads, optional GQA/QK-norm) with explicit arguments."""
    spec = dict(B=B, H=4, Hkv=4, D=D, S=S, T=S, cross=False, dtype=torch.float32, layout="bhsd",
                fused_qkv=False, repeat="repeat_kv", scale_at="scores_mul", scale=0.35, upcast=False,
                qk_norm=False, mask="none")
    spec.update(overrides)
    torch.manual_seed(0)
    module = _AttentionModule(**spec).eval()
    args = [torch.randn(B, spec["S"], module.E)]
    if spec["cross"]:
        args.append(torch.randn(B, spec["T"], module.E))
    if spec["mask"] == "bool_inf":
        args.append(keep_mask(spec["T"]))
    return module, tuple(args)


def test_fuses_bmm_form_reshaped_from_4d_heads():
    _, report = fuse(*block(layout="bmm3d"), changed=True,
                     checks="CHECK: f32[8, 5, 8] = aten.scaled_dot_product_attention(\n"
                            "CHECK-NEXT: f32[2, 4, 5, 8] = aten.view(%scaled_dot_product_attention_default, [2, 4, 5, 8])")
    assert report.stats["fused"] == 1 and tags(report) == {"fused.bmm_3d"}


def test_fuses_qkv_split_from_one_fused_projection():
    _, report = fuse(*block(fused_qkv=True), changed=True,
                     checks="CHECK: aten.split_with_sizes(%view_1, [32, 32, 32], -1)\n"
                            "CHECK: aten.scaled_dot_product_attention(%permute_1, %permute_default_1, %permute_3, None, "
                            "0.0, False, scale=0.35)")
    assert report.stats["fused"] == 1 and tags(report) == set()


def test_fuses_cross_attention_with_different_query_and_key_lengths():
    after, report = fuse(*block(cross=True, T=7, mask="bool_inf"), changed=True,
                         checks="CHECK: f32[2, 4, 5, 8] = aten.scaled_dot_product_attention(\nCHECK-SAME: False, scale=0.35)")
    sdpa = the_sdpa(after)
    assert [list(val(a).shape) for a in sdpa.args[:3]] == [[B, 4, S, D], [B, 4, 7, D], [B, 4, 7, D]]
    assert report.stats["fused"] == 1 and tags(report) == {"fused.masked"}


def test_fuses_attention_with_qk_norm():
    _, report = fuse(*block(qk_norm=True), changed=True,
                     checks="CHECK: aten.native_layer_norm(%permute_3, [8], %q_norm_weight\n"
                            "CHECK: aten.native_layer_norm(%permute_4, [8], %k_norm_weight\n"
                            "CHECK: aten.scaled_dot_product_attention(%getitem, %getitem_3, %permute_5, None, 0.0, False, "
                            "scale=0.35)")
    assert report.stats["fused"] == 1


@pytest.mark.parametrize("operand", ["q", "k", "v"])
def test_fuses_operand_reshaped_from_another_4d_shape(operand):
    # regression: an operand reshaped [B, H, a, b] -> [B, H, L, D] before the matmul was read as the
    # un-reshaped [B, H, a, b] tensor because only its leading [B, H] was compared, and building SDPA
    # crashed; the pass must read the [B, H, L, D] view
    q, k, v = qkv(S, T)
    if operand == "q":
        fn = lambda q, k, v: torch.softmax(scores(q.reshape(B, H, S, D), k) * 0.35, -1) @ v  # noqa: E731
        q = torch.randn(B, H, 2 * S, D // 2)
    elif operand == "k":  # k [B, H, D*T, 1]: kᵀ [B, H, 1, D*T] reshaped to [B, H, D, T]
        fn = lambda q, k, v: torch.softmax(q @ k.transpose(-2, -1).reshape(B, H, D, T) * 0.35, -1) @ v  # noqa: E731
        k = torch.randn(B, H, D * T, 1)
    else:
        fn = lambda q, k, v: torch.softmax(scores(q, k) * 0.35, -1) @ v.reshape(B, H, T, D)  # noqa: E731
        v = torch.randn(B, H, 2 * T, D // 2)
    after, report = fuse(Attention(fn), (q, k, v), changed=True,
                         checks="CHECK: aten.scaled_dot_product_attention(\nCHECK-SAME: None, 0.0, False, scale=0.35)")
    sdpa = the_sdpa(after)
    assert [list(val(a).shape) for a in sdpa.args[:3]] == [[B, H, S, D], [B, H, T, D], [B, H, T, D]]
    assert report.stats["fused"] == 1


# ---------------------------------------------------------------------------------------- GQA
def repeat_kv(x, r):  # transformers' llama: head h reads kv head h // r
    b, n, t, d = x.shape
    return x[:, :, None, :, :].expand(b, n, r, t, d).reshape(b, n * r, t, d)


def repeat_interleave(x, r):
    return x.repeat_interleave(r, dim=1)


def tile_heads(x, r):  # head h reads kv head h % n: not what enable_gqa computes
    return x.repeat(1, r, 1, 1)


def tile_heads_by_expand(x, r):  # the same tiling spelled with unsqueeze(1)+expand+reshape
    b, n, t, d = x.shape
    return x[:, None].expand(b, r, n, t, d).reshape(b, r * n, t, d)


class GroupedAttention(nn.Module):
    """q [B, H, S, D] attends k, v [B, Hkv, T, D] repeated to H heads by ``repeat``."""

    def __init__(self, repeat):
        super().__init__()
        self.repeat = repeat

    def forward(self, q, k, v):
        r = q.shape[1] // k.shape[1]
        k, v = self.repeat(k, r), self.repeat(v, r)
        return torch.softmax(scores(q, k) * 0.35, -1) @ v


@pytest.mark.parametrize("repeat", [repeat_kv, repeat_interleave], ids=["repeat_kv", "repeat_interleave"])
@pytest.mark.parametrize("kv_heads", [2, 1], ids=["gqa", "mqa"])
def test_grouped_query_attention_reads_kv_unrepeated(repeat, kv_heads):
    after, report = fuse(GroupedAttention(repeat), qkv(heads=4, kv_heads=kv_heads), changed=True,
                         checks="CHECK: aten.scaled_dot_product_attention(%q, %k, %v, None, 0.0, False, scale=0.35, "
                                "enable_gqa=True)\nCHECK-NOT: aten.expand\nCHECK-NOT: aten.clone",
                         op_counts={**FUSED, "aten.expand.default": 0, "aten.clone.default": 0,
                                    "aten.repeat_interleave.self_int": 0, "aten.view.default": 0})
    assert list(val(the_sdpa(after).args[1]).shape) == [B, kv_heads, T, D]
    assert report.stats["fused"] == 1 and tags(report) == {"fused.gqa"}


@pytest.mark.parametrize("repeat", [tile_heads, tile_heads_by_expand], ids=["repeat", "expand_at_dim_1"])
def test_kv_heads_tiled_are_not_read_as_gqa(repeat):
    # tiling (head h reads kv head h % Hkv) is not enable_gqa's grouping (h // r): fused with the tiled k, v
    after, report = fuse(GroupedAttention(repeat), qkv(heads=4, kv_heads=2), changed=True,
                         checks="CHECK: aten.scaled_dot_product_attention(\nCHECK-NOT: enable_gqa")
    assert list(val(the_sdpa(after).args[1]).shape) == [B, 4, T, D]
    assert report.stats["fused"] == 1 and tags(report) == set()


# ---------------------------------------------------------------------------------------- not attention we can fuse
def test_does_not_fuse_logit_soft_capping():
    fn = lambda q, k, v: torch.softmax(torch.tanh(scores(q, k) * 0.35 / 30.0) * 30.0, -1) @ v  # noqa: E731
    assert_not_fused(Attention(fn), qkv(), "logit soft-capping (tanh)")


def test_does_not_fuse_softmax_over_query_axis():
    fn = lambda q, k, v: torch.softmax(scores(q, k) * 0.35, dim=-2) @ v  # noqa: E731
    assert_not_fused(Attention(fn), qkv(S, S), "softmax over dim 2, not the last (key) axis")


def test_does_not_fuse_data_dependent_scale():
    fn = lambda q, k, v: torch.softmax(scores(q, k) * q.mean(), -1) @ v  # noqa: E731
    assert_not_fused(Attention(fn), qkv(), "scales the scores by a value that is not a constant")


class PerHeadTemperature(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("temperature", torch.tensor([0.1, 0.5, 2.0]).view(H, 1, 1))

    def forward(self, q, k, v):
        return torch.softmax(scores(q, k) * self.temperature, -1) @ v


def test_does_not_fuse_per_head_scale():
    # a constant, but not one number: SDPA has a single scale
    assert_not_fused(PerHeadTemperature(), qkv(), "scales the scores by a value that is not a constant")


def test_does_not_fuse_when_probabilities_are_returned():
    def fn(q, k, v):
        probs = torch.softmax(scores(q, k) * 0.35, -1)
        return probs @ v, probs

    assert_not_fused(Attention(fn), qkv(), "used elsewhere (e.g. attention weights returned")


@pytest.mark.parametrize("returned", ["scaled", "raw"])
def test_does_not_fuse_when_scores_are_returned(returned):
    # regression (scaled): the softmax's own input was not checked for other users, so the pass fused and
    # left q @ kᵀ computed twice
    def fn(q, k, v):
        raw = scores(q, k)
        s = raw * 0.35
        return torch.softmax(s, -1) @ v, (s if returned == "scaled" else raw)

    assert_not_fused(Attention(fn), qkv(), "are used elsewhere")


def test_does_not_fuse_active_dropout():
    def fn(q, k, v):
        return F.dropout(torch.softmax(scores(q, k) * 0.35, -1), p=0.5, training=True) @ v

    # random: the two runs check_pass compares cannot agree, so no numerics
    assert_not_fused(Attention(fn), qkv(), "dropout with p=0.5 is active", numerics=False)


def test_silu_attention_never_becomes_sdpa():
    # HSTU: silu(q @ kᵀ) / n @ v has no softmax: it becomes mmcompile::hstu_attention, not SDPA
    fn = lambda q, k, v: F.silu(scores(q, k)) / q.shape[-2] @ v  # noqa: E731
    _, report = fuse(Attention(fn), qkv(), changed=True, checks="CHECK-NOT: aten.scaled_dot_product_attention",
                     op_counts={SDPA: 0, "aten.bmm.default": 0, "mmcompile.hstu_attention.default": 1})
    assert report.stats["fused.silu"] == 1 and not report.notes


def test_does_not_fuse_softmax_without_value_matmul():
    fn = lambda q, k, v: torch.softmax(scores(q, k) * 0.35, -1).sum(-1)  # noqa: E731
    assert_not_fused(Attention(fn), qkv(), "does not feed a matmul with v (it feeds %sum_dim_int_list)")


class ClassifierHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(D, 10)

    def forward(self, x):
        return torch.softmax(self.linear(x), -1)


@pytest.mark.parametrize("shape, why", [
    ((4, D), "softmax over a rank-2 tensor"),
    ((B, 4, D), "does not feed a matmul with v"),
], ids=["2d", "3d"])
def test_does_not_fuse_softmax_classifier_head(shape, why):
    assert_not_fused(ClassifierHead(), (torch.randn(*shape),), why)


# ---------------------------------------------------------------------------------------- existing SDPA
def test_existing_sdpa_is_left_alone():
    fn = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=0.35)  # noqa: E731
    _, report = fuse(Attention(fn), qkv(), changed=False,
                     checks="CHECK: aten.scaled_dot_product_attention(%q, %k, %v, scale=0.35)",
                     op_counts={SDPA: 1})
    assert report.stats["already_fused"] == 1 and report.stats["fused"] == 0 and not report.notes


def _causal_bool(n):
    return torch.ones(n, n, dtype=torch.bool).tril()


def _causal_additive(n):  # transformers' sdpa mask for a prompt: 0 where visible, finfo.min elsewhere
    return torch.zeros(n, n).masked_fill(~_causal_bool(n), torch.finfo(torch.float32).min)


def _causal_from_aranges(n):  # as transformers builds it: positions compared, expanded per row
    pos = torch.arange(n) + 0
    return (pos[None, None, None, :] <= pos[None, None, :, None]).expand(B, -1, n, n)


@pytest.mark.parametrize("mask", [_causal_bool, _causal_additive, _causal_from_aranges],
                         ids=["bool", "additive_finfo_min", "aranges"])
def test_existing_sdpa_under_a_constant_causal_mask_becomes_is_causal(mask):
    fn = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask(S), scale=0.35)  # noqa: E731
    _, report = fuse(Attention(fn), qkv(S, S), changed=True, op_counts={SDPA: 1, "aten.arange.start_step": 0},
                     checks="CHECK: aten.scaled_dot_product_attention(%q, %k, %v, None, 0.0, True, scale=0.35)")
    assert report.stats["existing_causal"] == 1 and "constant causal mask became is_causal" in report.notes[-1]


@pytest.mark.parametrize("case", ["window", "bias", "input", "not_square"])
def test_existing_sdpa_keeps_a_mask_that_is_not_constant_causal(case):
    s, t = (S, T) if case == "not_square" else (S, S)
    if case == "input":  # the mask is an input of the graph: not known when compiling
        fn = lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m)  # noqa: E731
        module, args = MaskedAttention(fn), (*qkv(s, t), _causal_bool(s))
    else:
        mask = {"window": _causal_bool(s).triu(-1),  # a sliding window of two keys
                "bias": _causal_additive(s) + torch.eye(s),  # causal, but with a bias on the diagonal
                "not_square": torch.ones(s, t, dtype=torch.bool).tril()}[case]
        module, args = Attention(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)), qkv(s, t)
    after, report = fuse(module, args, changed=False, op_counts={SDPA: 1})
    sdpa = the_sdpa(after)
    assert sdpa.args[3] is not None and report.stats["existing_causal"] == 0


def test_fuses_eager_attention_next_to_existing_sdpa():
    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, scale=0.35) + torch.softmax(scores(q, k) * 0.35, -1) @ v

    _, report = fuse(Attention(fn), qkv(), changed=True, op_counts={SDPA: 2, SOFTMAX: 0},
                     checks="CHECK-COUNT-2: aten.scaled_dot_product_attention(%q, %k, %v,")
    assert report.stats["already_fused"] == 1 and report.stats["fused"] == 1


# ---------------------------------------------------------------------------------------- property
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(testing.attention_modules())
def test_fuses_every_generated_attention_block(case):
    module, args = case
    tol = 3e-2 if args[0].dtype == torch.bfloat16 else 1e-5
    prog = canonical(module, args)
    _, report = testing.check_pass(prog, "fuse_attention", changed=True, rtol=tol, atol=tol,
                                   op_counts={SOFTMAX: 0, SDPA: 1})
    assert report.stats["fused"] == 1, report.notes


# ---------------------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("name", hf_zoo.ZOO)
def test_zoo_model_attention_fused_end_to_end(name):
    model, args, kwargs, n = hf_zoo.build(name)
    result = mmc.optimize(mmc.capture(model, args, kwargs), "default")
    report = result.report("fuse_attention")
    assert report.stats["fused"] == n and report.stats["not_fused"] == 0, report.notes
    testing.assert_op_counts(result.program, {SDPA: n, SOFTMAX: 0})
    if name in ("llama_gqa", "qwen2"):
        assert report.stats["fused.gqa"] == n
        testing.assert_op_counts(result.program, {"aten.expand.default": 0})
    logits = hf_zoo.logits_of(result.program(*args, **kwargs))
    testing.assert_close(logits, hf_zoo.reference(model, args, kwargs), rtol=1e-4, atol=1e-4)


def test_zoo_llama_gqa_in_bf16_fused_end_to_end():
    model, args, kwargs, n = hf_zoo.build("llama_gqa", dtype=torch.bfloat16)
    result = mmc.optimize(mmc.capture(model, args, kwargs), "default")
    report = result.report("fuse_attention")
    assert report.stats["fused"] == n and report.stats["fused.gqa"] == n, report.notes
    assert report.stats["fused.softmax_upcast"] == n
    testing.assert_op_counts(result.program, {SDPA: n, SOFTMAX: 0})
    logits = hf_zoo.logits_of(result.program(*args, **kwargs)).float()
    eager = hf_zoo.reference(model, args, kwargs).float()
    # bf16 logits (|x| up to ~6) differ by a few bf16 ulps wherever rounding happens in another order: compare
    # in aggregate, and against fp32 — the fused model must be no further from it than eager bf16 is
    assert (logits - eager).abs().mean() < 5e-2
    assert torch.linalg.norm(logits - eager) / torch.linalg.norm(eager) < 3e-2
    model32, args32, kwargs32, _ = hf_zoo.build("llama_gqa")
    fp32 = hf_zoo.reference(model32, args32, kwargs32)
    assert torch.linalg.norm(logits - fp32) <= 1.25 * torch.linalg.norm(eager - fp32)


# ---------------------------------------------------------------------------------------- dynamic shapes
def test_fuses_gqa_with_a_dynamic_sequence_length_without_specializing_it():
    model = mmc.models.build("llama:tiny", attn_impl="eager")
    seq = torch.export.Dim("seq", min=2, max=32)
    prog = mmc.capture(model, (torch.zeros(1, 5, dtype=torch.long), torch.arange(5)[None], model.empty_cache(1, 32)),
                       dynamic_shapes={"tokens": {1: seq}, "input_pos": {1: seq},
                                       "cache": [(None, None)] * model.config.n_layers})
    result = mmc.optimize(prog, "default", verify=True)
    report = result.report("fuse_attention")
    assert report.stats["fused"] == report.stats["fused.gqa"] == model.config.n_layers
    assert isinstance(result.program.placeholders()[0].meta["val"].shape[1], torch.SymInt)  # still dynamic
    for n in (3, 11):
        tokens, pos = torch.randint(0, 256, (1, n)), torch.arange(n)[None]
        with torch.no_grad():
            ref = model(tokens, pos, model.empty_cache(1, 32))
        torch.testing.assert_close(result.program(tokens, pos, model.empty_cache(1, 32)), ref, rtol=1e-5, atol=1e-5)


def test_does_not_write_symbolic_sizes_into_a_new_view():
    # the 3-D bmm form with a dynamic length: q/k/v exist only as [B*H, S, D]; a [B, H, S, D] view of
    # them would need the symbolic S as a literal, so the pass declines instead of emitting broken code
    def fn(q, k, v):
        B, Hh, S_, D_ = q.shape
        s = torch.bmm(q.reshape(B * Hh, S_, D_), k.reshape(B * Hh, S_, D_).transpose(1, 2)).view(B, Hh, S_, S_)
        p = torch.softmax(s * 0.25, dim=-1)
        return torch.bmm(p.reshape(B * Hh, S_, S_), v.reshape(B * Hh, S_, D_)).view(B, Hh, S_, D_) + 0

    class Flat(nn.Module):
        def forward(self, q, k, v):
            return fn(q, k, v)

    q = torch.randn(2, 3, 6, 8)
    s = torch.export.Dim("s", min=2, max=16)
    prog = mmc.optimize(mmc.capture(Flat(), (q, q.clone(), q.clone()),
                                    dynamic_shapes=({2: s}, {2: s}, {2: s})), ["canonicalize"]).program
    after, report = testing.run_pass(prog, "fuse_attention")
    if report.changed:  # fused through the model's own 4-D tensors: must still be right at another length
        x = torch.randn(2, 3, 9, 8)
        testing.assert_close(after(x, x, x), prog(x, x, x), rtol=1e-5, atol=1e-5)
    else:
        assert report.stats["not_fused"] == 1 and "symbolic sizes" in report.notes[0]


def test_a_relative_position_bias_made_by_its_own_matmul_is_fused():
    """Shaw-style relative keys: scores + einsum(q, r[j - i]) — the bias has a matmul of its own, permuted
    into place; the scores are the q·kᵀ one."""

    class Relative(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.table = torch.nn.Parameter(torch.randn(9, 8))

        def forward(self, q, k, v):
            n = q.shape[2]
            steps = torch.arange(n)
            r = self.table[(steps[None, :] - steps[:, None]).clamp(-4, 4) + 4]  # [N, N, D]
            scores = torch.matmul(q, k.transpose(2, 3)) * 8 ** -0.5
            scores = scores + torch.einsum("bhld,lrd->bhlr", q, r) / math.sqrt(8)
            return torch.matmul(torch.softmax(scores, dim=-1), v)

    args = tuple(torch.randn(2, 3, 6, 8) for _ in range(3))
    model = Relative().eval()
    program = mmc.capture(model, args)
    result = mmc.optimize(program, ["canonicalize", "fuse_attention"])
    (report,) = [r for r in result.reports if r.name == "fuse_attention"]
    assert report.stats["fused"] == 1, report.notes
    torch.testing.assert_close(result.program.graph_module(*args)[0], model(*args), rtol=1e-5, atol=1e-5)
