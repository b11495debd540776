"""The onnxruntime backend's rewrites to ONNX Runtime contrib ops: decode attention over a static KV cache
-> GroupQueryAttention, rotary embeddings -> RotaryEmbedding (or GroupQueryAttention's own rotary).
Each rewrite happens only where it is proven; the rest stays standard ONNX with the reason noted."""

import collections

import pytest
import torch
from hypothesis import given, settings, strategies as st

import mmcompile as mmc

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


class CacheStep(torch.nn.Module):
    """One decode step of attention over a static cache, written the way models write it."""

    def __init__(self, kv_heads, length, mask="visible", extra_reader=False):
        super().__init__()
        self.kv_heads, self.length, self.mask, self.extra_reader = kv_heads, length, mask, extra_reader

    def forward(self, q, k, v, cache_k, cache_v, pos):
        B, H, L = q.shape[0], self.kv_heads, self.length
        rows, heads, p = torch.arange(B).view(B, 1, 1), torch.arange(H).view(1, H, 1), pos.view(B, 1, 1)
        cache_k.index_put_((rows, heads, p), k)
        cache_v.index_put_((rows, heads, p), v)
        slots = torch.arange(L).view(1, 1, L)
        visible = slots <= p
        if self.mask == "window":
            visible = visible & (slots > p - 4)
        mask = visible.unsqueeze(1)
        if self.mask == "additive":  # transformers' form
            mask = torch.where(mask, 0.0, torch.finfo(q.dtype).min)
        elif self.mask == "additive-100":
            mask = torch.where(mask, 0.0, -100.0)
        out = torch.nn.functional.scaled_dot_product_attention(q, cache_k, cache_v, mask, enable_gqa=True)
        return out + cache_k.sum() if self.extra_reader else out


def step_inputs(B, Hq, Hkv, D, L, positions, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return [r(B, Hq, 1, D), r(B, Hkv, 1, D), r(B, Hkv, 1, D), r(B, Hkv, L, D), r(B, Hkv, L, D),
            torch.tensor(positions).view(B, 1)]


def run_both(module, inputs):
    compiled = mmc.lower(mmc.capture(module, tuple(x.clone() for x in inputs)), "onnxruntime")
    ours, ref = [x.clone() for x in inputs], [x.clone() for x in inputs]
    got, want = compiled(*ours), module(*ref)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(ours[3:5], ref[3:5]):  # both caches written where they live, the other slots kept
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)  # rotated keys: ONNX Runtime rounds once more
    return compiled, collections.Counter(n.op_type for n in compiled.onnx_model.graph.node)


@pytest.mark.parametrize("mask, fused", [("visible", True), ("additive", True), ("window", False),
                                         ("additive-100", False)])
def test_decode_attention_over_a_cache_becomes_group_query_attention_only_under_its_mask(mask, fused):
    compiled, ops = run_both(CacheStep(2, 24, mask), step_inputs(2, 4, 2, 16, 24, [5, 23]))
    assert (ops["GroupQueryAttention"] == 1) == fused
    assert ("ScatterND" in ops) == (not fused)  # the writes move into the op, or stay
    if not fused:
        assert any("left as SDPA: the mask is not" in note for note in compiled.fusions), compiled.fusions


def test_a_cache_read_elsewhere_is_left_to_standard_onnx():
    compiled, ops = run_both(CacheStep(2, 24, extra_reader=True), step_inputs(2, 4, 2, 16, 24, [5, 11]))
    assert "GroupQueryAttention" not in ops
    assert any("other readers" in note for note in compiled.fusions), compiled.fusions


def test_a_non_contiguous_cache_is_updated_through_a_contiguous_copy():
    module = CacheStep(2, 16)
    inputs = step_inputs(2, 4, 2, 8, 16, [3, 9])
    compiled = mmc.lower(mmc.capture(module, tuple(x.clone() for x in inputs)), "onnxruntime")
    ours = [x.clone() for x in inputs]
    ours[3] = ours[3].transpose(1, 2).contiguous().transpose(1, 2)  # same values, [B, L, H, D] storage
    ref = [x.clone() for x in inputs]
    torch.testing.assert_close(compiled(*ours), module(*ref), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[3], ref[3], rtol=0, atol=0)


@settings(max_examples=5, deadline=None)
@given(B=st.integers(1, 3), kv_heads=st.integers(1, 2), group=st.integers(1, 3), D=st.sampled_from([8, 16, 32]),
       L=st.integers(4, 40), data=st.data())
def test_group_query_attention_equals_sdpa_over_the_cache(B, kv_heads, group, D, L, data):
    positions = data.draw(st.lists(st.integers(0, L - 1), min_size=B, max_size=B))
    _, ops = run_both(CacheStep(kv_heads, L), step_inputs(B, kv_heads * group, kv_heads, D, L, positions))
    assert ops["GroupQueryAttention"] == 1


class TableRope(torch.nn.Module):
    """q and k rotated with gathered tables, then attention over the cache: the form of models/llama."""

    def __init__(self, D, L, equal_halves=True):
        super().__init__()
        f = torch.arange(L)[:, None] * (1.0 / 10000 ** (torch.arange(0, D, 2) / D))[None]
        g = torch.cat([f, f], -1) if equal_halves else torch.cat([f, 2 * f], -1)
        self.register_buffer("cos", g.cos())
        self.register_buffer("sin", g.sin())
        self.step = CacheStep(2, L)

    def rope(self, x, pos):
        c, s = self.cos[pos].unsqueeze(1), self.sin[pos].unsqueeze(1)
        h = x.shape[-1] // 2
        return x * c + torch.cat([-x[..., h:], x[..., :h]], -1) * s

    def forward(self, q, k, v, cache_k, cache_v, pos):
        return self.step(self.rope(q, pos), self.rope(k, pos), v, cache_k, cache_v, pos)


@pytest.mark.parametrize("equal_halves", [True, False])
def test_rotary_embedding_moves_into_group_query_attention_only_for_rotate_half_tables(equal_halves):
    compiled, ops = run_both(TableRope(16, 24, equal_halves), step_inputs(2, 4, 2, 16, 24, [0, 19]))
    assert ops["GroupQueryAttention"] == 1
    notes = " ".join(compiled.fusions)
    if equal_halves:
        assert "with rotary" in notes and "Sin" not in ops and "Neg" not in ops
    else:
        assert "with rotary" not in notes and "not the rotate-half layout" in notes


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_transformers_generation_through_group_query_attention_equals_eager(family):
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = (transformers.LlamaForCausalLM(transformers.LlamaConfig(**common)) if family == "llama"
             else transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))).eval()
    gen = mmc.compile_generator(model, backend="onnxruntime", max_batch=2, max_seq_len=48)
    ref = mmc.compile_generator(model, backend="eager", max_batch=2, max_seq_len=48)
    notes = gen.decode_fn.fusions
    assert sum("GroupQueryAttention with rotary" in n for n in notes) == 2, notes
    decode_ops = {n.op_type for n in gen.decode_fn.onnx_model.graph.node}
    assert {"Sin", "Cos", "ScatterND", "Attention"}.isdisjoint(decode_ops)  # rotary tables built at compile time
    # no copy kernels of their own: the attention output's [B, H, 1, D] -> [B, 1, H, D] is a reshape, and
    # the packed gate/up product is cut by one Split, not a Slice per half
    assert {"Transpose", "Slice"}.isdisjoint(decode_ops) and "Split" in decode_ops, decode_ops
    assert "copies: 2 transpose(s) of size-1 dimensions -> reshape" in notes
    assert "copies: 2 set(s) of slices covering a dimension -> one split" in notes
    # SwiGLU's SiLU as one contrib kernel, not Sigmoid then Mul
    assert "QuickGelu" in decode_ops and "Sigmoid" not in decode_ops, decode_ops
    assert "onnx: 2 SiLU(s) x * Sigmoid(x) -> QuickGelu(alpha=1)" in notes
    prompts = [torch.randint(3, 128, (9,)).tolist(), torch.randint(3, 128, (4,)).tolist()]
    torch.testing.assert_close(gen.generate(prompts, max_new_tokens=32), ref.generate(prompts, max_new_tokens=32),
                               rtol=0, atol=0)
    prefill = gen.prefill_fn.compiled[16].step  # the prompt's rotary embeddings: RotaryEmbedding; attention: ONNX's
    assert {"RotaryEmbedding", "Attention"} <= {n.op_type for n in prefill.onnx_model.graph.node}


def test_group_query_attention_reads_separate_projections_rows(tiny_llama):
    # without fuse_linears q, k and v come from three projections: their rows, not transposed heads
    passes = [p for p in mmc.DEFAULT_PIPELINE if p != "fuse_linears"]
    gen = mmc.compile_generator(tiny_llama, backend="onnxruntime", max_batch=2, max_seq_len=48, passes=passes)
    ref = mmc.compile_generator(tiny_llama, backend="eager", max_batch=2, max_seq_len=48)
    assert sum(note.endswith("with rotary, rows") for note in gen.decode_fn.fusions) == 2, gen.decode_fn.fusions
    prompts = [[5, 9, 17, 33], [7, 8]]
    assert torch.equal(gen.generate(prompts, max_new_tokens=32), ref.generate(prompts, max_new_tokens=32))
