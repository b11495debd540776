"""The Triton GEMV kernels (mmcompile.kernels) against the reference math.

On a CPU machine they run under Triton's interpreter (conftest sets TRITON_INTERPRET=1), on a GPU as
compiled kernels; either way every case compares with the float computation of the same quantized
weights. The interpreter has no bfloat16 matrix product, so the several-row (tl.dot) cases use float16
there."""

import inspect

import pytest
import torch
from hypothesis import given, settings, strategies as st

from mmcompile import kernels, ops
from mmcompile.quant import dequantize_int4, dequantize_int8, int4_words, pack_int4, quantize_int4, quantize_int8

pytestmark = pytest.mark.skipif(not kernels.available("cuda" if torch.cuda.is_available() else "cpu")[0],
                                reason="triton is not installed (the kernels are checked where it is)")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = {"BLOCK_N": 16, "BLOCK_K": 64, "num_warps": 4}  # small tiles: several K steps and N programs


def dtype_for(rows):
    return torch.bfloat16 if rows == 1 or DEVICE == "cuda" else torch.float16


def close(y, ref, x):
    # fp32 accumulation; the output is rounded once to the activation dtype
    tol = 2e-2 if x.dtype == torch.bfloat16 else 4e-3
    torch.testing.assert_close(y.float(), ref, rtol=tol, atol=tol * ref.abs().max().item())


@settings(max_examples=12, deadline=None)
@given(rows=st.sampled_from([1, 2, 5, 16]), n=st.integers(1, 70), k=st.sampled_from([16, 48, 64, 200]),
       bias=st.booleans())
def test_float_gemv_matches_matmul(rows, n, k, bias):
    g = torch.Generator().manual_seed(rows * 1000 + n * 7 + k)
    dt = dtype_for(rows)
    x = torch.randn(rows, k, generator=g).to(DEVICE, dt)
    w = torch.randn(n, k, generator=g).to(DEVICE, dt)
    b = torch.randn(n, generator=g).to(DEVICE, dt) if bias else None
    ref = x.float() @ w.float().t() + (b.float() if bias else 0)
    close(kernels.gemv(x, w, b, config=SMALL), ref, x)


@settings(max_examples=10, deadline=None)
@given(rows=st.sampled_from([1, 3, 8]), n=st.integers(1, 40), k=st.sampled_from([32, 96, 256]),
       outlier=st.booleans(), zero_row=st.booleans())
def test_int8_gemv_matches_dequantized_matmul(rows, n, k, outlier, zero_row):
    g = torch.Generator().manual_seed(rows * 100 + n + k)
    dt = dtype_for(rows)
    w = torch.randn(n, k, generator=g)
    if outlier:
        w[0, k // 2] = 50.0
    if zero_row:
        w[-1] = 0
    q, s = quantize_int8(w)
    x = torch.randn(rows, k, generator=g).to(DEVICE, dt)
    q, s = q.to(DEVICE), s.to(DEVICE, dt)
    ref = x.float() @ dequantize_int8(q, s).t()
    y = kernels.gemv_int8(x, q, s, config=SMALL)
    close(y, ref, x)
    if zero_row:
        assert torch.all(y[:, -1] == 0)


@settings(max_examples=10, deadline=None)
@given(rows=st.sampled_from([1, 4, 16]), n=st.integers(1, 40), groups=st.integers(1, 5),
       group_size=st.sampled_from([32, 64, 128]), per_step=st.sampled_from([1, 2, 4]), bias=st.booleans())
def test_int4_gemv_matches_dequantized_matmul(rows, n, groups, group_size, per_step, bias):
    """Group counts that do not divide the groups handled per step (e.g. 86 groups of 128 in 11008
    inputs) are masked, never read past the row."""
    g = torch.Generator().manual_seed(rows * 100 + n + groups * 3 + group_size)
    dt = dtype_for(rows)
    k = groups * group_size
    p, s, z = quantize_int4(torch.randn(n, k, generator=g), group_size)
    x = torch.randn(rows, k, generator=g).to(DEVICE, dt)
    p, s, z = p.to(DEVICE), s.to(DEVICE, dt), z.to(DEVICE, dt)
    b = torch.randn(n, generator=g).to(DEVICE, dt) if bias else None
    ref = x.float() @ dequantize_int4(p, s, z).t() + (b.float() if bias else 0)
    close(kernels.gemv_int4(x, p, s, z, b, config={"BLOCK_N": 16, "GROUPS": per_step, "num_warps": 4}), ref, x)


@settings(max_examples=10, deadline=None)
@given(n=st.integers(1, 40), groups=st.integers(1, 5), group_size=st.sampled_from([32, 64, 128]),
       per_step=st.sampled_from([1, 2, 4]), block_n=st.sampled_from([1, 4]), bias=st.booleans(),
       cvt=st.sampled_from(kernels.INT4_CONVERSIONS), dt=st.sampled_from([torch.bfloat16, torch.float16]),
       pdl=st.booleans())
def test_int4_word_kernel_matches_dequantized_matmul(n, groups, group_size, per_step, block_n, bias, cvt, dt, pdl):
    """The one-row kernel on the codes as words: every conversion, tile and group count (masked when the
    groups per step do not divide them), codes 0 and 15 included, equals the float product."""
    if cvt == "prmt" and DEVICE != "cuda":
        cvt = "bits"  # PTX: CUDA only
    g = torch.Generator().manual_seed(n * 31 + groups * 3 + group_size + per_step)
    k = groups * group_size
    w = torch.randn(n, k, generator=g)
    w[0, :group_size] = torch.linspace(-1, 1, group_size)  # the group's ends become codes 0 and 15
    p, s, z = quantize_int4(w, group_size)
    x = torch.randn(1, k, generator=g).to(DEVICE, dt)
    p, s, z = p.to(DEVICE), s.to(DEVICE, dt), z.to(DEVICE, dt)
    b = torch.randn(n, generator=g).to(DEVICE, dt) if bias else None
    ref = x.float() @ dequantize_int4(p, s, z).t() + (b.float() if bias else 0)
    cfg = {"BLOCK_N": block_n, "GROUPS": per_step, "num_warps": 4, "INT4_CVT": cvt, "PDL": pdl}
    close(kernels.gemv_int4_words(x, int4_words(p, groups), s, z, b, config=cfg), ref, x)


def test_int4_words_hold_each_groups_inputs_as_contiguous_runs_of_nibbles():
    codes = torch.arange(64).remainder(16).view(1, 64).to(torch.uint8)  # two groups of 32: 0..15, 0..15, ...
    words = int4_words(pack_int4(codes), 2)  # [1, 8]: four words per group, runs of 4 inputs per nibble
    assert words.dtype == torch.int32 and words.shape == (1, 8)
    w = words.view(torch.uint32).to(torch.int64) if hasattr(torch, "uint32") else words.to(torch.int64) % 2 ** 32
    for group in range(2):
        for j in range(4):
            for i in range(8):
                assert (w[0, group * 4 + j] >> (4 * i)) & 15 == codes[0, group * 32 + i * 4 + j]
    with pytest.raises(ValueError, match="groups of a multiple of 8 inputs"):
        int4_words(pack_int4(codes), 16)
    x = torch.randn(2, 64)
    ok, why = kernels.int4_words_supported(x, words, torch.zeros(1, 2))
    assert not ok and "2 rows" in why
    assert kernels.int4_words_supported(x[:1], words, torch.zeros(1, 4)) == (True, "")  # groups of 16
    ok, why = kernels.int4_words_supported(x[:1], words, torch.zeros(1, 8))
    assert not ok and "groups of 8 inputs" in why
    ok, why = kernels.int4_words_supported(x[:1, :32], words, torch.zeros(1, 2))
    assert not ok and "32 inputs against words for 64" in why


def test_default_tiles_and_the_registered_ops_agree_with_explicit_tiles():
    x = torch.randn(1, 512).to(DEVICE, torch.bfloat16)
    w = torch.randn(48, 512).to(DEVICE, torch.bfloat16)
    torch.testing.assert_close(kernels.gemv(x, w), kernels.gemv(x, w, config=SMALL), rtol=1e-2, atol=1e-2)
    assert torch.equal(kernels.gemv(x, w), torch.ops.mmcompile.triton_gemv(x, w))


@pytest.mark.skipif(DEVICE != "cuda", reason="Inductor launches the kernels from its own code on a CUDA device only")
@pytest.mark.parametrize("fused", [False, True], ids=["gemv", "gemv_fused"])
def test_rows_sliced_from_a_wider_product_under_inductor_equal_eager(fused):
    """Traced under Inductor, the kernel's row strides are numbers fixed at trace time; rows that are a
    slice of a wider product (strides with gaps) must still be read where they are."""
    torch.manual_seed(0)
    a = torch.randn(4, 96, device=DEVICE, dtype=torch.bfloat16)
    wide = torch.randn(2 * 160, 96, device=DEVICE, dtype=torch.bfloat16) / 10
    w = torch.randn(48, 160, device=DEVICE, dtype=torch.bfloat16) / 10

    def f(a):
        both = a @ wide.t()  # [4, 320]; each half is a [4, 160] view with a row stride of 320
        if fused:
            return kernels.gemv_fused(both[:, :160], w, up=both[:, 160:], residual=torch.ones(4, 48, device=DEVICE,
                                                                                               dtype=a.dtype))
        return kernels.gemv(both[:, 160:], w)

    torch._dynamo.reset()
    close(torch.compile(f, fullgraph=True)(a), f(a).float(), a)


def test_every_int8_conversion_gives_the_same_products():
    # each way of turning int8 weights into fp32 is exact, so with one tile the sums are the same bits
    convs = [c for c in kernels.INT8_CONVERSIONS if DEVICE == "cuda" or c != "prmt"]  # PTX: CUDA only
    x = torch.randn(1, 300).to(DEVICE, torch.bfloat16)
    q, s = quantize_int8(torch.randn(37, 300).to(DEVICE))
    q[0, :8] = torch.tensor([-128, -127, -1, 0, 1, 127, 64, -64], dtype=torch.int8)  # the ends of the range
    outs = [kernels.gemv_int8(x, q, s, config={"BLOCK_N": 4, "BLOCK_K": 128, "num_warps": 4, "INT8_CVT": c})
            for c in convs]
    for c, y in zip(convs[1:], outs[1:]):
        assert torch.equal(y, outs[0]), c
    close(outs[0], x.float() @ dequantize_int8(q, s).t(), x)
    with pytest.raises(ValueError, match="INT8_CVT='fast'; choose from cvt, bits, prmt"):
        kernels.gemv_int8(x, q, s, config={"BLOCK_N": 4, "BLOCK_K": 128, "INT8_CVT": "fast"})


def test_the_kernels_survive_being_copied_into_inductors_generated_code():
    # Inductor (torch 2.11) puts a user kernel's source into a '''-quoted literal without escaping it;
    # an escape sequence in the source (say a newline in an inline-asm string) then changes the copy and
    # the generated module does not import. Every kernel the Inductor backend launches must round-trip.
    from mmcompile import decode_attention, hstu_attention

    fns = [kernels._gemv_kernel, kernels._row_step, kernels._row_activations, kernels._row_product,
           kernels._gemv_int4_kernel,
           kernels._gemv_int4_words_kernel, kernels._words_tile, kernels._words_step, kernels._nibble_bits,
           kernels._slab,
           decode_attention._decode_kernel, hstu_attention._hstu_kernel, hstu_attention._hstu_heads_kernel, hstu_attention._rows,
           hstu_attention._relative_bias, hstu_attention._rule]
    for fn in fns:
        src = inspect.getsource(fn.fn)  # the Python function under the JIT (or interpreter) wrapper
        assert eval("'''" + src + "'''") == src, fn.fn.__name__


@pytest.mark.parametrize("launch", ["plain", "pdl", "int8", "int4", "int4_words", "int4_words_pdl"])
def test_every_kernel_argument_is_passed_not_left_to_its_default(monkeypatch, launch):
    # Inductor (torch 2.11) launches a user kernel with the arguments of the traced call and nothing
    # else: a parameter left to its default shifts the grid into the arguments, and the launch fails.
    calls = []

    class Recorder:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            return lambda *args, **kw: calls.append((self.fn, len(args), kw))

    monkeypatch.setattr(kernels, "wrap_triton", lambda fn: fn)  # the dependent launch does not wrap
    for name in ("_gemv_kernel", "_gemv_int4_kernel", "_gemv_int4_words_kernel"):
        monkeypatch.setattr(kernels, name, Recorder(getattr(kernels, name)))
    x = torch.randn(1, 64).to(DEVICE, torch.bfloat16)
    w = torch.randn(32, 64).to(DEVICE, torch.bfloat16)
    if launch.startswith("int4"):
        packed, scales, zeros = (t.to(DEVICE) for t in quantize_int4(w.float(), 32))
        if launch == "int4":
            kernels._launch_int4(x, packed, scales, zeros, None, None)
        else:
            kernels._launch_int4_words(x, int4_words(packed, 2), scales, zeros, None, None, pdl=launch.endswith("pdl"))
    elif launch == "int8":
        q, s = quantize_int8(w.float())
        kernels._launch(x, q.to(DEVICE), s.to(DEVICE, torch.bfloat16), None, "int8", None)
    else:
        kernels._launch(x, w, None, None, "float", None, pdl=launch == "pdl")
    (fn, positional, kw), = calls
    passed = fn.arg_names[:positional] + [k for k in kw if k in fn.arg_names]
    assert passed == fn.arg_names, set(fn.arg_names) - set(passed)


def test_inapplicable_calls_say_why():
    x32 = torch.randn(1, 64, device=DEVICE)
    w = torch.randn(8, 64, device=DEVICE)
    ok, why = kernels.supported(x32, w)
    assert not ok and "float32" in why
    x = torch.randn(17, 64).to(DEVICE, torch.float16)
    ok, why = kernels.supported(x, w)
    assert not ok and "17 rows" in why
    with pytest.raises(ValueError, match="not applicable: .*17 rows"):
        kernels.gemv(x, w.half())
    ok, why = kernels.int4_supported(torch.zeros(8, 12, dtype=torch.uint8), torch.zeros(8, 1))
    assert not ok and "24 inputs" in why
    # layouts the kernels would misread are refused, never computed wrongly
    xh = torch.randn(1, 64).to(DEVICE, torch.float16)
    ok, why = kernels.supported(xh, torch.randn(64, 8, device=DEVICE).half().t())
    assert not ok and "contiguous in K" in why
    ok, why = kernels.supported(xh, w.half(), torch.randn(16, device=DEVICE)[::2])
    assert not ok and "not contiguous" in why
    ok, why = kernels.int4_supported(torch.zeros(12, 8, dtype=torch.uint8).t(), torch.zeros(8, 1))
    assert not ok and "not contiguous" in why


def test_inductor_table_routes_decode_products_to_the_kernels_and_keeps_the_rest():
    """The Inductor backend's decompositions: a transposed contiguous weight with few rows goes to the
    kernel; another layout, many rows or float32 fall through (NotImplemented: Inductor's own mm)."""
    table = ops.inductor_decompositions(True, {}, devices=(DEVICE,))
    mm, addmm = table[torch.ops.aten.mm.default], table[torch.ops.aten.addmm.default]
    x = torch.randn(1, 64).to(DEVICE, torch.bfloat16)
    w = torch.randn(24, 64).to(DEVICE, torch.bfloat16)
    b = torch.randn(24).to(DEVICE, torch.bfloat16)
    close(mm(x, w.t()), x.float() @ w.float().t(), x)
    close(addmm(b, x, w.t()), x.float() @ w.float().t() + b.float(), x)
    assert mm(x, w.t().contiguous()) is NotImplemented  # a weight stored [K, N]: cuBLAS
    assert mm(torch.randn(64, 64).to(DEVICE, torch.bfloat16), w.t()) is NotImplemented  # prefill
    assert mm(x.float(), w.float().t()) is NotImplemented
    q, s = quantize_int8(w.float())
    q, s = q.to(DEVICE), s.to(DEVICE, torch.bfloat16)
    close(table[torch.ops.mmcompile.linear_int8.default](x, q, s), x.float() @ dequantize_int8(q, s).t(), x)
    # without the kernels the table is the decompositions alone
    plain = ops.inductor_decompositions(False)
    assert plain[torch.ops.aten.mm.default](x, w.t()) is NotImplemented
    assert plain[torch.ops.mmcompile.linear_int8.default] is ops._linear_int8_decomposed


def test_inductor_table_makes_products_over_one_index_pointwise():
    """A product over one index (transformers' rotary: inv_freq [B, D/2, 1] @ positions [B, 1, L]) is a
    multiply, bit for bit what the GEMM computes; longer products keep Inductor's own lowering."""
    for table in (ops.inductor_decompositions(True, {}, devices=(DEVICE,)), ops.inductor_decompositions(False)):
        bmm, mm = table[torch.ops.aten.bmm.default], table[torch.ops.aten.mm.default]
        freqs = (1e4 ** -torch.arange(0, 1, 1 / 64))[None, :, None].expand(2, 64, 1)
        pos = torch.tensor([[[7.0]], [[4093.0]]])
        out = bmm(freqs, pos)
        assert out is not NotImplemented and torch.equal(out, torch.bmm(freqs, pos))
        assert torch.equal(mm(freqs[0], pos[1]), freqs[0] @ pos[1])
        assert bmm(torch.randn(2, 3, 2), torch.randn(2, 2, 4)) is NotImplemented
        assert mm(torch.randn(3, 2), torch.randn(2, 4)) is NotImplemented


def test_importing_mmcompile_leaves_inductor_unloaded_until_a_kernel_op_is_used():
    # torch's triton_op imports Inductor and Dynamo; the kernels' ops are registered at first use, so a
    # program that only loads an artifact to run it does not pay that import. The first use may come
    # inside a Dynamo trace (torch.compile of a function calling kernels.gemv), which must not trace
    # into the registration (Dynamo refuses to trace triton_op) but run it.
    import subprocess
    import sys

    code = ("import sys, torch, mmcompile\n"
            "assert 'torch._dynamo' not in sys.modules and 'torch._inductor' not in sys.modules, 'loaded on import'\n"
            "from mmcompile import kernels, decode_attention, hstu_attention\n"
            "def f(x):\n"
            "    kernels.register(); decode_attention.register(); hstu_attention.register()\n"
            "    return x + 1\n"
            "torch.compile(f, backend='eager', fullgraph=True)(torch.ones(2))\n"
            "names = ['triton_gemv', 'triton_gemv_int8', 'triton_gemv_fused', 'triton_gemv_int4', 'decode_attention',\n"
            "         'triton_hstu_attention']\n"
            "assert kernels.triton is None or all(hasattr(torch.ops.mmcompile, n) for n in names)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.parametrize("weights", ["bf16", "int8"])
def test_pipelined_loads_give_the_same_products(weights):
    # STAGES only changes when the loads are issued, not the order of the sums: the same bits
    x = torch.randn(1, 1000).to(DEVICE, torch.bfloat16)
    w = torch.randn(40, 1000).to(DEVICE)
    q, s = quantize_int8(w)
    run = (lambda c: kernels.gemv(x, w.to(torch.bfloat16), config=c)) if weights == "bf16" else \
        (lambda c: kernels.gemv_int8(x, q, s.to(torch.bfloat16), config=c))
    plain = run({"BLOCK_N": 8, "BLOCK_K": 128, "num_warps": 4})
    assert torch.equal(run({"BLOCK_N": 8, "BLOCK_K": 128, "num_warps": 4, "STAGES": 3}), plain)


@pytest.mark.parametrize("weights", ["bf16", "int8"])
def test_accumulators_folded_per_run_of_inputs_give_the_products(weights):
    # VEC sums each run of VEC inputs before accumulating: another order of the same fp32 sums
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 1000, generator=g).to(DEVICE, torch.bfloat16)
    w = torch.randn(40, 1000, generator=g).to(DEVICE)
    q, s = quantize_int8(w)
    norm = (torch.rand(1000, generator=g) + 0.5).to(DEVICE, torch.bfloat16)
    weight, scales = (w.to(torch.bfloat16), None) if weights == "bf16" else (q, s.to(torch.bfloat16))
    dense = (w.to(torch.bfloat16).float() if weights == "bf16" else dequantize_int8(q, s.to(torch.bfloat16).float()))
    xf = x.float()
    ref = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.float()) @ dense.T
    for vec in (1, 8, 16):
        y = kernels.gemv_fused(x, weight, scales=scales, norm_weight=norm, eps=1e-5,
                               config={"BLOCK_N": 16, "BLOCK_K": 128, "num_warps": 4, "STAGES": 2, "VEC": vec})
        close(y, ref, x)
    with pytest.raises(ValueError, match="VEC=3 must be a positive divisor of BLOCK_K=128"):
        kernels.gemv_fused(x, weight, scales=scales, config={"BLOCK_N": 16, "BLOCK_K": 128, "num_warps": 4, "VEC": 3})
