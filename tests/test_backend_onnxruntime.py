"""The onnxruntime backend: Programs exported to ONNX and run by ONNX Runtime's CPU provider, with the
KV cache updated in place through IOBinding; generation equals eager token for token."""

import collections
import os

import pytest
import torch

import mmcompile as mmc

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def decode_call(model, batch=2, slots=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    cache = model.empty_cache(batch, slots)
    for layer in cache:
        for t in layer:
            t.copy_(torch.randn(t.shape, generator=g))  # a cache with history, so attention reads it
    tokens = torch.randint(0, model.config.vocab_size, (batch, 1), generator=g)
    return tokens, torch.full((batch, 1), 3), cache


def tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, initializer_range=0.2)).eval()


def clone(cache):
    return [tuple(t.clone() for t in layer) for layer in cache]


@pytest.fixture(scope="module")
def decode_program(tiny_llama):
    tokens, pos, cache = decode_call(tiny_llama)
    return mmc.optimize(mmc.capture(tiny_llama, (tokens, pos, cache)), "default").program


def test_decode_step_equals_eager_and_updates_the_cache_in_place(decode_program, tiny_llama):
    tokens, pos, cache = decode_call(tiny_llama, seed=1)
    ours, ref = clone(cache), clone(cache)
    compiled = mmc.lower(decode_program, "onnxruntime")
    assert compiled._in_place  # each cache input is read only by its update: bound as input and output
    want = decode_program(tokens, pos, ref)
    pointers = [t.data_ptr() for layer in ours for t in layer]
    got = compiled(tokens, pos, ours)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(ours, ref):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    assert pointers == [t.data_ptr() for layer in ours for t in layer]
    ops = collections.Counter(n.op_type for n in compiled.onnx_model.graph.node)
    # attention over the cache, its writes and the rotary embeddings: one GroupQueryAttention per layer
    assert ops["GroupQueryAttention"] == 2 and not {"Attention", "ScatterND", "RotaryEmbedding"} & set(ops)
    assert sum("with rotary" in note for note in compiled.fusions) == 2
    outputs = [o.name for o in compiled.onnx_model.graph.output]
    assert outputs == ["output_0"] + [f"present_{n.name}" for n in decode_program.state_inputs()]


@pytest.mark.parametrize("contrib", [True, False])
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_linears_export_and_keep_their_packed_weights(decode_program, tiny_llama, mode, contrib, tmp_path):
    import onnx

    q = mmc.optimize(decode_program, ["quantize_linear", "eliminate_dead_code"],
                     quantize_linear={"mode": mode, "group_size": 32}).program
    tokens, pos, cache = decode_call(tiny_llama, seed=2)
    want = q(tokens, pos, clone(cache))
    compiled = mmc.lower(q, "onnxruntime", contrib_ops=contrib)
    torch.testing.assert_close(compiled(tokens, pos, clone(cache)), want, rtol=1e-4, atol=1e-4)
    compiled.save(tmp_path)
    saved = onnx.load(str(tmp_path / "model.onnx"))
    ops = {(n.domain, n.op_type) for n in saved.graph.node}
    assert (("com.microsoft", "MatMulNBits") in ops) == contrib  # the contrib op is really in the saved model
    if contrib:  # every quantized layer (qkv, o, gate/up, down after fuse_linears; 2 layers); the LM head
        assert sum(n.op_type == "MatMulNBits" for n in saved.graph.node) == 8  # stays a float MatMul


def test_an_int8_embedding_table_exports_as_a_gather_of_int8(decode_program, tiny_llama, tmp_path):
    import onnx
    from onnx import numpy_helper

    q = mmc.optimize(decode_program, ["quantize_linear", "eliminate_dead_code"],
                     quantize_linear={"embeddings": True}).program
    tokens, pos, cache = decode_call(tiny_llama, seed=3)
    want = q(tokens, pos, clone(cache))
    compiled = mmc.lower(q, "onnxruntime")
    torch.testing.assert_close(compiled(tokens, pos, clone(cache)), want, rtol=1e-4, atol=1e-4)
    compiled.save(tmp_path)
    saved = onnx.load(str(tmp_path / "model.onnx"))
    int8 = {i.name for i in saved.graph.initializer if numpy_helper.to_array(i).dtype.name == "int8"}
    gathers = [n for n in saved.graph.node if n.op_type == "Gather" and n.input[0] in int8]
    assert len(gathers) == 1  # the table is read as int8, one row per token


def test_generation_equals_eager_token_for_token(tiny_llama):
    gen = mmc.compile_generator(tiny_llama, backend="onnxruntime", max_batch=3, max_seq_len=64)
    ref = mmc.Generator.from_module(tiny_llama, max_batch=3, max_seq_len=64)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 256, (n,), generator=g) for n in (5, 11, 2)]
    assert torch.equal(gen.generate(prompts, 24), ref.generate(prompts, 24))
    assert torch.equal(gen.generate(prompts[:1], 24, num_beams=3), ref.generate(prompts[:1], 24, num_beams=3))
    # every layer's decode attention reads the fused projection's packed q/k/v row, rotary inside
    assert sum(n.endswith("with rotary, packed q/k/v") for n in gen.decode_fn.fusions) == 2, gen.decode_fn.fusions

    # linear weights reach the exporter transposed by torch (no Transpose folded into a numpy view), one
    # transposed copy per weight shared by the phases
    def transposed(compiled):
        return {name: value.const_value.raw for name, value in compiled._exported.model.graph.initializers.items()
                if name.startswith("_ort_transposed")}

    decode, prefill = transposed(gen.decode_fn), transposed(gen.prefill_fn.compiled[16])
    assert decode and all(isinstance(t, torch.Tensor) and t.is_contiguous() for t in decode.values())
    assert {t.data_ptr() for t in decode.values()} == {t.data_ptr() for t in prefill.values()}


def test_transformers_gpt2_generation_equals_model_generate():
    model = tiny_gpt2()
    gen = mmc.compile_generator(model, backend="onnxruntime", max_batch=2, max_seq_len=64)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 128, (n,), generator=g) for n in (4, 9)]
    out = gen.generate(prompts, 32)
    for row, p in zip(out, prompts):
        ref = model.generate(p[None], max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)[0]
        assert torch.equal(row[: ref.numel()], ref)


def test_ops_without_a_translation_and_missing_packages_are_clear_errors(decode_program, monkeypatch):
    w8a8 = mmc.optimize(decode_program, ["quantize_linear"], quantize_linear={"mode": "w8a8"}).program
    with pytest.raises(mmc.BackendError, match="linear_w8a8.*quantize to int8 or int4"):
        mmc.lower(w8a8, "onnxruntime")
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    with pytest.raises(mmc.BackendError, match="onnxruntime package is not installed: pip install"):
        mmc.backends.get("onnxruntime")


# ---------------------------------------------------------------------------------------- artifacts
@pytest.fixture(scope="module")
def artifact(decode_program, tmp_path_factory):
    directory = tmp_path_factory.mktemp("artifact")
    compiled = mmc.lower(decode_program, "onnxruntime")
    compiled.save(directory)
    return compiled, directory


def test_artifact_loads_and_runs_like_the_compiled_program(artifact, tiny_llama):
    import json

    compiled, directory = artifact
    assert sorted(p.name for p in directory.iterdir()) == ["manifest.json", "model.onnx", "model.onnx.data"]
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["backend"] == "onnxruntime" and manifest["in_place"] == [True] * 4 and len(manifest["state"]) == 4
    loaded = mmc.load(directory)
    tokens, pos, cache = decode_call(tiny_llama, seed=6)
    a, b = clone(cache), clone(cache)
    torch.testing.assert_close(loaded(tokens, pos, a), compiled(tokens, pos, b))
    assert all(torch.equal(x, y) for la, lb in zip(a, b) for x, y in zip(la, lb))
    with pytest.raises(mmc.ShapeError, match="compiled for torch.int64 \\[2, 1\\]"):
        loaded(tokens[:1], pos[:1], clone(cache))


def copy_artifact(directory, tmp_path):
    import shutil

    target = tmp_path / "copy"
    shutil.copytree(directory, target)
    return target


def test_loading_an_artifact_imports_neither_the_exporter_nor_inductor(artifact):
    """A program that only loads an artifact and runs it pays for ONNX Runtime and onnx, not for onnxscript
    (and the sympy it imports) or torch's compiler: a fresh process checks what the load imported."""
    import subprocess
    import sys

    _, directory = artifact
    code = ("import sys, torch, mmcompile as mmc\n"
            f"mmc.load({str(directory)!r})\n"
            "print(sorted(m for m in ('onnxscript', 'sympy', 'torch._inductor', 'torch._dynamo') if m in sys.modules))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "[]", r.stdout


def test_damaged_artifacts_give_one_clear_error_each(artifact, tmp_path, monkeypatch):
    import json

    _, directory = artifact
    with pytest.raises(mmc.BackendError, match="no manifest.json"):
        mmc.load(tmp_path)
    d = copy_artifact(directory, tmp_path)
    data = (d / "model.onnx.data").read_bytes()
    (d / "model.onnx.data").write_bytes(data[: len(data) // 2])
    with pytest.raises(mmc.BackendError, match="model.onnx.data does not match its hash.*truncated"):
        mmc.load(d)
    (d / "model.onnx.data").write_bytes(data)
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["inputs"][0]["shape"] = [4, 1]
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(mmc.BackendError, match="was edited"):
        mmc.load(d)
    (d / "manifest.json").write_text("{ not json")
    with pytest.raises(mmc.BackendError, match="not valid JSON"):
        mmc.load(d)
    monkeypatch.setattr(torch, "__version__", "2.99.0")
    with pytest.raises(mmc.BackendError, match="built with torch .* this is torch 2.99.0"):
        mmc.load(directory)
    monkeypatch.undo()
    monkeypatch.setattr(ort, "__version__", "1.0.0")
    with pytest.raises(mmc.BackendError, match="this is onnxruntime 1.0.0; recompile"):
        mmc.load(directory)
    monkeypatch.undo()
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(mmc.BackendError, match="onnxruntime package is not installed"):
        mmc.load(directory)


def test_backends_without_artifacts_say_so(decode_program, tmp_path):
    with pytest.raises(mmc.BackendError, match="cannot save artifacts; lower with backend='inductor'"):
        mmc.lower(decode_program, "eager").save(tmp_path)


def test_generator_artifact_round_trip(tmp_path):
    """The loaded Generator decodes as the compiled one, and its phases' models reference one copy of the
    weights: the decode step writes no data of its own, the prefill's file holds the weights once."""
    import json

    model = tiny_gpt2()
    gen = mmc.compile_generator(model, backend="onnxruntime", max_batch=2, max_seq_len=48)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 128, (n,), generator=g) for n in (4, 9)]
    want = gen.generate(prompts, 24)
    gen.save(tmp_path)
    (prefill,) = [p for p in tmp_path.iterdir() if p.name.startswith("prefill_")]
    assert not (tmp_path / "decode" / "model.onnx.data").exists()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert (prefill / "model.onnx.data").stat().st_size < 1.5 * weights  # one copy (and a transposed tied head)
    manifest = json.loads((tmp_path / "decode" / "manifest.json").read_text())
    assert manifest["external_data"] == {f"{prefill.name}.model.onnx.data": f"../{prefill.name}/model.onnx.data"}
    loaded = mmc.load(tmp_path)
    assert isinstance(loaded, mmc.Generator) and loaded.vocab_size == 128
    assert torch.equal(loaded.generate(prompts, 24), want)
    with pytest.raises(mmc.ShapeError, match="needs a prefill bucket of at least 20; this Generator has \\[16\\]"):
        loaded.generate([torch.arange(3, 23)], 4)


def test_weights_checked_while_loading_still_fail_the_load(tmp_path, monkeypatch):
    # large weights files are hashed on a background thread while the sessions read them; a damaged one
    # still fails the load with the hash error (also when the damage makes the loader fail first)
    import shutil
    import time
    from pathlib import Path

    from mmcompile import artifact

    monkeypatch.setattr(artifact, "_CHUNK", 1024)  # every weights file counts as large here
    gen = mmc.compile_generator(tiny_gpt2(), backend="onnxruntime", max_batch=1, max_seq_len=32)
    gen.save(tmp_path / "gen")
    (prefill,) = [p.name for p in (tmp_path / "gen").iterdir() if p.name.startswith("prefill_")]
    # both phases name the prefill's weights file: it is hashed once, not once per phase at once
    hashed, real = [], artifact._sha256

    def counted(path):
        hashed.append(Path(path).name)
        time.sleep(0.3)  # still hashing when the other phase asks
        return real(path)

    monkeypatch.setattr(artifact, "_sha256", counted)
    artifact._DIGESTS.clear()
    assert isinstance(mmc.load(tmp_path / "gen"), mmc.Generator)
    assert hashed.count("model.onnx.data") == 1
    monkeypatch.setattr(artifact, "_sha256", real)
    for damage in ("flip", "truncate"):
        d = shutil.copytree(tmp_path / "gen", tmp_path / damage)
        data = d / prefill / "model.onnx.data"  # the weights both phases read
        raw = bytearray(data.read_bytes())
        if damage == "flip":
            raw[len(raw) // 2] ^= 0x40  # same length: ONNX Runtime itself would load it
        else:
            raw = raw[: len(raw) // 2]
        data.write_bytes(bytes(raw))
        with pytest.raises(mmc.BackendError, match="model.onnx.data does not match its hash"):
            mmc.load(d)



@pytest.mark.parametrize("kind", ["t5", "bart", "gpt2", "llama_gqa", "whisper", "qwen2"])
def test_transformers_forward_passes_equal_eager_and_pass_the_onnx_checker(kind):
    pytest.importorskip("transformers")
    import onnx

    import hf_zoo

    model, args, kwargs, _ = hf_zoo.build(kind)
    prog = mmc.optimize(mmc.capture(model, args, kwargs), "default").program
    compiled = mmc.lower(prog, "onnxruntime")
    onnx.checker.check_model(compiled.onnx_model, full_check=True)
    assert "Attention" in {n.op_type for n in compiled.onnx_model.graph.node}
    out = hf_zoo.logits_of(compiled(*args, **kwargs))
    ref = hf_zoo.reference(model, args, kwargs)
    mask = kwargs.get("attention_mask")
    if mask is not None and out.shape[:2] == mask.shape:
        # a left-padded query sees no key at all: torch's SDPA and ONNX's Attention define that row differently
        # (it is padding; nothing reads it), so compare the real positions
        out, ref = out[mask.bool()], ref[mask.bool()]
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("contrib", [True, False])
def test_rms_norm_exports_as_rmsnormalization_and_skip_simplified_layer_norm(decode_program, tiny_llama, contrib,
                                                                              tmp_path):
    """Norms after a residual add whose sum is read again become ONNX Runtime's
    SkipSimplifiedLayerNormalization (the sum is its fourth output); the others ONNX's RMSNormalization."""
    import onnx

    fused = mmc.optimize(decode_program, ["fuse_rmsnorm", "eliminate_dead_code"]).program
    compiled = mmc.lower(fused, "onnxruntime", contrib_ops=contrib)
    compiled.save(tmp_path)
    nodes = onnx.load(str(tmp_path / "model.onnx")).graph.node
    skip = [n for n in nodes if (n.domain, n.op_type) == ("com.microsoft", "SkipSimplifiedLayerNormalization")]
    assert len(skip) == (3 if contrib else 0)
    assert all(n.output[3] for n in skip)  # the residual sum is read from the op, not recomputed
    assert sum(n.op_type == "RMSNormalization" for n in nodes) == (2 if contrib else 5)
    tokens, pos, cache = decode_call(tiny_llama, seed=8)
    torch.testing.assert_close(compiled(tokens, pos, clone(cache)), decode_program(tokens, pos, clone(cache)),
                               rtol=1e-5, atol=1e-5)


def test_models_over_the_in_memory_limit_load_through_external_data(decode_program, tiny_llama, monkeypatch):
    # a 7B model's weights exceed protobuf's 2 GB: the session reads them from a file beside the graph
    import mmcompile.backends.onnxruntime as backend

    monkeypatch.setattr(backend, "_IN_MEMORY_LIMIT", 0)
    written = []
    monkeypatch.setattr(backend, "_save", lambda exported, path, save=backend._save: (written.append(path),
                                                                                       save(exported, path)))
    tokens, pos, cache = decode_call(tiny_llama, seed=4)
    compiled = mmc.lower(decode_program, "onnxruntime")
    assert len(written) == 1 and not os.path.exists(written[0])  # a scratch copy, removed after
    torch.testing.assert_close(compiled(tokens, pos, clone(cache)), decode_program(tokens, pos, clone(cache)),
                               rtol=1e-5, atol=1e-5)


def test_cuda_graph_options_are_checked(decode_program):
    with pytest.raises(mmc.BackendError, match="cuda_graph=True needs a CUDA device"):
        mmc.lower(decode_program, "onnxruntime", cuda_graph=True)
    with pytest.raises(mmc.BackendError, match="cuda_graph must be"):
        mmc.lower(decode_program, "onnxruntime", cuda_graph="always")
    assert not mmc.lower(decode_program, "onnxruntime").cuda_graph  # "auto" on the CPU


def _two_phases(tmp_path):
    """Two phase folders: prefill's data file holds ``a``, decode's holds ``b`` (after 64 bytes); decode's
    model computes ``x @ a @ b``, reading ``a`` from prefill's file by the key the manifest maps."""
    import numpy as np
    from onnx import TensorProto, helper

    (tmp_path / "prefill").mkdir()
    (tmp_path / "decode").mkdir()
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((8, 8)).astype(np.float32) for _ in range(2))
    (tmp_path / "prefill" / "model.onnx.data").write_bytes(a.tobytes())
    (tmp_path / "decode" / "model.onnx.data").write_bytes(b"\0" * 64 + b.tobytes())

    def external(name, key, offset):
        t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=[8, 8], data_location=TensorProto.EXTERNAL)
        for k, v in (("location", key), ("offset", str(offset)), ("length", "256")):
            t.external_data.add(key=k, value=v)
        return t

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "a"], ["h"]), helper.make_node("MatMul", ["h", "b"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
        [external("a", "prefill.model.onnx.data", 0), external("b", "model.onnx.data", 64)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    (tmp_path / "decode" / "model.onnx").write_bytes(model.SerializeToString())
    keys = {"model.onnx.data": "model.onnx.data", "prefill.model.onnx.data": "../prefill/model.onnx.data"}
    return keys, a, b, rng


def test_a_phase_reads_its_own_weights_and_another_phases_from_their_folders(tmp_path):
    """A loaded phase whose model reads two data files — its own beside it and another phase's in a sibling
    directory (keys the manifest maps to paths) — runs from the model's bytes with the artifact's folder as
    its data folder and computes what the weights say."""
    import numpy as np
    import onnx

    from mmcompile.backends.onnxruntime import _session, _with_shared_data

    keys, a, b, rng = _two_phases(tmp_path)
    source, folder = _with_shared_data(tmp_path / "decode", keys)
    assert folder == str(tmp_path.resolve())
    locations = {t.name: t.external_data[0].value for t in onnx.load_from_string(source).graph.initializer}
    assert locations == {"a": "prefill/model.onnx.data", "b": "decode/model.onnx.data"}
    x = rng.standard_normal((1, 8)).astype(np.float32)
    (y,) = _session(source, ["CPUExecutionProvider"], folder).run(None, {"x": x})
    np.testing.assert_allclose(y, x @ a @ b, rtol=1e-5, atol=1e-5)
    # only its own file: the usual load from the model's path
    assert _with_shared_data(tmp_path / "decode", {"model.onnx.data": "model.onnx.data"}) == \
        (str(tmp_path / "decode" / "model.onnx"), None)
    (tmp_path / "prefill" / "model.onnx.data").unlink()
    with pytest.raises(mmc.BackendError, match="model.onnx.data is missing: the artifact's weights are incomplete"):
        _with_shared_data(tmp_path / "decode", keys)


def test_phases_share_one_device_copy_of_each_data_files_tensors(tmp_path):
    """``_device_initializers``: the tensors a model reads from data files become ONNX Runtime values made
    once per file and device — a second phase naming the same file gets the same values — and a session
    handed them (``add_initializer``) computes with them, not with its own load of the file. They are
    dropped when no loaded phase holds them; a data file cut short is a clear error."""
    import gc

    import numpy as np
    import onnxruntime as ort

    from mmcompile import backends
    from mmcompile.backends import onnxruntime as backend

    keys, a, b, rng = _two_phases(tmp_path)
    source, folder = backend._with_shared_data(tmp_path / "decode", keys)
    cpu = torch.device("cpu")
    decode = backend._device_initializers(source, folder, cpu)
    again = backend._device_initializers(source, folder, cpu)
    assert set(decode) == {"a", "b"} and all(again[k][0] is decode[k][0] for k in decode)
    np.testing.assert_array_equal(decode["a"][0].numpy(), a)
    np.testing.assert_array_equal(decode["b"][0].numpy(), b)
    x = rng.standard_normal((1, 8)).astype(np.float32)
    (y,) = backend._session(source, ["CPUExecutionProvider"], folder, decode).run(None, {"x": x})
    np.testing.assert_allclose(y, x @ a @ b, rtol=1e-5, atol=1e-5)
    # the session computes with the values it is handed: a different b changes the result
    other = dict(decode, b=(ort.OrtValue.ortvalue_from_numpy(2 * b), None))
    (y2,) = backend._session(source, ["CPUExecutionProvider"], folder, other).run(None, {"x": x})
    np.testing.assert_allclose(y2, 2 * (x @ a @ b), rtol=1e-5, atol=1e-5)
    del decode, again, other
    gc.collect()
    assert not [k for k in backends._LOADED_FILES if k[0].startswith(str(tmp_path.resolve()))]
    data = tmp_path / "decode" / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:200])
    with pytest.raises(mmc.BackendError, match="model.onnx.data ends before b's data .64 \\+ 256 bytes.: the "
                                               "artifact's weights are incomplete"):
        backend._device_initializers(source, folder, cpu)


def test_phases_loading_on_threads_share_one_copy(tmp_path, monkeypatch):
    """A Generator's phases load on threads at once: the second waits for the first's copy of a file and
    gets the same values (unlocked, each made its own, and a 7B artifact took 27 GB on the GPU, not 14)."""
    import threading
    import time

    from mmcompile.backends import onnxruntime as backend

    keys, *_ = _two_phases(tmp_path)
    source, folder = backend._with_shared_data(tmp_path / "decode", keys)
    real = backend.read_spans

    def slow_read(*args, **kwargs):  # each thread is still reading when the other arrives
        time.sleep(0.2)
        return real(*args, **kwargs)

    monkeypatch.setattr(backend, "read_spans", slow_read)
    results = []
    threads = [threading.Thread(target=lambda: results.append(
        backend._device_initializers(source, folder, torch.device("cpu")))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and all(results[0][k][0] is results[1][k][0] for k in ("a", "b"))
