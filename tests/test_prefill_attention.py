"""The position-bounded prefill attention kernel (mmcompile.prefill_attention) against torch's SDPA, and
the Inductor backend's routing of prefill attention to it.

On a CPU machine the kernel runs under Triton's interpreter (conftest sets TRITON_INTERPRET=1), which
has no bfloat16 matrix product: the CPU cases use float32 and float16, the GPU cases bfloat16 too. On a
GPU, tl.dot multiplies float32 in TF32, so float32 gets TF32's tolerance there."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import mmcompile as mmc
from mmcompile import prefill_attention as pa
from mmcompile.backends.inductor import route_prefill_attention
from mmcompile.kernels import available

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not available(DEVICE)[0], reason="triton is not installed (checked where it is)")
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
F32 = 5e-3 if DEVICE == "cuda" else 2e-6  # TF32 on a GPU
SDPA = torch.ops.aten.scaled_dot_product_attention.default


def _positions(B, S, L, pattern, g):
    if pattern == "prefill":  # a prompt from the cache's first slot
        return torch.arange(S)[None].expand(B, S)
    if pattern == "chunk":  # a later chunk of a prompt: each row from its own offset
        return torch.arange(S)[None] + torch.randint(0, max(L - S, 0) + 1, (B, 1), generator=g)
    return torch.randint(-2, L + 3, (B, S), generator=g)  # any integers, some seeing no key or every key


def _reference(q, k, v, positions, scale=None):
    L = k.shape[2]
    mask = torch.arange(L, device=k.device)[None, None, None, :] <= positions[:, None, :, None]
    out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, scale=scale, enable_gqa=True)
    return torch.nan_to_num(out, nan=0.0)  # a query that sees no key: NaN in SDPA, zeros in the kernel


@settings(max_examples=12, deadline=None)
@given(B=st.integers(1, 2), HKV=st.sampled_from([1, 2]), group=st.sampled_from([1, 4]), S=st.integers(2, 80),
       extra=st.integers(0, 90), D=st.sampled_from([16, 64]), dtype=st.sampled_from(DTYPES),
       pattern=st.sampled_from(["prefill", "chunk", "any"]), seed=st.integers(0, 1000))
def test_kernel_equals_sdpa_under_the_position_mask(B, HKV, group, S, extra, D, dtype, pattern, seed):
    g = torch.Generator().manual_seed(seed)
    L = S + extra
    q = torch.randn(B, HKV * group, S, D, generator=g).to(DEVICE, dtype)
    k, v = (torch.randn(B, HKV, L, D, generator=g).to(DEVICE, dtype) for _ in range(2))
    positions = _positions(B, S, L, pattern, g).to(DEVICE)
    out = pa.prefill_attention(q, k, v, positions)
    tol = F32 if dtype == torch.float32 else 2e-2  # probabilities enter P @ V in the input dtype
    torch.testing.assert_close(out.float(), _reference(q, k, v, positions), rtol=tol, atol=tol)
    # laid out [B, S, H, D] in memory, as torch's flash kernels lay out theirs
    assert out.transpose(1, 2).is_contiguous()


def test_keys_past_the_greatest_position_are_never_read():
    """A prompt of 65 tokens in a cache of 256 slots: the slots past the blocks that hold it may hold
    anything (NaN here). The last query, at a block's first key, still sees that key."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 65, 16, generator=g).to(DEVICE)
    k, v = (torch.randn(1, 2, 256, 16, generator=g).to(DEVICE) for _ in range(2))
    positions = torch.arange(65, device=DEVICE)[None]
    want = _reference(q, k[:, :, :65], v[:, :, :65], positions)
    k[:, :, 128:], v[:, :, 128:] = float("nan"), float("nan")
    torch.testing.assert_close(pa.prefill_attention(q, k, v, positions), want, rtol=F32, atol=F32)


def test_positions_shared_by_every_row_and_a_given_scale():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 30, 32, generator=g).to(DEVICE)
    k, v = (torch.randn(2, 2, 50, 32, generator=g).to(DEVICE) for _ in range(2))
    positions = torch.arange(10, 40, device=DEVICE)
    want = _reference(q, k, v, positions.expand(2, 30), scale=0.07)
    torch.testing.assert_close(pa.prefill_attention(q, k, v, positions, scale=0.07), want, rtol=F32, atol=F32)


def test_inapplicable_calls_say_why():
    q = torch.randn(1, 4, 8, 16, dtype=torch.float16, device=DEVICE)
    k = v = torch.randn(1, 2, 12, 16, dtype=torch.float16, device=DEVICE)
    pos = torch.arange(8, device=DEVICE)[None]
    assert pa.supported(q, k, v, pos)[0]
    assert "do not group" in pa.supported(q[:, :3], k, v, pos)[1]
    assert "powers of two" in pa.supported(q[..., :12], k[..., :12], v[..., :12], pos)[1]
    assert "integers" in pa.supported(q, k, v, pos.float())[1]
    assert "[B or 1, S]" in pa.supported(q, k, v, pos[:, :5])[1]
    assert "float32" in pa.supported(q.float(), k.float(), v.float(), pos)[1]  # routed path: fp16/bf16 only
    with pytest.raises(ValueError, match="not applicable: .* do not match"):
        pa.prefill_attention(q, k[..., :8].contiguous(), v, pos)


def _prefill(attn_impl: str, B: int = 2, S: int = 20, offsets=(0, 30)):
    model = mmc.models.build("llama:tiny", dtype=torch.float16, device=DEVICE, attn_impl=attn_impl)
    cache = model.empty_cache(B, 96)
    for kv in cache:
        for t in kv:
            t.normal_()
    tokens = torch.randint(0, model.config.vocab_size, (B, S), device=DEVICE)
    pos = torch.arange(S, device=DEVICE)[None] + torch.tensor(offsets[:B], device=DEVICE)[:, None]
    prog = mmc.optimize(mmc.capture(model, (tokens, pos, cache)), "default").program
    return model, prog, (tokens, pos, cache)


@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
def test_the_inductor_backend_routes_prefill_attention_and_computes_the_same(attn_impl):
    """A prefill of our Llama (its mask built from the positions, boolean under SDPA, or finfo.min
    filled in eager attention and fused): every attention becomes the kernel's op; the routed graph
    computes what the unrouted one does, the cache writes included; the Program is untouched."""
    model, prog, (tokens, pos, cache) = _prefill(attn_impl)
    routed, notes = route_prefill_attention(prog.graph_module, devices=(DEVICE,))
    ops = [n.target for n in routed.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.mmcompile.prefill_attention.default) == model.config.n_layers
    assert SDPA not in ops and any(n.target is SDPA for n in prog.graph_module.graph.nodes)
    assert notes and "read the keys up to their positions" in notes[-1]
    flat = lambda: [t.clone() for kv in cache for t in kv]  # noqa: E731
    with torch.no_grad():
        ref = prog.graph_module(tokens, pos, *flat())
        out = routed(tokens, pos, *flat())
    for a, b in zip(out, ref):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


def test_a_mask_of_positions_shared_by_the_rows_and_expanded_over_them_routes():
    """transformers' static-cache masks: one position per query for every row ([S]), the comparison
    [1, 1, S, L] expanded over the batch; the router hands the kernel the [1, S] positions."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 12, 16, generator=g).to(DEVICE, torch.float16)
    k, v = (torch.randn(2, 2, 40, 16, generator=g).to(DEVICE, torch.float16) for _ in range(2))
    pos = torch.arange(12, device=DEVICE) + 9

    def fn(q, k, v, pos):
        visible = torch.arange(40, device=q.device)[None, :] <= pos[:, None]
        mask = visible[None, None].expand(2, -1, -1, -1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    gm = mmc.capture(fn, (q, k, v, pos)).graph_module
    routed, notes = route_prefill_attention(gm, devices=(DEVICE,))
    assert routed is not gm, notes
    torch.testing.assert_close(routed(q, k, v, pos)[0].float(), _reference(q, k, v, pos.expand(2, 12)),
                               rtol=2e-2, atol=2e-2)


def test_decode_and_other_masks_stay_on_sdpa_and_say_why():
    model, prog, (tokens, pos, cache) = _prefill("sdpa", B=1, S=1, offsets=(7,))
    assert route_prefill_attention(prog.graph_module, devices=(DEVICE,)) == (prog.graph_module, [])
    q = torch.randn(1, 2, 8, 16, dtype=torch.float16, device=DEVICE)
    k = v = torch.randn(1, 2, 8, 16, dtype=torch.float16, device=DEVICE)
    window = torch.ones(8, 8, dtype=torch.bool, device=DEVICE).tril().triu(-2)  # not a prefix of the keys
    row = torch.tensor([[5]], device=DEVICE)  # one position for the row, not one per query

    def one_per_row(q, k, v, p):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=torch.arange(8, device=q.device) <= p[:, :, None])

    for fn, args, why in ((lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), (), "is_causal"),
                          (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=window), (), "the mask"),
                          (one_per_row, (row,), "not one per query")):
        gm = mmc.capture(fn, (q, k, v, *args)).graph_module
        same, notes = route_prefill_attention(gm, devices=(DEVICE,))
        assert same is gm and len(notes) == 1 and "stays on SDPA" in notes[0] and why in notes[0], notes
    # and not on another device than the ones named
    _, prog, _ = _prefill("sdpa")
    assert route_prefill_attention(prog.graph_module, devices=("cuda:none",))[0] is prog.graph_module


@pytest.mark.skipif(DEVICE != "cuda", reason="Inductor launches the kernel from its own code on a CUDA device only")
def test_prefill_compiled_by_inductor_runs_the_kernel_and_equals_eager():
    model, prog, (tokens, pos, cache) = _prefill("eager")
    compiled = mmc.lower(prog, "inductor")
    assert any("prefill_attention" in f for f in compiled.fusions), compiled.fusions
    flat = [t.clone() for kv in cache for t in kv]
    with torch.no_grad():
        want = model(tokens, pos, [(a.clone(), b.clone()) for a, b in cache])
        got = compiled(tokens, pos, [(flat[2 * i], flat[2 * i + 1]) for i in range(len(cache))])
    torch.testing.assert_close(got.float(), want.float(), rtol=3e-2, atol=3e-2)
