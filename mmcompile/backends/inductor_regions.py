"""Regional compilation for the Inductor backend: a model's repeated layers are compiled once.

A decoder of 32 identical layers captures to one graph of 32 copies of the same subgraph, and Inductor
lowers, schedules and generates code for every copy: most of a 7B model's compile time. This module cuts
the graph into regions — the nodes before the layers (embedding, rotary tables, masks), one region per
layer (nodes whose ``nn_module_stack`` names an element of a module list, such as ``model.layers.7``),
and the nodes after them (final norm, LM head, sampling) — and compiles each distinct region once. A
layer's weights become inputs of its region instead of constants, so layer 7 runs layer 0's compiled
code on its own weights and cache buffers. The cache writes a decode step ends with (``copy_`` into
a state input) move into the layer that computed them, so each region updates its buffers in place.

Regions are compiled on the Program's example inputs, in order (each region's outputs are the next
one's examples): two regions share code only when their graphs and their inputs' shapes, strides and
dtypes are the same. Under a CUDA graph the replay is the same kernels as a whole-graph compile; what is
lost is fusion across a layer boundary (Inductor's add + norm between layers; on the GPU decode path
the GEMV kernel already takes both). Without CUDA graphs each region is one more Python call.

``plan(gm)`` says whether a graph qualifies and, when it does not, why (the backend then compiles the
whole graph): static shapes only, at least ``min_layers`` layer regions, layer nodes in order with no
value flowing from a later layer or from the nodes after the layers back into a layer, and at least
two layers of the same structure.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import fx

from mmcompile.program import _getattr

_ELEMENT = re.compile(r"^(?P<parent>.+)\.(?P<index>\d+)$")  # "model.layers.7" -> ("model.layers", 7)
_COPY = torch.ops.aten.copy_.default


def _layer_of(node: fx.Node) -> Optional[tuple[str, int]]:
    """The outermost module-list element in the node's module stack: ("model.layers", 7), or None."""
    stack = node.meta.get("nn_module_stack") or {}
    for value in stack.values():
        path = value[0] if isinstance(value, tuple) else value
        match = _ELEMENT.match(str(path))
        if match:
            return match.group("parent"), int(match.group("index"))
    return None


@dataclass
class Region:
    """A slice of the graph compiled as one function: ``nodes`` in graph order, read from ``inputs``
    (nodes outside the region), writing ``outputs`` (its nodes that something later reads)."""

    name: str
    nodes: list[fx.Node]
    inputs: list[fx.Node] = field(default_factory=list)
    outputs: list[fx.Node] = field(default_factory=list)
    key: tuple = ()  # the graph's structure, with inputs and nodes numbered: equal keys, same code


@dataclass
class Plan:
    regions: list[Region]
    layers: int
    parent: str

    def describe(self) -> str:
        distinct = len({r.key for r in self.regions if r.name.startswith("layer")})
        return (f"regions: {self.layers} layers of {self.parent} in {distinct} distinct "
                f"structure{'s' if distinct != 1 else ''}, plus the nodes before and after them")


def plan(gm: fx.GraphModule, *, min_layers: int = 2) -> tuple[Optional[Plan], str]:
    """Cut ``gm`` into before / layer 0 / ... / layer N-1 / after regions, or say why it cannot be."""
    graph = gm.graph
    for node in graph.nodes:
        if node.op == "placeholder":
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor) and not all(isinstance(s, int) for s in val.shape):
                return None, f"input {node.name} has a dynamic shape; regions are compiled for static shapes"
    tag: dict[fx.Node, Optional[tuple[str, int]]] = {}
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is _COPY and node.args[0].op == "placeholder" and isinstance(node.args[1], fx.Node):
            tag[node] = tag.get(node.args[1])  # a cache write belongs to the layer that computed the value
        else:
            tag[node] = _layer_of(node)
    layered = {t for t in tag.values() if t is not None}
    parents = {p for p, _ in layered}
    if not layered:
        return None, "no node belongs to an element of a module list (no nn_module_stack such as model.layers.0)"
    if len(parents) > 1:
        # nested or several lists: take the one with the most elements, leave the others to the before/after
        counts = {p: len({i for q, i in layered if q == p}) for p in parents}
        parent = max(counts, key=counts.get)
        tag = {n: (t if t is not None and t[0] == parent else None) for n, t in tag.items()}
    else:
        parent = next(iter(parents))
    indices = sorted({t[1] for t in tag.values() if t is not None})
    if len(indices) < min_layers:
        return None, f"{len(indices)} layer region(s) of {parent}; regions pay off from {min_layers}"
    if indices != list(range(indices[0], indices[0] + len(indices))):
        return None, f"the layers of {parent} present are {indices[:8]}..., not consecutive"

    def layer_dependents() -> set[fx.Node]:
        found: set[fx.Node] = set()
        for node in graph.nodes:
            if node.op == "call_function" and (tag.get(node) is not None or any(i in found for i in node.all_input_nodes)):
                found.add(node)
        return found

    # an untagged node computed from a layer's values and read only by one layer's nodes (a view a pass
    # inserted without module metadata) belongs to that layer
    depends = layer_dependents()
    for node in reversed(list(graph.nodes)):
        if node in depends and tag.get(node) is None and node.users:
            users = {tag.get(u) for u in node.users}
            if len(users) == 1 and None not in users:
                tag[node] = users.pop()
    # other untagged nodes: after the layers if they depend on a layer, else before them
    depends = layer_dependents()
    before, after, per_layer = [], [], {i: [] for i in indices}
    where: dict[fx.Node, str] = {}
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        t = tag.get(node)
        if t is not None:
            per_layer[t[1]].append(node)
            where[node] = f"layer{t[1]}"
        elif node in depends:
            after.append(node)
            where[node] = "after"
        else:
            before.append(node)
            where[node] = "before"
    # the regions' dataflow (and, for each cache write, its readers before the writer) as a networkx graph:
    # the regions can run one after another only if every edge points forward in that order
    import networkx as nx

    order = {"before": -1, "after": len(indices) + indices[0] + 1}
    order.update({f"layer{i}": i for i in indices})
    flow = nx.DiGraph()
    flow.add_nodes_from(order)
    for node, region in where.items():
        for user in node.users:
            if user.op != "output" and where[user] != region:
                flow.add_edge(region, where[user], via=f"{node.name} feeds {user.name}")
        if node.target is _COPY and node.args[0].op == "placeholder":
            for reader in node.args[0].users:
                if reader is not node and reader.op != "output" and where[reader] != region:
                    flow.add_edge(where[reader], region, via=f"{reader.name} reads {node.args[0].name} before "
                                                            f"{node.name} writes it")
    backward = [(a, b, d["via"]) for a, b, d in flow.edges(data=True) if order[a] > order[b]]
    if backward:
        a, b, via = backward[0]
        cycle = "" if nx.is_directed_acyclic_graph(flow) else " (the regions' dataflow has a cycle)"
        return None, f"{via}: {a} must run before {b}, an earlier region; the layers do not run one after another{cycle}"
    regions = [Region("before", before)] + [Region(f"layer{i}", per_layer[i]) for i in indices] + [Region("after", after)]
    regions = [r for r in regions if r.nodes]
    for region in regions:
        members = set(region.nodes)
        seen: dict[fx.Node, None] = {}
        for node in region.nodes:
            for i in node.all_input_nodes:
                if i not in members:
                    seen.setdefault(i)
        region.inputs = list(seen)
        region.outputs = [n for n in region.nodes if any(u not in members for u in n.users)]
        region.key = _structure(gm, region)
    layer_keys = [r.key for r in regions if r.name.startswith("layer")]
    if len(set(layer_keys)) == len(layer_keys):
        return None, f"no two of the {len(layer_keys)} layers of {parent} have the same structure"
    return Plan(regions, len(indices), parent), ""


def _structure(gm: fx.GraphModule, region: Region) -> tuple:
    """The region's graph with its inputs and nodes numbered, and its inputs' shapes and dtypes: regions
    with equal structures compute the same function of inputs of the same kind."""
    number = {n: ("in", i) for i, n in enumerate(region.inputs)}
    number.update({n: ("node", i) for i, n in enumerate(region.nodes)})

    def norm(a):
        if isinstance(a, fx.Node):
            return number[a]
        if isinstance(a, (list, tuple)):
            return (type(a).__name__, tuple(norm(x) for x in a))
        if isinstance(a, dict):
            return ("dict", tuple(sorted((k, norm(v)) for k, v in a.items())))
        if isinstance(a, (bool, int, float, str, type(None), torch.dtype, torch.device, torch.layout,
                          torch.memory_format)):
            return (type(a).__name__, a)
        return ("other", repr(a))

    nodes = tuple((str(n.target), norm(n.args), norm(n.kwargs)) for n in region.nodes)
    outputs = tuple(number[n] for n in region.outputs)
    def kind(n: fx.Node):
        value = _getattr(gm, n.target) if n.op == "get_attr" else n.meta.get("val")
        if isinstance(value, torch.Tensor):
            return n.op == "get_attr", tuple(value.shape), value.dtype
        return n.op == "get_attr", type(value).__name__

    return nodes, outputs, tuple(kind(n) for n in region.inputs)


def region_module(gm: fx.GraphModule, region: Region) -> fx.GraphModule:
    """The region as a GraphModule of its own: a placeholder per input (weights included), its nodes,
    and its outputs as a tuple."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for i, node in enumerate(region.inputs):
        ph = graph.placeholder(f"in{i}_{node.name}")
        ph.meta.update({k: v for k, v in node.meta.items() if k in ("val", "tensor_meta")})
        env[node] = ph
    for node in region.nodes:
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(tuple(env[n] for n in region.outputs))
    return fx.GraphModule(torch.nn.Module(), graph, class_name=f"Region_{region.name}")


class RegionalRunner:
    """Runs a planned graph region by region: the flat inputs, the weights, then each region's compiled
    function on its inputs. ``compile_region(gm, example_inputs)`` compiles one region; regions with the
    same structure and input layouts get the function compiled for the first of them."""

    def __init__(self, gm: fx.GraphModule, plan_: Plan, compile_region: Callable[[fx.GraphModule, list], Callable],
                 example_inputs: list[Any]):
        graph = gm.graph
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        slot: dict[fx.Node, int] = {n: i for i, n in enumerate(placeholders)}
        constants: list[Any] = []
        for node in graph.nodes:
            if node.op == "get_attr":
                slot[node] = len(placeholders) + len(constants)
                value = _getattr(gm, node.target)
                constants.append(value.detach() if isinstance(value, torch.Tensor) else value)
        n_fixed = len(placeholders) + len(constants)
        for region in plan_.regions:
            for node in region.outputs:
                slot[node] = n_fixed
                n_fixed += 1
        self._size = n_fixed
        self._constants = constants
        self._n_inputs = len(placeholders)
        self._steps: list[tuple[Callable, list[int], list[int]]] = []
        output = graph.output_node()
        flat_out, self._out_spec = torch.utils._pytree.tree_flatten(output.args[0])
        self._outputs = [("slot", slot[o]) if isinstance(o, fx.Node) else ("const", o) for o in flat_out]
        self.compiled: dict[tuple, Callable] = {}

        env = self._env(example_inputs)
        for region in plan_.regions:
            ins = [slot[n] for n in region.inputs]
            outs = [slot[n] for n in region.outputs]
            args = [env[i] for i in ins]
            key = (region.key, tuple(_layout(a) for a in args))
            fn = self.compiled.get(key)
            if fn is None:
                fn = compile_region(region_module(gm, region), args)
                self.compiled[key] = fn
            self._steps.append((fn, ins, outs))
            self._run_step(env, fn, ins, outs)

    def _env(self, flat) -> list:
        env = [None] * self._size
        env[: self._n_inputs] = list(flat)
        env[self._n_inputs: self._n_inputs + len(self._constants)] = self._constants
        return env

    @staticmethod
    def _run_step(env, fn, ins, outs):
        result = fn(*[env[i] for i in ins])
        if len(outs) == 1 and not isinstance(result, (list, tuple)):
            result = (result,)
        for j, value in zip(outs, result):
            env[j] = value

    def __call__(self, *flat):
        env = self._env(flat)
        for fn, ins, outs in self._steps:
            self._run_step(env, fn, ins, outs)
        out = [env[v] if kind == "slot" else v for kind, v in self._outputs]
        return torch.utils._pytree.tree_unflatten(out, self._out_spec)


def _layout(x):
    if isinstance(x, torch.Tensor):
        return (tuple(x.shape), tuple(x.stride()), x.dtype, str(x.device), x.storage_offset())
    return (type(x).__name__, x if isinstance(x, (bool, int, float, str, type(None))) else repr(x))


def example_inputs(program) -> list[Any]:
    """Real tensors to compile the regions on: the Program's example inputs laid out as its placeholders
    were captured, state inputs copied (the example run writes into them)."""
    out = []
    for node, x in zip(program.placeholders(), program.example_inputs):
        val = node.meta.get("val")
        if isinstance(x, torch.Tensor) and isinstance(val, torch.Tensor):
            shape, stride = tuple(val.shape), tuple(val.stride())
            if any(st == 0 and sz > 1 for sz, st in zip(shape, stride)):  # a broadcast example: write a dense one
                stride = torch.empty(shape, device="meta").stride()
            x = torch.empty_strided(shape, stride, dtype=x.dtype, device=x.device).copy_(x)
        out.append(x)
    return out
