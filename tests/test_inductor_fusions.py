"""The GEMV kernel with its neighbours (mmcompile.kernels.gemv_fused) and the Inductor backend's rewrite
that moves RMSNorm, the SiLU gate and residual adds into it (mmcompile.backends.inductor_fusions).

On a CPU machine the kernel runs under Triton's interpreter (conftest sets TRITON_INTERPRET=1), which
has no bfloat16 matrix product: several-row cases use float16 there. The rewritten graphs run eagerly
here (the kernel is called directly); Inductor compiling them is checked on a GPU (tests/test_gpu.py)."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import mmcompile as mmc
from mmcompile import kernels
from mmcompile.backends.inductor_fusions import fuse_gemv_neighbours, launch_gemvs_dependently
from mmcompile.quant import dequantize_int8, quantize_int8

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not kernels.available(DEVICE)[0], reason="triton is not installed (checked where it is)")
kernels.register()
FUSED = torch.ops.mmcompile.triton_gemv_fused.default
FUSED_PDL = torch.ops.mmcompile.triton_gemv_fused_pdl.default
SMALL = {"BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 4}  # several K steps and N programs on small shapes


def _dtype(rows):
    return torch.bfloat16 if rows == 1 or DEVICE == "cuda" else torch.float16


@settings(max_examples=16, deadline=None)
@given(rows=st.sampled_from([1, 3, 16]), n=st.integers(1, 40), k=st.sampled_from([16, 48, 100]),
       prologue=st.sampled_from(["none", "norm", "glu"]), residual=st.booleans(), bias=st.booleans(),
       int8=st.booleans(), small=st.booleans(), pdl=st.booleans())
def test_fused_gemv_equals_the_unfused_math(rows, n, k, prologue, residual, bias, int8, small, pdl):
    """``pdl``: the kernel as launched while the one before finishes (its first weight tile read before
    the loop; the wait itself is CUDA's and only runs there)."""
    g = torch.Generator().manual_seed(rows * 997 + n * 31 + k)
    dt = _dtype(rows)
    x = torch.randn(rows, k, generator=g).to(DEVICE, dt)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(DEVICE, dt)
    b = torch.randn(n, generator=g).to(DEVICE, dt) if bias else None
    r = torch.randn(rows, n, generator=g).to(DEVICE, dt) if residual else None
    kw = {}
    a = x.float()
    if prologue == "norm":
        kw.update(norm_weight=(torch.rand(k, generator=g) + 0.5).to(DEVICE, dt), eps=1e-5)
        a = F.rms_norm(a, (k,), kw["norm_weight"].float(), 1e-5)
    elif prologue == "glu":
        gu = torch.randn(rows, 2 * k, generator=g).to(DEVICE, dt)
        x, kw["up"] = gu[:, :k], gu[:, k:]  # slices of one stacked product, as fuse_linears makes them
        a = F.silu(x.float()) * kw["up"].float()
    if int8:
        q, s = quantize_int8(w.float())
        w, kw["scales"] = q.to(DEVICE), s.to(DEVICE, dt)
        wf = dequantize_int8(w, kw["scales"]).float()
    else:
        wf = w.float()
    ref = a @ wf.t() + (b.float() if bias else 0) + (r.float() if residual else 0)
    config = SMALL if small else None
    if pdl:
        config = dict(config or kernels.config_for("float" if not int8 else "int8", rows, n, k,
                                                   None if prologue == "none" else prologue), PDL=True)
    y = kernels.gemv_fused(x, w, b, residual=r, config=config, **kw)
    assert y.shape == (rows, n) and y.dtype == dt
    # the activations are rounded to the input dtype where the kernel uses tl.dot (several rows)
    tol = 3e-2 if dt == torch.bfloat16 or rows > 1 else 5e-3
    torch.testing.assert_close(y.float(), ref, rtol=tol, atol=tol * max(ref.abs().max().item(), 1.0))


def test_bad_calls_say_what_is_wrong():
    x = torch.randn(1, 32).to(DEVICE, torch.float16)
    w = torch.randn(8, 32).to(DEVICE, torch.float16)
    with pytest.raises(ValueError, match="norm weight \\[16\\] for 32 inputs"):
        kernels.gemv_fused(x, w, norm_weight=torch.ones(16, device=DEVICE, dtype=torch.float16))
    with pytest.raises(ValueError, match="up \\[1, 16\\] and gate \\[1, 32\\] differ"):
        kernels.gemv_fused(x, w, up=x[:, :16])
    with pytest.raises(ValueError, match="residual \\[1, 4\\] for a \\[1, 8\\] product"):
        kernels.gemv_fused(x, w, residual=x[:, :4])
    with pytest.raises(ValueError, match="together are not supported"):
        kernels.gemv_fused(x, w, norm_weight=torch.ones(32, device=DEVICE, dtype=torch.float16), up=x)


def _decode(model, batch=2, slots=64):
    cache = model.empty_cache(batch, slots)
    for kv in cache:
        for t in kv:
            t.normal_()
    tokens = torch.arange(5, 5 + batch, device=DEVICE)[:, None]
    pos = torch.arange(17, 17 + 9 * batch, 9, device=DEVICE)[:, None]
    program = mmc.optimize(mmc.capture(model, (tokens, pos, cache)), "default").program
    return program, (tokens, pos, *[t for kv in cache for t in kv])


def _run(gm, inputs):
    with torch.no_grad():
        return gm(*[t.clone() for t in inputs])


def test_a_llama_decode_step_keeps_only_fused_gemvs_and_computes_the_same():
    """Our Llama's batch-1 decode step (fuse_linears on): per layer the q/k/v and gate/up products take their
    RMSNorm, the down product its SiLU gate, the o and down products their residual adds; the final
    norm goes into the LM head. No norm, gate or plain product is left; the logits and cache writes
    match the unfused step."""
    model = mmc.models.build("llama:tiny", dtype=torch.float16, device=DEVICE)
    layers = model.config.n_layers
    program, inputs = _decode(model, batch=1)
    gm, notes = fuse_gemv_neighbours(program.graph_module, devices=(DEVICE,))
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(FUSED) == 4 * layers + 1
    for gone in (torch.ops.aten.mm.default, torch.ops.aten.rsqrt.default, torch.ops.aten.sigmoid.default):
        assert gone not in targets
    assert sum("RMSNorm prologue" in n for n in notes) == 2 * layers + 1
    assert sum("SiLU gate prologue and residual epilogue" in n for n in notes) == layers
    assert sum(n.endswith("fused with its residual epilogue") for n in notes) == layers
    assert FUSED not in [n.target for n in program.graph_module.graph.nodes]  # the Program is untouched
    ref, out = _run(program.graph_module, inputs), _run(gm, inputs)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)
    # two rows: the kernel's several-row path is slower with the prologues, so nothing moves
    program, _ = _decode(model, batch=2)
    assert fuse_gemv_neighbours(program.graph_module, devices=(DEVICE,)) == (program.graph_module, [])


def _transformers_decode_steps():
    """(name, layers, Generator, its decode Program) of a tiny unmodified transformers Llama and Qwen2
    (q/k/v biases: addmm), compiled with the eager backend."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    shape = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=128)
    for cls, cfg in ((LlamaForCausalLM, LlamaConfig(**shape)), (Qwen2ForCausalLM, Qwen2Config(**shape))):
        torch.manual_seed(0)
        model = cls(cfg).eval().to(DEVICE, torch.float16)
        gen = mmc.compile_generator(model, backend="eager", max_batch=1, max_seq_len=48)
        yield cls.__name__, cfg.num_hidden_layers, gen, gen.programs["decode"]


def _generates_the_same_tokens(gen, decode, gm) -> bool:
    """Whether the Generator's greedy tokens stay the same with its decode step's graph replaced by ``gm``."""
    prompts = [torch.randint(0, 96, (11,))]
    ref = gen.generate(prompts, 6)  # every step runs the kernels in Triton's interpreter here: few of them
    rewritten = decode.clone()
    rewritten.graph_module = gm
    gen.decode_fn = mmc.lower(rewritten, "eager")
    return torch.equal(gen.generate(prompts, 6), ref)


def test_products_with_constant_weights_are_launched_dependently_and_compute_the_same():
    """``launch_gemvs_dependently`` after the neighbour fusion, on our Llama's batch-1 decode step: every
    fused product (their weights are the model's constants) becomes the dependently launched op, and the
    outputs are bit for bit those of the ordinary launches (the same sums in the same order)."""
    model = mmc.models.build("llama:tiny", dtype=torch.float16, device=DEVICE)
    program, inputs = _decode(model, batch=1)
    gm, _ = fuse_gemv_neighbours(program.graph_module, devices=(DEVICE,))
    dependent, notes = launch_gemvs_dependently(gm, devices=(DEVICE,))
    targets = [n.target for n in dependent.graph.nodes if n.op == "call_function"]
    assert FUSED not in targets and targets.count(FUSED_PDL) == 4 * model.config.n_layers + 1, notes
    assert notes == [f"gemv: {4 * model.config.n_layers + 1} products launched as programmatic dependent launches"]
    assert FUSED_PDL not in [n.target for n in gm.graph.nodes]  # its input is left as it was
    for a, b in zip(_run(dependent, inputs), _run(gm, inputs)):
        assert torch.equal(a, b)
    assert launch_gemvs_dependently(program.graph_module, devices=(DEVICE,)) == (program.graph_module, [])


def test_dependent_launches_wait_for_a_step_replayed_from_cuda_graphs():
    """The Inductor backend's option ``pdl``: under "auto" a step not replayed from CUDA graphs keeps its
    ordinary launches and says why; "all" also switches on Inductor's own; "off" leaves everything."""
    from mmcompile.backends.inductor import _dependent_launches

    model = mmc.models.build("llama:tiny", dtype=torch.float16, device=DEVICE)
    program, _ = _decode(model, batch=1)
    gm, _ = fuse_gemv_neighbours(program.graph_module, devices=(DEVICE,))
    config = {}
    out, notes = _dependent_launches(gm, {}, True, False, config)
    assert out is gm and config == {} and "ordinary launches: the step is not replayed from CUDA graphs" in notes[0]
    assert _dependent_launches(gm, {"pdl": "off"}, True, True, config) == (gm, [])
    _dependent_launches(gm, {"pdl": "all"}, False, True, config)
    assert config == {"triton.enable_pdl": True}


def test_a_product_whose_weight_is_computed_keeps_its_ordinary_launch():
    """The dependently launched kernel reads its first weight tile before the kernel before it finishes:
    a weight computed in the graph (here scaled by an input) must not be read early, so that product
    stays as it is and the notes say why."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def step(x, w, scale):
        return FUSED(x, w * scale, None, None, None, 1e-5, None, None)

    args = (torch.randn(1, 32), torch.randn(8, 32), torch.tensor(2.0))
    gm = make_fx(step, tracing_mode="fake")(*args)
    out, notes = launch_gemvs_dependently(gm, devices=("cpu",))
    assert out is gm and len(notes) == 1
    assert "its weight mul is computed in the graph, not a constant" in notes[0], notes


def test_transformers_llama_and_qwen2_generate_the_same_tokens():
    """Unmodified transformers models (Qwen2 with q/k/v biases: addmm), their decode step rewritten
    and run by the Generator: the same greedy tokens as without the rewrite."""
    for name, layers, gen, decode in _transformers_decode_steps():
        gm, notes = fuse_gemv_neighbours(decode.graph_module, devices=(DEVICE,))
        targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
        assert targets.count(FUSED) == 4 * layers + 1, (name, notes)
        assert _generates_the_same_tokens(gen, decode, gm), name


def test_int8_linears_take_their_neighbours_too():
    model = mmc.models.build("llama:tiny", dtype=torch.float16, device=DEVICE)
    cache = model.empty_cache(1, 32)
    inputs = (torch.tensor([[5]], device=DEVICE), torch.tensor([[3]], device=DEVICE), cache)
    program = mmc.optimize(mmc.capture(model, inputs), [*mmc.DEFAULT_PIPELINE, "quantize_linear"]).program
    flat = (inputs[0], inputs[1], *[t for kv in cache for t in kv])
    gm, notes = fuse_gemv_neighbours(program.graph_module, devices=(DEVICE,))
    int8 = [n for n in notes if ", int8)" in n]
    assert len(int8) == 4 * model.config.n_layers and all("fused with" in n for n in int8)
    assert torch.ops.mmcompile.linear_int8.default not in [n.target for n in gm.graph.nodes]
    torch.testing.assert_close(_run(gm, flat)[0].float(), _run(program.graph_module, flat)[0].float(),
                               rtol=2e-2, atol=2e-2)


def test_what_cannot_move_in_stays_and_says_why():
    """Products without a recognisable neighbour, of many rows (prefill) or on other devices are not
    touched; a norm whose input the kernel cannot read stays, with the reason."""

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.Parameter(torch.rand(32) + 0.5)
            self.proj = torch.nn.Linear(32, 16, bias=False)

        def forward(self, h):  # h float32; normalized in float32, cast to float16 for the product
            r = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
            return self.proj((h * r * self.norm).half())

    block = Block().to(DEVICE)
    block.proj.half()
    program = mmc.optimize(mmc.capture(block, (torch.randn(1, 1, 32, device=DEVICE),)), "default").program
    gm, notes = fuse_gemv_neighbours(program.graph_module, devices=(DEVICE,))
    assert gm is program.graph_module and notes == []  # no recognisable neighbour at all

    model = mmc.models.build("llama:tiny", dtype=torch.float16, device=DEVICE)
    cache = model.empty_cache(1, 64)
    prefill = mmc.capture(model, (torch.zeros(1, 24, dtype=torch.long, device=DEVICE),
                                  torch.arange(24, device=DEVICE)[None], cache))
    prefill = mmc.optimize(prefill, "default").program
    assert fuse_gemv_neighbours(prefill.graph_module, devices=(DEVICE,)) == (prefill.graph_module, [])
    program, _ = _decode(model)
    assert fuse_gemv_neighbours(program.graph_module, devices=("cuda:none",)) == (program.graph_module, [])

    class Strided(torch.nn.Module):  # an RMSNorm of every other input: an input the kernel does not read
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.rand(32) + 0.5)
            self.proj = torch.nn.Linear(32, 16, bias=False)

        def forward(self, h):
            hf = h[..., ::2].float()
            normed = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(h.dtype)
            return self.proj(self.weight * normed)

    strided = Strided().to(DEVICE, torch.float16)
    h = torch.randn(1, 1, 64, device=DEVICE, dtype=torch.float16)
    program = mmc.optimize(mmc.capture(strided, (h,)), "default").program
    gm, notes = fuse_gemv_neighbours(program.graph_module, devices=(DEVICE,))
    assert gm is program.graph_module
    assert len(notes) == 1 and "RMSNorm not fused: its input is torch.float16 [1, 1, 32] non-contiguous" in notes[0]



def test_int4_one_row_products_move_on_cuda_only_and_say_why_not():
    """int4_kernel "tinygemm", "words" and "auto" (tinygemm, else the word kernel): CUDA kernels take
    one-row int4 products whose groups and rows they can tile; the rest keep mmcompile's packed-code
    kernel, with each kernel's reason. Their numerics are checked on the GPU (tests/test_gpu.py)."""
    from mmcompile.backends.inductor_fusions import int4_one_row_products
    from mmcompile.errors import BackendError
    from mmcompile.quant import tinygemm_supported

    codes = torch.zeros(16, 64, dtype=torch.uint8)  # N = 16, K = 128
    assert tinygemm_supported(codes, torch.zeros(16, 4)) == (True, "")  # groups of 32
    assert "groups of 16 inputs" in tinygemm_supported(codes, torch.zeros(16, 8))[1]
    assert "groups of 512 inputs" in tinygemm_supported(torch.zeros(16, 256, dtype=torch.uint8), torch.zeros(16, 1))[1]
    assert "12 output rows" in tinygemm_supported(codes[:12], torch.zeros(12, 4))[1]
    model = mmc.models.build("llama:tiny", dtype=torch.bfloat16)
    cache = model.empty_cache(1, 32)
    inputs = (torch.tensor([[5]]), torch.tensor([[3]]), cache)
    program = mmc.optimize(mmc.capture(model, inputs), [*mmc.DEFAULT_PIPELINE, "quantize_linear"],
                           quantize_linear={"mode": "int4", "group_size": 32}).program
    assert int4_one_row_products(program.graph_module, "tinygemm", devices=("cpu", "cuda")) == \
        (program.graph_module, [])
    assert int4_one_row_products(program.graph_module, "words", devices=("cuda",)) == (program.graph_module, [])
    with pytest.raises(ValueError, match="int4 kernel 'marlin'; choose from auto, tinygemm, words"):
        int4_one_row_products(program.graph_module, "marlin")
    with pytest.raises(BackendError, match="int4_kernel='cutlass' is not an option"):
        mmc.lower(program, "inductor", int4_kernel="cutlass")


@pytest.mark.skipif(not __import__("mmcompile.kernels").kernels.available("cpu")[0],
                    reason="the word kernel runs on the CPU only under Triton's interpreter")
def test_int4_products_on_the_word_kernel_equal_the_packed_codes():
    """The rewrite lays each product's codes out as words once (scales and zeros rounded to bf16) and
    calls the word kernel; run here under Triton's interpreter, the step's logits equal those of the
    packed codes within bf16 rounding, and a several-row product is left alone."""
    from mmcompile.backends.inductor_fusions import int4_one_row_products

    model = mmc.models.build("llama:tiny", dtype=torch.bfloat16)
    inputs = (torch.tensor([[5]]), torch.tensor([[3]]), model.empty_cache(1, 32))
    program = mmc.optimize(mmc.capture(model, inputs), [*mmc.DEFAULT_PIPELINE, "quantize_linear"],
                           quantize_linear={"mode": "int4", "group_size": 32}).program
    gm, notes = int4_one_row_products(program.graph_module, "auto", devices=("cpu",))  # tinygemm: CUDA only
    calls = [n for n in gm.graph.nodes if n.target is torch.ops.mmcompile.triton_gemv_int4_words.default]
    assert calls and notes == [f"int4: {len(calls)} one-row products on mmcompile's int4 word kernel"]
    assert not any(n.target is torch.ops.mmcompile.linear_int4.default for n in gm.graph.nodes)
    want = program.graph_module(*[t.clone() for t in program.example_inputs])[0]
    got = gm(*[t.clone() for t in program.example_inputs])[0]
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=3e-2 * want.abs().max().item())

    prefill = (torch.tensor([[5, 6, 7]]), torch.arange(3)[None], model.empty_cache(1, 32))
    program = mmc.optimize(mmc.capture(model, prefill), [*mmc.DEFAULT_PIPELINE, "quantize_linear"],
                           quantize_linear={"mode": "int4", "group_size": 32}).program
    assert int4_one_row_products(program.graph_module, "words", devices=("cpu",)) == (program.graph_module, [])

    fp32 = mmc.models.build("llama:tiny", dtype=torch.float32)
    step = (torch.tensor([[5]]), torch.tensor([[3]]), fp32.empty_cache(1, 32))
    program = mmc.optimize(mmc.capture(fp32, step), [*mmc.DEFAULT_PIPELINE, "quantize_linear"],
                           quantize_linear={"mode": "int4", "group_size": 32}).program
    gm, notes = int4_one_row_products(program.graph_module, "auto", devices=("cpu",))
    assert gm is program.graph_module and notes
    assert all("packed-code int4 kernel: not tinygemm: tinygemm is a CUDA kernel; not words: torch.float32 "
               "activations; the word kernel takes float16 or bfloat16" in n for n in notes), notes[0]
