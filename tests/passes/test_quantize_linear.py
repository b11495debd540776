"""quantize_linear: int8 weight-only linears through mmcompile::linear_int8, checked against the float model."""

import pytest
import torch

import mmcompile as mmc
from mmcompile import testing

FUSE = ["canonicalize", "fold_constants", "fuse_attention"]


@pytest.fixture(scope="module")
def decode_step(tiny_llama):
    tokens = torch.randint(0, 256, (2, 1), generator=torch.Generator().manual_seed(0))
    call = (tokens, torch.full((2, 1), 3), tiny_llama.empty_cache(2, 16))
    return mmc.optimize(mmc.capture(tiny_llama, call), FUSE).program, call


def relative_error(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_quantizes_every_linear_but_the_lm_head_and_stays_close_to_float(decode_step):
    prog, call = decode_step
    checks = """
    CHECK: constant layers_0_attention_wq_weight_int8
    CHECK: = mmcompile.linear_int8(%view, %layers_0_attention_wq_weight_int8, %layers_0_attention_wq_weight_scales, None)
    CHECK: = aten.mm(
    CHECK: return
    """
    after, report = testing.check_pass(prog, "quantize_linear", changed=True, numerics=False, checks=checks)
    layers = 2 * 7  # q, k, v, o, gate, up, down per layer
    assert report.stats["quantized.int8"] == layers and report.stats["kept"] == 1
    assert after.op_counts()["mmcompile.linear_int8.default"] == layers
    assert after.op_counts()["aten.mm.default"] == 1  # the LM head
    assert any("output.weight kept" in n and "LM head" in n for n in report.notes)
    q = after.metadata["quantization"]
    assert len(q) == layers and all(v["mode"] == "int8" and v["weight_error"] < 0.01 for v in q.values())
    ref, out = prog(*call), after(*call)
    assert relative_error(out, ref) < mmc.passes.get("quantize_linear").tolerance


def test_int8_weights_replace_the_float_ones(decode_step):
    prog, _ = decode_step
    result = mmc.optimize(prog, ["quantize_linear", "eliminate_dead_code"])
    consts = result.program.constants()
    int8 = [n for n, t in consts.items() if t.dtype == torch.int8]
    assert len(int8) == 14 and "layers_0_attention_wq_weight_int8" in int8
    assert not any(n.startswith("layers.0.attention.wq") for n in consts)  # the float weight is gone
    assert result.report("eliminate_dead_code").stats["constants_removed"] >= 14


def test_layer_patterns_select_what_is_quantized(decode_step):
    prog, _ = decode_step
    _, report = testing.run_pass(prog, "quantize_linear", layers=["*feed_forward*"], exclude=["*w2*"])
    assert report.stats["quantized.int8"] == 4  # w1, w3 of two layers
    assert any("not matched by layers" in n for n in report.notes)
    assert any("excluded by" in n for n in report.notes)
    _, report = testing.run_pass(prog, "quantize_linear", lm_head=True)
    assert report.stats["quantized.int8"] == 15


def test_inductor_lowering_equals_the_eager_op(decode_step):
    prog, call = decode_step
    after, _ = testing.run_pass(prog, "quantize_linear")
    eager = after(*call)
    fast = mmc.lower(after, "inductor")(*call)
    torch.testing.assert_close(fast, eager, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rows", [1, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [40, 64])  # 64: aten's int8 CPU kernel; 40: the dequantize-then-matmul path
def test_linear_int8_op_matches_its_reference_and_decomposition(rows, dtype, k):
    from mmcompile import ops, quant

    torch.manual_seed(0)
    w, x, b = torch.randn(48, k), torch.randn(rows, k).to(dtype), torch.randn(48).to(dtype)
    q, scales = quant.quantize_int8(w)
    ref = (x.float() @ quant.dequantize_int8(q, scales).t() + b.float())
    out = torch.ops.mmcompile.linear_int8(x, q, scales.to(dtype), b)
    dec = ops._linear_int8_decomposed(x, q, scales.to(dtype), b)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert out.dtype == dtype and out.shape == (rows, 48)
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(dec.float(), ref, rtol=tol, atol=tol)


def test_generator_with_int8_linears_stays_close_to_float(tiny_llama):
    gen = mmc.compile_generator(tiny_llama, backend="eager", passes=FUSE + ["quantize_linear"], max_batch=1,
                                max_seq_len=48)
    assert gen.programs["decode"].op_counts()["mmcompile.linear_int8.default"] == 14
    ref = mmc.Generator.from_module(tiny_llama, max_batch=1, max_seq_len=48)
    prompt = [torch.arange(5)]
    a, b = gen.generate(prompt, 24), ref.generate(prompt, 24)
    assert (a[0, 5:] == b[0, 5:]).float().mean() >= 0.5  # int8 may flip near-ties; most tokens agree


def test_unknown_mode_is_a_clear_error(decode_step):
    with pytest.raises(Exception, match="mode must be one of"):
        testing.run_pass(decode_step[0], "quantize_linear", mode="int3")


@pytest.mark.parametrize("group", [32, 64])
def test_int4_groups_quantize_every_linear_and_lower_to_inductor(decode_step, group):
    prog, call = decode_step
    after, report = testing.run_pass(prog, "quantize_linear", mode="int4", group_size=group)
    assert report.stats["quantized.int4"] == 14
    packed = after.constants()["layers_0_feed_forward_w1_weight_int4_g%d" % group]
    assert packed.dtype == torch.uint8 and packed.shape == (128, 32)  # [N, K / 2]
    assert after.metadata["quantization"]["layers.0.feed_forward.w1.weight"]["group_size"] == group
    ref, out = prog(*call), after(*call)
    assert relative_error(out, ref) < 0.15
    torch.testing.assert_close(mmc.lower(after, "inductor")(*call), out, rtol=1e-4, atol=1e-4)


def test_int4_falls_back_to_int8_where_the_group_does_not_divide(decode_step):
    prog, _ = decode_step
    _, report = testing.run_pass(prog, "quantize_linear", mode="int4", group_size=128)
    # K = 64 for q, k, v, o, w1, w3 (6 per layer); only w2 (K = 128) takes int4
    assert report.stats["quantized.int4"] == 2 and report.stats["quantized.int8"] == 12
    assert any("not a multiple of group_size=128" in n for n in report.notes)
    with pytest.raises(Exception, match="group_size must be one of"):
        testing.run_pass(prog, "quantize_linear", mode="int4", group_size=100)


@pytest.mark.parametrize("rows", [1, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_int4_op_matches_its_reference_and_decomposition(rows, dtype):
    from mmcompile import ops, quant

    torch.manual_seed(0)
    w, x, b = torch.randn(48, 64), torch.randn(rows, 64).to(dtype), torch.randn(48).to(dtype)
    packed, scales, zeros = quant.quantize_int4(w, 32)
    ref = x.float() @ quant.dequantize_int4(packed, scales, zeros).t() + b.float()
    out = torch.ops.mmcompile.linear_int4(x, packed, scales, zeros, b)
    dec = ops._linear_int4_decomposed(x, packed, scales, zeros, b)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    assert out.dtype == dtype and out.shape == (rows, 48)
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(dec.float(), ref, rtol=tol, atol=tol)


def fake_timer(mode, fn, device):
    """A clock on which int4 is fastest, then int8, then float (as on a GPU with good kernels)."""
    fn()
    return {"int4": 1e-6, "int8": 2e-6, "float": 4e-6}[mode]


@pytest.mark.parametrize("budget,expected", [(0.0, "float"), (0.02, "int8"), (1.0, "int4")])
def test_auto_picks_the_fastest_mode_within_the_error_budget(decode_step, budget, expected):
    prog, call = decode_step
    after, report = testing.run_pass(prog, "quantize_linear", mode="auto", error_budget=budget, group_size=32,
                                     timer=fake_timer)
    q = after.metadata["quantization"]
    assert len(q) == 14 and {v["mode"] for v in q.values()} == {expected}
    for entry in q.values():  # every layer's measured error is recorded, and the pick respects the budget
        assert entry["errors"][entry["mode"]] <= budget
        assert entry["errors"]["int8"] < 0.02 < entry["errors"]["int4"]
    assert report.changed == (expected != "float")
    assert any("-> %s (output error, time: float 0.00%% 4 us, int8" % expected in n for n in report.notes)
    if expected != "float":
        assert relative_error(after(*call), prog(*call)) < (0.05 if expected == "int8" else 0.15)


def test_auto_with_the_real_clock_records_what_it_measured(decode_step):
    prog, _ = decode_step
    after, _ = testing.run_pass(prog, "quantize_linear", mode="auto", error_budget=0.02, group_size=32)
    for entry in after.metadata["quantization"].values():
        within = {m: t for m, t in entry["times_us"].items() if entry["errors"][m] <= 0.02}
        assert entry["mode"] == min(within, key=within.get) and "int4" not in within


@pytest.mark.parametrize("mode,tol", [("w8a8", 0.05), ("fp8", 0.1)])
def test_activation_quantizing_modes_stay_close_to_float(decode_step, mode, tol):
    prog, call = decode_step
    after, report = testing.run_pass(prog, "quantize_linear", mode=mode)
    assert report.stats[f"quantized.{mode}"] == 14
    op = f"mmcompile.linear_{mode}.default"
    assert after.op_counts()[op] == 14
    assert relative_error(after(*call), prog(*call)) < tol
    from torch._inductor.utils import run_and_get_code

    got, code = run_and_get_code(lambda: mmc.lower(after, "inductor")(*call))
    torch.testing.assert_close(got, after(*call), rtol=1e-4, atol=1e-4)
    # Inductor computes the activations' quantization in its own fused code and calls aten's matmul: the op
    # itself (six separate kernels for the quantization) is never called
    code = "\n".join(code)
    assert {"w8a8": "_int_mm(", "fp8": "_scaled_mm("}[mode] in code and f"mmcompile.linear_{mode}(" not in code


@pytest.mark.parametrize("rows", [1, 33])
def test_w8a8_and_fp8_ops_equal_their_definition(rows):
    from mmcompile import quant

    torch.manual_seed(0)
    x, w, b = torch.randn(rows, 64, dtype=torch.bfloat16), torch.randn(48, 64), torch.randn(48, dtype=torch.bfloat16)
    q, s = quant.quantize_int8(w)
    xq, sx = quant.quantize_rows_int8(x)
    want = (xq.float() @ q.float().t()) * sx * s + b.float()  # int8 x int8 summed exactly, then scaled
    got = torch.ops.mmcompile.linear_w8a8(x, q, s, b)
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2)
    f8, s8 = quant.quantize_fp8(w)
    xf, sxf = quant.quantize_rows_fp8(x)
    want = (xf.float() * sxf) @ (f8.float() * s8[:, None]).t() + b.float()
    got = torch.ops.mmcompile.linear_fp8(x, f8, s8, b)
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=5e-2)


def test_fp8_with_one_scale_per_tensor(decode_step):
    """fp8_scales="tensor": each weight one 0-d scale, the activations one per tensor at run time; the op
    equals its definition, the model stays near float, and a bad option names the choices."""
    from mmcompile import quant

    torch.manual_seed(0)
    x, w = torch.randn(33, 64, dtype=torch.bfloat16), torch.randn(48, 64)
    f8, s8 = quant.quantize_fp8(w, "tensor")
    xf, sxf = quant.quantize_tensor_fp8(x)
    assert s8.dim() == 0 and sxf.dim() == 0
    assert s8 == w.abs().max() / quant.FP8_MAX  # the largest magnitude mapped to 448
    want = (xf.float() * sxf) @ (f8.float() * s8).t()
    torch.testing.assert_close(torch.ops.mmcompile.linear_fp8(x, f8, s8).float(), want, rtol=2e-2, atol=5e-2)
    prog, call = decode_step
    after, report = testing.run_pass(prog, "quantize_linear", mode="fp8", fp8_scales="tensor")
    scales = [t for name, t in after.constants().items() if name.endswith("_scales")]
    assert report.stats["quantized.fp8"] == 14 and len(scales) == 14 and all(t.dim() == 0 for t in scales)
    assert all(e["fp8_scales"] == "tensor" for e in after.metadata["quantization"].values())
    assert relative_error(after(*call), prog(*call)) < 0.1
    torch.testing.assert_close(mmc.lower(after, "inductor")(*call), after(*call), rtol=1e-4, atol=1e-4)
    rows, _ = testing.run_pass(prog, "quantize_linear", mode="fp8")
    assert not torch.equal(after(*call), rows(*call))  # another quantization, not the per-row one renamed
    with pytest.raises(ValueError, match="fp8_scales must be 'row'.* or 'tensor'"):
        testing.run_pass(prog, "quantize_linear", mode="fp8", fp8_scales="channel")


def test_fp8_falls_back_to_int8_for_sizes_the_gpu_matmul_cannot_take():
    from mmcompile.passes.quantize_linear import _fits

    assert _fits("fp8", (48, 64), 128) == ("fp8", "")
    assert _fits("fp8", (40, 64), 128)[0] == "int8" and "multiples of 16" in _fits("fp8", (40, 64), 128)[1]
    assert _fits("w8a8", (44, 64), 128)[0] == "int8"
    assert _fits("int4", (48, 96), 64)[0] == "int8"


@pytest.mark.parametrize("mode", ["int8", "int4", "fp8"])
def test_packed_weights_save_and_load(decode_step, tmp_path, mode):
    prog, call = decode_step
    result = mmc.optimize(prog, ["quantize_linear", "eliminate_dead_code"], quantize_linear={"mode": mode, "group_size": 32})
    q = result.program
    path = tmp_path / "constants.safetensors"
    q.save_constants(path)
    want = q(*call)
    fresh = q.clone()
    fresh.graph_module = torch.fx.GraphModule(q.graph_module, fresh.graph)  # its own attributes to overwrite
    for name, t in fresh.constants().items():  # zero the quantized weights (new tensors: nothing shared)...
        if "." not in name:
            setattr(fresh.graph_module, name, torch.zeros_like(t))
    assert not torch.allclose(fresh(*call), want)
    fresh.load_constants(path)  # ... and restore them from the file
    torch.testing.assert_close(fresh(*call), want)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:  # stored packed, not dequantized
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    assert {"int8": torch.int8, "int4": torch.uint8, "fp8": torch.float8_e4m3fn}[mode] in dtypes


def test_loading_constants_refuses_a_file_of_another_program_or_a_truncated_one(decode_step, tmp_path):
    prog, _ = decode_step
    int8 = mmc.optimize(prog, ["quantize_linear", "eliminate_dead_code"]).program
    path = tmp_path / "float.safetensors"
    prog.save_constants(path)
    with pytest.raises(mmc.ShapeError, match="does not hold this Program's constants"):
        int8.load_constants(path)
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(mmc.ShapeError, match="truncated"):
        prog.load_constants(tmp_path / "cut.safetensors")


def test_auto_times_each_distinct_product_once_lowered_by_the_inductor_backend():
    """timer="inductor" (the default on CUDA): each candidate is lowered alone by the Inductor backend
    and timed once per distinct shape — two layers of one shape compile float and int8 once each."""

    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = (torch.nn.Linear(64, 64, bias=False) for _ in range(3))

        def forward(self, x):
            return self.head(torch.relu(self.b(torch.relu(self.a(x)))))

    prog = mmc.capture(Two().eval(), (torch.randn(1, 64),))
    after, report = testing.run_pass(prog, "quantize_linear", mode="auto", candidates=["int8"], timer="inductor")
    assert "auto: timed 2 distinct candidate products, each lowered alone by the Inductor backend" in report.notes
    q = after.metadata["quantization"]
    assert set(q) == {"a.weight", "b.weight"}
    assert all(set(entry["times_us"]) == {"float", "int8"} for entry in q.values())
    assert q["a.weight"]["times_us"] == q["b.weight"]["times_us"]  # measured once, for both
    with pytest.raises(ValueError, match="timer='fastest'; use 'inductor', 'eager' or a callable"):
        testing.run_pass(prog, "quantize_linear", mode="auto", timer="fastest")


def test_embedding_tables_in_int8_only_when_asked(decode_step, tmp_path):
    prog, call = decode_step
    _, report = testing.run_pass(prog, "quantize_linear")
    assert "quantized.embedding_int8" not in report.stats  # off by default
    result = mmc.optimize(prog, ["quantize_linear", "eliminate_dead_code"], quantize_linear={"embeddings": True})
    after = result.program
    assert result.report("quantize_linear").stats["quantized.embedding_int8"] == 1
    counts = after.op_counts()
    assert counts["mmcompile.embedding_int8.default"] == 1 and "aten.embedding.default" not in counts
    consts = after.constants()
    assert consts["tok_embeddings_weight_int8"].dtype == torch.int8 and "tok_embeddings.weight" not in consts
    entry = after.metadata["quantization"]["tok_embeddings.weight"]
    assert entry["embedding"] and entry["weight_error"] < 0.01
    ref = prog(*call)
    assert relative_error(after(*call), ref) < mmc.passes.get("quantize_linear").tolerance
    torch.testing.assert_close(mmc.lower(after, "inductor")(*call), after(*call), rtol=1e-4, atol=1e-4)
    # the table's own patterns apply, and a non-boolean is refused
    _, report = testing.run_pass(prog, "quantize_linear", embeddings=True, exclude=["tok_*"])
    assert "quantized.embedding_int8" not in report.stats and any("(embedding) kept" in n for n in report.notes)
    with pytest.raises(mmc.PipelineError, match="embeddings must be true or false, got 'yes'"):
        mmc.optimize(prog, ["quantize_linear"], quantize_linear={"embeddings": "yes"})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_embedding_int8_op_matches_its_reference_and_decomposition(dtype):
    from mmcompile import ops, quant

    torch.manual_seed(0)
    table = torch.randn(50, 24).to(dtype)
    table[7] = 0  # an all-zero row
    q, scales = quant.quantize_int8(table)
    ids = torch.tensor([[0, 7, 49], [3, 3, 12]])
    scales = scales.to(dtype)  # as the pass stores them: in the table's dtype
    want = (q.float() * scales.float()[:, None])[ids].to(dtype)  # in fp32, rounded once
    out = torch.ops.mmcompile.embedding_int8(q, scales, ids)
    assert out.dtype == dtype and out.shape == (2, 3, 24)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    assert (out[0, 1] == 0).all()
    decomposed = ops.inductor_decompositions()[torch.ops.mmcompile.embedding_int8.default]
    torch.testing.assert_close(decomposed(q, scales, ids), want, rtol=0, atol=0)
    torch.testing.assert_close(out.float(), table[ids].float(), rtol=0, atol=float(scales.max()) / 2 + 1e-2)


def test_a_tied_lm_head_and_embedding_share_one_int8_copy():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=1, n_head=4))
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1))
    base = mmc.optimize(mmc.capture(model.eval(), (), {"input_ids": ids, "use_cache": False}), "default").program
    result = mmc.optimize(base, ["quantize_linear", "eliminate_dead_code"],
                          quantize_linear={"embeddings": True, "lm_head": True})
    consts = result.program.constants()
    assert [n for n, t in consts.items() if t.dtype == torch.int8] == ["lm_head_weight_int8"]  # one copy
    assert not any(n in consts for n in ("lm_head.weight", "transformer.wte.weight"))  # no float copy left
    assert any("the int8 copy of lm_head.weight" in n for n in result.report("quantize_linear").notes)
    out = result.program(input_ids=ids, use_cache=False)
    ref = base(input_ids=ids, use_cache=False)
    logits = [o.logits if hasattr(o, "logits") else o[0] for o in (out, ref)]
    assert relative_error(*logits) < mmc.passes.get("quantize_linear").tolerance
