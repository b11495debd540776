"""Generator: compiled prefill + decode over a static KV cache equals eager generation token for token."""

import pytest
import torch

import mmcompile as mmc


def _prompts(lengths, vocab=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g) for n in lengths]


@pytest.fixture(scope="module")
def eager_backend_gen(tiny_llama):
    return mmc.compile_generator(tiny_llama, backend="eager", max_batch=3, max_seq_len=64)


@pytest.fixture(scope="module")
def inductor_gen(tiny_llama):
    return mmc.compile_generator(tiny_llama, backend="inductor", max_batch=3, max_seq_len=64)


def _check_rows(out, prompts, refs, pad=0):
    assert out.shape[0] == len(prompts)
    for row, ref in zip(out, refs):
        n = ref.numel()
        assert torch.equal(row[:n], ref), f"row differs from eager:\n{row[:n]}\n{ref}"
        assert bool((row[n:] == pad).all())


@pytest.mark.parametrize("gen_fixture", ["eager_backend_gen", "inductor_gen"])
def test_greedy_equals_eager_generation_batch_with_different_lengths(request, gen_fixture, tiny_llama):
    gen = request.getfixturevalue(gen_fixture)
    prompts = _prompts([5, 11, 2])
    refs = [tiny_llama.generate_reference(p, 20) for p in prompts]
    out = gen.generate(prompts, max_new_tokens=20)
    _check_rows(out, prompts, refs)
    assert out.shape == (3, 11 + 20)
    # the same prompts one at a time give the same rows (batching does not leak between rows)
    single = gen.generate([prompts[1]], max_new_tokens=20)
    assert torch.equal(single[0], refs[1])


def test_long_prompt_compiles_a_larger_prefill_bucket(eager_backend_gen, tiny_llama):
    prompt = _prompts([21], seed=9)
    out = eager_backend_gen.generate(prompt, 6)
    assert 32 in eager_backend_gen.prefill_fn.compiled
    assert torch.equal(out[0], tiny_llama.generate_reference(prompt[0], 6))


def test_compiled_generator_has_separate_optimized_phases(inductor_gen):
    assert set(inductor_gen.programs) == {"prefill", "decode"}
    decode = inductor_gen.programs["decode"]
    prefill = inductor_gen.programs["prefill"]
    # decode is static [B, 1]; prefill is static per prompt-length bucket, compiled on first use
    assert list(decode.placeholders()[0].meta["val"].shape) == [3, 1]
    assert list(prefill.placeholders()[0].meta["val"].shape) == [3, 16]
    assert inductor_gen.prefill_fn.buckets == [16, 32, 64]
    assert set(inductor_gen.prefill_fn.compiled) == {16}
    assert [r.name for r in inductor_gen.reports["decode"]] == list(mmc.DEFAULT_PIPELINE) + ["capture_decode_loop"]
    assert inductor_gen.cuda_graphs == "off" and "need a CUDA device" in inductor_gen.cuda_graph_notes[0]
    assert inductor_gen.compile_seconds > 0
    # the Generator owns the cache: the same tensors are fed to both phases
    assert len(inductor_gen.cache) == 2 and inductor_gen.cache[0][0].shape == (3, 2, 64, 16)


def test_per_row_stop_tokens(eager_backend_gen, tiny_llama):
    prompts = _prompts([4, 7], seed=1)
    free = [tiny_llama.generate_reference(p, 16) for p in prompts]
    # stop row 0 at its 3rd new token; row 1 must run on unaffected unless it emits the same token
    stop = int(free[0][4 + 2])
    refs = [tiny_llama.generate_reference(p, 16, stop_tokens=(stop,)) for p in prompts]
    out = eager_backend_gen.generate(prompts, max_new_tokens=16, stop_tokens=[stop], pad_token_id=0)
    _check_rows(out, prompts, refs)
    assert refs[0].numel() <= 4 + 3


def test_streaming_yields_the_generated_tokens(eager_backend_gen):
    prompts = _prompts([6, 3], seed=2)
    out = eager_backend_gen.generate(prompts, max_new_tokens=10)
    steps = list(eager_backend_gen.stream(prompts, max_new_tokens=10))
    assert len(steps) == 10 and all(s.shape == (2,) for s in steps)
    streamed = torch.stack(steps, dim=1)
    assert torch.equal(streamed[0], out[0, 6:16])
    assert torch.equal(streamed[1], out[1, 3:13])


def test_attention_mask_left_padding_equals_unpadded(eager_backend_gen):
    prompts = _prompts([3, 5], seed=3)
    padded = torch.zeros(2, 5, dtype=torch.long)
    mask = torch.zeros(2, 5, dtype=torch.long)
    padded[0, 2:], mask[0, 2:] = prompts[0], 1  # left padding
    padded[1], mask[1] = prompts[1], 1
    a = eager_backend_gen.generate(padded, max_new_tokens=6, attention_mask=mask)
    b = eager_backend_gen.generate(prompts, max_new_tokens=6)
    assert torch.equal(a, b)


def test_sampling_is_seedable_and_topk1_is_greedy(eager_backend_gen):
    prompts = _prompts([5], seed=4)
    cfg = mmc.SamplingConfig(temperature=1.0, top_k=50, top_p=0.9, seed=123)
    a = eager_backend_gen.generate(prompts, 12, sampling=cfg)
    b = eager_backend_gen.generate(prompts, 12, sampling=cfg)
    assert torch.equal(a, b)
    c = eager_backend_gen.generate(prompts, 12, sampling={"temperature": 1.0, "seed": 7})
    d = eager_backend_gen.generate(prompts, 12, sampling={"temperature": 1.0, "seed": 8})
    assert not torch.equal(c, d)  # different seeds sample differently (12 tokens over a 256 vocab)
    greedy = eager_backend_gen.generate(prompts, 12)
    assert torch.equal(eager_backend_gen.generate(prompts, 12, sampling={"temperature": 0.7, "top_k": 1, "seed": 1}), greedy)
    assert torch.equal(eager_backend_gen.generate(prompts, 12, sampling={"temperature": 0.7, "top_p": 1e-6, "seed": 1}), greedy)


def test_sample_top_k_and_top_p_restrict_support():
    from mmcompile.runtime.sampling import sample

    logits = torch.tensor([[4.0, 3.0, 2.0, -10.0, -10.0]]).repeat(400, 1)
    g = torch.Generator().manual_seed(0)
    k2 = sample(logits, mmc.SamplingConfig(temperature=1.0, top_k=2), g)
    assert set(k2.tolist()) == {0, 1}
    p = sample(logits, mmc.SamplingConfig(temperature=1.0, top_p=0.5), g)  # token 0 alone has p=0.66
    assert set(p.tolist()) == {0}


def test_generator_errors(eager_backend_gen):
    with pytest.raises(mmc.ShapeError, match="max_seq_len=64"):
        eager_backend_gen.generate(_prompts([60]), max_new_tokens=10)
    with pytest.raises(mmc.ShapeError, match="max_batch=3"):
        eager_backend_gen.generate(_prompts([2, 2, 2, 2]), max_new_tokens=2)
    with pytest.raises(ValueError, match="temperature"):
        eager_backend_gen.generate(_prompts([2]), 2, sampling={"temperature": -1})
    with pytest.raises(ValueError, match="unknown sampling option"):
        eager_backend_gen.generate(_prompts([2]), 2, sampling={"topk": 3})
    with pytest.raises(mmc.ShapeError, match="empty"):
        eager_backend_gen.generate([torch.tensor([], dtype=torch.long)], 2)


def test_generator_rejects_models_without_the_protocol():
    with pytest.raises(mmc.ModelSpecError, match="generation protocol"):
        mmc.compile_generator(torch.nn.Linear(2, 2))


def test_eager_module_generator_matches_reference(tiny_llama):
    gen = mmc.Generator.from_module(tiny_llama, max_batch=2, max_seq_len=40)
    prompts = _prompts([3, 8], seed=5)
    out = gen.generate(prompts, 10)
    _check_rows(out, prompts, [tiny_llama.generate_reference(p, 10) for p in prompts])
    assert gen.stats.steps == 10 and gen.stats.new_tokens == 20


def test_generator_fuses_eager_attention_and_matches_reference():
    model = mmc.models.build("llama:tiny", attn_impl="eager")
    gen = mmc.compile_generator(model, backend="eager", max_batch=2, max_seq_len=48)
    for phase in ("prefill", "decode"):
        fused = next(r for r in gen.reports[phase] if r.name == "fuse_attention")
        assert fused.stats["fused"] == model.config.n_layers and fused.stats["fused.gqa"] == model.config.n_layers
        assert gen.programs[phase].op_counts()["aten._softmax.default"] == 0
    prompts = _prompts([4, 9], seed=11)
    out = gen.generate(prompts, 12)
    _check_rows(out, prompts, [model.generate_reference(p, 12) for p in prompts])


def test_beam_search_by_row_indirection_equals_reordering_by_copy(eager_backend_gen, tiny_llama):
    """The compiled Generator reorders beams through a row table; the eager reference copies cache rows."""
    reference = mmc.Generator.from_module(tiny_llama, max_batch=3, max_seq_len=64)
    prompt = _prompts([6], seed=7)
    ours, ref = eager_backend_gen.generate(prompt, 32, num_beams=3), reference.generate(prompt, 32, num_beams=3)
    assert torch.equal(ours, ref)
    assert not torch.equal(ours, eager_backend_gen.generate(prompt, 32))  # beams are not greedy here
    assert eager_backend_gen.programs["beam_decode"].placeholders()[-1].name == "cache_rows"


def test_a_generator_that_launches_one_by_one_tells_its_backends(tiny_llama):
    """cuda_graphs="off": the Programs say they are not replayed, so no backend compiles for replay (the
    Inductor backend's dependent launches, ONNX Runtime's own CUDA graph) although each is capturable."""
    from mmcompile import backends
    from mmcompile.backends.onnxruntime import _cuda_graph

    off = mmc.compile_generator(tiny_llama, backend="eager", max_batch=2, max_seq_len=32, cuda_graphs="off")
    auto = mmc.compile_generator(tiny_llama, backend="eager", max_batch=1, max_seq_len=32)
    off.generate(_prompts([4], seed=1), 3, num_beams=2)  # compiles the beam step
    assert off.programs["prefill"].metadata["replayed"] is False
    assert off.programs["beam_decode"].metadata["replayed"] is False
    off, auto = off.programs["decode"], auto.programs["decode"]
    assert off.metadata["replayed"] is False and "replayed" not in auto.metadata
    for program in (off, auto):  # what capture_decode_loop proves on a GPU (a CPU tensor is not capturable)
        program.metadata["capturable"] = True
    assert not backends.replayed(off) and backends.replayed(auto)
    cuda = torch.device("cuda")  # the choice itself, without a GPU
    assert _cuda_graph({}, off, cuda) is False and _cuda_graph({}, auto, cuda)
    assert _cuda_graph({"cuda_graph": True}, off, cuda)  # asked for, it still applies
