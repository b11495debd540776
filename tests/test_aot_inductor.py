"""Artifacts of the inductor backend: AOTInductor packages (model.pt2) with their weights beside them
(weights.safetensors, one copy per tensor across a Generator's phases) that load without the model or a
compile, update the KV cache in place, and generate what the compiled Generator generates."""

import json
import shutil

import pytest
import torch

import mmcompile as mmc

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """GPT-2 as transformers builds it, compiled and saved with one prefill bucket and the decode step."""
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=96, n_embd=32, n_layer=1, n_head=2, n_positions=64, initializer_range=0.2)).eval()
    gen = mmc.compile_generator(model, backend="inductor", max_batch=2, max_seq_len=40, prefill_buckets=[16])
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 96, (n,), generator=g) for n in (4, 13)]
    want = gen.generate(prompts, 20)
    directory = tmp_path_factory.mktemp("aoti")
    gen.save(directory)
    return gen, prompts, want, directory


def test_a_generator_round_trips_and_its_phases_share_one_copy_of_the_weights(saved):
    gen, prompts, want, directory = saved
    assert sorted(p.name for p in directory.iterdir()) == ["decode", "manifest.json", "prefill_16"]
    assert sorted(p.name for p in (directory / "decode").iterdir()) == ["manifest.json", "model.pt2",
                                                                        "weights.safetensors"]
    # the decode step reads the weights the prefill wrote (one copy on disk), under its own names
    refs = json.loads((directory / "decode" / "manifest.json").read_text())["weights"]
    assert refs and all(path == "../prefill_16/weights.safetensors" for path, _ in refs.values())
    from safetensors import safe_open

    with safe_open(str(directory / "decode" / "weights.safetensors"), "pt") as f:
        assert list(f.keys()) == []
    loaded = mmc.load(directory)
    assert isinstance(loaded, mmc.Generator) and loaded.backend == "inductor"
    assert torch.equal(loaded.generate(prompts, 20), want)
    # and in memory: both phases run on the same tensors
    prefill = next(iter(loaded.prefill_fn.compiled.values()))
    shared = {id(t) for t in getattr(prefill, "step", prefill)._weights.values()}
    assert {id(t) for t in loaded.decode_fn._weights.values()} <= shared


def test_a_loaded_step_runs_like_the_program_and_updates_the_cache_in_place(saved):
    gen, _, _, directory = saved
    program = gen.programs["decode"]
    step = mmc.load(directory / "decode")
    manifest = json.loads((directory / "decode" / "manifest.json").read_text())
    assert manifest["backend"] == "inductor" and manifest["backend_version"] == torch.__version__
    g = torch.Generator().manual_seed(1)
    flat = [torch.randn(x.shape, generator=g).to(x.dtype) if isinstance(x, torch.Tensor) and x.is_floating_point()
            else x.contiguous().clone() if isinstance(x, torch.Tensor) else x for x in program.example_inputs]
    state = [i for i, n in enumerate(program.placeholders()) if n in program.state_inputs()]
    a = [x.clone() if isinstance(x, torch.Tensor) else x for x in flat]
    b = [x.clone() if isinstance(x, torch.Tensor) else x for x in flat]
    b[state[0]] = b[state[0]].transpose(-1, -2).contiguous().transpose(-1, -2)  # state in another layout
    got, ref = step.run_flat(a), program.graph_module(*flat)
    torch.testing.assert_close(got[0], ref[0])
    torch.testing.assert_close(step.run_flat(b)[0], ref[0])
    for i in state:  # the same cache writes, in the caller's tensors, whatever their layout
        torch.testing.assert_close(a[i], flat[i])
        torch.testing.assert_close(b[i], flat[i])
    assert not torch.equal(a[state[0]], program.example_inputs[state[0]])
    with pytest.raises(mmc.ShapeError, match="but the artifact was compiled for"):
        step.run_flat([x[:1] if isinstance(x, torch.Tensor) else x for x in a])


def test_a_damaged_package_or_another_torch_is_refused(saved, tmp_path, monkeypatch):
    *_, directory = saved
    d = tmp_path / "copy"
    shutil.copytree(directory, d)
    data = (d / "decode" / "model.pt2").read_bytes()
    (d / "decode" / "model.pt2").write_bytes(data[: len(data) // 3])
    with pytest.raises(mmc.BackendError, match="model.pt2 does not match its hash.*truncated"):
        mmc.load(d)
    (d / "decode" / "model.pt2").write_bytes(data)
    (d / "prefill_16" / "weights.safetensors").unlink()
    with pytest.raises(mmc.BackendError, match="weights.safetensors is missing; copy the whole artifact"):
        mmc.load(d / "decode")
    monkeypatch.setattr(torch, "__version__", "2.99.0")
    with pytest.raises(mmc.BackendError, match="built with torch .* this is torch 2.99.0"):
        mmc.load(directory)
    monkeypatch.undo()
    with pytest.raises(mmc.BackendError, match="loaded from an artifact; copy the artifact directory"):
        mmc.load(directory / "decode").save(tmp_path / "again")


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


def test_python_constant_inputs_are_dropped_and_one_the_graph_uses_is_refused():
    """Exported formats take tensors only: a constant of the capture is dropped from the inputs (its
    index returned); one the graph computes with cannot be, and the error says so."""
    from mmcompile.backends import drop_constant_inputs

    graph = torch.fx.Graph()
    x, flag, n = graph.placeholder("x"), graph.placeholder("use_cache"), graph.placeholder("n")
    x.meta["val"], flag.meta["val"], n.meta["val"] = torch.zeros(2), True, 3
    graph.output(graph.call_function(torch.ops.aten.mul.Tensor, (x, 2.0)))
    keep = [node.name for node in graph.nodes if node.op == "placeholder"]
    assert drop_constant_inputs(graph, "inductor") == [1, 2]
    assert [node.name for node in graph.nodes if node.op == "placeholder"] == keep[:1]
    graph = torch.fx.Graph()
    x, n = graph.placeholder("x"), graph.placeholder("n")
    x.meta["val"], n.meta["val"] = torch.zeros(2), 3
    graph.output(graph.call_function(torch.ops.aten.mul.Tensor, (x, n)))
    with pytest.raises(mmc.BackendError, match="inductor: input n is a int the graph computes with; the backend "
                                               "takes tensor inputs only"):
        drop_constant_inputs(graph, "inductor")
