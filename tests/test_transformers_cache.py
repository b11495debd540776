"""Decode steps of unmodified transformers models, with their DynamicCache, capture and fuse."""

import copy

import pytest
import torch

import mmcompile as mmc

transformers = pytest.importorskip("transformers")

B, T = 2, 5


def build(kind: str):
    torch.manual_seed(0)
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=64)
    if kind == "llama":
        cfg = transformers.LlamaConfig(num_key_value_heads=2, **common)
        model = transformers.LlamaForCausalLM(cfg)
    elif kind == "qwen2":
        cfg = transformers.Qwen2Config(num_key_value_heads=2, **common)
        model = transformers.Qwen2ForCausalLM(cfg)
    else:
        cfg = transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64)
        model = transformers.GPT2LMHeadModel(cfg)
    model.config._attn_implementation = "eager"
    return model.eval()


def prefill(model, past: int):
    ids = torch.randint(3, 128, (B, past + 1))
    with torch.no_grad():
        out = model(input_ids=ids[:, :past], attention_mask=torch.ones(B, past, dtype=torch.long), use_cache=True)
    return dict(input_ids=ids[:, past:], cache=out.past_key_values,
                attention_mask=torch.ones(B, past + 1, dtype=torch.long),
                position_ids=torch.full((B, 1), past), use_cache=True)


def check(program, model, kwargs):
    with torch.no_grad():
        ref = model(**{k: copy.deepcopy(v) if k == "cache" else v for k, v in kwargs.items()})
    got = program(**kwargs)
    torch.testing.assert_close(got.logits, ref.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.past_key_values.layers[0].keys, ref.past_key_values.layers[0].keys)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_decode_step_with_dynamic_cache_captures_fuses_and_matches_eager(kind):
    model = build(kind)
    kwargs = prefill(model, T)
    prog = mmc.capture(model, (), kwargs)
    assert [n.name for n in prog.placeholders()][1:3] == ["cache_key_cache_0", "cache_key_cache_1"]
    result = mmc.optimize(prog, "default", verify=True)
    fused = result.report("fuse_attention").stats
    assert fused["fused"] == 2 and result.program.op_counts()["aten._softmax.default"] == 0
    if kind != "gpt2":
        assert fused["fused.gqa"] == 2
    check(result.program, model, kwargs)


def test_prefill_returning_a_dynamic_cache_captures():
    model = build("llama")
    ids = torch.randint(3, 128, (B, T))
    kwargs = dict(input_ids=ids, attention_mask=torch.ones(B, T, dtype=torch.long), use_cache=True)
    prog = mmc.capture(model, (), kwargs)
    out = prog(**kwargs)
    with torch.no_grad():
        ref = model(**kwargs)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    assert out.past_key_values.layers[1].values.shape == (B, 2, T, 16)


def test_decode_with_a_dynamic_past_length_serves_every_length():
    model = build("llama")
    kwargs = prefill(model, T)
    A = torch.export.Dim.AUTO
    L = model.config.num_hidden_layers
    shapes = dict(input_ids=None, cache=[[{2: A}] * L, [{2: A}] * L], attention_mask={1: A},
                  position_ids=None, use_cache=None)
    result = mmc.optimize(mmc.capture(model, (), kwargs, dynamic_shapes=shapes), "default", verify=True)
    assert result.report("fuse_attention").stats["fused.gqa"] == L
    for past in (1, 3, 12):
        check(result.program, model, prefill(model, past))
