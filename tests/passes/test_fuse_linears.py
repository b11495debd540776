"""fuse_linears: linear layers that read the same input become one matmul over stacked weights."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

import mmcompile as mmc
from mmcompile import testing

aten = torch.ops.aten


class Heads(torch.nn.Module):
    """Linears of sizes ``outs`` on one input (with or without bias each), plus one on another input."""

    def __init__(self, outs=(12, 8, 8), biases=(False, False, False), k=16):
        super().__init__()
        self.heads = torch.nn.ModuleList(torch.nn.Linear(k, n, bias=b) for n, b in zip(outs, biases))
        self.other = torch.nn.Linear(k, 4)

    def forward(self, x, z):
        return [h(x) for h in self.heads] + [self.other(z)]


def capture(model, rows=3, dtype=torch.float32, k=16):
    g = torch.Generator().manual_seed(0)
    model = model.to(dtype)
    return mmc.capture(model, (torch.randn(rows, k, generator=g, dtype=dtype),
                               torch.randn(rows, k, generator=g, dtype=dtype)))


def test_fuses_linears_on_one_input_and_leaves_the_rest():
    checks = """
    CHECK: aten.mm
    CHECK: aten.slice
    CHECK: aten.slice
    CHECK: aten.slice
    """
    after, report = testing.check_pass(capture(Heads()), "fuse_linears", changed=True, checks=checks,
                                       op_counts={"aten.mm.default": 1, "aten.addmm.default": 1})
    assert report.stats["fused"] == 3 and report.stats["groups"] == 1
    fused = [v for k, v in after.constants().items() if "fused_weight" in k]
    assert [tuple(t.shape) for t in fused] == [(28, 16)]
    assert not any("heads" in k and "fused" not in k for k in after.constants())  # the layers' own weights are gone


@pytest.mark.parametrize("biases", [(True, True, True), (True, False, True)])
def test_biases_are_stacked_and_a_missing_bias_is_zeros(biases):
    after, _ = testing.check_pass(capture(Heads(biases=biases)), "fuse_linears", changed=True,
                                  op_counts={"aten.addmm.default": 2, "aten.mm.default": 0})
    bias = next(v for k, v in after.constants().items() if "fused_bias" in k)
    assert bias.shape == (28,)
    if not biases[1]:
        assert torch.all(bias[12:20] == 0)


def test_the_model_weights_become_views_of_the_stacked_weight_and_a_second_capture_reuses_it():
    model = Heads()
    before = [h.weight.detach().clone() for h in model.heads]
    first = mmc.optimize(capture(model), ["fuse_linears"]).program
    stacked = next(v for k, v in first.constants().items() if "fused_weight" in k)
    for h, w in zip(model.heads, before):
        assert torch.equal(h.weight, w)  # same values ...
        assert h.weight.untyped_storage().data_ptr() == stacked.untyped_storage().data_ptr()  # ... in its storage
    second = mmc.optimize(capture(model), ["fuse_linears"]).program
    again = next(v for k, v in second.constants().items() if "fused_weight" in k)
    assert again.data_ptr() == stacked.data_ptr()  # no second copy
    # an in-place update of the model's weights reaches the compiled program
    x, z = torch.randn(3, 16), torch.randn(3, 16)
    compiled = mmc.lower(first, "eager")
    with torch.no_grad():
        model.heads[1].weight.mul_(2)
        torch.testing.assert_close(compiled(x, z)[1], model(x, z)[1])


def test_a_consumer_that_cannot_view_a_column_slice_reads_a_contiguous_copy():
    class Flat(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(8, 6), torch.nn.Linear(8, 10)

        def forward(self, x):
            return self.a(x).reshape(-1) * 2, self.b(x).reshape(-1)

    prog = mmc.capture(Flat(), (torch.randn(3, 8),))
    after, _ = testing.check_pass(prog, "fuse_linears", changed=True)
    assert after.op_counts()["aten.clone.default"] == 2


def test_keeps_groups_it_cannot_prove_and_says_why():
    class Mixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(8, 4)
            self.b = torch.nn.Linear(8, 4).double()

        def forward(self, x):
            return self.a(x), self.b(x.double())

    class Shared(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(8, 4, bias=False)

        def forward(self, x):
            return self.a(x), self.a(x) * 2

    _, report = testing.check_pass(mmc.capture(Mixed(), (torch.randn(2, 8),)), "fuse_linears", changed=False,
                                   options={"explain": True})
    assert report.stats["kept"] == 0  # different inputs (x and x.double()): nothing to group
    _, report = testing.check_pass(mmc.capture(Shared(), (torch.randn(2, 8),)), "fuse_linears", changed=False,
                                   options={"explain": True})
    assert any("read the same weight" in n for n in report.notes), report.notes


def test_llama_fuses_qkv_and_gate_up_and_quantizes_the_stacked_weights():
    model = mmc.models.build("llama:tiny", seed=0)
    call = (torch.randint(0, 256, (2, 5)), torch.arange(5)[None].expand(2, 5), model.empty_cache(2, 16))
    prog = mmc.capture(model, call)
    after, report = testing.check_pass(prog, "fuse_linears", changed=True)
    L = model.config.n_layers
    assert report.stats["groups"] == 2 * L and report.stats["fused"] == 5 * L  # q, k, v and gate, up per layer
    with torch.no_grad():
        ref = model(*call)
    both = mmc.optimize(mmc.capture(model, call), ["fuse_linears", "quantize_linear"]).program
    alone = mmc.optimize(mmc.capture(model, call), ["quantize_linear"]).program
    assert both.op_counts()["mmcompile.linear_int8.default"] == 2 * L + L * 2  # qkv, o, gate/up, down per layer
    # per-output-channel scales: quantizing the stacked weight gives the same numbers as each layer apart
    torch.testing.assert_close(mmc.lower(both, "eager")(*call), mmc.lower(alone, "eager")(*call), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mmc.lower(both, "eager")(*call), ref, rtol=5e-2, atol=5e-2)


@settings(max_examples=15, deadline=None)
@given(outs=st.lists(st.integers(1, 24), min_size=2, max_size=4), rows=st.integers(1, 5),
       bias_bits=st.integers(0, 15), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_property_fused_outputs_equal_the_layers_apart(outs, rows, bias_bits, dtype):
    biases = tuple(bool(bias_bits >> i & 1) for i in range(len(outs)))
    torch.manual_seed(len(outs) * 31 + rows)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    testing.check_pass(capture(Heads(tuple(outs), biases), rows=rows, dtype=dtype), "fuse_linears", changed=True,
                       rtol=tol, atol=tol)
