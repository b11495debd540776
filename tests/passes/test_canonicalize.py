"""Golden before/after tests of canonicalize: every rule, positive and negative, plus a property test.

Each test captures a tiny module with ``mmc.capture`` (so the graph is what real models give the pass).
Spellings that capture never produces (``transpose``, ``_unsafe_view``, ``mul.Scalar``, ``alias``, ...)
are built by respelling a node of a captured Program. ``testing.check_pass`` then checks the IR, op
counts, numerics against the Program before the pass (exactly: every rule is exact) and idempotence.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import mmcompile as mmc
from mmcompile import testing
from mmcompile.rewrite import insert_call, replace_node

aten = torch.ops.aten
EXACT = dict(rtol=0.0, atol=0.0)


class Unary(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class Binary(Unary):
    def forward(self, x, y):
        return self.fn(x, y)


def capture(fn, x: torch.Tensor | None = None, y: torch.Tensor | None = None) -> mmc.Program:
    x = torch.randn(2, 3, 4) if x is None else x
    if y is None:
        return mmc.capture(Unary(fn), (x,), name="f")
    return mmc.capture(Binary(fn), (x, y), name="f")


def the_node(prog: mmc.Program, target) -> torch.fx.Node:
    nodes = [n for n in prog.graph.nodes if n.op == "call_function" and n.target == target]
    assert len(nodes) == 1, f"expected one {target} node, found {len(nodes)}\n{prog}"
    return nodes[0]


def respell(prog: mmc.Program, node: torch.fx.Node, target, args: tuple, kwargs: dict | None = None) -> torch.fx.Node:
    """Replace ``node`` by ``target(*args, **kwargs)``: a spelling capture does not produce."""
    new = insert_call("test", prog.graph_module, node, target, args, kwargs)
    replace_node(node, new)
    prog.graph_module.recompile()
    return new


def interpose(prog: mmc.Program, node: torch.fx.Node, target, extra: tuple = (), kwargs: dict | None = None):
    """Insert ``target(node, *extra)`` right after ``node`` and make node's users read it instead."""
    users = list(node.users)
    new = insert_call("test", prog.graph_module, node.next, target, (node, *extra), kwargs)
    for user in users:
        user.replace_input_with(node, new)
    prog.graph_module.recompile()
    return new


def canonicalize(prog: mmc.Program, **kwargs):
    kwargs.setdefault("rtol", 0.0)
    kwargs.setdefault("atol", 0.0)
    return testing.check_pass(prog, "canonicalize", **kwargs)


# ---------------------------------------------------------------------------------------- transpose_to_permute
@pytest.mark.parametrize("dims, perm", [((0, 1), [1, 0, 2]), ((-1, -2), [0, 2, 1]), ((2, 0), [2, 1, 0])])
def test_transpose_becomes_permute(dims, perm):
    prog = capture(lambda x: x.permute(*perm) * 2)
    x = prog.placeholders()[0]
    respell(prog, the_node(prog, aten.permute.default), aten.transpose.int, (x, *dims))
    _, report = canonicalize(
        prog, changed=True,
        checks=f"CHECK: aten.permute(%x, {perm})\nCHECK-NEXT: aten.mul.Tensor\nCHECK-NOT: aten.transpose",
        op_counts={"aten.transpose.int": 0, "aten.permute.default": 1},
    )
    assert report.stats["transpose_to_permute"] == 1


def test_t_becomes_permute():
    prog = capture(lambda x: x.permute(1, 0) * 2, torch.randn(3, 4))
    respell(prog, the_node(prog, aten.permute.default), aten.t.default, (prog.placeholders()[0],))
    _, report = canonicalize(prog, changed=True, checks="CHECK: aten.permute(%x, [1, 0])\nCHECK-NOT: aten.t(",
                             op_counts={"aten.t.default": 0, "aten.permute.default": 1})
    assert report.stats["transpose_to_permute"] == 1


# ---------------------------------------------------------------------------------------- fold_permutes
def test_folds_permute_of_permute_into_one():
    prog = capture(lambda x: x.permute(1, 0, 2).permute(2, 1, 0) + 1)
    _, report = canonicalize(prog, changed=True, checks="CHECK: aten.permute(%x, [2, 0, 1])\nCHECK-NEXT: aten.add",
                             op_counts={"aten.permute.default": 1})
    assert report.stats["fold_permutes"] == 1


def test_removes_permutes_that_cancel():
    prog = capture(lambda x: x.permute(1, 0, 2).permute(1, 0, 2) + 1)
    _, report = canonicalize(prog, changed=True, checks="CHECK: aten.add.Tensor(%x, 1)",
                             op_counts={"aten.permute.default": 0})
    assert report.stats["fold_permutes"] == 2  # fold into an identity permute, then drop it


def test_removes_identity_permute():
    prog = capture(lambda x: x.permute(0, 1, 2) * 3)
    _, report = canonicalize(prog, changed=True, checks="CHECK: aten.mul.Tensor(%x, 3)",
                             op_counts={"aten.permute.default": 0})
    assert report.stats["fold_permutes"] == 1


def test_folds_chain_of_three_permutes_in_one_run():
    prog = capture(lambda x: x.permute(1, 0, 2).permute(0, 2, 1).permute(2, 1, 0) - x.sum())
    canonicalize(prog, changed=True, op_counts={"aten.permute.default": 1})


def test_folds_identity_permute_of_permute_that_is_graph_output():
    # regression: the identity permute was kept because it is an output, leaving permute(permute(.))
    prog = capture(lambda x: (x + 1).permute(1, 0, 2).permute(0, 1, 2))
    _, report = canonicalize(prog, changed=True, checks="CHECK: aten.permute(%add, [1, 0, 2])\nCHECK-NEXT: return",
                             op_counts={"aten.permute.default": 1})
    assert report.stats["fold_permutes"] == 1


def test_keeps_identity_permute_that_is_graph_output():
    prog = capture(lambda x: (x + 1).permute(0, 1, 2))
    canonicalize(prog, changed=False, op_counts={"aten.permute.default": 1})


# ---------------------------------------------------------------------------------------- fold_views
def test_folds_view_of_view_into_one():
    prog = capture(lambda x: x.view(6, 4).view(24) + 1)
    _, report = canonicalize(prog, changed=True, checks="CHECK: aten.view(%x, [24])\nCHECK-NEXT: aten.add",
                             op_counts={"aten.view.default": 1})
    assert report.stats["fold_views"] == 1


def test_unsafe_view_becomes_view():
    prog = capture(lambda x: x.view(6, 4) + 1)
    respell(prog, the_node(prog, aten.view.default), aten._unsafe_view.default, (prog.placeholders()[0], [6, 4]))
    _, report = canonicalize(prog, changed=True, checks="CHECK: aten.view(%x, [6, 4])\nCHECK-NOT: _unsafe_view",
                             op_counts={"aten._unsafe_view.default": 0, "aten.view.default": 1})
    assert report.stats["fold_views"] == 1


def test_removes_view_to_same_shape():
    prog = capture(lambda x: x.view(2, 3, 4) + 1)
    _, report = canonicalize(prog, changed=True, checks="CHECK: aten.add.Tensor(%x, 1)",
                             op_counts={"aten.view.default": 0})
    assert report.stats["fold_views"] == 1


def test_keeps_view_of_graph_output_identity():
    prog = capture(lambda x: (x + 1).view(2, 3, 4))
    canonicalize(prog, changed=False, op_counts={"aten.view.default": 1})


def test_does_not_fold_views_of_non_contiguous_tensor():
    # view(view(p)) == view(p, final shape) only when p is contiguous; a permute is not.
    prog = capture(lambda x: x.permute(1, 0, 2).view(3, 2, 2, 2).view(3, 2, 4) + 1)
    canonicalize(prog, changed=False, checks="CHECK: aten.view(%permute, [3, 2, 2, 2])\nCHECK-NEXT: aten.view",
                 op_counts={"aten.view.default": 2})


# ---------------------------------------------------------------------------------------- remove_identity
def test_removes_expand_to_same_shape():
    prog = capture(lambda x: x.expand(2, 3, 4) + 1)
    _, report = canonicalize(prog, changed=True, checks="CHECK: aten.add.Tensor(%x, 1)",
                             op_counts={"aten.expand.default": 0})
    assert report.stats["remove_identity"] == 1


def test_removes_alias():
    prog = capture(lambda x: torch.sin(x) * 2)
    interpose(prog, the_node(prog, aten.sin.default), aten.alias.default)
    _, report = canonicalize(prog, changed=True, checks="CHECK: aten.mul.Tensor(%sin, 2)",
                             op_counts={"aten.alias.default": 0})
    assert report.stats["remove_identity"] == 1


def test_removes_clone_that_changes_nothing():
    prog = capture(lambda x: (x + 1).clone() * 2)
    _, report = canonicalize(prog, changed=True, checks="CHECK: aten.mul.Tensor(%add, 2)",
                             op_counts={"aten.clone.default": 0})
    assert report.stats["remove_identity"] == 1


def test_removes_cast_to_same_dtype():
    prog = capture(lambda x: torch.sin(x) * 2)
    interpose(prog, the_node(prog, aten.sin.default), aten._to_copy.default, kwargs={"dtype": torch.float32})
    _, report = canonicalize(prog, changed=True, checks="CHECK: aten.mul.Tensor(%sin, 2)",
                             op_counts={"aten._to_copy.default": 0})
    assert report.stats["remove_identity"] == 1


def test_keeps_cast_that_changes_dtype():
    prog = capture(lambda x: (x + 1).to(torch.float16) * 2)
    canonicalize(prog, op_counts={"aten._to_copy.default": 1})  # only the proven dtype assert goes


def test_keeps_clone_that_changes_layout():
    # .contiguous() of a permuted tensor feeding a view: the view needs the copy's layout
    prog = capture(lambda x: x.permute(1, 0, 2).contiguous().view(-1) + 1)
    canonicalize(prog, changed=False, checks="CHECK: aten.clone(%permute, memory_format=torch.contiguous_format)",
                 op_counts={"aten.clone.default": 1})


def test_does_not_remove_clone_of_graph_input():
    prog = capture(lambda x: x.clone() * 2)
    canonicalize(prog, changed=False, checks="CHECK: aten.clone(%x)", op_counts={"aten.clone.default": 1})


def test_does_not_remove_clone_that_is_graph_output():
    prog = capture(lambda x: (x + 1).clone())
    canonicalize(prog, changed=False, op_counts={"aten.clone.default": 1})


def test_does_not_remove_clone_of_view_of_graph_input():
    # Without the clone the returned view would alias the caller's input (regression: it was removed).
    prog = capture(lambda x: x[0].clone().view(-1))
    canonicalize(prog, changed=False, checks="CHECK: aten.clone(%select)", op_counts={"aten.clone.default": 1})


def test_does_not_remove_clone_of_view_of_constant():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("table", torch.randn(4, 3))

        def forward(self, x):
            return x + 1, self.table[1:3].clone().view(-1)

    prog = mmc.capture(M(), (torch.randn(2),))
    canonicalize(prog, changed=False, op_counts={"aten.clone.default": 1})


# ---------------------------------------------------------------------------------------- scalar_overloads
@pytest.mark.parametrize("scalar_op, c, expect", [
    (aten.mul.Scalar, 3.0, "aten.mul.Tensor(%sin, 3.0)"),
    (aten.add.Scalar, 3.0, "aten.add.Tensor(%sin, 3.0)"),
    (aten.div.Scalar, 3.0, "aten.div.Tensor(%sin, 3.0)"),
])
def test_scalar_overload_becomes_tensor_overload(scalar_op, c, expect):
    prog = capture(lambda x: torch.sin(x) * 2)
    mul = the_node(prog, aten.mul.Tensor)
    respell(prog, mul, scalar_op, (mul.args[0], c))
    _, report = canonicalize(prog, changed=True, checks=f"CHECK: {expect}", op_counts={str(scalar_op): 0})
    assert report.stats["scalar_overloads"] == 1


def test_sub_scalar_overload_then_becomes_add():
    prog = capture(lambda x: torch.sin(x) * 2)
    mul = the_node(prog, aten.mul.Tensor)
    respell(prog, mul, aten.sub.Scalar, (mul.args[0], 1.5))
    _, report = canonicalize(prog, changed=True, checks="CHECK: aten.add.Tensor(%sin, -1.5)",
                             op_counts={"aten.sub.Scalar": 0, "aten.sub.Tensor": 0})
    assert report.stats["scalar_overloads"] == 1 and report.stats["sub_to_add"] == 1


def test_div_scalar_by_power_of_two_then_becomes_mul():
    prog = capture(lambda x: torch.sin(x) * 2)
    mul = the_node(prog, aten.mul.Tensor)
    respell(prog, mul, aten.div.Scalar, (mul.args[0], 4.0))
    _, report = canonicalize(prog, changed=True, checks="CHECK: aten.mul.Tensor(%sin, 0.25)",
                             op_counts={"aten.div.Scalar": 0, "aten.div.Tensor": 0})
    assert report.stats["scalar_overloads"] == 1 and report.stats["div_to_mul"] == 1


# ---------------------------------------------------------------------------------------- scalar_on_right
@pytest.mark.parametrize("op, name", [(torch.mul, "mul"), (torch.add, "add")])
def test_moves_zero_dim_operand_right(op, name):
    prog = capture(lambda x: op(torch.tensor(2.0), x))
    _, report = canonicalize(prog, changed=True, checks=f"CHECK: aten.{name}.Tensor(%x, %clone)")
    assert report.stats["scalar_on_right"] == 1


def test_does_not_swap_operands_of_different_dtypes():
    prog = capture(lambda x: torch.tensor(2.0, dtype=torch.float64) * x)
    canonicalize(prog, changed=False, checks="CHECK: aten.mul.Tensor(%clone, %x)")


def test_does_not_swap_add_with_alpha():
    # add(c, x, alpha=2) is c + 2x; swapping would give x + 2c
    prog = capture(lambda x: torch.add(torch.tensor(2.0), x, alpha=2))
    canonicalize(prog, changed=False, checks="CHECK: aten.add.Tensor(%clone, %x, alpha=2)")


def test_does_not_swap_operands_of_same_rank():
    prog = capture(lambda x, y: y * x, torch.randn(3), torch.randn(3))
    canonicalize(prog, changed=False, checks="CHECK: aten.mul.Tensor(%y, %x)")


# ---------------------------------------------------------------------------------------- div_to_mul
@pytest.mark.parametrize("c", [2.0, 4, 0.5, -0.125, 2.0 ** 13, 2.0 ** -13])
def test_div_by_power_of_two_becomes_mul(c):
    prog = capture(lambda x: x / c)
    _, report = canonicalize(prog, changed=True, checks=f"CHECK: aten.mul.Tensor(%x, {1.0 / c!r})",
                             op_counts={"aten.div.Tensor": 0})
    assert report.stats["div_to_mul"] == 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("c", [2.0 ** 13, 2.0 ** -13, -0.5])
def test_div_to_mul_is_bit_exact_in_low_precision(dtype, c):
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(64, generator=g) * 1e4, torch.randn(64, generator=g) * 1e-6,
                   torch.tensor([0.0, -0.0, 6e-8, 65504.0])])  # large, subnormal in half, signed zeros, half max
    prog = capture(lambda x: x / c, x.to(dtype))
    after, _ = canonicalize(prog, changed=True)
    (ref,), _ = testing.run_program(prog)
    (out,), _ = testing.run_program(after)
    assert torch.equal(ref, out)


@pytest.mark.parametrize("c", [3.0, 0.1, 10])
def test_does_not_rewrite_div_by_non_power_of_two(c):
    prog = capture(lambda x: x / c)  # x * (1/c) is not exact: 1/c rounds
    canonicalize(prog, changed=False, checks=f"CHECK: aten.div.Tensor(%x, {c!r})")


def test_does_not_rewrite_div_by_power_of_two_outside_half_range():
    prog = capture(lambda x: x / 2.0 ** 20)  # 2**-20 is not a normal float16
    canonicalize(prog, changed=False, op_counts={"aten.div.Tensor": 1})


def test_does_not_rewrite_integer_division():
    prog = capture(lambda x: x / 2, torch.arange(6).view(2, 3))  # true division of an integer tensor
    canonicalize(prog, changed=False, checks="CHECK: aten.div.Tensor(%x, 2)")


def test_does_not_rewrite_div_by_tensor():
    prog = capture(lambda x, y: x / y, torch.randn(3), torch.rand(3) + 1)
    canonicalize(prog, changed=False, op_counts={"aten.div.Tensor": 1})


# ---------------------------------------------------------------------------------------- sub_to_add
@pytest.mark.parametrize("c, neg", [(1.5, "-1.5"), (2, "-2"), (-0.25, "0.25")])
def test_sub_of_number_becomes_add(c, neg):
    prog = capture(lambda x: x - c)
    _, report = canonicalize(prog, changed=True, checks=f"CHECK: aten.add.Tensor(%x, {neg})",
                             op_counts={"aten.sub.Tensor": 0})
    assert report.stats["sub_to_add"] == 1


def test_does_not_rewrite_sub_with_alpha():
    prog = capture(lambda x: torch.sub(x, 1.5, alpha=2))
    canonicalize(prog, changed=False, checks="CHECK: aten.sub.Tensor(%x, 1.5, alpha=2)")


def test_does_not_rewrite_integer_sub():
    prog = capture(lambda x: x - 1, torch.arange(6).view(2, 3))
    canonicalize(prog, changed=False, op_counts={"aten.sub.Tensor": 1})


def test_does_not_rewrite_sub_of_tensors():
    prog = capture(lambda x, y: x - y, torch.randn(3), torch.randn(3))
    canonicalize(prog, changed=False, checks="CHECK: aten.sub.Tensor(%x, %y)")


# ---------------------------------------------------------------------------------------- positive_dims
@pytest.mark.parametrize("fn, x, expect", [
    (lambda x: x.softmax(-1), None, "aten._softmax(%x, 2, False)"),
    (lambda x: x.log_softmax(-2), None, "aten._log_softmax(%x, 1, False)"),
    (lambda x: x.sum(-1), None, "aten.sum.dim_IntList(%x, [2])"),
    (lambda x: x.mean((-1, 0)), None, "aten.mean.dim(%x, [2, 0])"),
    (lambda x: x.amax(-2), None, "aten.amax(%x, [1])"),
    (lambda x: x.argmax(-1), None, "aten.argmax(%x, 2)"),
    (lambda x: x.unsqueeze(-1) * 2, None, "aten.unsqueeze(%x, 3)"),
    (lambda x: torch.cat([x, x], dim=-1), None, "aten.cat([%x, %x], 2)"),
    (lambda x: x.permute(-1, 0, 1) + 1, None, "aten.permute(%x, [2, 0, 1])"),
    (lambda x: x.squeeze(-1) + 1, torch.randn(2, 1), "aten.squeeze.dims(%x, [1])"),
])
def test_negative_dims_become_positive(fn, x, expect):
    prog = capture(fn, x)
    _, report = canonicalize(prog, changed=True, checks=f"CHECK: {expect}")
    assert report.stats["positive_dims"] == 1


def test_keeps_non_negative_and_absent_dims():
    prog = capture(lambda x: x.softmax(2).sum((0, 1)) + x.sum())
    canonicalize(prog, changed=False)


# ---------------------------------------------------------------------------------------- drop_proven_asserts
def test_drops_dtype_asserts_the_metadata_proves():
    prog = capture(lambda x: x.float().softmax(1).to(torch.float32) * 2)
    mul = next(n for n in prog.graph.nodes if n.target is torch.ops.aten.mul.Tensor)
    with prog.graph.inserting_before(mul):  # as export's pre-dispatch trace writes for .to(): x is f32, proven
        prog.graph.call_function(torch.ops.aten._assert_tensor_metadata.default, (mul.args[0],), {"dtype": torch.float32})
    prog.graph_module.recompile()
    after, report = canonicalize(prog, changed=True, op_counts={"aten._assert_tensor_metadata.default": 0},
                                 checks="CHECK-NOT: _assert_tensor_metadata")
    assert report.stats["drop_proven_asserts"] >= 1


def test_keeps_assert_the_metadata_does_not_prove():
    prog = capture(lambda x: x * 2)
    mul = next(n for n in prog.graph.nodes if n.op == "call_function")
    with prog.graph.inserting_before(mul):  # x is f32: this assertion fails at run time
        prog.graph.call_function(torch.ops.aten._assert_tensor_metadata.default, (mul.args[0],), {"dtype": torch.float16})
    prog.graph_module.recompile()
    after, _ = testing.run_pass(prog, "canonicalize", verify=False)
    assert after.op_counts()["aten._assert_tensor_metadata.default"] == 1


# ---------------------------------------------------------------------------------------- the whole pass
def test_every_rule_is_covered_here():
    import mmcompile.passes.canonicalize as module

    covered = {"transpose_to_permute", "fold_permutes", "fold_views", "remove_identity", "scalar_overloads",
               "scalar_on_right", "div_to_mul", "sub_to_add", "positive_dims", "drop_proven_asserts"}
    assert {rule.__name__ for rule in module.RULES} == covered


def test_new_nodes_are_tagged():
    prog = capture(lambda x: x.permute(1, 0, 2).permute(2, 1, 0) / 2.0)
    after, _ = canonicalize(prog, changed=True)
    new = [n for n in after.graph.nodes if n.op == "call_function"]
    assert new and all(n.meta.get("mmcompile.pass") == "canonicalize" for n in new)


# ---------------------------------------------------------------------------------------- property
SCALARS = [2.0, 0.5, 3.0, -4.0, 0.1, 1, 2.0 ** -13]


@st.composite
def chains(draw):
    """(input shape, ops, respellings): a random chain of layout and scalar ops on a 2-4-d tensor."""
    rank = draw(st.integers(2, 4))
    shape = draw(st.lists(st.integers(1, 4), min_size=rank, max_size=rank))
    cur, ops = list(shape), []
    for _ in range(draw(st.integers(1, 6))):
        r = len(cur)
        kind = draw(st.sampled_from(["permute", "transpose", "reshape", "scalar", "scalar", "scalar_left",
                                     "softmax", "contiguous", "expand"]))
        if kind == "permute":
            perm = draw(st.permutations(range(r)))
            if draw(st.booleans()):
                perm = [d - r for d in perm]
            cur = [cur[d] for d in perm]
            ops.append(("permute", perm))
        elif kind == "transpose":
            a, b = draw(st.integers(-r, r - 1)), draw(st.integers(-r, r - 1))
            cur[a], cur[b] = cur[b], cur[a]
            ops.append(("transpose", a, b))
        elif kind == "reshape":
            how = draw(st.sampled_from(["shuffle", "merge", "split"]))
            if how == "merge" and r > 2:
                i = draw(st.integers(0, r - 2))
                cur = cur[:i] + [cur[i] * cur[i + 1]] + cur[i + 2:]
            elif how == "split" and r < 4:
                i = draw(st.integers(0, r - 1))
                a = 2 if cur[i] % 2 == 0 else 1
                cur = cur[:i] + [a, cur[i] // a] + cur[i + 1:]
            else:
                cur = list(draw(st.permutations(cur)))
            ops.append(("reshape", list(cur)))
        elif kind == "scalar":
            ops.append((draw(st.sampled_from(["mul", "div", "add", "sub"])), draw(st.sampled_from(SCALARS))))
        else:
            ops.append((kind,))
    respellings = draw(st.frozensets(st.sampled_from(["transpose", "unsafe_view", "scalar_overloads"])))
    return shape, ops, respellings


def apply(ops, x):
    for op, *a in ops:
        if op == "permute":
            x = x.permute(*a[0])
        elif op == "transpose":
            x = x.transpose(*a)
        elif op == "reshape":
            x = x.reshape(a[0])
        elif op == "mul":
            x = x * a[0]
        elif op == "div":
            x = x / a[0]
        elif op == "add":
            x = x + a[0]
        elif op == "sub":
            x = x - a[0]
        elif op == "scalar_left":
            x = torch.tensor(0.5) * x
        elif op == "softmax":
            x = x.softmax(-1)
        elif op == "contiguous":
            x = x.contiguous()
        elif op == "expand":
            x = x.expand(x.shape)
    return x


_SCALAR_SPELLING = {aten.mul.Tensor: aten.mul.Scalar, aten.add.Tensor: aten.add.Scalar,
                    aten.sub.Tensor: aten.sub.Scalar, aten.div.Tensor: aten.div.Scalar}


def respell_all(prog: mmc.Program, which: frozenset) -> None:
    """Rewrite captured nodes into the spellings capture never gives: transposes, _unsafe_view, .Scalar."""
    for node in list(prog.graph.nodes):
        if node.op != "call_function":
            continue
        if "transpose" in which and node.target is aten.permute.default:
            perm = [d % len(node.args[1]) for d in node.args[1]]
            moved = [i for i, d in enumerate(perm) if d != i]
            if len(moved) == 2:
                respell(prog, node, aten.transpose.int, (node.args[0], *moved))
        elif "unsafe_view" in which and node.target is aten.view.default:
            respell(prog, node, aten._unsafe_view.default, node.args)
        elif ("scalar_overloads" in which and node.target in _SCALAR_SPELLING and not node.kwargs
              and isinstance(node.args[1], (int, float))):
            respell(prog, node, _SCALAR_SPELLING[node.target], node.args)


def assert_normal_form(prog: mmc.Program) -> None:
    testing.assert_op_counts(prog, {name: 0 for name in (
        "aten.transpose.int", "aten.t.default", "aten._unsafe_view.default",
        "aten.mul.Scalar", "aten.add.Scalar", "aten.sub.Scalar", "aten.div.Scalar")})
    for node in prog.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is aten.permute.default:
            assert node.args[0].target is not aten.permute.default, f"unfolded permutes at %{node.name}\n{prog}"
            assert all(d >= 0 for d in node.args[1]), f"negative dims at %{node.name}\n{prog}"
        if node.target is aten._softmax.default:
            assert node.args[1] >= 0, f"negative dim at %{node.name}\n{prog}"
        if node.target is aten.sub.Tensor:
            assert not isinstance(node.args[1], (int, float)), f"sub of a number at %{node.name}\n{prog}"
        if node.target is aten.div.Tensor and isinstance(node.args[1], (int, float)):
            assert math.frexp(abs(node.args[1]))[0] != 0.5, f"div by a power of two at %{node.name}\n{prog}"
        if node.target in (aten.add.Tensor, aten.mul.Tensor) and isinstance(node.args[0], torch.fx.Node):
            a, b = node.args[0].meta["val"], node.args[1]
            if isinstance(b, torch.fx.Node) and a.dtype == b.meta["val"].dtype and not node.kwargs:
                assert not (a.dim() == 0 and b.meta["val"].dim() > 0), f"0-d operand first at %{node.name}\n{prog}"


@settings(max_examples=25, deadline=None, database=None)
@given(chains(), st.integers(0, 2 ** 16))
def test_property_exact_idempotent_and_normal(chain, seed):
    shape, ops, which = chain
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    prog = capture(lambda x: apply(ops, x), x)
    respell_all(prog, which)
    after, _ = canonicalize(prog)  # exact numerics, verify, idempotence
    ref, _ = testing.run_program(prog)
    out, _ = testing.run_program(after)
    assert all(torch.equal(a, b) for a, b in zip(ref, out))
    assert_normal_form(after)


def test_removes_slices_over_a_whole_dimension():
    # x[:, :, None] on a tensor with a symbolic size leaves slice(x, dim, 0, INT64_MAX) in the graph
    # (repeat_kv over a growing transformers cache); build that form on a dynamic capture
    from mmcompile.rewrite import insert_call

    prog = mmc.capture(Unary(lambda x: x * 2), (torch.randn(2, 5, 4),),
                       dynamic_shapes=({1: torch.export.Dim("t", min=2, max=64)},), name="f")
    mul = next(n for n in prog.graph.nodes if n.target is torch.ops.aten.mul.Tensor)
    sl = insert_call("test", prog.graph_module, mul, torch.ops.aten.slice.Tensor, (mul.args[0], 1, 0, 2**63 - 1))
    mul.replace_input_with(mul.args[0], sl)
    prog.graph_module.recompile()
    after, report = canonicalize(prog, changed=True, op_counts={"aten.slice.Tensor": 0})
    assert report.stats["remove_identity"] == 1
    x = torch.randn(2, 9, 4)
    assert torch.equal(after(x), x * 2)


def test_keeps_slices_that_cut_a_dimension():
    prog = capture(lambda x: x[:, 1:, :] * 2)
    canonicalize(prog, op_counts={"aten.slice.Tensor": 1})
