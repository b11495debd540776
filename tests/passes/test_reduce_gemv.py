"""reduce_gemv: batch-1 linear layers with large weights become fp32 multiply-and-sum reductions."""

import pytest
import torch

import mmcompile as mmc
from mmcompile import testing

CPU_TOO = {"devices": ("cpu", "cuda"), "min_weight_elements": 1000}


class Linears(torch.nn.Module):
    def __init__(self, bias=False):
        super().__init__()
        self.big = torch.nn.Linear(64, 96, bias=bias)    # 6144 weights
        self.small = torch.nn.Linear(96, 8, bias=False)  # 768 weights

    def forward(self, x):
        return self.small(torch.relu(self.big(x)))


def capture(rows, bias=False, dtype=torch.float32):
    torch.manual_seed(0)
    model = Linears(bias).to(dtype)
    return mmc.capture(model, (torch.randn(rows, 64, dtype=dtype),))


@pytest.mark.parametrize("bias", [False, True])
def test_rewrites_a_large_batch1_linear_into_a_reduction(bias):
    checks = """
    CHECK: aten.mul.Tensor
    CHECK: aten.sum.dim_IntList
    CHECK: aten.mm
    """
    _, report = testing.check_pass(capture(1, bias), "reduce_gemv", changed=True, options=CPU_TOO, checks=checks,
                                   op_counts={"aten.sum.dim_IntList": 1, "aten.mm.default": 1})
    assert report.stats["rewritten"] == 1 and report.stats["kept"] == 1  # the small layer stays a matmul


def test_accumulates_in_float32_for_bfloat16():
    prog = capture(1, dtype=torch.bfloat16)
    after, _ = testing.check_pass(prog, "reduce_gemv", changed=True, options=CPU_TOO, rtol=2e-2, atol=2e-2)
    sums = [n for n in after.graph.nodes if n.target is torch.ops.aten.sum.dim_IntList]
    assert sums[0].meta["val"].dtype == torch.float32
    assert after.graph.output_node().args[0][0].meta["val"].dtype == torch.bfloat16


def test_keeps_matmuls_with_several_rows_and_says_why():
    _, report = testing.check_pass(capture(4), "reduce_gemv", changed=False, options={**CPU_TOO, "explain": True})
    assert any("4 rows > max_rows=1" in n for n in report.notes)


def test_keeps_the_cpu_blas_by_default():
    _, report = testing.check_pass(capture(1), "reduce_gemv", changed=False,
                                   options={"min_weight_elements": 1000, "explain": True})
    assert any("not one of ('cuda',)" in n for n in report.notes)


def test_default_threshold_keeps_small_weights():
    _, report = testing.check_pass(capture(1), "reduce_gemv", changed=False,
                                   options={"devices": ("cpu",), "explain": True})
    assert any("smaller than 33554432 elements" in n for n in report.notes)
