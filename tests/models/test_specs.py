"""Model specs: llama:NAME, hf:PATH, py:FILE:FACTORY, and their errors."""

import json
import textwrap

import pytest
import torch

import mmcompile as mmc
from mmcompile.models import llama


def test_llama_spec_builds_random_model():
    m = mmc.models.build("llama:tiny")
    assert isinstance(m, llama.Llama) and not m.training
    assert m.config.n_layers == llama.CONFIGS["tiny"].n_layers


@pytest.mark.parametrize("spec,match", [
    ("llama", "malformed model spec"),
    ("gpt:tiny", "unknown model spec"),
    ("llama:13b", "unknown llama config '13b'"),
    ("llama:", "unknown model spec"),
    ("hf:/does/not/exist", "no config.json"),
    ("py:nofile.py:make", "does not exist"),
    ("py:onlyfile.py", "expected py:FILE.py:FACTORY"),
])
def test_malformed_specs_give_one_clear_error(spec, match):
    with pytest.raises(mmc.ModelSpecError, match=match):
        mmc.models.build(spec)


def test_hf_llama_checkpoint_loads_into_our_llama(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path)
    ours = mmc.models.build(f"hf:{tmp_path}")
    assert isinstance(ours, llama.Llama)
    ids = torch.randint(0, 96, (1, 6))
    with torch.no_grad():
        ref = hf(ids).logits
        out = ours(ids, torch.arange(6)[None], ours.empty_cache(1, 16))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_hf_config_only_gives_random_llama(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
        "num_key_value_heads": 4, "num_hidden_layers": 1, "vocab_size": 50, "max_position_embeddings": 32,
        "rms_norm_eps": 1e-5}))
    m = mmc.models.build(f"hf:{tmp_path}")
    assert isinstance(m, llama.Llama) and m.config.vocab_size == 50


def test_hf_bad_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(mmc.ModelSpecError, match="not valid JSON"):
        mmc.models.build(f"hf:{tmp_path}")


def test_py_factory(tmp_path):
    f = tmp_path / "my_models.py"
    f.write_text(textwrap.dedent("""
        import torch
        def make():
            return torch.nn.Linear(3, 3)
        def not_a_module():
            return 3
    """))
    assert isinstance(mmc.models.build(f"py:{f}:make"), torch.nn.Linear)
    with pytest.raises(mmc.ModelSpecError, match="not a torch.nn.Module"):
        mmc.models.build(f"py:{f}:not_a_module")
    with pytest.raises(mmc.ModelSpecError, match="no callable 'missing'"):
        mmc.models.build(f"py:{f}:missing")
