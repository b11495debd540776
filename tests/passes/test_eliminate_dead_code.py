"""Golden tests of eliminate_dead_code: unused nodes and constants go; side effects stay.

torch.export already drops dead code of the model itself, so dead nodes here are made the way passes
make them: by inserting a node nobody reads, or by a (toy) pass rewiring a use away.
"""

from __future__ import annotations

import torch
from torch import nn

import mmcompile as mmc
from mmcompile import testing
from mmcompile.rewrite import insert_call

aten = torch.ops.aten


def dce(prog: mmc.Program, **kwargs):
    return testing.check_pass(prog, "eliminate_dead_code", **kwargs)


def the_node(prog: mmc.Program, target) -> torch.fx.Node:
    (node,) = [n for n in prog.graph.nodes if n.op == "call_function" and n.target == target]
    return node


class Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return self.lin(x) * self.scale + 1


class DropScale(mmc.Pass):
    """Toy pass: ``mul(h, scale)`` -> ``h``; leaves the ``scale`` weight unread."""

    name = "test_drop_scale"

    def run(self, program, options):
        report = self.report()
        mul = the_node(program, aten.mul.Tensor)
        mul.replace_all_uses_with(mul.args[0])
        program.graph.erase_node(mul)
        report.count("rewired")
        return report


class BypassLayer(mmc.Pass):
    """Toy pass: ``mul(lin(x), scale)`` -> ``mul(x, scale)``; leaves the whole linear layer unread."""

    name = "test_bypass_layer"

    def run(self, program, options):
        report = self.report()
        mul = the_node(program, aten.mul.Tensor)
        mul.replace_input_with(mul.args[0], program.placeholders()[0])
        report.count("rewired")
        return report


# ---------------------------------------------------------------------------------------- removes
def test_removes_unused_computation():
    prog = mmc.capture(lambda x: x + 1, (torch.randn(3),), name="f")
    x, out = prog.placeholders()[0], prog.graph.output_node()
    exp = insert_call("test", prog.graph_module, out, aten.exp.default, (x,))
    insert_call("test", prog.graph_module, out, aten.mul.Tensor, (exp, 2.0))
    prog.graph_module.recompile()
    _, report = dce(prog, changed=True, checks="CHECK: aten.add.Tensor(%args_0, 1)\nCHECK-NEXT: return",
                    op_counts={"aten.exp.default": 0, "aten.mul.Tensor": 0, "aten.add.Tensor": 1})
    assert report.stats["nodes_removed"] == 2


def test_deletes_weight_another_pass_made_dead():
    prog, _ = testing.run_pass(mmc.capture(Linear(), (torch.randn(2, 4),)), DropScale())
    (scale,) = [n for n in prog.graph.nodes if n.op == "get_attr" and n.target == "scale"]
    assert not scale.users and hasattr(prog.graph_module, "scale")
    after, report = dce(prog, changed=True, checks="CHECK-NOT: constant scale")
    assert report.stats["nodes_removed"] == 1 and report.stats["constants_removed"] == 1
    assert "scale" not in after.constants() and not hasattr(after.graph_module, "scale")
    assert set(after.constants()) == {"lin.weight", "lin.bias"}


def test_deletes_dead_layer_and_its_empty_submodule():
    prog, _ = testing.run_pass(mmc.capture(Linear(), (torch.randn(2, 4),)), BypassLayer())
    after, report = dce(prog, changed=True, op_counts={"aten.addmm.default": 0, "aten.permute.default": 0})
    assert report.stats["nodes_removed"] == 4  # permute, addmm, lin.weight, lin.bias
    assert report.stats["constants_removed"] == 2
    assert set(after.constants()) == {"scale"}
    assert not hasattr(after.graph_module, "lin")


def test_deletes_tensor_attribute_no_node_reads():
    prog = mmc.capture(Linear(), (torch.randn(2, 4),))
    prog.graph_module.register_buffer("stale", torch.zeros(1024))  # Program.clone() would not copy it: run in place
    report = mmc.passes.get("eliminate_dead_code")(prog)
    assert report.stats["constants_removed"] == 1
    assert not hasattr(prog.graph_module, "stale")
    assert set(prog.constants()) == {"lin.weight", "lin.bias", "scale"}


def test_second_run_changes_nothing():
    prog = mmc.capture(lambda x: x + 1, (torch.randn(3),), name="f")
    insert_call("test", prog.graph_module, prog.graph.output_node(), aten.exp.default, (prog.placeholders()[0],))
    once, first = testing.run_pass(prog, "eliminate_dead_code")
    twice, second = testing.run_pass(once, "eliminate_dead_code")
    assert first.changed and not second.changed and not second.stats
    assert str(twice) == str(once)


# ---------------------------------------------------------------------------------------- keeps
class IndexPutCache(nn.Module):
    def forward(self, x, cache, pos):
        cache.index_put_((pos,), x)
        return cache.sum() * 1


class AddInPlace(nn.Module):
    def forward(self, x, buf):
        buf.add_(x)
        return x * 2


def test_keeps_index_put_state_update():
    prog = mmc.capture(IndexPutCache(), (torch.randn(2, 4), torch.zeros(8, 4), torch.tensor([1, 5])))
    dce(prog, changed=False, checks="CHECK: aten.copy_(%cache, %index_put)",
        op_counts={"aten.copy_.default": 1, "aten.index_put.default": 1})


def test_keeps_in_place_add_on_state_input():
    # copy_ has no user, and its source feeds nothing else: both stay
    prog = mmc.capture(AddInPlace(), (torch.randn(2, 4), torch.zeros(2, 4)))
    dce(prog, changed=False, checks="CHECK: aten.add.Tensor(%buf, %x)\nCHECK: aten.copy_(%buf, %add)",
        op_counts={"aten.copy_.default": 1, "aten.add.Tensor": 1})


def test_removes_dead_code_but_keeps_state_update():
    prog = mmc.capture(AddInPlace(), (torch.randn(2, 4), torch.zeros(2, 4)))
    insert_call("test", prog.graph_module, the_node(prog, aten.copy_.default), aten.exp.default,
                (prog.placeholders()[0],))
    _, report = dce(prog, changed=True, op_counts={"aten.exp.default": 0, "aten.copy_.default": 1})
    assert report.stats["nodes_removed"] == 1


class Assertions(nn.Module):
    def forward(self, x, n):
        k = n.item()
        torch._check(k >= 1)
        torch._check(k <= 4)
        return x[:k] * 2, x.to(torch.float32) + 1


def test_keeps_runtime_assertions():
    prog = mmc.capture(Assertions(), (torch.randn(8, 4), torch.tensor(3)))
    out = prog.graph.output_node()
    with prog.graph.inserting_before(out):  # an assertion nothing reads (capture may or may not write one)
        prog.graph.call_function(torch.ops.aten._assert_tensor_metadata.default, (prog.placeholders()[0],),
                                 {"dtype": torch.float32})
    prog.graph_module.recompile()
    dce(prog, changed=False, op_counts={"aten._assert_scalar.default": 2, "aten._assert_tensor_metadata.default": 1})


def test_keeps_unused_random_op():
    # removing it would shift the random stream every later random op draws from
    prog = mmc.capture(lambda x: x + 1, (torch.randn(3),), name="f")
    insert_call("test", prog.graph_module, prog.graph.output_node(), aten.randn.default, ([3],))
    dce(prog, changed=False, op_counts={"aten.randn.default": 1})


def test_keeps_unused_input():
    prog = mmc.capture(lambda x, y: x + 1, (torch.randn(3), torch.randn(3)), name="f")
    after, _ = dce(prog, changed=False)
    assert len(after.placeholders()) == 2
