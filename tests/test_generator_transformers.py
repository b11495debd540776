"""The Generator on unmodified transformers causal LMs: their DynamicCache is rewritten into static buffers,
and greedy generation equals ``model.generate`` token for token."""

import pytest
import torch

import mmcompile as mmc

transformers = pytest.importorskip("transformers")

VOCAB = 128


def build(kind: str, attn: str = "eager"):
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=128, initializer_range=0.2)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(num_key_value_heads=2, **common))
    elif kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(num_key_value_heads=2, **common))
    else:
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128, initializer_range=0.2))
    model.config._attn_implementation = attn
    return model.eval()


def reference(model, prompt, new_tokens):
    return model.generate(prompt[None], max_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0]


def prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g) for n in lengths]


@pytest.mark.parametrize("kind,attn", [("llama", "eager"), ("llama", "sdpa"), ("qwen2", "eager"),
                                       ("qwen2", "sdpa"), ("gpt2", "eager"), ("gpt2", "sdpa")])
def test_batched_greedy_generation_equals_model_generate(kind, attn):
    model = build(kind, attn)
    gen = mmc.compile_generator(model, backend="eager", max_batch=3, max_seq_len=64)
    batch = prompts([4, 9, 14])
    out = gen.generate(batch, max_new_tokens=33)
    assert out.shape == (3, 14 + 33)
    for row, p in zip(out, batch):
        ref = reference(model, p, 33)
        assert torch.equal(row[: ref.numel()], ref), f"{kind}/{attn}: row differs from model.generate"
    decode = gen.programs["decode"]
    kv = decode.metadata["kv_cache"]
    assert kv["phase"] == "decode" and kv["layout"] == "bhsd" and kv["max_seq_len"] == 64
    assert len(decode.state_inputs()) == 2 * model.config.num_hidden_layers
    assert gen.programs["prefill"].metadata["kv_cache"]["phase"] == "prefill"
    growing = [n for n in decode.graph.nodes if n.target is torch.ops.aten.cat.default and n.args[1] == 2
               and n.meta["val"].dim() == 4]
    assert not growing  # no cat along the sequence: the cache no longer grows


def test_inductor_generation_equals_model_generate_and_step_is_capturable_but_for_the_device():
    model = build("llama", "sdpa")
    gen = mmc.compile_generator(model, backend="inductor", max_batch=2, max_seq_len=64)
    batch = prompts([6, 17], seed=1)
    out = gen.generate(batch, max_new_tokens=32)
    for row, p in zip(out, batch):
        ref = reference(model, p, 32)
        assert torch.equal(row[: ref.numel()], ref)
    p = batch[1]
    beams = gen.generate([p], max_new_tokens=32, num_beams=2)[0]  # beam search through Inductor, too
    assert torch.equal(beams, model.generate(p[None], max_new_tokens=32, num_beams=2, do_sample=False,
                                             eos_token_id=None, pad_token_id=0)[0])
    reasons = gen.programs["decode"].metadata["not_capturable"]
    assert reasons and all("CPU" in r for r in reasons), reasons  # on a GPU nothing would remain
    assert any("launches kernels step by step" in n for n in gen.cuda_graph_notes)


def test_bshd_layout_generates_the_same_tokens():
    model = build("gpt2")
    gen = mmc.compile_generator(model, backend="eager", max_batch=1, max_seq_len=40,
                                pass_options={"rewrite_kv_cache": {"layout": "bshd"}})
    assert gen.cache[0][0].shape == (1, 40, 4, 16)  # [B, L, H, D]
    p = prompts([7], seed=2)[0]
    assert torch.equal(gen.generate([p], 32)[0], reference(model, p, 32))


def test_without_the_growing_cache_before_rewrite_the_step_is_not_capturable():
    """The decode step as captured (dynamic past length) is rejected by capture_decode_loop, with the reason."""
    from mmcompile.integrations.transformers import decode_example

    model = build("llama")
    kwargs, shapes = decode_example(model, 1, torch.device("cpu"))
    prog = mmc.capture(model, (), kwargs, dynamic_shapes=shapes)
    result = mmc.optimize(prog, ["canonicalize", "fuse_attention", "capture_decode_loop"])
    assert result.program.metadata["capturable"] is False
    assert any("dynamic shape" in r for r in result.program.metadata["not_capturable"])


def test_errors_name_the_problem():
    model = build("llama")
    with pytest.raises(mmc.ShapeError, match="model.to"):
        mmc.compile_generator(model, backend="eager", dtype=torch.float16)
    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4))
    with pytest.raises(mmc.ModelSpecError, match="decoder_start_token_id"):  # where decoding starts
        mmc.compile_generator(t5, backend="eager")


@pytest.mark.parametrize("kind,attn", [("llama", "sdpa"), ("gpt2", "eager")])
def test_beam_search_equals_model_generate_with_num_beams(kind, attn):
    model = build(kind, attn)
    gen = mmc.compile_generator(model, backend="eager", max_batch=6, max_seq_len=64)
    batch = prompts([5, 12], seed=3)
    out = gen.generate(batch, max_new_tokens=33, num_beams=3)
    greedy = gen.generate(batch, max_new_tokens=33)
    for row, p in zip(out, batch):
        ref = model.generate(p[None], max_new_tokens=33, num_beams=3, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0]
        assert torch.equal(row[: ref.numel()], ref), f"{kind}: beam search differs from model.generate"
    assert not torch.equal(out, greedy)  # the beams found something greedy decoding did not
    beam = gen.programs["beam_decode"]
    assert beam.placeholders()[-1].name == "cache_rows"  # caches are reordered through the row table
    assert beam.op_counts()["aten.index_select.default"] == 0


def test_beam_search_errors():
    gen = mmc.compile_generator(build("gpt2"), backend="eager", max_batch=4, max_seq_len=64)
    with pytest.raises(mmc.ShapeError, match="2 prompts x 3 beams exceeds max_batch=4"):
        gen.generate(prompts([3, 4]), 4, num_beams=3)
    with pytest.raises(ValueError, match="deterministic"):
        gen.generate(prompts([3]), 4, num_beams=2, stop_tokens=[2])
