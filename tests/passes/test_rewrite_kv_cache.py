"""Tests of rewrite_kv_cache: a growing KV cache (``cat([past, new], 2)`` over a dynamic past length) becomes
static per-layer buffers written in place at ``position_ids``, with the step called as
``program(input_ids, position_ids, [(k0, v0), ...]) -> logits``.

End to end on tiny transformers models (their ``DynamicCache``) and on a small module with a legacy
``(past_k, past_v)`` tuple cache: the rewritten step, fed buffers that hold the past at slots ``[0, T)`` and
noise everywhere else, equals the eager model and writes the new keys/values at each row's position and
nowhere else. Negative tests are named for why nothing changes and assert the reason the pass gives.
"""

from __future__ import annotations

import copy
import functools
import os
import sys

import pytest
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from torch import nn

import mmcompile as mmc
from mmcompile import testing
from mmcompile.rewrite import val

try:
    import test_transformers_cache as hf
except ImportError:  # run from another rootdir: tests/ is not on sys.path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import test_transformers_cache as hf

aten = torch.ops.aten
AUTO = torch.export.Dim.AUTO
B, T = hf.B, hf.T  # batch 2, past length 5
L = 32  # max_seq_len of the buffers
FUSE = ["canonicalize", "fold_constants", "fuse_attention"]
PIPELINE = FUSE + ["rewrite_kv_cache", "eliminate_dead_code"]


# ---------------------------------------------------------------------------------------- helpers
class Case:
    def __init__(self, model, ids, past, program):
        self.model, self.ids, self.past, self.program = model, ids, past, program

    @functools.cached_property
    def fused(self) -> mmc.Program:
        return mmc.optimize(self.program, FUSE, verify=True).program

    @property
    def layers(self) -> int:
        return len(self.past.layers)


@functools.lru_cache(maxsize=None)
def hf_decode(kind: str, *, dynamic: bool = True, positions: bool = True, mask: bool = False) -> Case:
    """A transformers decode step after a T-token prefill, captured with Dim.AUTO on the cache's past length."""
    model = hf.build(kind)
    ids = torch.randint(3, 128, (B, T + 1), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        past = model(input_ids=ids[:, :T], use_cache=True).past_key_values
    n = model.config.num_hidden_layers
    kwargs = dict(input_ids=ids[:, T:], cache=copy.deepcopy(past), use_cache=True)
    shapes = dict(input_ids=None, cache=[[{2: AUTO}] * n, [{2: AUTO}] * n], use_cache=None)
    if positions:
        kwargs["position_ids"], shapes["position_ids"] = torch.full((B, 1), T), None
    if mask:
        kwargs["attention_mask"], shapes["attention_mask"] = torch.ones(B, T + 1, dtype=torch.long), {1: AUTO}
    prog = mmc.capture(model, (), kwargs, dynamic_shapes=shapes if dynamic else None)
    return Case(model, ids[:, T:], past, prog)


@functools.lru_cache(maxsize=None)
def hf_rewritten(kind: str, layout: str = "bhsd") -> mmc.OptimizeResult:
    return mmc.optimize(hf_decode(kind).program, PIPELINE, verify=True,
                        rewrite_kv_cache={"max_seq_len": L, "layout": layout})


def eager_decode(model, ids, past, positions):
    """The transformers model's own decode step, on a copy of its DynamicCache."""
    with torch.no_grad():
        return model(input_ids=ids, position_ids=positions, cache=copy.deepcopy(past), use_cache=True)


def noise(shape, seed: int = 0) -> torch.Tensor:
    """What a buffer holds in the slots attention must never read (stale rows, other sequences)."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 3


def as_bhsd(buf: torch.Tensor, layout: str) -> torch.Tensor:
    """A buffer seen as [B, H, L, D] whatever its layout."""
    return buf if layout == "bhsd" else buf.transpose(1, 2)


def fill(layers, layout: str, max_seq_len: int = L, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (k, v) buffers of ``max_seq_len`` slots holding each [B, H, T, D] past at slots [0, T), noise after."""
    out = []
    for i, pair in enumerate(layers):
        bufs = []
        for j, past in enumerate(pair):
            b, h, t, d = past.shape
            buf = noise([b, h, max_seq_len, d], seed=seed + 2 * i + j)
            buf[:, :, :t] = past
            bufs.append(buf if layout == "bhsd" else buf.transpose(1, 2).contiguous())
        out.append(tuple(bufs))
    return out


def clone_buffers(bufs):
    return [tuple(b.clone() for b in pair) for pair in bufs]


def assert_written_only_at(buf, before, ref, slots, layout: str):
    """Row r of ``buf`` holds ``ref[r]`` (the new [H, D] entry) at slot ``slots[r]``; every other slot is untouched."""
    got, old = as_bhsd(buf, layout), as_bhsd(before, layout)
    for r, slot in enumerate(slots):
        torch.testing.assert_close(got[r, :, slot], ref[r], rtol=1e-5, atol=1e-5)
        assert torch.equal(got[r, :, :slot], old[r, :, :slot]), f"row {r}: a slot before {slot} was overwritten"
        assert torch.equal(got[r, :, slot + 1:], old[r, :, slot + 1:]), f"row {r}: a slot after {slot} was overwritten"


def hf_layers(cache):
    return [(layer.keys, layer.values) for layer in cache.layers]


def cache_cats(prog: mmc.Program) -> list[str]:
    """Nodes that grow a 4-D tensor along dimension 2 (a growing KV cache)."""
    out = []
    for n in prog.graph.nodes:
        if n.op == "call_function" and n.target is aten.cat.default:
            dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
            if val(n).dim() == 4 and dim % 4 == 2:
                out.append(n.name)
    return out


def symbolic(prog: mmc.Program) -> list[str]:
    """Nodes whose value has a symbolic size (or is a SymInt)."""
    out = []
    for n in prog.graph.nodes:
        for v in pytree.tree_leaves(n.meta.get("val")):
            if isinstance(v, torch.SymInt) or (isinstance(v, torch.Tensor) and
                                               not all(isinstance(d, int) for d in v.shape)):
                out.append(n.name)
                break
    return out


def assert_declined(prog: mmc.Program, why: str, **options):
    """The pass leaves ``prog`` exactly as it was and says why in a note."""
    after, report = testing.run_pass(prog, "rewrite_kv_cache", **options)
    assert report.changed is False, report
    assert str(after) == str(prog)
    assert "kv_cache" not in after.metadata and not after.state_inputs()
    assert not report.stats, report.stats
    assert report.notes and all(n.startswith("not rewritten: ") for n in report.notes), report.notes
    assert any(why in n for n in report.notes), report.notes
    return report


class TupleCacheAttention(nn.Module):
    """One attention layer with a legacy ``(past_k, past_v)`` cache, grown by ``torch.cat`` on dimension 2.

    ``mask``: "visible" (every cached slot, built from the past length), "window" (hides slots older than
    ``window`` positions: a sliding window) or "none" (no attn_mask). ``leak``: the grown keys also feed a
    reduction into the output, not only attention.
    """

    def __init__(self, *, heads=4, kv_heads=2, head_dim=8, mask="visible", window=4, leak=False, vocab=32,
                 max_pos=64):
        super().__init__()
        self.H, self.Hkv, self.D, self.mask, self.window, self.leak = heads, kv_heads, head_dim, mask, window, leak
        E = heads * head_dim
        self.tok, self.pos = nn.Embedding(vocab, E), nn.Embedding(max_pos, E)
        self.wq = nn.Linear(E, E, bias=False)
        self.wk = nn.Linear(E, kv_heads * head_dim, bias=False)
        self.wv = nn.Linear(E, kv_heads * head_dim, bias=False)
        self.wo = nn.Linear(E, E, bias=False)

    def forward(self, input_ids, position_ids, past_k, past_v):
        Bq, S = input_ids.shape
        x = self.tok(input_ids) + self.pos(position_ids)
        q = self.wq(x).view(Bq, S, self.H, self.D).transpose(1, 2)
        k = self.wk(x).view(Bq, S, self.Hkv, self.D).transpose(1, 2)
        v = self.wv(x).view(Bq, S, self.Hkv, self.D).transpose(1, 2)
        k_cat, v_cat = torch.cat([past_k, k], 2), torch.cat([past_v, v], 2)
        past = past_k.shape[2]
        slots = torch.arange(past + 1)
        if self.mask == "window":
            attn_mask = (slots > past - self.window)[None, None, None, :]
        elif self.mask == "visible":
            attn_mask = (slots <= past)[None, None, None, :]
        else:
            attn_mask = None
        out = F.scaled_dot_product_attention(q, k_cat, v_cat, attn_mask=attn_mask, enable_gqa=self.H != self.Hkv)
        out = self.wo(out.transpose(1, 2).reshape(Bq, S, -1))
        if self.leak:
            out = out + k_cat.mean()
        return out, k_cat, v_cat


def tuple_case(*, batch=B, past=6, S=1, seed=0, **kw):
    """(module, (input_ids, position_ids, past_k, past_v), captured Program with Dim.AUTO on the past length)."""
    torch.manual_seed(seed)
    m = TupleCacheAttention(**kw).eval()
    g = torch.Generator().manual_seed(seed + 1)
    args = (torch.randint(0, 32, (batch, S), generator=g), (past + torch.arange(S)).repeat(batch, 1),
            torch.randn(batch, m.Hkv, past, m.D, generator=g), torch.randn(batch, m.Hkv, past, m.D, generator=g))
    prog = mmc.capture(m, args, dynamic_shapes=(None, None, {2: AUTO}, {2: AUTO}))
    return m, args, prog


def check_tuple_step(m, args, result, layout: str, max_seq_len: int):
    """The rewritten step equals eager, and writes the new k/v at the position, in ``layout``, and nowhere else."""
    ids, pos, past_k, past_v = args
    past = past_k.shape[2]
    kv = result.program.metadata["kv_cache"]
    assert kv["layout"] == layout and kv["max_seq_len"] == max_seq_len and kv["phase"] == "decode"
    shape = [ids.shape[0], m.Hkv, max_seq_len, m.D] if layout == "bhsd" else [ids.shape[0], max_seq_len, m.Hkv, m.D]
    assert [list(val(n).shape) for n in result.program.state_inputs()] == [shape, shape]
    bufs = fill([(past_k, past_v)], layout, max_seq_len)
    before = clone_buffers(bufs)
    got = result.program(ids, pos, bufs)
    with torch.no_grad():
        ref, k_cat, v_cat = m(ids, pos, past_k, past_v)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    slots = [past] * ids.shape[0]
    assert_written_only_at(bufs[0][0], before[0][0], k_cat[:, :, past], slots, layout)
    assert_written_only_at(bufs[0][1], before[0][1], v_cat[:, :, past], slots, layout)


# ---------------------------------------------------------------------------------------- end to end: decode
@pytest.mark.parametrize("kind, layout", [("llama", "bhsd"), ("qwen2", "bhsd"), ("gpt2", "bhsd"), ("llama", "bshd")])
def test_dynamic_cache_decode_becomes_static_buffers_and_equals_eager(kind, layout):
    case = hf_decode(kind)
    n = case.layers
    assert len(cache_cats(case.program)) == 2 * n and symbolic(case.program)  # what the pass must remove
    result = hf_rewritten(kind, layout)
    prog, report = result.program, result.report("rewrite_kv_cache")
    assert report.changed, report.notes
    assert report.stats["rewritten.growing"] == 2 * n and report.stats["layers"] == n, report.stats
    assert "rewritten.created" not in report.stats

    # the generation protocol's calling convention: tokens, positions, then each layer's (k, v) buffers
    buffers = [f"kv_cache_{i}_{kv}" for i in range(n) for kv in "kv"]
    assert [p.name for p in prog.placeholders()] == ["input_ids", "position_ids", *buffers]
    assert [p.name for p in prog.state_inputs()] == buffers
    _, H, _, D = case.past.layers[0].keys.shape
    shape = [B, H, L, D] if layout == "bhsd" else [B, L, H, D]
    assert all(list(val(p).shape) == shape for p in prog.state_inputs())
    kv = prog.metadata["kv_cache"]
    assert (kv["layout"], kv["max_seq_len"], kv["phase"]) == (layout, L, "decode")
    assert kv["buffers"] == [[shape, shape]] * n and kv["dtype"] == "torch.float32"
    assert "shared_position" not in kv  # positions come from position_ids: rows decode at their own
    assert cache_cats(prog) == [] and symbolic(prog) == []
    assert prog.out_spec.is_leaf()  # logits only: the cache outputs are gone

    # buffers hold the past at [0, T) and noise after it; position T: the same logits as eager
    bufs = fill(hf_layers(case.past), layout)
    before = clone_buffers(bufs)
    logits = prog(case.ids, torch.full((B, 1), T), bufs)
    ref = eager_decode(case.model, case.ids, case.past, torch.full((B, 1), T))
    torch.testing.assert_close(logits, ref.logits, rtol=1e-5, atol=1e-5)
    for (k, v), (k0, v0), layer in zip(bufs, before, ref.past_key_values.layers):
        assert_written_only_at(k, k0, layer.keys[:, :, -1], [T] * B, layout)
        assert_written_only_at(v, v0, layer.values[:, :, -1], [T] * B, layout)


def test_golden_ir_attention_reads_the_buffer_written_in_place():
    fused = hf_decode("llama").fused
    assert "aten.cat([%cache_key_cache_0, %" in str(fused)  # the growing cache the pass replaces
    after, report = testing.check_pass(
        fused, "rewrite_kv_cache", changed=True, numerics=False, options={"max_seq_len": L},
        checks="CHECK: program LlamaForCausalLM(%input_ids: i64[2, 1], %position_ids: i64[2, 1], "
               "%kv_cache_0_k: f32[2, 2, 32, 16], %kv_cache_0_v: f32[2, 2, 32, 16], "
               "%kv_cache_1_k: f32[2, 2, 32, 16], %kv_cache_1_v: f32[2, 2, 32, 16]) {\n"
               "CHECK: i64[2, 1, 1] = aten.view(%position_ids, [2, 1, 1])\n"
               "CHECK: i64[32] = aten.arange.start_step(0, 32, 1\n"
               "CHECK: b8[2, 1, 32] = aten.le.Tensor(\n"
               "CHECK: %where_self: f32[2, 1, 1, 32] = aten.where.self(\n"
               "CHECK: %index_put_default: f32[2, 2, 32, 16] = aten.index_put(%kv_cache_0_k, [%\n"
               "CHECK-NEXT: %index_put_default_1: f32[2, 2, 32, 16] = aten.index_put(%kv_cache_0_v, [%\n"
               "CHECK-NEXT: f32[2, 4, 1, 16] = aten.scaled_dot_product_attention(%\n"
               "CHECK-SAME: , %index_put_default, %index_put_default_1, %where_self, 0.0, False, scale=0.25, "
               "enable_gqa=True)\n"
               "CHECK: %index_put_default_2: f32[2, 2, 32, 16] = aten.index_put(%kv_cache_1_k, [%\n"
               "CHECK-NEXT: %index_put_default_3: f32[2, 2, 32, 16] = aten.index_put(%kv_cache_1_v, [%\n"
               "CHECK-NEXT: aten.scaled_dot_product_attention(%\n"
               "CHECK-SAME: , %index_put_default_2, %index_put_default_3, %where_self, 0.0, False\n"
               "CHECK: aten.copy_(%kv_cache_0_k, %index_put_default)\n"
               "CHECK-NEXT: aten.copy_(%kv_cache_0_v, %index_put_default_1)\n"
               "CHECK-NEXT: aten.copy_(%kv_cache_1_k, %index_put_default_2)\n"
               "CHECK-NEXT: aten.copy_(%kv_cache_1_v, %index_put_default_3)\n"
               "CHECK-NEXT: return [%")
    # nowhere in the program: the old cache, a cat of a buffer, or the symbolic past length
    testing.filecheck(after, "CHECK-NOT: %cache_key_cache\nCHECK-NOT: %cache_value_cache\n"
                             "CHECK-NOT: aten.cat([%kv_cache\nCHECK-NOT: sym_size\nCHECK-NOT: sym(")
    assert report.stats["rewritten.growing"] == 4


def test_position_mask_is_per_row():
    # row 0 has 3 cached tokens, row 1 has 5: each row attends to its own slots only (row 0's slots 4.. are
    # noise), and each row's new k/v lands at its own position
    case, prog = hf_decode("llama"), hf_rewritten("llama").program
    model, pasts, g = case.model, (3, 5), torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 128, (1, p + 1), generator=g) for p in pasts]
    caches, refs = [], []
    for prompt, p in zip(prompts, pasts):
        with torch.no_grad():
            caches.append(model(input_ids=prompt[:, :p], use_cache=True).past_key_values)
        refs.append(eager_decode(model, prompt[:, p:], caches[-1], torch.tensor([[p]])))
    _, H, _, D = case.past.layers[0].keys.shape
    bufs = [tuple(noise([B, H, L, D], seed=10 + 2 * i + j) for j in range(2)) for i in range(case.layers)]
    for i, (k, v) in enumerate(bufs):
        for r, (cache, p) in enumerate(zip(caches, pasts)):
            k[r, :, :p], v[r, :, :p] = cache.layers[i].keys[0], cache.layers[i].values[0]
    before = clone_buffers(bufs)
    logits = prog(torch.cat([pr[:, -1:] for pr in prompts]), torch.tensor([[p] for p in pasts]), bufs)
    for r in range(B):
        torch.testing.assert_close(logits[r], refs[r].logits[0], rtol=1e-5, atol=1e-5)
    for i, ((k, v), (k0, v0)) in enumerate(zip(bufs, before)):
        layer = [ref.past_key_values.layers[i] for ref in refs]
        assert_written_only_at(k, k0, torch.stack([x.keys[0, :, -1] for x in layer]), pasts, "bhsd")
        assert_written_only_at(v, v0, torch.stack([x.values[0, :, -1] for x in layer]), pasts, "bhsd")


# ---------------------------------------------------------------------------------------- prefill
def test_prefill_cache_is_created_in_the_buffers_at_the_prompt_positions():
    model, S = hf.build("llama"), 4
    ids = torch.randint(3, 128, (B, S), generator=torch.Generator().manual_seed(4))
    pos = torch.arange(S).repeat(B, 1)
    prog = mmc.capture(model, (), dict(input_ids=ids, position_ids=pos, use_cache=True))
    result = mmc.optimize(prog, PIPELINE, verify=True, rewrite_kv_cache={"max_seq_len": L})
    after, report = result.program, result.report("rewrite_kv_cache")
    n = model.config.num_hidden_layers
    assert report.changed and report.stats["rewritten.created"] == 2 * n, report.notes
    assert "rewritten.growing" not in report.stats
    kv = after.metadata["kv_cache"]
    assert (kv["phase"], kv["layout"], kv["max_seq_len"]) == ("prefill", "bhsd", L)
    assert [p.name for p in after.state_inputs()] == [f"kv_cache_{i}_{x}" for i in range(n) for x in "kv"]
    assert cache_cats(after) == []

    with torch.no_grad():
        ref = model(input_ids=ids, position_ids=pos, use_cache=True)
    _, H, _, D = ref.past_key_values.layers[0].keys.shape
    bufs = [tuple(noise([B, H, L, D], seed=20 + 2 * i + j) for j in range(2)) for i in range(n)]
    before = clone_buffers(bufs)
    logits = after(ids, pos, bufs)  # prefill attention reads the new keys, never the (noisy) buffer
    torch.testing.assert_close(logits, ref.logits, rtol=1e-5, atol=1e-5)
    for (k, v), (k0, v0), layer in zip(bufs, before, ref.past_key_values.layers):
        for buf, old, want in ((k, k0, layer.keys), (v, v0, layer.values)):
            torch.testing.assert_close(buf[:, :, :S], want, rtol=1e-5, atol=1e-5)
            assert torch.equal(buf[:, :, S:], old[:, :, S:])


# ---------------------------------------------------------------------------------------- no change
def test_second_run_changes_nothing():
    prog = hf_rewritten("llama").program
    after, report = testing.run_pass(prog, "rewrite_kv_cache", max_seq_len=L)
    assert report.changed is False and not report.stats and report.notes == []
    assert str(after) == str(prog) and after.metadata["kv_cache"] == prog.metadata["kv_cache"]


@pytest.fixture(scope="module")
def static_llama(tiny_llama):
    """Our own llama decode step: the cache is already [B, Hkv, L, D] buffers updated in place."""
    tokens = torch.randint(0, tiny_llama.config.vocab_size, (B, 1), generator=torch.Generator().manual_seed(5))
    prog = mmc.capture(tiny_llama, (tokens, torch.full((B, 1), 3), tiny_llama.empty_cache(B, L)))
    return mmc.optimize(prog, FUSE, verify=True).program


def test_cache_that_is_already_static_buffers_is_left_alone(static_llama):
    assert len(static_llama.state_inputs()) == 4
    after, report = testing.run_pass(static_llama, "rewrite_kv_cache", max_seq_len=L)
    assert report.changed is False and not report.stats
    assert report.notes == ["the cache is already 4 static buffer(s) updated in place; nothing to rewrite"]
    assert str(after) == str(static_llama)
    kv = after.metadata["kv_cache"]
    assert kv["source"] == "static buffers updated in place" and kv["buffers"] == [[[B, 2, L, 16]] * 2] * 2


def test_records_the_layout_of_buffers_that_are_already_static(static_llama):
    after, _ = testing.run_pass(static_llama, "rewrite_kv_cache", max_seq_len=L)
    assert after.metadata["kv_cache"]["layout"] == "bhsd" and after.metadata["kv_cache"]["max_seq_len"] == L


# ---------------------------------------------------------------------------------------- declines
def test_declines_when_past_length_is_static():
    report = assert_declined(hf_decode("gpt2", dynamic=False).fused, "whose past length 5 is static", max_seq_len=L)
    assert len(report.notes) == 4 and all("Dim.AUTO" in n for n in report.notes)


@pytest.mark.parametrize("options", [{}, {"max_seq_len": 1}], ids=["missing", "too_small"])
def test_declines_without_max_seq_len(options):
    assert_declined(hf_decode("llama").fused, "optimize(..., rewrite_kv_cache={'max_seq_len': N})", **options)


def test_step_without_position_ids_gets_a_shared_position_input():
    """GPT-2 called without position_ids derives its positions from the past length (``arange(1) + T``): the
    rewrite adds ``position_ids``, computes those positions from it, and records that rows share it."""
    case = hf_decode("gpt2", positions=False)
    result = mmc.optimize(case.program, PIPELINE, verify=True, rewrite_kv_cache={"max_seq_len": L})
    prog, report = result.program, result.report("rewrite_kv_cache")
    assert report.stats["positions.from_past_length"] == 1, report
    assert [p.name for p in prog.placeholders()][:2] == ["input_ids", "position_ids"]
    kv = prog.metadata["kv_cache"]
    assert "shared_position" in kv and "positions_added" in kv
    assert symbolic(prog) == []
    bufs = fill(hf_layers(case.past), "bhsd")
    logits = prog(case.ids, torch.full((B, 1), T), bufs)
    ref = eager_decode(case.model, case.ids, case.past, None)
    torch.testing.assert_close(logits, ref.logits, rtol=1e-5, atol=1e-5)
    # at another position, the step's own position embedding follows the input, as it followed the length
    bufs = fill(hf_layers(case.past), "bhsd")
    shifted = prog(case.ids, torch.full((B, 1), T - 2), bufs)
    assert not torch.allclose(shifted, logits)


def test_declines_when_tokens_input_is_missing():
    assert_declined(hf_decode("gpt2").fused, "the step has no input named 'decoder_input_ids'",
                    max_seq_len=L, tokens="decoder_input_ids")


def test_declines_when_attention_mask_reads_an_input():
    assert_declined(hf_decode("gpt2", mask=True).fused, "reads input(s) %attention_mask", max_seq_len=L)


def test_declines_sliding_window_mask_that_hides_cached_positions():
    _, _, prog = tuple_case(mask="window", window=4)
    fused = mmc.optimize(prog, FUSE, verify=True).program
    assert_declined(fused, "hides some of the 5 cached positions at past length 4 (a sliding window", max_seq_len=L)


def test_declines_when_the_cache_feeds_more_than_attention():
    _, _, prog = tuple_case(leak=True)
    fused = mmc.optimize(prog, FUSE, verify=True).program
    assert_declined(fused, "not attention", max_seq_len=L)


def test_rejects_an_unknown_layout():
    with pytest.raises(ValueError, match="layout must be 'auto', 'bhsd' or 'bshd'"):
        testing.run_pass(hf_decode("llama").fused, "rewrite_kv_cache", max_seq_len=L, layout="bsdh")


# ---------------------------------------------------------------------------------------- legacy tuple caches
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_legacy_tuple_cache_with_all_visible_mask_is_rewritten(layout):
    m, args, prog = tuple_case(mask="visible")
    result = mmc.optimize(prog, PIPELINE, verify=True, rewrite_kv_cache={"max_seq_len": 12, "layout": layout})
    report = result.report("rewrite_kv_cache")
    assert report.changed and report.stats["rewritten.growing"] == 2, report.notes
    assert cache_cats(result.program) == [] and symbolic(result.program) == []
    check_tuple_step(m, args, result, layout, 12)


def test_declines_a_multi_token_step_on_a_growing_cache():
    """With no mask, each of S > 1 new queries sees the whole chunk; slot <= position would make it causal."""
    _, _, prog = tuple_case(mask="none", batch=1, past=4, S=2)
    fused = mmc.optimize(prog, FUSE, verify=True).program
    assert_declined(fused, "appends 2 tokens to a growing cache", max_seq_len=8)


@st.composite
def tuple_cache_steps(draw):
    kv_heads, ratio = draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2]))
    past = draw(st.integers(2, 9))
    return dict(layout=draw(st.sampled_from(["bhsd", "bshd"])), heads=kv_heads * ratio, kv_heads=kv_heads,
                head_dim=draw(st.sampled_from([4, 8])), batch=draw(st.integers(1, 3)), past=past,
                max_seq_len=past + 1 + draw(st.integers(0, 6)), seed=draw(st.integers(0, 2**16)))


# each example captures a module (~1 s): no shrinking, which would take minutes on a failure (the failing
# example is printed as drawn)
@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck), database=None,
          phases=(Phase.explicit, Phase.generate))
@given(tuple_cache_steps())
def test_rewritten_tuple_cache_step_equals_eager(spec):
    spec = dict(spec)
    layout, max_seq_len = spec.pop("layout"), spec.pop("max_seq_len")
    m, args, prog = tuple_case(**spec)
    result = mmc.optimize(prog, PIPELINE, verify=True,
                          rewrite_kv_cache={"max_seq_len": max_seq_len, "layout": layout})
    assert result.report("rewrite_kv_cache").stats["rewritten.growing"] == 2, result.report("rewrite_kv_cache").notes
    check_tuple_step(m, args, result, layout, max_seq_len)


# ---------------------------------------------------------------------------------------- beam search rows
@pytest.mark.parametrize("source", ["static", "rewritten_bshd"])
def test_beam_rows_read_each_slot_from_the_row_the_table_names(source, static_llama):
    """With cache_rows, row b attends to buffer row rows[b, j] at slot j: the same as running the step
    without the table on caches whose rows were copied from those rows (the index_select it replaces)."""
    prog = static_llama if source == "static" else hf_rewritten("llama", layout="bshd").program
    after, report = testing.run_pass(prog, "rewrite_kv_cache", max_seq_len=L, beam_rows=True)
    assert report.changed and report.stats["beam_rows"] == 4
    assert [n.name for n in after.placeholders()][-1] == "cache_rows"
    assert after.op_counts()["aten.index.Tensor"] - prog.op_counts()["aten.index.Tensor"] == 4  # one gather per buffer
    assert "beam_rows" in after.metadata["kv_cache"]
    again, second = testing.run_pass(after, "rewrite_kv_cache", max_seq_len=L, beam_rows=True)
    assert second.changed is False

    tokens, pos = after.example_inputs[0], torch.full((B, 1), 3)
    bufs = [tuple(noise(list(ph.meta["val"].shape), seed=40 + i) for i, ph in enumerate(pair))
            for pair in zip(after.state_inputs()[::2], after.state_inputs()[1::2])]
    parents = torch.tensor([1, 1] + list(range(2, B)))[:B]  # row 0 continues row 1's history
    rows = parents[:, None].expand(B, L).clone()
    rows[torch.arange(B), 3] = torch.arange(B)  # each row writes (and reads) its new token in its own row
    copied = [tuple(t[parents].clone() for t in pair) for pair in bufs]
    want = prog(tokens, pos, copied)
    got = after(tokens, pos, clone_buffers(bufs), rows)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
