"""Backend registry, lowering, and mmc.compile: every backend matches eager."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mmcompile as mmc
from mmcompile import testing
from mmcompile.compile import CHECK_BUDGETS


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(16, 32)
        self.norm = torch.nn.LayerNorm(32)

    def forward(self, x):
        return torch.nn.functional.gelu(self.norm(self.lin(x))).transpose(1, 2)


def test_only_real_backends_are_registered():
    assert mmc.backends.names() == ["eager", "inductor", "onnxruntime"]
    with pytest.raises(mmc.BackendError, match="unknown backend 'tensorrt'.*eager, inductor, onnxruntime"):
        mmc.backends.get("tensorrt")


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_lowered_program_matches_eager_model(backend):
    model = Block().eval()
    x = torch.randn(2, 5, 16)
    prog = mmc.optimize(mmc.capture(model, (x,)), "default").program
    compiled = mmc.lower(prog, backend)
    assert compiled.backend == backend
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    testing.check_numerics(prog, compiled, [torch.randn(2, 5, 16)])


def test_compile_one_call_and_reports():
    model = Block().eval()
    x = torch.randn(3, 4, 16)
    fast = mmc.compile(model, (x,), backend="eager", passes=["canonicalize"])
    assert [r.name for r in fast.reports] == ["canonicalize"]
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x))
    with pytest.raises(mmc.ShapeError, match="compiled for 3"):
        fast(torch.randn(4, 4, 16))


class _ScaleFirstOutput(mmc.Pass):
    """A wrong rewrite, for the check to catch: the first output comes out 10% larger."""

    name = "scale_first_output"

    def run(self, program, options):
        report = self.report()
        out = program.graph.output_node()
        first, *rest = out.args[0]
        with program.graph.inserting_before(out):
            scaled = self.tag(program.graph.call_function(torch.ops.aten.mul.Tensor, (first, 1.1)))
        scaled.meta["val"] = first.meta["val"]
        out.args = ((scaled, *rest),)
        report.count("scaled")
        return report


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_compile_check_compares_the_compiled_program_with_the_captured_one(backend):
    model, x = Block().eval(), torch.randn(2, 5, 16)
    compiled = mmc.compile(model, (x,), backend=backend, check=True)
    assert 0 <= compiled.check_error <= CHECK_BUDGETS[torch.float32]
    with pytest.raises(mmc.VerificationError, match=r"compiled output 0 \(\[2, 32, 5\]\) differs from the captured "
                                                     r"program's by 1\.0\de-01 of its largest magnitude .* budget of 1\.0e-04"):
        mmc.compile(model, (x,), backend=backend, passes=["canonicalize", _ScaleFirstOutput()], check=True)
    # a budget of one's own lets the same difference through
    loose = mmc.compile(model, (x,), backend=backend, passes=["canonicalize", _ScaleFirstOutput()], check=0.2)
    assert 0.09 < loose.check_error < 0.11


class _WithIndices(torch.nn.Module):
    def forward(self, x):
        y = torch.nn.functional.silu(x) * 3
        return y, y.argmax(-1), x.shape[0]


class _ShiftSecondOutput(mmc.Pass):
    """A wrong rewrite of an integer output, for the check to catch: the second output comes out one larger."""

    name = "shift_second_output"

    def run(self, program, options):
        report = self.report()
        out = program.graph.output_node()
        first, second, *rest = out.args[0]
        with program.graph.inserting_before(out):
            shifted = self.tag(program.graph.call_function(torch.ops.aten.add.Tensor, (second, 1)))
        shifted.meta["val"] = second.meta["val"]
        out.args = ((first, shifted, *rest),)
        report.count("shifted")
        return report


def test_compile_check_compares_integer_outputs_exactly():
    x = torch.randn(4, 7)
    compiled = mmc.compile(_WithIndices(), (x,), backend="inductor", check=True)
    assert compiled.check_error <= CHECK_BUDGETS[torch.float32]
    # an integer output is compared exactly, whatever the budget
    with pytest.raises(mmc.VerificationError, match=r"compiled output 1 \(torch.int64 \[4\]\) differs"):
        mmc.compile(_WithIndices(), (x,), backend="eager", passes=["canonicalize", _ShiftSecondOutput()], check=0.5)


def test_compile_check_with_a_lossy_pass_asks_for_a_budget():
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).eval()
    x = torch.randn(3, 64)
    with pytest.raises(ValueError, match=r"check=True with a lossy pass \(quantize_linear\).*e\.g\. check=0\.1"):
        mmc.compile(model, (x,), backend="eager", passes=["canonicalize", "quantize_linear"], check=True)
    compiled = mmc.compile(model, (x,), backend="eager", passes=["canonicalize", "quantize_linear"], check=0.05)
    assert 0 < compiled.check_error < 0.05  # int8 weights: a small difference, not none


def test_a_misspelt_backend_option_is_refused_never_ignored():
    prog = mmc.capture(Block().eval(), (torch.randn(2, 5, 16),))
    with pytest.raises(mmc.BackendError, match="eager: unknown option 'regions'; it takes no options"):
        mmc.lower(prog, "eager", regions="on")
    with pytest.raises(mmc.BackendError, match="inductor: unknown options 'gemm', 'region'; its options are mode"):
        mmc.lower(prog, "inductor", region="on", gemm="cublas")
    pytest.importorskip("onnxruntime")
    with pytest.raises(mmc.BackendError, match="onnxruntime: unknown option 'opset_version'; its options are opset"):
        mmc.lower(prog, "onnxruntime", opset_version=18)


def test_compile_fails_fast_on_unknown_backend():
    with pytest.raises(mmc.BackendError, match="unknown backend 'ort'"):
        mmc.compile(Block(), (torch.randn(1, 2, 16),), backend="ort")


def test_inductor_accepts_inputs_with_other_strides():
    model = Block().eval()
    x = torch.randn(2, 5, 16)
    compiled = mmc.lower(mmc.capture(model, (x,)), "inductor")
    xt = torch.randn(16, 5, 2).permute(2, 1, 0)  # same shape, non-contiguous
    with torch.no_grad():
        torch.testing.assert_close(compiled(xt), model(xt), rtol=1e-5, atol=1e-5)


def test_inductor_kernel_options_are_checked_and_say_what_to_do(monkeypatch):
    from mmcompile import kernels
    from mmcompile.errors import BackendError

    prog = mmc.capture(torch.nn.Linear(8, 4), (torch.randn(1, 8),))
    with pytest.raises(BackendError, match="gemv='fast' is not an option; use 'auto'"):
        mmc.lower(prog, "inductor", gemv="fast")
    with pytest.raises(BackendError, match="attention='flash' is not an option"):
        mmc.lower(prog, "inductor", attention="flash")
    with pytest.raises(BackendError, match="gemv_fusion='yes' is not an option"):
        mmc.lower(prog, "inductor", gemv_fusion="yes")
    with pytest.raises(BackendError, match="attention_fusion='on' is not an option; use 'auto'"):
        mmc.lower(prog, "inductor", attention_fusion="on")
    with pytest.raises(BackendError, match="pdl='always' is not an option; use 'auto'"):
        mmc.lower(prog, "inductor", pdl="always")
    monkeypatch.setattr(kernels, "available", lambda device="cuda": (False, "triton cannot be imported (test)"))
    with pytest.raises(BackendError, match="gemv='triton' but triton cannot be imported \\(test\\); use gemv='cublas'"):
        mmc.lower(prog, "inductor", gemv="triton")
    x = torch.randn(1, 8)
    torch.testing.assert_close(mmc.lower(prog, "inductor", gemv="cublas")(x), prog(x))


def test_inductor_analyses_each_kernel_specialization_once(monkeypatch):
    """Inductor analyses a user-defined Triton kernel at every call site; inside the backend's compile
    mmcompile's kernels are analysed once per specialization (constexprs and numbers by value, tensors by
    dtype), other kernels and unhashable arguments every time, and torch's function comes back after."""
    from torch._higher_order_ops import triton_kernel_wrap as wrap

    from mmcompile.backends.inductor import kernel_analysis_once

    name = next((n for n in ("identify_accessed_tensors", "identify_mutated_tensors") if hasattr(wrap, n)), None)
    if name is None:
        pytest.skip("this torch has no per-call Triton kernel analysis to memoize")
    calls = []

    def analyse(kernel, kwargs, tma):
        calls.append(kernel)
        return [k for k, v in kwargs.items() if isinstance(v, torch.Tensor) and k.startswith("y")]

    monkeypatch.setattr(wrap, name, analyse)

    def ours():
        pass

    def theirs():
        pass

    ours.__module__ = "mmcompile.kernels"
    x, y = torch.zeros(2, dtype=torch.bfloat16), torch.zeros(2, dtype=torch.bfloat16)
    args = dict(x_ptr=x, y_ptr=y, N=4096, BLOCK=64, eps=1e-5)
    with kernel_analysis_once():
        analysed = getattr(wrap, name)
        first = analysed(ours, args, {})
        assert first == ["y_ptr"]
        first.append("changed by a caller")
        assert analysed(ours, dict(args, x_ptr=torch.ones(8, dtype=torch.bfloat16)), {}) == ["y_ptr"]
        assert len(calls) == 1  # same dtypes and numbers: the first answer, a fresh copy
        analysed(ours, dict(args, N=11008), {})
        analysed(ours, dict(args, x_ptr=x.float()), {})
        analysed(ours, dict(args, BLOCK=128), {})
        assert len(calls) == 4  # another size, dtype or constexpr is another specialization
        analysed(theirs, args, {})
        analysed(theirs, args, {})
        analysed(ours, dict(args, N=object()), {})
        assert len(calls) == 7  # other modules' kernels and arguments without a key: every time
    assert getattr(wrap, name) is analyse


@settings(max_examples=60, deadline=None)
@given(data=st.data(), chunk=st.sampled_from([1, 3, 8, 64]))
def test_read_spans_pieces_cover_every_span_once_within_a_chunk(data, chunk):
    """The reads ``read_spans`` plans: each at most a chunk long, and the copies out of them put every byte
    of every span — spans overlapping, touching, empty or far apart — in place exactly once."""
    from mmcompile.backends import _pieces

    spans = data.draw(st.dictionaries(st.integers(0, 9), st.tuples(st.integers(0, 200), st.integers(0, 70)),
                                      max_size=6))
    filled = {key: [0] * length for key, (_, length) in spans.items()}
    for offset, length, copies in _pieces(spans, chunk):
        assert 0 < length <= chunk
        for key, at, start, n in copies:
            assert 0 <= start and start + n <= length and n > 0
            assert spans[key][0] + at == offset + start  # the bytes copied are the span's own
            for i in range(at, at + n):
                filled[key][i] += 1
    assert all(count == 1 for counts in filled.values() for count in counts)


def test_read_spans_reads_each_span_and_refuses_one_past_the_end(tmp_path):
    from mmcompile.backends import read_spans

    data = torch.randint(0, 256, (10_000,), dtype=torch.uint8)
    path = tmp_path / "weights.bin"
    path.write_bytes(data.numpy().tobytes())
    spans = {"a": (0, 4096), "b": (4100, 3000), "same": (4100, 3000), "tail": (9000, 1000), "empty": (50, 0)}
    got = read_spans(path, spans, "cpu", chunk=1024, workers=3)
    for key, (offset, length) in spans.items():
        assert torch.equal(got[key], data[offset:offset + length]), key
    with pytest.raises(EOFError, match="weights.bin is 10000 bytes, but a span ends at"):
        read_spans(path, {"past": (9000, 2000)}, "cpu", chunk=1024)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="copies through page-locked buffers to a CUDA device")
def test_read_spans_to_cuda_through_pinned_buffers(tmp_path):
    from mmcompile.backends import read_spans

    data = torch.randint(0, 256, (50 << 20,), dtype=torch.uint8)
    path = tmp_path / "weights.bin"
    path.write_bytes(data.numpy().tobytes())
    spans = {i: (i * (3 << 20) + 64 * i, (2 << 20) + 7 * i) for i in range(16)}
    got = read_spans(path, spans, "cuda", chunk=1 << 20, workers=4)
    for key, (offset, length) in spans.items():
        assert got[key].device.type == "cuda" and torch.equal(got[key].cpu(), data[offset:offset + length]), key
