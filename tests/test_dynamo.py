"""torch.compile(model, backend="mmcompile") on our Llama and on a transformers Llama."""

import pytest
import torch

import mmcompile as mmc


@pytest.fixture(autouse=True)
def _reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_backend_is_registered_through_the_entry_point():
    from torch._dynamo import list_backends
    from torch._dynamo.backends.registry import lookup_backend

    assert "mmcompile" in list_backends(exclude_tags=())
    from mmcompile.dynamo import mmcompile_backend

    assert lookup_backend("mmcompile") is mmcompile_backend


def test_our_llama_forward_with_default_pipeline_and_inductor(tiny_llama):
    tokens = torch.randint(0, 256, (2, 7))
    pos = torch.arange(7).expand(2, 7)
    with torch.no_grad():
        ref_cache = tiny_llama.empty_cache(2, 32)
        ref = tiny_llama(tokens, pos, ref_cache)
        cache = tiny_llama.empty_cache(2, 32)
        out = torch.compile(tiny_llama, backend="mmcompile")(tokens, pos, cache)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cache[0][0], ref_cache[0][0], rtol=1e-5, atol=1e-5)  # in-place cache update kept


def _hf_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_transformers_llama_with_options(monkeypatch):
    model = _hf_llama()
    ids = torch.randint(0, 128, (2, 9))
    seen = []
    import mmcompile.dynamo as dyn

    real = dyn.mmcompile_backend

    def spy(gm, example_inputs, **kw):
        fn = real(gm, example_inputs, **kw)
        seen.append(fn)
        return fn

    with torch.no_grad():
        ref = model(ids).logits
        out = torch.compile(model, backend=spy, options={"backend": "eager", "verify": True,
                                                         "passes": ["canonicalize", "eliminate_dead_code"]})(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert seen, "the mmcompile backend was never called"
    assert [r.name for r in seen[0].mmcompile_reports] == ["canonicalize", "eliminate_dead_code"]
    assert seen[0].mmcompile_program.op_counts()["aten.mm.default"] > 0


def test_transformers_llama_default_backend():
    model = _hf_llama()
    ids = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        ref = model(ids).logits
        out = torch.compile(model, backend="mmcompile")(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_unknown_option_is_a_clear_error():
    f = torch.compile(torch.nn.Linear(4, 4), backend="mmcompile", options={"pases": "default"})
    with pytest.raises(Exception, match="unknown option.*pases"):
        f(torch.randn(2, 4))
