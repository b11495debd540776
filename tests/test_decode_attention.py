"""The split-KV decode attention kernel (mmcompile.decode_attention) against torch's SDPA.

On a CPU machine the kernel runs under Triton's interpreter (conftest sets TRITON_INTERPRET=1), which
has no bfloat16 matrix product: the CPU cases use float32 and float16, the GPU cases bfloat16 too. On a
GPU, tl.dot multiplies float32 in TF32, so float32 gets TF32's tolerance there."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import mmcompile as mmc
from mmcompile import decode_attention as da
from mmcompile.backends.inductor import route_decode_attention
from mmcompile.kernels import available

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not available(DEVICE)[0], reason="triton is not installed (checked where it is)")
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
F32 = 5e-3 if DEVICE == "cuda" else 2e-6  # TF32 on a GPU


def _case(B, H, HKV, S, D, dtype, seed, pattern):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(shape, generator=g).to(DEVICE, dtype)
               for shape in ((B, H, 1, D), (B, HKV, S, D), (B, HKV, S, D)))
    if pattern == "prefix":  # a static cache: keys up to each row's position
        pos = torch.randint(0, S, (B,), generator=g)
        mask = (torch.arange(S)[None, :] <= pos[:, None])[:, None, None, :]
    else:  # any boolean pattern, per head, with at least one visible key per row and head
        mask = torch.rand(B, H, 1, S, generator=g) < 0.3
        mask[..., int(torch.randint(0, S, (), generator=g))] = True
    return q, k, v, mask.to(DEVICE)


@settings(max_examples=14, deadline=None)
@given(B=st.integers(1, 3), HKV=st.sampled_from([1, 2, 4]), group=st.sampled_from([1, 2, 4]),
       S=st.integers(1, 300), D=st.sampled_from([16, 32, 64]), dtype=st.sampled_from(DTYPES),
       pattern=st.sampled_from(["prefix", "any"]), seed=st.integers(0, 1000))
def test_kernel_equals_sdpa_over_shapes_masks_and_head_groups(B, HKV, group, S, D, dtype, pattern, seed):
    q, k, v, mask = _case(B, HKV * group, HKV, S, D, dtype, seed, pattern)
    out = da.decode_attention(q, k, v, mask)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True)
    tol = F32 if dtype == torch.float32 else 2e-2  # probabilities enter P @ V in the input dtype
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)


def test_no_mask_and_a_given_scale():
    q, k, v, _ = _case(2, 4, 2, 70, 32, torch.float32, 0, "prefix")
    ref = F.scaled_dot_product_attention(q, k, v, scale=0.05, enable_gqa=True)
    torch.testing.assert_close(da.decode_attention(q, k, v, None, scale=0.05), ref, rtol=F32, atol=F32)


def test_blocks_without_a_visible_key_are_not_read():
    """Keys behind the mask may hold anything (NaN here): the kernel never loads their block."""
    q, k, v, _ = _case(1, 2, 2, 256, 16, torch.float32, 1, "prefix")
    mask = torch.zeros(1, 1, 1, 256, dtype=torch.bool, device=DEVICE)
    mask[..., :40] = True
    k[:, :, 64:], v[:, :, 64:] = float("nan"), float("nan")  # blocks 1-3 of 64 keys
    out = da.decode_attention(q, k, v, mask)
    ref = F.scaled_dot_product_attention(q, k[:, :, :40], v[:, :, :40])
    torch.testing.assert_close(out, ref, rtol=F32, atol=F32)


@pytest.mark.skipif(DEVICE != "cuda", reason="Inductor launches the kernel from its own code on a CUDA device only")
def test_queries_sliced_from_a_wider_product_under_inductor_equal_sdpa():
    """Heads sliced from a wider pointwise result (strides with gaps), traced under Inductor, where the
    kernel's query strides are fixed at trace time: the kernel still reads the right queries."""
    B, H, S, D = 2, 4, 96, 32
    g = torch.Generator().manual_seed(0)
    a = torch.randn(B, 1, 3 * H * D, generator=g).to(DEVICE, torch.bfloat16)
    k, v = (torch.randn(B, H, S, D, generator=g).to(DEVICE, torch.bfloat16) for _ in range(2))

    def f(a, k, v):
        qkv = a * 2.0  # Inductor may lay this out as it likes; q is a view of it with gaps
        q = qkv[..., : H * D].view(B, 1, H, D).transpose(1, 2)
        return da.decode_attention(q, k, v)

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True)(a, k, v)
    q = (a * 2.0)[..., : H * D].view(B, 1, H, D).transpose(1, 2)
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)


def test_inapplicable_calls_say_why():
    q, k, v, mask = _case(1, 4, 2, 32, 16, torch.float16, 0, "prefix")
    assert da.supported(q, k, v, mask)[0]
    assert "one" in da.supported(q.expand(1, 4, 2, 16), k, v, mask)[1]
    assert "boolean masks" in da.supported(q, k, v, mask.half())[1]
    assert "powers of two" in da.supported(q[..., :12], k[..., :12], v[..., :12])[1]
    assert "do not group" in da.supported(q[:, :3], k, v)[1]
    assert "float32" in da.supported(q.float(), k.float(), v.float())[1]  # on the routed path: fp16/bf16 only
    with pytest.raises(ValueError, match="not applicable: .* do not match"):
        da.decode_attention(q, k[:, :, :, :8].contiguous(), v)


def test_the_inductor_backend_routes_the_decode_step_and_keeps_the_rest():
    """Captured decode step of our Llama in float16: its SDPA calls become the kernel's op; the prefill's
    (many queries) stay SDPA; the routed graph computes what the unrouted one does."""
    model = mmc.models.build("llama:tiny", dtype=torch.float16, device=DEVICE)
    cache = model.empty_cache(2, 96)
    for kv in cache:
        for t in kv:
            t.normal_()
    tokens = torch.tensor([[5], [9]], device=DEVICE)
    pos = torch.tensor([[17], [70]], device=DEVICE)
    decode = mmc.optimize(mmc.capture(model, (tokens, pos, cache)), "default").program
    routed = route_decode_attention(decode.graph_module, devices=(DEVICE,))
    ops = [n.target for n in routed.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.mmcompile.decode_attention.default) == model.config.n_layers
    assert torch.ops.aten.scaled_dot_product_attention.default not in ops
    assert any(n.target is torch.ops.aten.scaled_dot_product_attention.default
               for n in decode.graph_module.graph.nodes)  # the Program itself is untouched
    with torch.no_grad():
        ref = decode.graph_module(tokens, pos, *[t for kv in cache for t in kv])
        out = routed(tokens, pos, *[t for kv in cache for t in kv])
    torch.testing.assert_close(out[0].float(), ref[0].float(), rtol=2e-2, atol=2e-2)
    prefill = mmc.capture(model, (torch.zeros(2, 16, dtype=torch.long, device=DEVICE),
                                  torch.arange(16, device=DEVICE).expand(2, 16), cache))
    prefill = mmc.optimize(prefill, "default").program
    assert route_decode_attention(prefill.graph_module, devices=(DEVICE,)) is prefill.graph_module
    # and not on another device than the ones named
    assert route_decode_attention(decode.graph_module, devices=("cuda:none",)) is decode.graph_module


def test_additive_masks_made_from_a_boolean_route_and_others_stay():
    """transformers builds its decode mask as where(visible, 0, finfo.min): the router hands the kernel
    ``visible`` itself. A mask whose hidden value would still leave weight (-100) is left to SDPA."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=128)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval().to(DEVICE, torch.float16)
    gen = mmc.compile_generator(model, backend="eager", max_batch=2, max_seq_len=48)
    decode = gen.programs["decode"]
    routed = route_decode_attention(decode.graph_module, devices=(DEVICE,))
    ops = [n.target for n in routed.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.mmcompile.decode_attention.default) == cfg.num_hidden_layers
    prompts = [torch.randint(0, 96, (n,)) for n in (5, 11)]
    ref = gen.generate(prompts, 8)
    assert torch.equal(_generate_with_step(gen, routed, prompts, 8), ref)

    q, k, v, mask = _case(1, 4, 4, 32, 16, torch.float16, 0, "prefix")
    for hidden, routes in ((-100.0, False), (float("-inf"), True)):
        for flipped in (False, True):
            def additive(q, k, v, visible):
                bias = torch.where(~visible, hidden, 0.0) if flipped else torch.where(visible, 0.0, hidden)
                return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)

            prog = mmc.capture(additive, (q, k, v, mask))
            gm = route_decode_attention(prog.graph_module, devices=(DEVICE,))
            assert (gm is not prog.graph_module) == routes, (hidden, flipped)
            if routes:  # (the reference in fp32 with the boolean mask: CUDA's fp16 SDPA under an fp32 -inf bias gives NaN)
                ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
                torch.testing.assert_close(gm(q, k, v, mask)[0].float(), ref, rtol=2e-2, atol=1e-3)


def _generate_with_step(gen, graph_module, prompts, new_tokens: int) -> torch.Tensor:
    """``gen.generate`` with its decode step's graph replaced by ``graph_module`` (run by the eager backend)."""
    step = gen.programs["decode"].clone()
    step.graph_module = graph_module
    gen.decode_fn = mmc.lower(step, "eager")
    return gen.generate(prompts, new_tokens)


def _append_reference(qkv, cache_k, cache_v, positions, heads, cos, sin, scale):
    """index_put of the (rotated) new key and the value into copies of the caches, then SDPA under the
    mask arange(S) <= position: what decode_attention_append computes, in float32."""
    B, HKV, S, D = cache_k.shape
    x = qkv.float().reshape(B, heads + 2 * HKV, D)
    q, k, v = x[:, :heads, None], x[:, heads:heads + HKV, None], x[:, heads + HKV:, None]
    if cos is not None:
        c, s = cos.float().reshape(-1, 1, 1, D), sin.float().reshape(-1, 1, 1, D)
        rot = lambda t: t * c + torch.cat([-t[..., D // 2:], t[..., : D // 2]], -1) * s  # noqa: E731
        q, k = rot(q), rot(k)
    ck, cv = cache_k.float().clone(), cache_v.float().clone()
    rows = torch.arange(B)
    ck[rows, :, positions] = k[:, :, 0]
    cv[rows, :, positions] = v[:, :, 0]
    mask = (torch.arange(S, device=positions.device)[None, :] <= positions[:, None])[:, None, None, :]
    out = F.scaled_dot_product_attention(q, ck, cv, attn_mask=mask, scale=scale, enable_gqa=True)
    return out, ck.to(cache_k.dtype), cv.to(cache_v.dtype)


@settings(max_examples=12, deadline=None)
@given(B=st.integers(1, 3), HKV=st.sampled_from([1, 2]), group=st.sampled_from([1, 4]), S=st.integers(2, 200),
       D=st.sampled_from([16, 64]), dtype=st.sampled_from(DTYPES), rope=st.sampled_from(["per row", "shared", None]),
       seed=st.integers(0, 1000))
def test_attention_with_its_cache_write_equals_index_put_then_sdpa(B, HKV, group, S, D, dtype, rope, seed):
    """``decode_attention_append``: the new key (rotated, with the query, when cos/sin are given — one
    vector per row or one for all) and value land in the caches at each row's position, anywhere in the
    buffer (its first slot, its last, a chunk's edge), and the output is attention up to that position."""
    g = torch.Generator().manual_seed(seed)
    H = HKV * group
    qkv = torch.randn(B, (H + 2 * HKV) * D, generator=g).to(DEVICE, dtype)
    cache_k, cache_v = (torch.randn(B, HKV, S, D, generator=g).to(DEVICE, dtype) for _ in range(2))
    positions = torch.randint(0, S, (B,), generator=g)
    positions[0] = int(torch.randint(0, 3, (), generator=g)) * (S - 1) // 2  # 0, the middle or the last slot
    positions = positions.to(DEVICE)
    cos = sin = None
    if rope:
        angle = torch.rand(B if rope == "per row" else 1, D // 2, generator=g) * 6
        cos, sin = (torch.cat([f(angle), f(angle)], -1).to(DEVICE, dtype) for f in (torch.cos, torch.sin))
    want, want_k, want_v = _append_reference(qkv, cache_k, cache_v, positions, H, cos, sin, 0.3)
    out = da.decode_attention_append(qkv, cache_k, cache_v, positions, H, cos, sin, scale=0.3)
    tol = F32 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), want, rtol=tol, atol=tol)
    torch.testing.assert_close(cache_k.float(), want_k.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(cache_v, want_v, rtol=0, atol=0)  # the value is copied as it is


def _fusion_case(kind: str):
    """A Generator (eager backend) of our Llama or an unmodified transformers Llama, Qwen2 (q/k/v biases)
    or GPT-2 (no rotary; q/k/v split from one projection), float16, batch 2."""
    import transformers as tf

    torch.manual_seed(0)
    if kind == "ours":
        model = mmc.models.build("llama:tiny", dtype=torch.float16, device=DEVICE)
    elif kind == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                                 bos_token_id=0, eos_token_id=0))
    else:
        shape = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, intermediate_size=128)
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**shape)) if kind == "qwen2" else \
            tf.LlamaForCausalLM(tf.LlamaConfig(**shape))
    model = model.eval().to(DEVICE, torch.float16)
    return model, mmc.compile_generator(model, backend="eager", max_batch=2, max_seq_len=48)


@pytest.mark.parametrize("kind", ["ours", "transformers", "qwen2", "gpt2"])
def test_rotary_cache_writes_and_attention_fuse_into_one_kernel_with_the_same_tokens(kind):
    """``fuse_cache_writes_into_attention`` on the captured decode step: every layer's rotary, cache
    writes and SDPA become one ``decode_attention_append`` (no index_put and no state copy left), and
    generation with the rewritten step — batch 2, prompts of different lengths — gives eager's tokens."""
    from mmcompile.backends.inductor_fusions import fuse_cache_writes_into_attention

    model, gen = _fusion_case(kind)
    decode = gen.programs["decode"]
    state = {n.name for n in decode.state_inputs()}
    gm, notes = fuse_cache_writes_into_attention(decode.graph_module, state, devices=(DEVICE,))
    layers = len(decode.state_inputs()) // 2
    assert notes == [f"attention: {layers} decode attention(s) with their rotary and cache writes in one kernel"]
    ops = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.mmcompile.decode_attention_append.default) == layers
    for gone in (torch.ops.aten.index_put.default, torch.ops.aten.copy_.default,
                 torch.ops.aten.scaled_dot_product_attention.default, torch.ops.aten.neg.default):
        assert gone not in ops, gone
    # one step from random caches at positions 7 and 30: the same logits and the same caches after it
    g = torch.Generator().manual_seed(1)
    flat = [torch.randint(0, 96, x.shape, generator=g).to(DEVICE) if i == 0 else
            torch.tensor([[7], [30]], device=DEVICE) if i == 1 else
            torch.randn(x.shape, generator=g).to(DEVICE, x.dtype)
            for i, x in enumerate(decode.example_inputs)]
    mine = [x.clone() for x in flat]
    with torch.no_grad():
        want_logits, got_logits = decode.graph_module(*flat)[0], gm(*mine)[0]
    torch.testing.assert_close(got_logits.float(), want_logits.float(), rtol=2e-2, atol=2e-2)
    for a, b in zip(mine[2:], flat[2:]):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)
    prompts = [torch.randint(0, 96, (n,)) for n in (5, 11)]
    want = gen.generate(prompts, 12)
    assert torch.equal(_generate_with_step(gen, gm, prompts, 12), want)


def test_attention_whose_mask_is_not_the_cache_prefix_keeps_its_writes_and_says_why():
    """A mask other than arange(S) <= position (here <) is not what the kernel's append mode computes:
    the step is left as it is, with the reason; so is a step on a device not asked for."""
    from mmcompile.backends.inductor_fusions import fuse_cache_writes_into_attention

    _, gen = _fusion_case("transformers")
    decode = gen.programs["decode"].clone()
    state = {n.name for n in decode.state_inputs()}
    assert fuse_cache_writes_into_attention(decode.graph_module, state, devices=("cuda:none",)) == \
        (decode.graph_module, [])
    (le,) = [n for n in decode.graph.nodes if n.target is torch.ops.aten.le.Tensor]
    le.target = torch.ops.aten.lt.Tensor
    gm, notes = fuse_cache_writes_into_attention(decode.graph_module, state, devices=(DEVICE,))
    assert gm is decode.graph_module
    assert len(notes) == 2 and all("keeps its cache writes and rotary apart: the mask is not arange(cache "
                                   "length) <= position" in n for n in notes), notes


def test_the_dependently_launched_attention_keeps_its_counters_and_computes_the_same():
    """``launch_attention_dependently`` moves each fused attention to the op launched as a programmatic
    dependent launch; its combination counters live across calls, and each launch leaves them at zero, so
    call after call (layers, steps) the outputs and caches equal the ordinary op's bit for bit."""
    from mmcompile.backends.inductor_fusions import fuse_cache_writes_into_attention, launch_attention_dependently

    _, gen = _fusion_case("transformers")
    decode = gen.programs["decode"]
    state = {n.name for n in decode.state_inputs()}
    fused, _ = fuse_cache_writes_into_attention(decode.graph_module, state, devices=(DEVICE,))
    dependent, notes = launch_attention_dependently(fused, devices=(DEVICE,))
    layers = len(state) // 2
    assert notes == [f"attention: {layers} decode attention(s) launched as programmatic dependent launches"]
    ops = [n.target for n in dependent.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.mmcompile.decode_attention_append_pdl.default) == layers
    assert torch.ops.mmcompile.decode_attention_append.default not in ops
    assert launch_attention_dependently(decode.graph_module, devices=(DEVICE,)) == (decode.graph_module, [])
    g = torch.Generator().manual_seed(3)
    flat = [torch.randint(0, 96, x.shape, generator=g).to(DEVICE) if i == 0 else
            torch.tensor([[7], [30]], device=DEVICE) if i == 1 else
            torch.randn(x.shape, generator=g).to(DEVICE, x.dtype)
            for i, x in enumerate(decode.example_inputs)]
    a, b = [x.clone() for x in flat], [x.clone() for x in flat]
    with torch.no_grad():
        for step in range(3):  # the counters of one call are the next one's
            a[1].add_(step), b[1].add_(step)
            out_a, out_b = fused(*a)[0], dependent(*b)[0]
            assert torch.equal(out_a, out_b), step
            assert all(torch.equal(x, y) for x, y in zip(a[2:], b[2:])), step
    from mmcompile import decode_attention as da_module

    assert all(int(c.abs().sum()) == 0 for c in da_module._COUNTERS.values())
