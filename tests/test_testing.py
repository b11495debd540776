"""mmcompile.testing catches broken passes: wrong numbers, non-idempotence, lying reports, bad IR checks.

The toy passes here are Pass subclasses used as instances; none is registered globally.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mmcompile as mmc
from mmcompile import testing
from mmcompile.rewrite import insert_call, replace_node

aten = torch.ops.aten


class Scale(nn.Module):
    def forward(self, x):
        return torch.sin(x) * 2


class Accumulate(nn.Module):
    def forward(self, x, buf):
        buf.add_(x)
        return x * 2


@pytest.fixture(scope="module")
def prog() -> mmc.Program:
    # %x -> sin -> mul(%sin, 2) -> return
    return mmc.capture(Scale(), (torch.randn(3, 4),))


def muls(program: mmc.Program) -> list[torch.fx.Node]:
    return [n for n in program.graph.nodes if n.op == "call_function" and n.target is aten.mul.Tensor]


# ---------------------------------------------------------------------------------------- toy passes
class MulByTwoToAdd(mmc.Pass):
    """Correct: ``mul(a, 2)`` -> ``add(a, a)`` (exact)."""

    name = "test_mul_by_two_to_add"

    def run(self, program, options):
        report = self.report()
        for node in muls(program):
            if node.args[1] == 2:
                a = node.args[0]
                replace_node(node, insert_call(self.name, program.graph_module, node, aten.add.Tensor, (a, a)))
                report.count("rewritten")
        return report


class MulToAdd(mmc.Pass):
    """Wrong: ``mul(a, c)`` -> ``add(a, c)``."""

    name = "test_mul_to_add"

    def run(self, program, options):
        report = self.report()
        for node in muls(program):
            replace_node(node, insert_call(self.name, program.graph_module, node, aten.add.Tensor, tuple(node.args)))
            report.count("rewritten")
        return report


class AppendNode(mmc.Pass):
    """Not idempotent: adds one more harmless unused node every run."""

    name = "test_append_node"

    def run(self, program, options):
        report = self.report()
        insert_call(self.name, program.graph_module, program.graph.output_node(), aten.neg.default,
                    (program.placeholders()[0],))
        report.count("appended")
        return report


class Lies(MulByTwoToAdd):
    """Rewrites like MulByTwoToAdd but reports no change."""

    name = "test_lies"

    def run(self, program, options):
        super().run(program, options)
        return self.report()


class ReturnsNone(MulByTwoToAdd):
    name = "test_returns_none"

    def run(self, program, options):
        super().run(program, options)


class NoOp(mmc.Pass):
    name = "test_noop"

    def run(self, program, options):
        return self.report()


class Perturb(mmc.Pass):
    """Lossy: ``mul(a, 2)`` -> ``mul(a, 2 + eps)``; declares a tolerance like a quantization pass."""

    name = "test_perturb"
    exact = False
    tolerance = 1e-2

    def __init__(self, eps: float):
        self.eps = eps

    def run(self, program, options):
        report = self.report()
        for node in muls(program):
            if node.args[1] == 2:
                node.args = (node.args[0], 2 + self.eps)
                report.count("perturbed")
        return report


class StoreInput(mmc.Pass):
    """Wrong on state: the in-place update stores ``x`` instead of ``buf + x``."""

    name = "test_store_input"

    def run(self, program, options):
        report = self.report()
        for node in program.graph.nodes:
            if node.target is aten.copy_.default:
                node.args = (node.args[0], program.placeholders()[0])
                report.count("rewritten")
        return report


# ---------------------------------------------------------------------------------------- check_pass
def test_check_pass_accepts_a_correct_pass(prog):
    after, report = testing.check_pass(prog, MulByTwoToAdd(), changed=True, rtol=0, atol=0,
                                       checks="CHECK: aten.sin\nCHECK-NEXT: aten.add.Tensor(%sin, %sin)\n"
                                              "CHECK-NOT: aten.mul",
                                       op_counts={"aten.mul.Tensor": 0, "aten.add.Tensor": 1})
    assert report.stats["rewritten"] == 1
    assert muls(prog), "check_pass must leave the original Program alone"


def test_check_pass_accepts_registered_pass_by_name(prog):
    _, report = testing.check_pass(prog, "canonicalize", changed=False)
    assert report.name == "canonicalize"


def test_check_pass_catches_changed_numerics(prog):
    with pytest.raises(AssertionError, match="outputs: "):
        testing.check_pass(prog, MulToAdd())


def test_check_pass_without_numerics_misses_them(prog):
    testing.check_pass(prog, MulToAdd(), numerics=False, changed=True)


def test_check_pass_catches_changed_state_update():
    prog = mmc.capture(Accumulate(), (torch.randn(2, 4), torch.randn(2, 4)))
    with pytest.raises(AssertionError, match="state"):
        testing.check_pass(prog, StoreInput())


def test_check_pass_catches_non_idempotent_pass(prog):
    with pytest.raises(AssertionError, match="not idempotent"):
        testing.check_pass(prog, AppendNode())
    testing.check_pass(prog, AppendNode(), idempotent=False)


def test_check_pass_catches_pass_that_hides_a_change(prog):
    with pytest.raises(mmc.PassContractError, match="changed=False"):
        testing.check_pass(prog, Lies())


def test_check_pass_catches_pass_returning_none(prog):
    with pytest.raises(mmc.PassContractError, match="NoneType"):
        testing.check_pass(prog, ReturnsNone())


def test_check_pass_catches_wrong_changed_expectation(prog):
    with pytest.raises(AssertionError, match="changed=False, expected True"):
        testing.check_pass(prog, NoOp(), changed=True)
    with pytest.raises(AssertionError, match="changed=True, expected False"):
        testing.check_pass(prog, MulByTwoToAdd(), changed=False)


def test_check_pass_catches_failed_ir_check(prog):
    with pytest.raises(AssertionError, match="FileCheck failed"):
        testing.check_pass(prog, MulByTwoToAdd(), checks="CHECK: aten.mul")


def test_check_pass_catches_wrong_op_counts(prog):
    with pytest.raises(AssertionError, match="aten.add.Tensor: found 1, expected 2"):
        testing.check_pass(prog, MulByTwoToAdd(), op_counts={"aten.add.Tensor": 2})


def test_check_pass_uses_tolerance_of_lossy_pass(prog):
    testing.check_pass(prog, Perturb(1e-4), changed=True)  # within the pass's 1e-2
    with pytest.raises(AssertionError, match="outputs: "):
        testing.check_pass(prog, Perturb(0.5))


def test_run_pass_verifies_the_result(prog):
    class BreakMeta(NoOp):
        name = "test_break_meta"

        def run(self, program, options):
            report = self.report()
            # wrong dtype in meta["val"] of a new node: verify() must notice
            node = insert_call(self.name, program.graph_module, program.graph.output_node(), aten.neg.default,
                               (program.placeholders()[0],))
            node.meta["val"] = node.meta["val"].to(torch.float16)
            report.count("broken")
            return report

    with pytest.raises(mmc.VerificationError, match="claims f16"):
        testing.run_pass(prog, BreakMeta())


# ---------------------------------------------------------------------------------------- filecheck
def test_filecheck_passes_on_matching_ir(prog):
    testing.filecheck(prog, "CHECK: program Scale(%x: f32[3, 4])\nCHECK: aten.sin(%x)\nCHECK-NEXT: aten.mul.Tensor\n"
                            "CHECK-NOT: aten.add\nCHECK: return [%mul]")
    testing.filecheck(prog, "CHECK-COUNT-2: f32[3, 4] = aten.")


def test_filecheck_accepts_commented_directives(prog):
    testing.filecheck(prog, "# CHECK: aten.sin\n    # CHECK-NEXT: aten.mul")


@pytest.mark.parametrize("checks", [
    "CHECK: aten.cos",                          # missing op
    "CHECK: aten.mul\nCHECK-NEXT: aten.sin",    # wrong order
    "CHECK-NOT: aten.sin",                      # present op
    "CHECK-COUNT-2: aten.mul",                  # wrong count
    "no directives at all",
])
def test_filecheck_failure_raises_assertion_error_with_the_ir(prog, checks):
    with pytest.raises(AssertionError, match=r"(?s)FileCheck failed.*--- IR ---.*aten\.sin"):
        testing.filecheck(prog, checks)


def test_filecheck_takes_text():
    testing.filecheck("a\nb", "CHECK: a\nCHECK-NEXT: b")
    with pytest.raises(AssertionError):
        testing.filecheck("a\nb", "CHECK: b\nCHECK-NEXT: a")


# ---------------------------------------------------------------------------------------- op counts, numerics
def test_assert_op_counts(prog):
    testing.assert_op_counts(prog, {"aten.sin.default": 1, "aten.mul.Tensor": 1, "aten.add.Tensor": 0})
    with pytest.raises(AssertionError, match=r"aten.mul.Tensor: found 1, expected 0(?s:.*)program Scale"):
        testing.assert_op_counts(prog, {"aten.mul.Tensor": 0})
    with pytest.raises(AssertionError, match="aten.cos.default: found 0, expected 1"):
        testing.assert_op_counts(prog, {"aten.cos.default": 1})


def test_check_numerics_treats_nans_in_the_same_places_as_equal():
    # regression: NaN != NaN made every Program with a NaN output "differ" from itself
    prog = mmc.capture(lambda x: torch.log(x) * 2, (torch.tensor([-1.0, 0.0, 1.0, 2.0]),), name="f")
    testing.check_numerics(prog, prog.clone())
    testing.check_pass(prog, MulByTwoToAdd(), changed=True, rtol=0, atol=0)


def test_check_numerics_still_catches_a_new_nan():
    with pytest.raises(AssertionError, match="leaf 0"):
        testing.assert_close([torch.tensor([float("nan"), 4.0])], [torch.tensor([1.0, 4.0])])


def test_assert_close_names_the_differing_leaf():
    testing.assert_close((torch.ones(2), 3), (torch.ones(2), 3))
    with pytest.raises(AssertionError, match="leaf 1"):
        testing.assert_close((torch.ones(2), torch.zeros(2)), (torch.ones(2), torch.ones(2)))
    with pytest.raises(AssertionError, match="structure differs"):
        testing.assert_close((torch.ones(2),), [torch.ones(2)])
    with pytest.raises(AssertionError, match="leaf 0: 3 != 4"):
        testing.assert_close([3], [4])


def test_run_program_does_not_mutate_the_inputs_it_is_given():
    prog = mmc.capture(Accumulate(), (torch.randn(2, 4), torch.zeros(2, 4)))
    x, buf = torch.ones(2, 4), torch.zeros(2, 4)
    (out,), (_, buf_after) = testing.run_program(prog, [x, buf])
    assert torch.equal(out, 2 * x) and torch.equal(buf_after, x)
    assert torch.equal(buf, torch.zeros(2, 4))


def test_relative_error_is_the_largest_difference_over_the_largest_reference_magnitude():
    want = torch.tensor([[4.0, -8.0], [1.0, 0.0]])
    assert testing.relative_error(want + torch.tensor([[0.0, 0.0], [0.4, 0.0]]), want) == pytest.approx(0.05)
    assert testing.relative_error(want.bfloat16(), want) == 0.0  # dtypes compared in float32
    assert testing.relative_error(torch.full((3,), 0.5), torch.zeros(3)) == 0.5  # an all-zero reference: absolute
    assert torch.isnan(torch.tensor(testing.relative_error(torch.tensor([float("nan")]), torch.ones(1))))
