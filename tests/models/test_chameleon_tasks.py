"""Chameleon's tasks end to end (mmcompile.runtime.chameleon), compiled against eager, and local checkpoints."""

import json

import pytest
import torch

from mmcompile.cli import main
from mmcompile.errors import ShapeError
from mmcompile.models import chameleon, vqgan
from mmcompile.runtime.chameleon import ChameleonGenerator, compile_chameleon, load_image, save_image


@pytest.fixture(scope="module")
def modules():
    return chameleon.build_with_tokenizer("tiny", seed=0)


@pytest.fixture(scope="module")
def eager(modules):
    return ChameleonGenerator.from_modules(*modules)


@pytest.fixture(scope="module")
def compiled(modules):
    # each distinct layer compiled once, as on the GPU (the whole-graph decoder: tests/models/test_chameleon.py)
    return compile_chameleon(*modules, backend="inductor", backend_options={"regions": "on"})


def _pixels(seed):
    return torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_every_phase_is_compiled_and_every_task_equals_eager(modules, eager, compiled):
    model, vq = modules
    assert {"prefill", "decode", "vq_encode", "vq_decode"} <= set(compiled.programs)
    from mmcompile.runtime.generator import _unwrap
    assert _unwrap(compiled.generator.decode_fn).regions[0].startswith("regions: 2 layers")
    image = _pixels(0)
    prompt = [100, 200, 300, 400]
    # text-to-image: one row and its unconditioned row in a batch of two, guided, image codes only
    a, b = compiled.run("text-to-image", prompt), eager.run("text-to-image", prompt)
    assert a.codes.shape == (1, 64) and a.pixels.shape == (1, 3, 32, 32)
    assert torch.equal(a.codes, b.codes)
    torch.testing.assert_close(a.pixels, b.pixels, rtol=1e-4, atol=1e-4)
    N = vq.config.grid ** 2
    new = a.tokens[0, len(prompt) + 1:len(prompt) + 1 + N]
    assert a.tokens[0, len(prompt)] == model.config.boi_token and set(new.tolist()) <= set(model.config.image_token_range)
    torch.testing.assert_close(a.pixels, vq.decode(a.codes))
    # guidance changes the image (the scale reaches the choice)
    assert not torch.equal(compiled.run("text-to-image", prompt, guidance_scale=None).codes, a.codes)
    # text-image-to-image
    a, b = compiled.run("text-image-to-image", prompt, image), eager.run("text-image-to-image", prompt, image)
    assert torch.equal(a.codes, b.codes)
    assert torch.equal(a.tokens[0, 4:4 + N + 2], eager.image_tokens(image)[0])  # the input image's tokens
    # text-to-text and image-to-text: text tokens only
    for task, img in (("text-to-text", None), ("image-to-text", image)):
        x, y = compiled.run(task, prompt, img, max_new_tokens=12), eager.run(task, prompt, img, max_new_tokens=12)
        assert x.shape == (1, 12) and torch.equal(x, y)
        c = model.config
        assert not set(x[0].tolist()) & (set(c.image_token_range) | {c.boi_token, c.eoi_token})
    # captioning reads the image: another image, another caption
    assert not torch.equal(compiled.run("image-to-text", prompt, _pixels(5), max_new_tokens=12), x)


def test_image_tokens_are_boi_codes_eoi_and_bad_inputs_are_named(modules, eager):
    model, vq = modules
    tokens = eager.image_tokens(_pixels(1))
    c = model.config
    assert tokens[0, 0] == c.boi_token and tokens[0, -1] == c.eoi_token
    assert torch.equal(tokens[0, 1:-1] - c.image_token_start, vq.encode(_pixels(1))[0])
    with pytest.raises(ShapeError, match=r"images must be float pixels \[B, 3, 32, 32\]"):
        eager.image_tokens(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="needs an input image"):
        eager.run("image-to-text", [100])
    with pytest.raises(ValueError, match="takes no input image; use image-to-text"):
        eager.run("text-to-text", [100], _pixels(0))
    with pytest.raises(ValueError, match="unknown task 'caption'"):
        eager.run("caption", [100])
    with pytest.raises(ShapeError, match="outside the vocabulary"):
        eager.run("text-to-image", [100, 100_000])


def test_png_round_trip_and_image_files_are_cropped_and_resized(tmp_path, modules):
    pixels = _pixels(2)
    path = save_image(pixels, tmp_path / "x.png")
    back = load_image(path, 32)
    assert back.shape == (1, 3, 32, 32)
    assert float((back - pixels).abs().max()) <= 1 / 127.5 + 1e-6  # 8-bit quantization only
    from PIL import Image

    Image.new("RGB", (90, 60), (255, 0, 0)).save(tmp_path / "wide.png")
    red = load_image(tmp_path / "wide.png", 32)
    assert red.shape == (1, 3, 32, 32) and torch.allclose(red[0, 0], torch.ones(32, 32))
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="not an image"):
        load_image(tmp_path / "bad.png", 32)
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "missing.png", 32)


# ------------------------------------------------------------------ local checkpoints (public layout)


def _transformers_checkpoint(tmp_path):
    """A tiny transformers ChameleonForConditionalGeneration written with save_pretrained. Its vocabulary
    names the image tokens as the public tokenizer does and numbers them in the names' sorted order, so
    code c is not token 4 + c."""
    transformers = pytest.importorskip("transformers")
    n = 64
    letters = lambda c: "".join(chr(ord("A") + int(d)) for d in str(c))  # noqa: E731
    vocab = {"<image>": 90, "<racm3:break>": 80, "<eoss>": 81}
    vocab.update({name: 4 + i for i, name in enumerate(sorted(f"IMGIMG{letters(c)}Z" for c in range(n)))})
    cfg = transformers.ChameleonConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, vocabulary_map=vocab,
        vq_config=dict(embed_dim=16, num_embeddings=n, double_latent=False, latent_channels=32, resolution=32,
                       in_channels=3, base_channels=32, channel_multiplier=[1, 1, 2], num_res_blocks=1,
                       attn_resolutions=[], dropout=0.0))
    torch.manual_seed(0)
    hf = transformers.ChameleonForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # QK-norm and norms away from 1 / 0 so a wrong mapping shows
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    return hf


def test_a_transformers_checkpoint_loads_and_matches_transformers(tmp_path):
    hf = _transformers_checkpoint(tmp_path)
    model, vq = chameleon.from_pretrained(tmp_path)
    c = model.config
    assert (c.boi_token, c.eoi_token) == (80, 81) and c.image_token_ids is not None
    assert c.image_token_table() != list(c.image_token_range)  # the permuted vocabulary is kept
    ids = torch.randint(100, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    pixels = torch.cat([_pixels(3), _pixels(4)])
    with torch.no_grad():
        ref = hf.lm_head(hf.model(input_ids=ids).last_hidden_state)
        ours = model(ids, torch.arange(12)[None].expand(2, 12), model.empty_cache(2, 16))
        theirs_tokens = hf.model.get_image_tokens(pixels)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    # the tokenizer's encoder gives the image tokens transformers gives
    runner = ChameleonGenerator.from_modules(model, vq, max_batch=2)
    assert torch.equal(runner.image_tokens(pixels)[:, 1:-1], theirs_tokens.long())
    # transformers ships no VQ decoder: text tasks run, image output is refused with the reason
    assert not vq.has_decoder
    assert runner.run("image-to-text", [[300, 301]], _pixels(3), max_new_tokens=4).shape == (1, 4)
    with pytest.raises(RuntimeError, match="without its decoder's weights"):
        runner.run("text-to-image", [[300, 301]])


def test_the_tokenizer_decoder_loads_from_taming_names(tmp_path):
    from safetensors.torch import save_file

    _transformers_checkpoint(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())["vq_config"]
    levels = len(cfg["channel_multiplier"])
    donor = vqgan.build("tiny", seed=7)  # the same shapes as the checkpoint's tokenizer
    extra = {"model.vqmodel." + vqgan.to_taming_name(name, levels): p.detach().clone()
             for name, p in donor.named_parameters() if name.startswith("decoder.")}
    assert "model.vqmodel.decoder.up.0.block.0.conv1.weight" in extra and "model.vqmodel.decoder.mid.attn_1.proj_out.bias" in extra
    save_file(extra, str(tmp_path / "vq-decoder.safetensors"))
    index = tmp_path / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"].update({k: "vq-decoder.safetensors" for k in extra})
        index.write_text(json.dumps(data))
    else:  # one file: make it an index over both
        from safetensors import safe_open

        with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
            names = list(f.keys())
        weight_map = {k: "model.safetensors" for k in names} | {k: "vq-decoder.safetensors" for k in extra}
        index.write_text(json.dumps({"weight_map": weight_map}))
    model, vq = chameleon.from_pretrained(tmp_path)
    assert vq.has_decoder
    codes = torch.randint(0, 64, (1, 64), generator=torch.Generator().manual_seed(0))
    donor.post_quant_conv.load_state_dict(vq.post_quant_conv.state_dict())  # these come from the checkpoint
    donor.codebook.load_state_dict(vq.codebook.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(vq.decode(codes), donor.decode(codes))


def test_bad_chameleon_configs_are_named(tmp_path):
    _transformers_checkpoint(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["vq_config"]["attn_resolutions"] = [16]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(chameleon.llama.CheckpointError, match="attn_resolutions"):
        chameleon.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="64 distinct token ids"):
        chameleon.ChameleonConfig(vocab_size=512, dim=64, n_layers=1, n_heads=4, ffn_dim=64, image_codes=64,
                                  image_token_ids=(5,) * 64, boi_token=80, eoi_token=81)


# ------------------------------------------------------------------ command line


def test_command_line_runs_the_tasks_and_writes_the_png(tmp_path, capsys):
    out = tmp_path / "generated.png"
    rc = main(["compile", "chameleon:tiny", "--backend", "eager", "--task", "text-to-image", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 0 and "matches eager image code for code: yes" in err
    assert out.is_file() and load_image(out, 32).shape == (1, 3, 32, 32)
    rc = main(["compile", "chameleon:tiny", "--backend", "eager", "--task", "image-to-text", "--image", str(out),
               "--max-new-tokens", "6"])
    err = capsys.readouterr().err
    assert rc == 0 and "matches eager token for token: yes" in err and "vq_encode" in err


@pytest.mark.parametrize("argv, message", [
    (["compile", "llama:tiny", "--task", "text-to-image"], "--task runs Chameleon models"),
    (["compile", "chameleon:tiny", "--task", "text-to-text", "--image", "x.png"], "takes no --image"),
    (["compile", "chameleon:tiny", "--task", "text-to-image", "--guidance-scale", "0"], "must be positive"),
    (["compile", "llama:tiny", "--image", "x.png"], "--image is an input of --task"),
])
def test_command_line_refuses_bad_task_arguments(argv, message):
    with pytest.raises(SystemExit, match=message):
        main(argv)
