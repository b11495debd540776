"""The Chameleon decoder (models/chameleon.py): QK-norm, norm placement, image codes, and decoding
through mmcompile equal to the model's own reference decoding."""

import pytest
import torch

import mmcompile as mmc
from mmcompile.errors import ModelSpecError
from mmcompile.models import chameleon as C


def prompts(*lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, C.CONFIGS["tiny"].vocab_size, (n,), generator=g) for n in lengths]


# through Inductor: test_command_line_compiles_and_checks_chameleon below (the whole graph, against eager) and
# the compiled tasks in test_chameleon_tasks.py (layer by layer)
@pytest.mark.parametrize("backend", ["eager"])
def test_compiled_decoding_equals_the_reference_token_for_token(backend):
    model = mmc.models.build("chameleon:tiny", seed=1)
    gen = mmc.compile_generator(model, backend=backend, max_batch=3, max_seq_len=80)
    ps = prompts(9, 3, 17)
    out = gen.generate(ps, 36)
    for row, p in zip(out, ps):
        ref = model.generate_reference(p, 36)
        assert torch.equal(row[: ref.numel()], ref)


def test_qk_norm_acts_on_every_layer_and_survives_the_pipeline():
    model = mmc.models.build("chameleon:tiny", seed=2)
    L = model.config.n_layers
    assert tuple(model.layers[0].attention.q_norm.weight.shape) == (4, 16)  # per head, as transformers lays it out
    assert tuple(model.layers[0].attention.k_norm.weight.shape) == (2, 16)
    tokens, pos = torch.randint(0, 512, (2, 6)), torch.arange(6)[None].expand(2, 6)
    prog = mmc.capture(model, (tokens, pos, model.empty_cache(2, 32)))
    norms = sum(v for k, v in prog.op_counts().items() if "layer_norm" in k)
    assert norms == 2 * L  # q and k of every layer
    result = mmc.optimize(prog, "default")
    assert result.report("fuse_linears").stats["fused"] == 5 * L  # q/k/v and gate/up still stack
    with torch.no_grad():
        ref = model(tokens, pos, model.empty_cache(2, 32))
        got = mmc.lower(result.program, "inductor")(tokens, pos, model.empty_cache(2, 32))
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
        plain = mmc.models.build("chameleon:tiny", seed=2, qk_norm=False)(tokens, pos, model.empty_cache(2, 32))
    assert (plain - ref).abs().max() > 1e-2  # the norm changes the result: it is not a no-op


def test_eager_attention_with_qk_norm_is_fused_into_sdpa():
    model = mmc.models.build("chameleon:tiny", attn_impl="eager")
    tokens, pos = torch.randint(0, 512, (1, 8)), torch.arange(8)[None]
    result = mmc.optimize(mmc.capture(model, (tokens, pos, model.empty_cache(1, 16))), "default")
    assert result.report("fuse_attention").stats["fused"] == model.config.n_layers
    assert result.program.op_counts()["aten._softmax.default"] == 0


def test_norm_after_attention_and_ffn_as_in_the_34b_model():
    model = mmc.models.build("chameleon:tiny", seed=3, swin_norm=True)
    gen = mmc.compile_generator(model, backend="eager", max_batch=2, max_seq_len=64)  # the pipeline's rewrites
    ps = prompts(5, 11, seed=4)
    out = gen.generate(ps, 32)
    for row, p in zip(out, ps):
        ref = model.generate_reference(p, 32)
        assert torch.equal(row[: ref.numel()], ref)
    x = torch.randn(1, 3, 64)
    block = model.layers[0]
    block.ffn_norm.weight.data.mul_(0)  # swin: the FFN's output is normalized, so a zero norm weight drops it
    cos = sin = torch.ones(1, 1, 3, 16)
    cache = model.empty_cache(1, 8)[0]
    mask = torch.ones(1, 1, 3, 8, dtype=torch.bool)
    idx = (torch.zeros(1, 1, 1, dtype=torch.long), torch.arange(2)[None, :, None], torch.arange(3)[None, None])
    with torch.no_grad():
        h = block(x, cos, sin, mask, idx, cache)
        attn = x + block.attention_norm(block.attention(x, cos, sin, mask, idx, model.empty_cache(1, 8)[0]))
    torch.testing.assert_close(h, attn)


def test_configs_match_the_published_shapes_and_bad_configs_are_refused():
    from mmcompile.models import llama

    assert round(llama.num_parameters(C.CONFIGS["7b"]) / 1e9, 1) == 7.0
    assert round(llama.num_parameters(C.CONFIGS["34b"]) / 1e9, 1) == 34.3
    assert C.CONFIGS["7b"].image_token_range == range(4, 8196)
    with pytest.raises(ValueError, match="do not fit the vocabulary"):
        C.ChameleonConfig(vocab_size=100, dim=64, n_layers=1, n_heads=4, ffn_dim=64, image_codes=200)
    with pytest.raises(ValueError, match="boi_token=10 must be a token of the vocabulary outside the image codes"):
        C.ChameleonConfig(vocab_size=512, dim=64, n_layers=1, n_heads=4, ffn_dim=64, image_codes=64, boi_token=10)
    with pytest.raises(ModelSpecError, match="unknown chameleon config 'huge'; known: tiny, 7b, 34b"):
        mmc.models.build("chameleon:huge")


def test_command_line_compiles_and_checks_chameleon():
    import subprocess

    run = subprocess.run(["mmcompile", "compile", "chameleon:tiny", "--max-new-tokens", "12"], capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "matches eager token for token: yes" in run.stdout + run.stderr, run.stderr
