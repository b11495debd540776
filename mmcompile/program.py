"""Program: the graph IR every pass reads and writes.

A Program wraps an ATen-level ``torch.fx.GraphModule`` obtained from ``torch.export``:

- placeholders are the flattened user inputs (pytree structure kept in ``in_spec``/``out_spec``);
- weights, buffers and other constants are ``get_attr`` nodes naming attributes of the GraphModule,
  so a pass adds or replaces a constant with :meth:`Program.add_constant` without touching a signature;
- every node carries ``meta["val"]`` (a FakeTensor, or a SymInt for size computations);
- inputs declared as *state* (a KV cache the model updates in place) are written only by the state
  update ops in :data:`STATE_UPDATE_OPS`, at the end of the graph.

:meth:`verify` checks these invariants; the pipeline runs it between passes.
"""

from __future__ import annotations

import collections
import copy
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.multiprocessing.reductions import StorageWeakRef

from mmcompile.errors import ShapeError, VerificationError

__all__ = ["Program", "STATE_UPDATE_OPS", "ALLOWED_NON_CORE_OPS", "op_name"]

# In-place ops allowed in a Program, and only when they write an input declared as state.
STATE_UPDATE_OPS: set = {torch.ops.aten.copy_.default}

# Ops outside ATen's core set that a Program may still hold: standard fused ops we prefer to keep
# (DESIGN: "prefer aten.scaled_dot_product_attention") and torch.export's own bookkeeping.
ALLOWED_NON_CORE_OPS: set = {
    torch.ops.aten.scaled_dot_product_attention.default,
    torch.ops.aten.sym_size.int,
    torch.ops.aten.sym_numel.default,
    torch.ops.aten.sym_stride.int,
    torch.ops.aten.sym_storage_offset.default,
    torch.ops.aten._assert_scalar.default,
    torch.ops.aten.sym_constrain_range_for_size.default,
    torch.ops.aten._assert_tensor_metadata.default,
    torch.ops.aten.lift_fresh_copy.default,
}

_DTYPE_NAMES = {
    torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64",
    torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
    torch.bool: "b8", torch.float8_e4m3fn: "f8e4m3", torch.float8_e5m2: "f8e5m2",
    torch.complex64: "c64",
}


def op_name(target: Any) -> str:
    """The name ``op_counts`` and the printer use: ``aten.mm.default``, ``mmcompile.attention.default``."""
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(target)
    if target is operator.getitem:
        return "getitem"
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__name__", repr(target))
    return f"{module.split('.')[-1]}.{name}" if module in ("_operator", "operator") else name


def _short_op(target: Any) -> str:
    name = op_name(target)
    return name[: -len(".default")] if name.endswith(".default") else name


def _fmt_val(val: Any) -> str:
    if isinstance(val, torch.Tensor):
        dims = ", ".join(str(d) for d in val.shape)
        return f"{_DTYPE_NAMES.get(val.dtype, str(val.dtype))}[{dims}]"
    if isinstance(val, (tuple, list)):
        return "(" + ", ".join(_fmt_val(v) for v in val) + ")"
    if isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return f"sym({val})"
    return type(val).__name__ if val is not None else "none"


def _fmt_arg(arg: Any) -> str:
    if isinstance(arg, fx.Node):
        return f"%{arg.name}"
    if isinstance(arg, (list, tuple)):
        inner = ", ".join(_fmt_arg(a) for a in arg)
        return f"[{inner}]"
    if isinstance(arg, torch.dtype):
        return _DTYPE_NAMES.get(arg, str(arg))
    if isinstance(arg, float):
        return repr(arg)
    return str(arg)


def _is_core(target: Any) -> bool:
    if not isinstance(target, torch._ops.OpOverload):
        return False
    return torch.Tag.core in target.tags


def _fake_mode_of(gm: fx.GraphModule):
    from torch._guards import detect_fake_mode

    vals = [n.meta.get("val") for n in gm.graph.find_nodes(op="placeholder")]  # indexed: no walk of the graph
    mode = detect_fake_mode(vals)
    if mode is None:
        from torch._subclasses.fake_tensor import FakeTensorMode

        mode = FakeTensorMode(allow_non_fake_inputs=True)
    return mode


def _no_new_guards(mode):
    """Re-propagating fake values must not specialize a dynamic dimension: some fake kernels
    (e.g. SDPA on CUDA) ask for concrete sizes, which would otherwise pin the symbol forever."""
    import contextlib

    shape_env = getattr(mode, "shape_env", None)
    return shape_env.suppress_guards() if shape_env is not None else contextlib.nullcontext()


def _named_by_op(graph: fx.Graph) -> fx.Graph:
    """A copy of ``graph`` whose ATen calls are named after their op, numbered in graph order (``mul``,
    ``mul_1``, ...): export names them by the order its tracer met them, which depends on how it traced."""
    new = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        name = node.target._opname if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) \
            else node.name
        copy_ = new.create_node(node.op, node.target, fx.map_arg(node.args, env.__getitem__),
                                fx.map_arg(node.kwargs, env.__getitem__), name=name, type_expr=node.type)
        copy_.meta = dict(node.meta)
        env[node] = copy_
    return new


class _ConstantAwareFakeProp(FakeTensorProp):
    """FakeTensorProp that turns ``get_attr`` constants into fake tensors of the same mode."""

    def get_attr(self, target, args, kwargs):
        value = super().get_attr(target, args, kwargs)
        if isinstance(value, torch.Tensor) and not isinstance(value, torch._subclasses.FakeTensor):
            value = self._mode.from_tensor(value, static_shapes=True)
        return value


class Program:
    """An ATen-level graph plus its constants, example inputs and calling convention.

    Build one with :func:`mmcompile.capture`; passes mutate it in place; backends lower it.
    Calling a Program runs its graph eagerly with the captured model's calling convention.
    """

    def __init__(
        self,
        graph_module: fx.GraphModule,
        *,
        in_spec: pytree.TreeSpec,
        out_spec: pytree.TreeSpec,
        example_inputs: list[Any],
        name: str = "program",
        metadata: dict | None = None,
    ):
        self.graph_module = graph_module
        self.in_spec = in_spec
        self.out_spec = out_spec
        self.example_inputs = list(example_inputs)  # flat, one per placeholder
        self.name = name
        self.metadata = dict(metadata or {})
        self._initial_aliases = self._output_aliases()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_exported(cls, ep: torch.export.ExportedProgram, example_inputs: list[Any], name: str) -> "Program":
        gm = ep.module()
        graph = gm.graph
        for node in list(graph.nodes):  # export's input guards: the Program checks shapes itself
            if node.op == "call_module" and node.target == "_guards_fn":
                graph.erase_node(node)
        if hasattr(gm, "_guards_fn"):
            delattr(gm, "_guards_fn")
        in_spec, out_spec = ep.call_spec.in_spec, ep.call_spec.out_spec
        graph = _named_by_op(graph)
        graph._codegen = fx.graph.CodeGen()  # flat inputs and outputs; the Program keeps the pytree specs
        out = graph.output_node()
        flat_out = out.args[0]
        if not isinstance(flat_out, (tuple, list)):
            flat_out = (flat_out,)
        out.args = (tuple(flat_out),)
        gm = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
        program = cls(gm, in_spec=in_spec, out_spec=out_spec, example_inputs=example_inputs, name=name)
        program.recompute_meta()
        program._initial_aliases = program._output_aliases()
        return program

    def clone(self) -> "Program":
        """A copy with its own graph; constants are shared (not copied) with this Program."""
        graph = fx.Graph()
        out = graph.graph_copy(self.graph_module.graph, {})
        graph.output(out)
        for old, new in zip(self.graph_module.graph.nodes, graph.nodes):
            new.meta = dict(old.meta)
        gm = fx.GraphModule(self.graph_module, graph, class_name=type(self.graph_module).__name__)
        new = Program(gm, in_spec=self.in_spec, out_spec=self.out_spec, example_inputs=self.example_inputs,
                      name=self.name, metadata=copy.deepcopy(self.metadata))
        new._initial_aliases = set(self._initial_aliases)
        return new

    # ------------------------------------------------------------------ views
    @property
    def graph(self) -> fx.Graph:
        return self.graph_module.graph

    def placeholders(self) -> list[fx.Node]:
        return [n for n in self.graph.nodes if n.op == "placeholder"]

    def state_inputs(self) -> list[fx.Node]:
        """Inputs the graph updates in place (declared state, e.g. KV-cache buffers)."""
        out = []
        for node in self.placeholders():
            if any(u.op == "call_function" and u.target in STATE_UPDATE_OPS and u.args[0] is node for u in node.users):
                out.append(node)
        return out

    def constants(self) -> dict[str, torch.Tensor]:
        """Attribute name -> tensor for every constant the graph reads."""
        return {n.target: _getattr(self.graph_module, n.target) for n in self.graph.nodes if n.op == "get_attr"}

    def add_constant(self, tensor: torch.Tensor, name: str = "_folded", *, before: fx.Node | None = None) -> fx.Node:
        """Register ``tensor`` as a new constant attribute and return a ``get_attr`` node reading it."""
        return add_constant(self.graph_module, tensor, name, before=before)

    def save_constants(self, path) -> None:
        """Write every constant the graph reads (weights, packed quantized weights, scales) to one
        safetensors file, under the names ``get_attr`` nodes use. Nothing is pickled."""
        from safetensors.torch import save_file

        tensors = {name: t.detach().contiguous() for name, t in self.constants().items()}
        save_file(tensors, str(path), metadata={"format": "mmcompile.constants", "program": self.name})

    def load_constants(self, path) -> None:
        """Replace this Program's constants with those saved by :meth:`save_constants`. The file must hold
        exactly the constants the graph reads, each with the same shape and dtype: a file from another
        Program, an edited or truncated file is refused with the first difference."""
        from safetensors import SafetensorError, safe_open

        want = self.constants()
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                names = set(f.keys())
                if header.get("format") != "mmcompile.constants" or names != set(want):
                    missing, extra = sorted(set(want) - names), sorted(names - set(want))
                    raise ShapeError(f"{path} does not hold this Program's constants (missing {missing[:3]}, "
                                     f"unexpected {extra[:3]}); save them with Program.save_constants")
                loaded = {name: f.get_tensor(name) for name in names}
        except (SafetensorError, OSError) as e:
            raise ShapeError(f"{path} is not a readable safetensors file ({e}); it may be truncated") from e
        for name, t in loaded.items():
            old = want[name]
            if t.shape != old.shape or t.dtype != old.dtype:
                raise ShapeError(f"{path}: constant {name} is {_fmt_val(t)} but the Program reads {_fmt_val(old)}")
        for name, t in loaded.items():
            module, _, attr = name.rpartition(".")
            owner = self.graph_module.get_submodule(module) if module else self.graph_module
            value = t.to(want[name].device)
            if attr in owner._parameters:
                owner._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
            elif attr in owner._buffers:
                owner._buffers[attr] = value
            else:
                setattr(owner, attr, value)

    def delete_unused_constants(self) -> int:
        """Drop tensor attributes (at any depth) that no ``get_attr`` reads; returns how many were removed."""
        used = {n.target for n in self.graph.nodes if n.op == "get_attr"}
        removed = 0
        for qualname, module in list(self.graph_module.named_modules()):
            prefix = f"{qualname}." if qualname else ""
            names = [k for k, v in vars(module).items() if isinstance(v, torch.Tensor)]
            names += list(module._parameters) + list(module._buffers)
            for attr in set(names):
                if prefix + attr not in used and isinstance(getattr(module, attr, None), torch.Tensor):
                    delattr(module, attr)
                    removed += 1
        for qualname, module in sorted(self.graph_module.named_modules(), key=lambda kv: -kv[0].count(".")):
            if qualname and not any(True for _ in module.parameters()) and not any(True for _ in module.buffers()) \
                    and not any(isinstance(v, torch.Tensor) for v in vars(module).values()):
                parent, _, leaf = qualname.rpartition(".")
                delattr(self.graph_module.get_submodule(parent) if parent else self.graph_module, leaf)
        return removed

    def op_counts(self) -> collections.Counter:
        """Counter of call_function targets: ``"aten.mm.default" -> 12``."""
        return collections.Counter(op_name(n.target) for n in self.graph.nodes if n.op == "call_function")

    def to_networkx(self):
        """A ``networkx.DiGraph`` view of the dataflow (derived; edit the fx graph, not this)."""
        import networkx as nx

        g = nx.DiGraph(name=self.name)
        for node in self.graph.nodes:
            val = node.meta.get("val")
            g.add_node(
                node.name,
                op=node.op,
                target=op_name(node.target) if node.op == "call_function" else str(node.target),
                shape=tuple(val.shape) if isinstance(val, torch.Tensor) else None,
                dtype=val.dtype if isinstance(val, torch.Tensor) else None,
                pass_=node.meta.get("mmcompile.pass"),
            )
            for inp in node.all_input_nodes:
                g.add_edge(inp.name, node.name)
        return g

    def __str__(self) -> str:
        inputs = ", ".join(f"%{n.name}: {_fmt_val(n.meta.get('val'))}" for n in self.placeholders())
        lines = [f"program {self.name}({inputs}) {{"]
        for node in self.graph.nodes:
            if node.op == "placeholder":
                continue
            if node.op == "output":
                lines.append(f"  return {_fmt_arg(node.args[0])}")
                continue
            lhs = f"%{node.name}: {_fmt_val(node.meta.get('val'))}"
            if node.op == "get_attr":
                lines.append(f"  {lhs} = constant {node.target}")
                continue
            args = [_fmt_arg(a) for a in node.args]
            args += [f"{k}={_fmt_arg(v)}" for k, v in node.kwargs.items()]
            lines.append(f"  {lhs} = {_short_op(node.target)}({', '.join(args)})")
        lines.append("}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        n = sum(1 for node in self.graph.nodes if node.op == "call_function")
        return f"<Program {self.name}: {n} ops, {len(self.placeholders())} inputs, {len(self.constants())} constants>"

    # ------------------------------------------------------------------ running
    def flatten_inputs(self, args: tuple, kwargs: dict | None = None) -> list[Any]:
        flat, spec = pytree.tree_flatten((tuple(args), dict(kwargs or {})))
        if spec != self.in_spec:
            raise ShapeError(
                f"{self.name}: inputs have structure {spec} but the Program was captured with {self.in_spec}; "
                "call it with the same positional/keyword arguments as the captured model."
            )
        self.check_inputs(flat)
        return flat

    def check_inputs(self, flat: list[Any]) -> None:
        """Raise ShapeError when an input's dtype, rank or a static dimension differs from the capture."""
        for node, value in zip(self.placeholders(), flat):
            expected = node.meta.get("val")
            if not isinstance(expected, torch.Tensor):
                continue
            if not isinstance(value, torch.Tensor):
                raise ShapeError(f"{self.name}: input {node.name} must be a tensor, got {type(value).__name__}")
            if value.dtype != expected.dtype or value.dim() != expected.dim():
                raise ShapeError(
                    f"{self.name}: input {node.name} is {_fmt_val(value)} but the Program was compiled for "
                    f"{_fmt_val(expected)}; recompile for this dtype/rank."
                )
            for i, (got, want) in enumerate(zip(value.shape, expected.shape)):
                if isinstance(want, int) and got != want:
                    raise ShapeError(
                        f"{self.name}: input {node.name} has size {got} in dimension {i} but the Program was "
                        f"compiled for {want} (static); capture with dynamic_shapes to vary it."
                    )
                if isinstance(want, torch.SymInt):
                    lo, hi = _sym_range(want)
                    if not lo <= got <= hi:
                        raise ShapeError(
                            f"{self.name}: input {node.name} has size {got} in dimension {i}, outside the compiled "
                            f"range [{lo}, {hi}]; recompile with a wider range."
                        )

    def __call__(self, *args, **kwargs):
        flat = self.flatten_inputs(args, kwargs)
        with torch.no_grad():
            out = self.graph_module(*flat)
        return pytree.tree_unflatten(list(out), self.out_spec)

    def run_flat(self, flat: list[Any]) -> list[Any]:
        with torch.no_grad():
            return list(self.graph_module(*flat))

    # ------------------------------------------------------------------ invariants
    def recompute_meta(self) -> None:
        """Re-derive ``meta["val"]`` of every node from the placeholders' fake values."""
        gm = self.graph_module
        mode = _fake_mode_of(gm)
        fake_inputs = []
        for node, example in zip(self.placeholders(), self.example_inputs):
            val = node.meta.get("val")
            if val is None and isinstance(example, torch.Tensor):
                val = mode.from_tensor(example, static_shapes=True)
            fake_inputs.append(val if val is not None else example)
        # under no_grad, as capture traced: with autograd on, weights that require grad steer some kernels
        # (SDPA with a mask computed from a parameter, T5's position bias) to other output layouts
        with mode, _no_new_guards(mode), torch.no_grad():
            _ConstantAwareFakeProp(gm, mode=mode).propagate_dont_convert_inputs(*fake_inputs)

    def _output_aliases(self) -> set[str]:
        """Names of outputs that share storage with an input or constant."""
        storages = {}
        for node in self.graph.nodes:
            val = node.meta.get("val")
            if node.op in ("placeholder", "get_attr") and isinstance(val, torch.Tensor):
                try:
                    storages[StorageWeakRef(val.untyped_storage())] = node.name
                except Exception:  # symbolic-size storages cannot always be referenced
                    pass
        aliases = set()
        for i, out in enumerate(pytree.tree_leaves(self.graph.output_node().args[0])):
            val = out.meta.get("val") if isinstance(out, fx.Node) else None
            if isinstance(val, torch.Tensor):
                try:
                    ref = StorageWeakRef(val.untyped_storage())
                except Exception:
                    continue
                if ref in storages:
                    aliases.add(f"output {i} aliases {storages[ref]}")
        return aliases

    def verify(self, *, run: bool = False) -> None:
        """Check the Program's invariants; raise VerificationError naming the first broken one.

        1. the graph lints and every node's ``meta["val"]`` agrees with re-propagating its inputs;
        2. only ATen core ops, ``getitem``, ``mmcompile::`` custom ops and :data:`ALLOWED_NON_CORE_OPS`;
        3. no new output/input aliasing; in-place writes only to state inputs through STATE_UPDATE_OPS;
        4. (``run=True``) the graph runs on the captured example inputs.
        """
        graph = self.graph
        try:
            graph.lint()
        except Exception as e:
            raise VerificationError(f"{self.name}: graph does not lint: {e}") from e
        for node in graph.nodes:
            if node.op in ("placeholder", "output"):
                continue
            where = f"{self.name}: node %{node.name}" + (
                f" (made by pass {node.meta['mmcompile.pass']})" if "mmcompile.pass" in node.meta else ""
            )
            if node.op == "call_function":
                t = node.target
                ok = (
                    _is_core(t)
                    or t in ALLOWED_NON_CORE_OPS
                    or t in STATE_UPDATE_OPS
                    or t is operator.getitem
                    or (isinstance(t, torch._ops.OpOverload) and t.namespace == "mmcompile")
                    or getattr(t, "__module__", None) in ("_operator", "operator", "math", "torch")
                )
                if not ok:
                    raise VerificationError(
                        f"{where}: {op_name(t)} is not an ATen core op, getitem or mmcompile:: op; "
                        "decompose it or register it as an mmcompile custom op."
                    )
                schema = getattr(t, "_schema", None)
                if schema is not None and schema.is_mutable:
                    target = node.args[0] if node.args else None
                    if t not in STATE_UPDATE_OPS or not (isinstance(target, fx.Node) and target.op == "placeholder"):
                        raise VerificationError(
                            f"{where}: in-place op {op_name(t)} writes {_fmt_arg(target)}; in-place updates are allowed "
                            f"only on state inputs through {sorted(map(op_name, STATE_UPDATE_OPS))}."
                        )
            elif node.op == "get_attr":
                try:
                    _getattr(self.graph_module, node.target)
                except AttributeError as e:
                    raise VerificationError(f"{where}: constant {node.target} does not exist") from e
            elif node.op in ("call_module", "call_method"):
                raise VerificationError(f"{where}: {node.op} nodes are not allowed in a Program (ATen ops only)")
            if "val" not in node.meta and not _returns_nothing(node):
                raise VerificationError(f"{where}: has no meta['val']; passes must set it on nodes they create")

        before = {n: n.meta.get("val") for n in graph.nodes}
        try:
            self.recompute_meta()
        except Exception as e:
            raise VerificationError(f"{self.name}: fake-tensor propagation failed: {e}") from e
        for node, old in before.items():
            new = node.meta.get("val")
            if isinstance(old, torch.Tensor) and isinstance(new, torch.Tensor):
                if old.dtype != new.dtype or [str(d) for d in old.shape] != [str(d) for d in new.shape]:
                    raise VerificationError(
                        f"{self.name}: node %{node.name} claims {_fmt_val(old)} but its inputs give {_fmt_val(new)}"
                    )
        new_aliases = self._output_aliases() - self._initial_aliases
        if new_aliases:
            raise VerificationError(f"{self.name}: new aliasing between outputs and inputs: {sorted(new_aliases)}")
        if run:
            inputs = [x.clone() if isinstance(x, torch.Tensor) else x for x in self.example_inputs]
            try:
                with torch.no_grad():
                    self.graph_module(*inputs)
            except Exception as e:
                raise VerificationError(f"{self.name}: no longer runs on its example inputs: {e}") from e


def _returns_nothing(node: fx.Node) -> bool:
    return node.op == "call_function" and (
        node.target in STATE_UPDATE_OPS
        or node.target in (torch.ops.aten._assert_scalar.default, torch.ops.aten._assert_tensor_metadata.default,
                           torch.ops.aten.sym_constrain_range_for_size.default)
    )


def add_constant(gm: fx.GraphModule, tensor: torch.Tensor, name: str = "_folded", *,
                 before: fx.Node | None = None) -> fx.Node:
    """Register ``tensor`` as a new constant attribute of ``gm`` (under ``name``, made unique) and return
    a ``get_attr`` node reading it, with its fake value, before ``before`` (default: after the inputs)."""
    base = name.replace(".", "_")
    attr, i = base, 0
    while hasattr(gm, attr):
        i += 1
        attr = f"{base}_{i}"
    gm.register_buffer(attr, tensor, persistent=True)
    anchor = before if before is not None else next(n for n in gm.graph.nodes if n.op != "placeholder")
    with gm.graph.inserting_before(anchor):
        node = gm.graph.get_attr(attr)
    node.meta["val"] = _fake_mode_of(gm).from_tensor(tensor, static_shapes=True)
    return node


def _getattr(module: torch.nn.Module, target: str):
    obj = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _sym_range(sym: torch.SymInt) -> tuple[int, float]:
    try:
        shape_env = sym.node.shape_env
        vr = shape_env.var_to_range.get(sym.node.expr)
        if vr is not None:
            lo = int(vr.lower) if vr.lower.is_finite else 0
            hi = int(vr.upper) if vr.upper.is_finite else float("inf")
            return lo, hi
    except Exception:
        pass
    return 0, float("inf")

