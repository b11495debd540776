"""Artifacts of the inductor backend: AOTInductor packages (model.pt2) with their weights beside them
(weights.safetensors, one copy per tensor across a Generator's phases) that load without the model or a
compile, update the KV cache in place, and generate what the compiled Generator generates."""

import json
import shutil

import pytest
import torch

import mmcompile as mmc


def decode_call(model, batch=2, slots=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    cache = model.empty_cache(batch, slots)
    for layer in cache:
        for t in layer:
            t.copy_(torch.randn(t.shape, generator=g))
    tokens = torch.randint(0, model.config.vocab_size, (batch, 1), generator=g)
    return tokens, torch.tensor([[3], [11]]), cache


def clone(cache):
    return [tuple(t.clone() for t in layer) for layer in cache]


@pytest.fixture(scope="module")
def step_artifact(tiny_llama, tmp_path_factory):
    program = mmc.optimize(mmc.capture(tiny_llama, decode_call(tiny_llama)), "default").program
    compiled = mmc.lower(program, "inductor")
    directory = tmp_path_factory.mktemp("aoti_step")
    compiled.save(directory)
    return program, compiled, directory


def test_a_saved_step_runs_like_the_program_and_updates_the_cache_in_place(step_artifact, tiny_llama):
    program, compiled, directory = step_artifact
    assert sorted(p.name for p in directory.iterdir()) == ["manifest.json", "model.pt2", "weights.safetensors"]
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["backend"] == "inductor" and manifest["backend_version"] == torch.__version__
    assert len(manifest["state"]) == 2 * tiny_llama.config.n_layers
    loaded = mmc.load(directory)
    tokens, pos, cache = decode_call(tiny_llama, seed=5)
    a, b = clone(cache), clone(cache)
    got = loaded(tokens, pos, a)
    torch.testing.assert_close(got, program.graph_module(tokens, pos, *[t for kv in b for t in kv])[0])
    for la, lb in zip(a, b):  # the same cache writes
        for x, y in zip(la, lb):
            torch.testing.assert_close(x, y)
    assert not torch.equal(a[0][0], cache[0][0])  # which happened in place, in the caller's tensors
    strided = [tuple(t.transpose(1, 2).contiguous().transpose(1, 2) for t in layer) for layer in clone(cache)]
    torch.testing.assert_close(loaded(tokens, pos, strided), got)  # state in another layout: still updated
    for la, ls in zip(a, strided):
        for x, y in zip(la, ls):
            torch.testing.assert_close(x, y)
    with pytest.raises(mmc.ShapeError, match="compiled for torch.int64 \\[2, 1\\]"):
        loaded(tokens[:1], pos[:1], clone(cache))


def test_a_damaged_package_or_another_torch_is_refused(step_artifact, tmp_path, monkeypatch):
    _, compiled, directory = step_artifact
    d = tmp_path / "copy"
    shutil.copytree(directory, d)
    data = (d / "model.pt2").read_bytes()
    (d / "model.pt2").write_bytes(data[: len(data) // 3])
    with pytest.raises(mmc.BackendError, match="model.pt2 does not match its hash.*truncated"):
        mmc.load(d)
    (d / "model.pt2").write_bytes(data)
    (d / "weights.safetensors").unlink()
    with pytest.raises(mmc.BackendError, match="weights.safetensors is missing; copy the whole artifact"):
        mmc.load(d)
    monkeypatch.setattr(torch, "__version__", "2.99.0")
    with pytest.raises(mmc.BackendError, match="built with torch .* this is torch 2.99.0"):
        mmc.load(directory)
    monkeypatch.undo()
    with pytest.raises(mmc.BackendError, match="loaded from an artifact; copy the artifact directory"):
        mmc.load(directory).save(tmp_path / "again")


def test_a_transformers_generator_round_trips_through_packages(tmp_path):
    """GPT-2 as transformers builds it (its capture has a Python-constant input, use_cache, that the
    package does not take): the loaded Generator generates what the compiled one does."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=96, n_embd=32, n_layer=1, n_head=2, n_positions=64, initializer_range=0.2)).eval()
    gen = mmc.compile_generator(model, backend="inductor", max_batch=2, max_seq_len=40, prefill_buckets=[16])
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 96, (n,), generator=g) for n in (4, 13)]
    want = gen.generate(prompts, 20)
    gen.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decode", "manifest.json", "prefill_16"]
    # the decode step reads the weights the prefill wrote (one copy on disk), under its own names
    refs = json.loads((tmp_path / "decode" / "manifest.json").read_text())["weights"]
    assert refs and all(path == "../prefill_16/weights.safetensors" for path, _ in refs.values())
    from safetensors import safe_open

    with safe_open(str(tmp_path / "decode" / "weights.safetensors"), "pt") as f:
        assert list(f.keys()) == []
    loaded = mmc.load(tmp_path)
    assert isinstance(loaded, mmc.Generator) and loaded.backend == "inductor"
    assert torch.equal(loaded.generate(prompts, 20), want)
    # and in memory: both phases run on the same tensors
    prefill = next(iter(loaded.prefill_fn.compiled.values()))
    shared = {id(t) for t in getattr(prefill, "step", prefill)._weights.values()}
    assert {id(t) for t in loaded.decode_fn._weights.values()} <= shared


def test_large_files_hash_by_chunks_and_still_catch_one_changed_byte(tmp_path, monkeypatch):
    import hashlib

    from mmcompile import artifact

    monkeypatch.setattr(artifact, "_CHUNK", 1024)
    f = tmp_path / "weights.bin"
    data = bytearray(torch.randint(0, 256, (10_000,), dtype=torch.uint8).numpy().tobytes())
    f.write_bytes(bytes(data))
    digest = artifact._sha256(f)
    chunks = b"".join(hashlib.sha256(bytes(data[i:i + 1024])).digest() for i in range(0, len(data), 1024))
    assert digest == "sha256-64MiB-chunks:" + hashlib.sha256(chunks).hexdigest()
    data[7777] ^= 1
    f.write_bytes(bytes(data))
    assert artifact._sha256(f) != digest
