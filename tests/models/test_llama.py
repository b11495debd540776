"""Tests of the Llama reference model (models/llama.py): shapes, cache protocol, export, HF parity, checkpoints."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.export import Dim, export

from mmcompile.models import llama as L
from mmcompile.models.llama import CheckpointError

VOCAB = L.CONFIGS["tiny"].vocab_size


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _tokens(*shape, seed=0):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def _positions(B, S, start=0):
    return torch.arange(start, start + S).expand(B, S).contiguous()


def _recompute_last(model, seq):
    """Logits of the last token of a 1-D sequence, from scratch with a fresh cache."""
    n = seq.numel()
    return model(seq[None], _positions(1, n), model.empty_cache(1, n))[0, -1]


# ---------------------------------------------------------------------------------------------- config


def test_config_properties_and_validation():
    c = L.CONFIGS["tiny"]
    assert (c.head_dim, c.kv_heads) == (16, 2)
    assert L.CONFIGS["7b"].kv_heads == 32
    with pytest.raises(ValueError, match="divisible by n_heads"):
        L.LlamaConfig(dim=100, n_heads=3)
    with pytest.raises(ValueError, match="divisible by n_kv_heads"):
        L.LlamaConfig(dim=64, n_heads=4, n_kv_heads=3)


def test_num_parameters():
    assert L.num_parameters(L.CONFIGS["7b"]) == pytest.approx(6.74e9, rel=2e-3)
    assert L.num_parameters(L.CONFIGS["8b"]) == pytest.approx(8.03e9, rel=2e-3)
    for kw in ({}, {"tie_word_embeddings": True}, {"n_kv_heads": None}):
        model = L.build("tiny", **kw)
        assert L.num_parameters(model.config) == sum(p.numel() for p in model.parameters())
    with torch.device("meta"):  # no allocation
        big = L.Llama(L.CONFIGS["8b"])
    assert L.num_parameters(big.config) == sum(p.numel() for p in big.parameters())


def test_build_errors():
    with pytest.raises(ValueError, match=r"unknown Llama config 'huge'.*known configs: 7b, 8b, tiny"):
        L.build("huge")
    with pytest.raises(ValueError, match=r"unknown LlamaConfig field\(s\) 'n_experts'"):
        L.build("tiny", n_experts=4)


def test_build_is_deterministic_and_tied():
    a, b = L.build("tiny", seed=1), L.build("tiny", seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.output.weight, L.build("tiny", seed=2).output.weight)
    tied = L.build("tiny", tie_word_embeddings=True)
    assert tied.output.weight is tied.tok_embeddings.weight
    bf = L.build("tiny", dtype=torch.bfloat16)
    assert bf.output.weight.dtype == torch.bfloat16 and bf.empty_cache(1)[0][0].dtype == torch.bfloat16
    assert bf(_tokens(1, 3), _positions(1, 3), bf.empty_cache(1, 8)).dtype == torch.bfloat16
    cos, _ = L.rope_tables(16, 128, 10000.0)
    assert torch.equal(a.rope_cos, cos)  # recomputed after to_empty


# ---------------------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("n_kv_heads", [2, None], ids=["gqa", "mha"])
def test_forward_shapes(n_kv_heads):
    model = L.build("tiny", n_kv_heads=n_kv_heads)
    kv = n_kv_heads or 4
    cache = model.empty_cache(2, 32)
    assert len(cache) == 2 and cache[0][0].shape == (2, kv, 32, 16)
    assert model.empty_cache(3)[1][1].shape == (3, kv, 128, 16)

    assert model(_tokens(2, 6), _positions(2, 6), cache).shape == (2, 6, VOCAB)
    out = model(_tokens(2, 6), _positions(2, 6), cache, output_pos=torch.tensor([5, 2]))
    assert out.shape == (2, 1, VOCAB) and out.dtype == torch.float32
    assert model(_tokens(2, 1), torch.tensor([[6], [3]]), cache).shape == (2, 1, VOCAB)
    assert model(_tokens(2, 1), torch.tensor([[6], [3]]), cache, torch.tensor([0, 0])).shape == (2, 1, VOCAB)


def test_output_pos_selects_rows():
    model = L.build("tiny")
    tokens = _tokens(2, 6)
    full = model(tokens, _positions(2, 6), model.empty_cache(2, 16))
    picked = model(tokens, _positions(2, 6), model.empty_cache(2, 16), output_pos=torch.tensor([5, 2]))
    torch.testing.assert_close(picked[:, 0], torch.stack([full[0, 5], full[1, 2]]))


# ---------------------------------------------------------------------------------------------- cache


@pytest.mark.parametrize("n_kv_heads", [2, None], ids=["gqa", "mha"])
def test_decode_matches_full_recompute(n_kv_heads):
    model = L.build("tiny", n_kv_heads=n_kv_heads)
    seq = _tokens(5)
    cache = model.empty_cache(1, 32)
    logits = model(seq[None], _positions(1, 5), cache, output_pos=torch.tensor([4]))
    for _ in range(4):
        torch.testing.assert_close(logits[0, -1], _recompute_last(model, seq), rtol=1e-5, atol=1e-5)
        nxt = logits[0, -1].argmax()
        pos = seq.numel()
        seq = torch.cat([seq, nxt[None]])
        logits = model(nxt.view(1, 1), torch.tensor([[pos]]), cache)
    torch.testing.assert_close(logits[0, -1], _recompute_last(model, seq), rtol=1e-5, atol=1e-5)


def test_ragged_batch_matches_single_rows():
    model = L.build("tiny")
    prompts = [_tokens(6, seed=1), _tokens(3, seed=2)]
    lens = [p.numel() for p in prompts]
    tokens = torch.zeros(2, 6, dtype=torch.long)  # right-padded with token 0
    for b, p in enumerate(prompts):
        tokens[b, : p.numel()] = p
    cache = model.empty_cache(2, 32)
    logits = model(tokens, _positions(2, 6), cache, output_pos=torch.tensor(lens) - 1)  # [2, 1, V]
    seqs = [p.clone() for p in prompts]
    for step in range(4):
        for b in range(2):
            torch.testing.assert_close(logits[b, 0], _recompute_last(model, seqs[b]), rtol=1e-5, atol=1e-5)
        nxt = logits[:, 0].argmax(-1)  # [2]
        pos = torch.tensor([[s.numel()] for s in seqs])  # per-row positions
        seqs = [torch.cat([s, n[None]]) for s, n in zip(seqs, nxt)]
        logits = model(nxt[:, None], pos, cache)


def test_generate_reference_stops_on_stop_token():
    model = L.build("tiny")
    prompt = _tokens(4)
    out = model.generate_reference(prompt, 6)
    assert out.shape == (10,) and out.dtype == torch.long and torch.equal(out[:4], prompt)
    stop = int(out[6])
    first = 4 + out[4:].tolist().index(stop)
    stopped = model.generate_reference(prompt, 6, stop_tokens=[stop])
    assert torch.equal(stopped, out[: first + 1]) and int(stopped[-1]) == stop
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        model.generate_reference(prompt, 200)


# ---------------------------------------------------------------------------------------------- export


def _same_caches(a, b):
    return all(torch.equal(x, y) for pa, pb in zip(a, b) for x, y in zip(pa, pb))


def test_export_prefill_dynamic_seq_and_decode():
    model = L.build("tiny")
    n_layers = model.config.n_layers
    seq = Dim("seq", min=2, max=model.config.max_seq_len)
    cache_spec = [(None, None)] * n_layers

    ep = export(
        model, (_tokens(2, 7), _positions(2, 7), model.empty_cache(2, 32)),
        {"output_pos": torch.tensor([6, 3])},
        dynamic_shapes={"tokens": {1: seq}, "input_pos": {1: seq}, "cache": cache_spec, "output_pos": None},
        strict=False,
    )
    eager_cache, exported_cache = model.empty_cache(2, 32), model.empty_cache(2, 32)
    for S in (5, 9):  # sizes other than the example one
        tokens, pos, out_pos = _tokens(2, S, seed=S), _positions(2, S), torch.tensor([S - 1, 1])
        got = ep.module()(tokens, pos, exported_cache, output_pos=out_pos)
        want = model(tokens, pos, eager_cache, output_pos=out_pos)
        torch.testing.assert_close(got, want)
        assert _same_caches(exported_cache, eager_cache)

    ep_full = export(
        model, (_tokens(1, 4), _positions(1, 4), model.empty_cache(1, 16)),
        dynamic_shapes={"tokens": {1: seq}, "input_pos": {1: seq}, "cache": cache_spec},
        strict=False,
    )
    tokens = _tokens(1, 6)
    torch.testing.assert_close(
        ep_full.module()(tokens, _positions(1, 6), model.empty_cache(1, 16)),
        model(tokens, _positions(1, 6), model.empty_cache(1, 16)),
    )

    ep_decode = export(model, (_tokens(2, 1), torch.tensor([[9], [9]]), model.empty_cache(2, 32)), strict=False)
    for step in range(3):
        tokens, pos = _tokens(2, 1, seed=step), torch.tensor([[9 + step], [2 + step]])  # rows differ
        got = ep_decode.module()(tokens, pos, exported_cache)
        torch.testing.assert_close(got, model(tokens, pos, eager_cache))
        assert got.shape == (2, 1, VOCAB) and _same_caches(exported_cache, eager_cache)


# ---------------------------------------------------------------------------------------------- Hugging Face


def _hf_model(seed=0, **kw):
    transformers = pytest.importorskip("transformers")
    cfg = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
               rms_norm_eps=1e-5, attn_implementation="eager")
    cfg.update(kw)
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()
    for name, p in hf.named_parameters():  # HF inits norms to ones: make them distinguishable
        if "norm" in name:
            p.normal_(1.0, 0.2)
    return hf


def _assert_matches_hf(hf, model, seq_len=11):
    tokens = _tokens(2, seq_len, seed=3)
    want = hf(input_ids=tokens).logits
    got = model(tokens, _positions(2, seq_len), model.empty_cache(2, 32))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_llama")
    with torch.no_grad():
        hf = _hf_model()
    hf.save_pretrained(path)
    return hf, path


@pytest.fixture
def ckpt(hf_checkpoint, tmp_path):
    """A private copy of the checkpoint that a test may damage."""
    dst = tmp_path / "ckpt"
    shutil.copytree(hf_checkpoint[1], dst)
    return dst


def test_from_pretrained_matches_transformers(hf_checkpoint):
    hf, path = hf_checkpoint
    model = L.from_pretrained(path)
    assert model.config == L.LlamaConfig(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                         ffn_dim=128, norm_eps=1e-5, max_seq_len=128)
    assert model.output.weight.dtype == torch.float32
    _assert_matches_hf(hf, model)
    bf = L.from_pretrained(path, dtype=torch.bfloat16)
    assert bf.output.weight.dtype == torch.bfloat16 and bf.rope_cos.dtype == torch.float32


@pytest.mark.parametrize("key", ["dtype", "torch_dtype"])
def test_from_pretrained_dtype_from_config(ckpt, key):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.pop("dtype", None), cfg.pop("torch_dtype", None)
    cfg[key] = "bfloat16"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    assert L.from_pretrained(ckpt).output.weight.dtype == torch.bfloat16


def test_from_pretrained_tied_embeddings(tmp_path):
    hf = _hf_model(seed=1, tie_word_embeddings=True, num_key_value_heads=4)
    hf.save_pretrained(tmp_path)
    model = L.from_pretrained(tmp_path)
    assert model.config.tie_word_embeddings and model.config.kv_heads == 4
    assert model.output.weight is model.tok_embeddings.weight
    _assert_matches_hf(hf, model)


def test_from_pretrained_sharded(tmp_path):
    hf = _hf_model(seed=2)
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    _assert_matches_hf(hf, L.from_pretrained(tmp_path))


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def _edit_weights(path, edit):
    file = path / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_error_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        L.from_pretrained(tmp_path / "nope")


def test_error_no_config(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        L.from_pretrained(ckpt)


def test_error_no_safetensors(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no safetensors weights"):
        L.from_pretrained(ckpt)


def test_error_missing_tensor(ckpt):
    _edit_weights(ckpt, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors.*model\.layers\.1\.mlp\.up_proj\.weight \(1 in all\)"):
        L.from_pretrained(ckpt)


def test_error_unexpected_tensor(ckpt):
    _edit_weights(ckpt, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}))
    with pytest.raises(CheckpointError, match=r"does not use: model\.layers\.0\.self_attn\.q_proj\.bias"):
        L.from_pretrained(ckpt)


def test_error_misshaped_tensor(ckpt):
    _edit_weights(ckpt, lambda t: t.update({"model.layers.0.self_attn.q_proj.weight": torch.zeros(32, 64)}))
    with pytest.raises(CheckpointError) as err:
        L.from_pretrained(ckpt)
    assert ("model.layers.0.self_attn.q_proj.weight has shape [32, 64] but the config expects [64, 64]"
            in str(err.value))


def test_error_non_llama(ckpt):
    _edit_config(ckpt, model_type="gpt2")
    with pytest.raises(CheckpointError, match="model_type 'gpt2' is not supported"):
        L.from_pretrained(ckpt)


def test_error_rope_scaling(ckpt):
    _edit_config(ckpt, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0})
    with pytest.raises(CheckpointError, match=r"rope scaling.*'llama3'.*not supported"):
        L.from_pretrained(ckpt)


# ---------------------------------------------------------------------------------------------- config_from_hf


def _hf_dict(**kw):
    d = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_attention_heads=4,
             num_key_value_heads=4, num_hidden_layers=2, rms_norm_eps=1e-6, vocab_size=VOCAB,
             max_position_embeddings=256)
    d.update(kw)
    return d


def test_config_from_hf():
    c = L.config_from_hf(_hf_dict())
    assert (c.n_kv_heads, c.kv_heads, c.rope_theta, c.norm_eps, c.max_seq_len) == (None, 4, 10000.0, 1e-6, 256)
    assert L.config_from_hf(_hf_dict(rope_theta=5e5)).rope_theta == 5e5
    assert L.config_from_hf(_hf_dict(rope_parameters={"rope_type": "default", "rope_theta": 5e5})).rope_theta == 5e5
    assert L.config_from_hf(_hf_dict(rope_scaling=None, head_dim=16)).head_dim == 16
    assert L.config_from_hf(_hf_dict(model_type="mistral", sliding_window=None, num_key_value_heads=2)).kv_heads == 2


@pytest.mark.parametrize("kw, message", [
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope scaling"),
    (dict(head_dim=32), "head_dim=32 is not supported"),
    (dict(mlp_bias=True), "mlp_bias=true is not supported"),
    (dict(attention_bias=True), "attention_bias=true is not supported"),
    (dict(model_type="mistral", sliding_window=4096), "sliding_window"),
    (dict(model_type="gpt2"), "model_type 'gpt2'"),
])
def test_config_from_hf_unsupported(kw, message):
    with pytest.raises(ValueError, match=message):
        L.config_from_hf(_hf_dict(**kw))


def test_eager_attention_variant_matches_sdpa():
    sdpa = L.build("tiny", seed=3)
    eager = L.build("tiny", seed=3, attn_impl="eager")
    tokens = torch.randint(0, 256, (2, 6))
    pos = torch.arange(6).expand(2, 6)
    with torch.no_grad():
        a = sdpa(tokens, pos, sdpa.empty_cache(2, 16))
        b = eager(tokens, pos, eager.empty_cache(2, 16))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="attn_impl"):
        L.build("tiny", attn_impl="flash")
