"""CUDA checks: the inductor backend and the Generator on a GPU (skipped on CPU machines)."""

import pytest
import torch

import mmcompile as mmc
from conftest import requires_cuda

pytestmark = requires_cuda


def test_inductor_generator_on_cuda_equals_eager_fp32():
    model = mmc.models.build("llama:tiny", device="cuda")
    gen = mmc.compile_generator(model, backend="inductor", max_batch=2, max_seq_len=64)
    assert gen.cache[0][0].device.type == "cuda"
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (n,), generator=g) for n in (4, 9)]
    out = gen.generate(prompts, 24)
    for row, p in zip(out, prompts):
        ref = model.generate_reference(p.cuda(), 24)
        assert torch.equal(row[: ref.numel()], ref)


def test_inductor_prefill_keeps_sdpa_on_cuda_bf16():
    model = mmc.models.build("llama:tiny", device="cuda", dtype=torch.bfloat16)
    gen = mmc.compile_generator(model, backend="inductor", max_batch=1, max_seq_len=128)
    assert gen.programs["prefill"].op_counts()["aten.scaled_dot_product_attention.default"] == model.config.n_layers
    # random weights give near-tied logits (top two 0.03 apart is common), so bf16 rounding may pick either
    # of two tokens: the first generated token must be one the float32 model scores within 0.05 of its best
    f32 = mmc.models.build("llama:tiny", device="cuda")
    f32.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    g = torch.Generator().manual_seed(0)
    for prompt in [torch.randint(0, 256, (40,), generator=g) for _ in range(4)]:
        with torch.no_grad():
            ref = f32(prompt[None].cuda(), torch.arange(40, device="cuda")[None], f32.empty_cache(1, 128))[0, -1]
        first = gen.generate([prompt], 1)[0, 40]
        assert ref[first] >= ref.max() - 0.05, (first, ref.topk(3))


def test_torch_compile_backend_on_cuda():
    model = mmc.models.build("llama:tiny", device="cuda")
    tokens = torch.randint(0, 256, (2, 5), device="cuda")
    pos = torch.arange(5, device="cuda").expand(2, 5)
    with torch.no_grad():
        ref = model(tokens, pos, model.empty_cache(2, 16))
        out = torch.compile(model, backend="mmcompile")(tokens, pos, model.empty_cache(2, 16))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_torch_compile_backend_with_cuda_graphs_keeps_parameters_in_place(monkeypatch):
    """options backend_options mode=reduce-overhead: the graph replays, and the parameters Dynamo hands in
    as inputs are used where they lie (kept), not copied at every call."""
    from mmcompile.runtime.cuda_graphs import ShapeGraphs

    made, init = [], ShapeGraphs.__init__
    monkeypatch.setattr(ShapeGraphs, "__init__", lambda self, *a, **k: (made.append(self), init(self, *a, **k))[1])
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 32)).cuda().eval()
    f = torch.compile(model, backend="mmcompile", options={"backend_options": {"mode": "reduce-overhead"}})
    with torch.no_grad():
        for seed in range(3):
            x = torch.randn(8, 64, device="cuda", generator=torch.Generator("cuda").manual_seed(seed))
            torch.testing.assert_close(f(x), model(x), rtol=1e-4, atol=1e-4)
    assert len(made) == 1 and len(made[0].graphs) == 1, [len(g.graphs) for g in made]  # one graph, replayed
    phase = next(iter(made[0].graphs.values()))
    # no parameter-shaped input is a copy: parameters are either kept where they lie or not inputs at all
    copied = [tuple(a.shape) for i, a in enumerate(phase.args) if isinstance(a, torch.Tensor) and i not in phase.keep]
    assert copied == [(8, 64)], copied
    assert all(phase.args[i].data_ptr() in {p.data_ptr() for p in model.parameters()} for i in phase.keep)


def test_fused_attention_runs_on_a_fused_sdpa_kernel_under_inductor():
    from torch.profiler import ProfilerActivity, profile

    model = mmc.models.build("llama:tiny", device="cuda", dtype=torch.bfloat16, attn_impl="eager", max_seq_len=256)
    S = 256
    call = (torch.randint(0, 256, (1, S), device="cuda"), torch.arange(S, device="cuda")[None], model.empty_cache(1, S))
    result = mmc.optimize(mmc.capture(model, call), "default")
    assert result.report("fuse_attention").stats["fused"] == model.config.n_layers
    compiled = mmc.lower(result.program, "inductor")
    with torch.no_grad():
        ref = model(*call)
        out = compiled(*call)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            compiled(*call)
            torch.cuda.synchronize()
    torch.testing.assert_close(out, ref, rtol=5e-2, atol=5e-2)
    kernels = {e.name.lower() for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA}
    # the prompt's mask is arange(L) <= positions: the Inductor backend routes it to the position-bounded
    # prefill kernel (attention="auto"), a fused kernel of its own
    assert any("_prefill_kernel" in k for k in kernels), sorted(kernels)


@pytest.mark.parametrize("mode", ["step", "multi"])
def test_cuda_graph_decoding_equals_reference(mode):
    model = mmc.models.build("llama:tiny", device="cuda")
    gen = mmc.compile_generator(model, backend="inductor", max_batch=2, max_seq_len=64, cuda_graphs=mode,
                                steps_per_graph=4)
    assert gen.programs["decode"].metadata["capturable"] is True
    assert gen.cuda_graphs.startswith("multi-step" if mode == "multi" else "step")
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (n,), generator=g) for n in (5, 12)]
    refs = [model.generate_reference(p.cuda(), 23) for p in prompts]
    out_full = gen.generate(prompts, 23)  # 23 = 1 from the prefill + 5 graphs of 4 + 2 single steps
    for row, ref in zip(out_full, refs):
        assert torch.equal(row[: ref.numel()], ref)
    # a stop inside a K-step chunk, the first time it comes: tokens past it are discarded
    new = refs[0][5:].tolist()
    first = next(j for j in range(6, len(new)) if new[j] not in new[:j] and j % 4 != 0)
    stop = new[first]
    out = gen.generate(prompts[:1], 23, stop_tokens=[stop])
    ref = model.generate_reference(prompts[0].cuda(), 23, stop_tokens=(stop,))
    assert torch.equal(out[0], ref)
    if mode == "multi":
        assert gen.multi_step.greedy_kernel  # argmax, token and position in one kernel
        # each next K tokens are launched before these are handed out, unless a stop made them unnecessary
        launches = []
        launch = gen.multi_step.launch
        gen.multi_step.launch = lambda *args: (launches.append(len(args)), launch(*args))[1]
        gen.generate(prompts[:1], 23, stop_tokens=[stop])
        # new token 0 comes from the prefill, then chunks of 4: from the host once, then on the device
        assert launches == [2] + [0] * ((first + 3) // 4 - 1)
        launches.clear()
        assert torch.equal(gen.generate(prompts, 23), out_full)
        assert launches == [2, 0, 0, 0, 0]
        # a stream left while K tokens are in flight: the next call is still exact
        stream = gen.stream(prompts, 23)
        assert all(next(stream).device.type == "cpu" for _ in range(7))
        stream.close()
        assert torch.equal(gen.generate(prompts, 23), out_full)
    # sampling replays the one-step graph and stays seedable
    a = gen.generate(prompts, 8, sampling={"temperature": 1.0, "seed": 3})
    b = gen.generate(prompts, 8, sampling={"temperature": 1.0, "seed": 3})
    assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_transformers_model_decodes_with_multi_step_graphs_on_cuda(kind):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "llama":
        cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4))
    model = model.cuda().eval()
    gen = mmc.compile_generator(model, backend="inductor", max_batch=2, max_seq_len=64)
    assert gen.multi_step is not None, gen.cuda_graph_notes
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 128, (n,), generator=g) for n in (5, 11)]
    out = gen.generate(prompts, 33)
    for row, p in zip(out, prompts):
        ref = model.generate(p[None].cuda(), max_new_tokens=33, do_sample=False, eos_token_id=None, pad_token_id=0)[0]
        assert torch.equal(row[: ref.numel()], ref)


def test_beam_search_replays_a_cuda_graph_with_the_row_table():
    transformers = pytest.importorskip("transformers")
    from mmcompile.runtime.cuda_graphs import StepGraph

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   initializer_range=0.2)
    model = transformers.LlamaForCausalLM(cfg).cuda().eval()
    gen = mmc.compile_generator(model, backend="inductor", max_batch=6, max_seq_len=64)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 128, (n,), generator=g) for n in (5, 12)]
    out = gen.generate(prompts, 33, num_beams=3)
    assert isinstance(gen.beam_step, StepGraph)
    for row, p in zip(out, prompts):
        ref = model.generate(p[None].cuda(), max_new_tokens=33, num_beams=3, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0]
        assert torch.equal(row[: ref.numel()], ref)


def test_encoder_decoder_model_decodes_with_cuda_graphs():
    """BART on CUDA: multi-step graphs for greedy decoding, a graph per beam step; tokens equal generate."""
    transformers = pytest.importorskip("transformers")
    from mmcompile.runtime.cuda_graphs import StepGraph

    torch.manual_seed(0)
    cfg = transformers.BartConfig(vocab_size=128, d_model=32, encoder_layers=2, decoder_layers=2,
                                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                  decoder_ffn_dim=64, max_position_embeddings=64, init_std=0.3,
                                  forced_eos_token_id=None, forced_bos_token_id=None)
    model = transformers.BartForConditionalGeneration(cfg).cuda().eval()
    gen = mmc.compile_generator(model, backend="inductor", max_batch=3, max_seq_len=48, max_source_len=24)
    assert gen.multi_step is not None, gen.cuda_graph_notes
    g = torch.Generator().manual_seed(1)
    sources = [torch.randint(3, 128, (n,), generator=g) for n in (5, 11, 17)]
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0, forced_eos_token_id=None, forced_bos_token_id=None)
    out = gen.generate(sources, 33)
    for row, s in zip(out, sources):
        ref = model.generate(s[None].cuda(), max_new_tokens=33, min_new_tokens=33, **kw)[0]
        assert torch.equal(row[: ref.numel()], ref)
    beams = gen.generate(sources[:1], 12, num_beams=3)
    assert isinstance(gen.beam_step, StepGraph)
    ref = model.generate(sources[0][None].cuda(), max_new_tokens=12, min_new_tokens=12, num_beams=3,
                         length_penalty=0.0, early_stopping=True, **kw)[0]
    assert torch.equal(beams[0], ref)


@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_decode_runs_the_triton_gemv_kernels_under_inductor(quantize):
    """bf16 decode at batch 1 and 3: the Inductor backend launches mmcompile's GEMV kernels (float or
    int8 weights; one-row int4 products run torch's tinygemm, or mmcompile's int4 word kernel or
    packed-code int4 kernel when asked) for
    the linear layers, and the step's logits equal the same Program on the eager backend (the ops'
    reference math) within bf16 rounding."""
    from torch.profiler import ProfilerActivity, profile

    model = mmc.models.build("llama:tiny", device="cuda", dtype=torch.bfloat16)
    passes = list(mmc.DEFAULT_PIPELINE) + (["quantize_linear"] if quantize else [])
    opts = {"quantize_linear": {"mode": quantize, "group_size": 32} if quantize == "int4" else {"mode": quantize}}
    for batch in (1, 3):
        S = 32
        call = (torch.randint(0, 256, (batch, 1), device="cuda"), torch.full((batch, 1), 5, device="cuda"),
                model.empty_cache(batch, S))
        result = mmc.optimize(mmc.capture(model, call), passes, **(opts if quantize else {}))
        ref = mmc.lower(result.program, "eager")(*call)
        ref_logits = ref[0] if isinstance(ref, (tuple, list)) else ref

        def run(**options):  # (the compiled step, its logits, the CUDA kernels of a second call)
            compiled = mmc.lower(result.program, "inductor", **options)
            with torch.no_grad():
                out = compiled(*call)
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    compiled(*call)
                    torch.cuda.synchronize()
            names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            return compiled, out[0] if isinstance(out, (tuple, list)) else out, names

        compiled, logits, names = run()
        torch.testing.assert_close(logits.float(), ref_logits.float(), rtol=5e-2, atol=5e-2)
        if quantize != "int4":
            assert any(n.startswith("_gemv_kernel") for n in names), sorted(set(names))
        elif batch == 1:  # one-row int4 products: torch's tinygemm by default, mmcompile's word kernel or its
            # packed-code kernel if asked
            assert any("tinygemm" in n.lower() or "int4pack" in n.lower() for n in names), sorted(set(names))
            assert any("one-row products on tinygemm" in note for note in compiled.fusions), compiled.fusions
            for kernel, launched in (("words", "_gemv_int4_words_kernel"), ("triton", "_gemv_int4_kernel")):
                _, other_logits, other_names = run(int4_kernel=kernel)
                torch.testing.assert_close(other_logits.float(), ref_logits.float(), rtol=5e-2, atol=5e-2)
                assert any(n.startswith(launched) for n in other_names), kernel
                assert not any("int4pack" in n.lower() for n in other_names), kernel
        assert not any(n.startswith("_gemv") for n in run(gemv="cublas")[2])


def test_int8_embedding_table_under_inductor_on_cuda_equals_the_eager_op():
    model = mmc.models.build("llama:tiny", device="cuda", dtype=torch.bfloat16)
    call = (torch.randint(0, 256, (2, 8), device="cuda"), torch.arange(8, device="cuda").expand(2, 8),
            model.empty_cache(2, 16))
    result = mmc.optimize(mmc.capture(model, call), [*mmc.DEFAULT_PIPELINE, "quantize_linear"],
                          quantize_linear={"embeddings": True})
    assert result.program.op_counts()["mmcompile.embedding_int8.default"] == 1
    ref = mmc.lower(result.program, "eager")(*call)
    out = mmc.lower(result.program, "inductor")(*call)
    first = [o[0] if isinstance(o, (tuple, list)) else o for o in (out, ref)]
    torch.testing.assert_close(first[0].float(), first[1].float(), rtol=5e-2, atol=5e-2)


def test_auto_quantization_times_the_inductor_kernels_on_cuda():
    """quantize_linear mode="auto" on CUDA times each distinct candidate product as the Inductor backend
    lowers it (default timer) and picks the fastest within the budget; the quantized step under Inductor
    equals the eager backend's logits."""
    model = mmc.models.build("llama:tiny", device="cuda", dtype=torch.bfloat16)
    call = (torch.randint(0, 256, (1, 1), device="cuda"), torch.full((1, 1), 5, device="cuda"),
            model.empty_cache(1, 32))
    program = mmc.optimize(mmc.capture(model, call), mmc.DEFAULT_PIPELINE).program
    from mmcompile import testing

    after, report = testing.run_pass(program, "quantize_linear", mode="auto", group_size=32, error_budget=0.2)
    timed = [n for n in report.notes if n.startswith("auto: timed")]
    assert timed and "lowered alone by the Inductor backend" in timed[0], report.notes
    for entry in after.metadata["quantization"].values():
        assert all(t > 0 for t in entry["times_us"].values()), entry
        within = {m: t for m, t in entry["times_us"].items() if entry["errors"][m] <= 0.2}
        assert entry["mode"] == min(within, key=within.get)
    got, want = (mmc.lower(after, backend)(*call)[0].float() for backend in ("inductor", "eager"))
    torch.testing.assert_close(got, want, rtol=5e-2, atol=5e-2)


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() < (9, 0),
                    reason="programmatic dependent launch needs sm_90 or later")
@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_gemvs_launched_while_the_kernel_before_finishes_generate_the_same(quantize):
    """pdl="auto" (the GEMV kernels launched as programmatic dependent launches, the step being marked
    capturable) and "all" (Inductor's kernels too) against "off": the step's logits are bit for bit the
    same, also replayed from a CUDA graph, and a Generator replaying K-step graphs produces the same
    greedy tokens. A step not marked capturable keeps ordinary launches under "auto", and says why."""
    model = mmc.models.build("llama:tiny", device="cuda", dtype=torch.bfloat16)
    passes = list(mmc.DEFAULT_PIPELINE) + ["capture_decode_loop"] + (["quantize_linear"] if quantize else [])
    opts = {"quantize_linear": {"mode": quantize, **({"group_size": 32} if quantize == "int4" else {})}} \
        if quantize else {}
    words = {"int4_kernel": "words"} if quantize == "int4" else {}  # one-row int4 on mmcompile's word kernel
    cache = model.empty_cache(1, 32)
    for kv in cache:
        for t in kv:
            t.normal_()
    call = (torch.randint(0, 256, (1, 1), device="cuda"), torch.full((1, 1), 7, device="cuda"), cache)
    program = mmc.optimize(mmc.capture(model, call), passes, **opts).program
    assert program.metadata["capturable"], program.metadata
    unmarked = program.clone()
    unmarked.metadata["capturable"] = False
    notes = mmc.lower(unmarked, "inductor").fusions
    assert any("ordinary launches: the step is not replayed from CUDA graphs" in f for f in notes), notes
    results = {}
    with torch.no_grad():
        for pdl in ("off", "auto", "all"):
            compiled = mmc.lower(program, "inductor", pdl=pdl, **words)
            launched = any("programmatic dependent launches" in f for f in compiled.fusions)
            assert launched == (pdl != "off"), compiled.fusions
            if quantize == "int4":  # the int4 word kernel too
                assert any("int4 word products launched as" in f for f in compiled.fusions) == (pdl != "off")
            mine = [tuple(t.clone() for t in kv) for kv in cache]
            out = compiled(*call[:2], mine)[0].clone()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                replayed = compiled(*call[:2], mine)[0]
            graph.replay()
            torch.cuda.synchronize()
            results[pdl] = (out, replayed.clone())
    for pdl in ("auto", "all"):
        for a, b in zip(results[pdl], results["off"]):
            assert torch.equal(a, b), pdl
    prompts = [torch.randint(0, 256, (9,))]
    tokens = []
    for pdl in ("off", "auto"):
        gen = mmc.compile_generator(model, backend="inductor", max_batch=1, max_seq_len=64, steps_per_graph=8,
                                    passes=passes, pass_options=opts or None, backend_options={"pdl": pdl, **words})
        tokens.append(gen.generate(prompts, 24))
    assert torch.equal(tokens[0], tokens[1])


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_gemv_fusion_under_inductor_launches_fewer_kernels_with_the_same_logits(quantize):
    """The batch-1 decode step with the GEMV kernel taking its RMSNorm, SiLU gate and residual adds
    (default) against the same step with them apart (gemv_fusion="off"): fewer kernels, the same logits
    within bf16 rounding, and the eager backend's reference; at batch 3 the step is left as it is."""
    from torch.profiler import ProfilerActivity, profile

    model = mmc.models.build("llama:tiny", device="cuda", dtype=torch.bfloat16)
    layers = model.config.n_layers
    passes = list(mmc.DEFAULT_PIPELINE) + (["quantize_linear"] if quantize else [])
    for batch in (1, 3):
        call = (torch.randint(0, 256, (batch, 1), device="cuda"), torch.full((batch, 1), 7, device="cuda"),
                model.empty_cache(batch, 32))
        program = mmc.optimize(mmc.capture(model, call), passes,
                               **({"quantize_linear": {"mode": quantize}} if quantize else {})).program
        fused, plain = mmc.lower(program, "inductor"), mmc.lower(program, "inductor", gemv_fusion="off")
        # one row only: several rows keep their neighbours apart (the tl.dot path is slower with them)
        assert sum("fused with" in f for f in fused.fusions) == (4 * layers + 1 if batch == 1 else 0), fused.fusions
        assert [f for f in plain.fusions if not f.startswith("attention:")] == []  # no GEMV moved
        launches = []
        with torch.no_grad():
            ref = mmc.lower(program, "eager")(*call)[0]
            for compiled in (fused, plain):
                out = compiled(*call)[0]
                torch.testing.assert_close(out.float(), ref.float(), rtol=5e-2, atol=5e-2)
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    compiled(*call)
                    torch.cuda.synchronize()
                launches.append(sum(e.device_type == torch.autograd.DeviceType.CUDA for e in prof.events()))
        assert launches[0] <= launches[1] - (2 * layers if batch == 1 else 0), launches


def test_triton_gemv_generator_equals_cublas_generator_bf16():
    model = mmc.models.build("llama:tiny", device="cuda", dtype=torch.bfloat16)
    prompts = [torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(3)) for n in (7, 20)]
    a = mmc.compile_generator(model, max_batch=2, max_seq_len=64).generate(prompts, 8)
    b = mmc.compile_generator(model, max_batch=2, max_seq_len=64,
                              backend_options={"gemv": "cublas"}).generate(prompts, 8)
    # bf16 kernels sum in another order: the first generated tokens agree
    assert torch.equal(a[:, :21], b[:, :21])


def test_decode_attention_kernel_runs_under_inductor_and_matches_sdpa():
    from torch.profiler import ProfilerActivity, profile

    model = mmc.models.build("llama:tiny", device="cuda", dtype=torch.bfloat16, max_seq_len=512)
    cache = model.empty_cache(2, 512)
    for kv in cache:
        for t in kv:
            t.normal_()
    call = (torch.tensor([[5], [9]], device="cuda"), torch.tensor([[40], [300]], device="cuda"), cache)
    program = mmc.optimize(mmc.capture(model, call), "default").program
    routed, plain = mmc.lower(program, "inductor"), mmc.lower(program, "inductor", attention="sdpa")
    with torch.no_grad():
        a, b = routed(*call), plain(*call)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            routed(*call)
            torch.cuda.synchronize()
    torch.testing.assert_close(a.float(), b.float(), rtol=3e-2, atol=3e-2)
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert sum("_decode_kernel" in k for k in kernels) == model.config.n_layers
    assert not any("attention" in k.lower() and "decode" not in k.lower() for k in kernels)


def test_chameleon_text_to_image_with_guided_multi_step_graphs_equals_eager():
    from mmcompile.models import chameleon
    from mmcompile.runtime.chameleon import ChameleonGenerator, compile_chameleon

    model, vq = chameleon.build_with_tokenizer("tiny", device="cuda")
    runner = compile_chameleon(model, vq, backend="inductor")
    eager = ChameleonGenerator.from_modules(model, vq)
    assert runner.generator.multi_step is not None
    a, b = runner.run("text-to-image", [100, 200, 300]), eager.run("text-to-image", [100, 200, 300])
    assert runner.generator._rule_graphs  # the guided K-step graph was recorded and used
    assert torch.equal(a.codes, b.codes)
    torch.testing.assert_close(a.pixels, b.pixels, rtol=1e-2, atol=1e-2)  # TF32 convolutions, other algorithms
    x = runner.run("image-to-text", [100], b.pixels, max_new_tokens=16)
    assert torch.equal(x, eager.run("image-to-text", [100], b.pixels, max_new_tokens=16))


@pytest.mark.xfail(torch.__version__ < (2, 12), strict=False,
                   reason="torch 2.11's AOTInductor loader crashes (SIGSEGV) on an H100 at aoti_load_package, also for "
                          "a package without mmcompile's kernels (docs/benchmarks.md); the test runs, its crash is expected")
def test_aot_inductor_artifact_with_the_triton_kernels_generates_what_the_compiled_generator_does(tmp_path):
    """The package holds the GEMV and decode attention kernels (user Triton kernels in AOTInductor); a
    Generator loaded in a fresh process on the GPU generates the compiled one's tokens. (Loading runs in
    a child process so that a crash inside AOTInductor's loader fails this test, not the whole run.)"""
    import subprocess
    import sys

    model = mmc.models.build("llama:tiny", device="cuda", dtype=torch.float16)
    gen = mmc.compile_generator(model, backend="inductor", max_batch=1, max_seq_len=64, prefill_buckets=[16])
    prompts = [torch.randint(0, 256, (11,), generator=torch.Generator().manual_seed(3))]
    want = gen.generate(prompts, 24)
    gen.save(tmp_path / "gen")
    torch.save({"prompts": prompts, "want": want.cpu()}, tmp_path / "want.pt")
    code = (f"import torch, mmcompile as mmc; d = torch.load({str(tmp_path / 'want.pt')!r}); "
            f"g = mmc.load({str(tmp_path / 'gen')!r}); assert g.device.type == 'cuda'; "
            "assert torch.equal(g.generate(d['prompts'], 24).cpu(), d['want']), 'tokens differ'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, f"exit {r.returncode}: {r.stderr[-2000:]}"


def _ort_cuda():
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu (the CUDA execution provider) is not installed")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_onnxruntime_cuda_decode_replays_its_own_cuda_graph_like_the_plain_session(dtype):
    """The decode step on the CUDA provider: GroupQueryAttention (rotary inside) over the Generator's cache,
    replayed as ONNX Runtime's CUDA graph, generating what the same session without the graph does."""
    _ort_cuda()
    model = mmc.models.build("llama:tiny", device="cuda", dtype=dtype)
    passes = [*mmc.DEFAULT_PIPELINE, "fuse_rmsnorm"]
    gen = mmc.compile_generator(model, backend="onnxruntime", max_batch=2, max_seq_len=64, passes=passes)
    plain = mmc.compile_generator(model, backend="onnxruntime", max_batch=2, max_seq_len=64, passes=passes,
                                  cuda_graphs="off")
    assert gen.decode_fn.cuda_graph and not plain.decode_fn.cuda_graph, gen.cuda_graph_notes
    assert "onnxruntime CUDA graph" in gen.cuda_graphs
    ops = {n.op_type for n in gen.decode_fn.onnx_model.graph.node}
    assert "GroupQueryAttention" in ops and "ScatterND" not in ops, gen.decode_fn.fusions
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (n,), generator=g) for n in (5, 12)]
    a, b = gen.generate(prompts, 24), plain.generate(prompts, 24)
    assert torch.equal(a, b)
    eager = mmc.Generator.from_module(model, max_batch=2, max_seq_len=64).generate(prompts, 24)
    for row, (p, x, y) in enumerate(zip(prompts, a, eager)):  # later tokens may part at a near tie in 16 bits
        assert x[len(p)] == y[len(p)], f"row {row}: first new token {x[len(p)]} != eager {y[len(p)]}"


def test_seamless_speech_to_speech_with_cuda_graphs_equals_eager():
    """Every Seamless phase compiled on the GPU (fp32, so tokens and units must agree exactly), the decode
    step replayed as CUDA graphs, greedy and beam search."""
    from mmcompile.models import seamless
    from mmcompile.runtime.seamless import SeamlessTranslator, compile_seamless

    model = seamless.build("tiny", device="cuda", seed=1)
    g = torch.Generator().manual_seed(0)
    waves = [torch.randn(12000, generator=g) * 0.1, torch.randn(7000, generator=g) * 0.1]
    compiled = compile_seamless(model, max_batch=4)
    assert compiled.generator.cuda_graphs.startswith("multi-step"), compiled.generator.cuda_graph_notes
    eager = SeamlessTranslator.from_module(model, max_batch=4)
    for kwargs in (dict(), dict(num_beams=2)):
        task = "speech-to-text" if kwargs else "speech-to-speech"
        want = eager.translate(waves, task, tgt_lang="fra", max_new_tokens=12, **kwargs)
        got = compiled.translate(waves, task, tgt_lang="fra", max_new_tokens=12, **kwargs)
        assert all(torch.equal(a, b) for a, b in zip(got.tokens, want.tokens)), kwargs
        if not kwargs:
            assert all(torch.equal(a, b) for a, b in zip(got.units, want.units))
            for a, b in zip(got.waveforms, want.waveforms):
                torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    from mmcompile.runtime.cuda_graphs import PhaseGraph

    for name in ("speech_encoder", "cross", "t2u_units", "vocode"):  # phases that run once replay as graphs
        assert all(isinstance(g, PhaseGraph) for g in compiled.phases[name].graphs.values()), name
    assert all(isinstance(g, PhaseGraph) for g in compiled.generator.prefill_fn.graphs.values())


def test_short_prefill_buckets_replay_as_cuda_graphs_and_long_ones_do_not():
    model = mmc.models.build("llama:tiny", device="cuda", max_seq_len=1024)  # RoPE tables for 1024 positions
    gen = mmc.compile_generator(model, max_batch=1, max_seq_len=1024, prefill_buckets=[16, 1024])
    g = torch.Generator().manual_seed(0)
    short, long = torch.randint(0, 256, (9,), generator=g), torch.randint(0, 256, (600,), generator=g)
    for prompt in (short, short, long):  # the second short prompt replays the recorded graph
        out = gen.generate([prompt], 8)
        ref = model.generate_reference(prompt.cuda(), 8)
        assert torch.equal(out[0, : ref.numel()], ref)
    assert list(gen.prefill_fn.graphs) == [16]  # 1024 tokens is above the 512 recorded
    assert gen.programs["prefill"].metadata["capturable"]


def test_regions_on_cuda_generate_what_the_whole_graph_generates_with_graphs_and_kernels():
    """regions="auto" on CUDA (four layers): each layer compiled once, with the GEMV and split-KV kernels
    and their fused neighbours inside the layer region, replayed as K-step CUDA graphs, tokens equal to
    the whole-graph compile's (float32) and logits close in bf16."""
    model = mmc.models.build("llama:tiny", device="cuda", n_layers=4)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (n,), generator=g) for n in (4, 9)]
    outs = {}
    for regions in ("auto", "off"):
        gen = mmc.compile_generator(model, backend="inductor", max_batch=2, max_seq_len=64,
                                    backend_options={"regions": regions}, steps_per_graph=4)
        assert gen.cuda_graphs.startswith("multi-step")
        outs[regions] = gen.generate(prompts, 24)
    assert torch.equal(outs["auto"], outs["off"])
    half = mmc.models.build("llama:tiny", device="cuda", n_layers=4, dtype=torch.bfloat16)
    program = mmc.compile_generator(half, backend="eager", max_batch=1, max_seq_len=64).programs["decode"]
    cut, whole = mmc.lower(program, "inductor", regions="auto"), mmc.lower(program, "inductor", regions="off")
    assert cut.regions[0].startswith("regions: 4 layers") and cut.regions[0].endswith("3 compiled")
    inputs = [x.clone() if isinstance(x, torch.Tensor) else x for x in program.example_inputs]
    a = cut.run_flat([x.clone() if isinstance(x, torch.Tensor) else x for x in inputs])
    b = whole.run_flat([x.clone() if isinstance(x, torch.Tensor) else x for x in inputs])
    torch.testing.assert_close(a[0].float(), b[0].float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("kind", ["ours", "transformers", "gpt2"])
def test_attention_with_its_rotary_and_cache_writes_in_one_kernel_under_inductor(kind):
    """The decode step compiled by Inductor with ``attention_fusion="auto"`` (default: rotary, cache
    writes and attention in one kernel) against ``"off"``, batch 2 at different positions: fewer kernels
    (at least one per layer), the same logits and caches within rounding — also replayed from a CUDA
    graph, where the caches must be written in place, not copied — and a Generator replaying K-step
    graphs gives the unfused one's greedy tokens."""
    from torch.profiler import ProfilerActivity, profile

    if kind == "ours":
        model = mmc.models.build("llama:tiny", device="cuda", dtype=torch.float16)
    elif kind == "gpt2":  # no rotary; q, k and v split from one projection
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=128, n_layer=3, n_head=4, n_positions=128,
                                           bos_token_id=0, eos_token_id=0)).eval().to("cuda", torch.float16)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=256, hidden_size=128, num_hidden_layers=3, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=256)
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).eval().to("cuda", torch.float16)
    decode = mmc.compile_generator(model, backend="eager", max_batch=2, max_seq_len=96).programs["decode"]
    layers = len(decode.state_inputs()) // 2
    g = torch.Generator().manual_seed(0)
    flat = [torch.randint(0, 256, x.shape, generator=g).cuda() if i == 0 else torch.tensor([[9], [70]]).cuda()
            if i == 1 else torch.randn(x.shape, generator=g).to("cuda", x.dtype)
            for i, x in enumerate(decode.example_inputs)]
    runs, launches = {}, {}
    with torch.no_grad():
        ref = [x.clone() for x in flat]
        ref_logits = decode.graph_module(*ref)[0]
        for fusion in ("off", "auto"):
            compiled = mmc.lower(decode, "inductor", attention_fusion=fusion)
            fused = [f for f in compiled.fusions if f.startswith("attention:") and "in one kernel" in f]
            assert fused == ([f"attention: {layers} decode attention(s) with their rotary and cache writes in one "
                              "kernel"] if fusion == "auto" else []), compiled.fusions
            mine = [x.clone() for x in flat]
            compiled.run_flat(mine)  # compiles and warms up
            mine = [x.clone() for x in flat]
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                out = compiled.run_flat(mine)[0].clone()
                torch.cuda.synchronize()
            launches[fusion] = sum(e.device_type == torch.autograd.DeviceType.CUDA for e in prof.events())
            graphed = [x.clone() for x in flat]
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                replayed = compiled.run_flat(graphed)[0]
            for x, y in zip(graphed, flat):
                x.copy_(y)
            graph.replay()
            torch.cuda.synchronize()
            runs[fusion] = (out, mine, replayed.clone(), graphed)
    assert launches["auto"] <= launches["off"] - layers, launches
    for fusion, (out, mine, replayed, graphed) in runs.items():
        for logits, caches in ((out, mine), (replayed, graphed)):
            torch.testing.assert_close(logits.float(), ref_logits.float(), rtol=2e-2, atol=2e-2)
            for a, b in zip(caches[2:], ref[2:]):
                torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)
    prompts = [torch.randint(0, 256, (n,)) for n in (9, 30)]
    tokens = [mmc.compile_generator(model, backend="inductor", max_batch=2, max_seq_len=96, steps_per_graph=8,
                                    backend_options={"attention_fusion": fusion}).generate(prompts, 16)
              for fusion in ("off", "auto")]
    assert torch.equal(tokens[0], tokens[1])
