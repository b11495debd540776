"""The pass pipeline: Pass contract, PassReport, ordering by ``requires``, instrumentation.

A pipeline is data — an ordered list of pass names. :func:`optimize` resolves it against the registry
(``mmcompile.passes``), orders it by each pass's ``requires`` (a DAG, checked with networkx), runs the
passes on a copy of the Program, and wraps each run with the instruments users debug with:

- ``verify=True``            run ``Program.verify()`` after every pass (``MMCOMPILE_VERIFY=1`` turns it on);
- ``print_after_change=True`` print the IR after every pass that changed it;
- ``dump_dir=DIR``           write ``000_input.txt``, ``001_<pass>.txt``, ... for diffing;
- ``bisect=N`` / ``MMCOMPILE_BISECT=N``  run only the first N passes, to find the pass that changed
  the numbers;
- per-pass wall time in every PassReport.
"""

from __future__ import annotations

import dataclasses
import os
import time
import collections
from pathlib import Path
from typing import Any, ClassVar, Iterable, Sequence

import torch.fx as fx

from mmcompile.errors import PassContractError, PipelineError
from mmcompile.program import Program

__all__ = ["Pass", "PassReport", "OptimizeResult", "optimize", "resolve", "DEFAULT_PIPELINE"]

DEFAULT_PIPELINE: tuple[str, ...] = ("canonicalize", "fold_constants", "fuse_attention", "fuse_linears",
                                     "eliminate_dead_code")


@dataclasses.dataclass
class PassReport:
    """What one pass did to one Program."""

    name: str
    changed: bool = False
    stats: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    notes: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    ops_before: collections.Counter = dataclasses.field(default_factory=collections.Counter, repr=False)
    ops_after: collections.Counter = dataclasses.field(default_factory=collections.Counter, repr=False)

    def count(self, rule: str, n: int = 1) -> None:
        self.stats[rule] += n
        self.changed = True

    def note(self, message: str) -> None:
        self.notes.append(message)

    def __str__(self) -> str:
        stats = ", ".join(f"{k}={v}" for k, v in sorted(self.stats.items())) or "no change"
        return f"{self.name}: {stats} ({self.seconds * 1e3:.1f} ms)"


class Pass:
    """Base class of every pass. Subclasses set ``name`` and implement :meth:`run`.

    Contract: ``run(program, options)`` mutates ``program`` and returns a PassReport whose ``changed``
    is true exactly when the graph changed. Running a pass twice changes nothing the second time.
    Nodes a pass creates should be made through :meth:`tag` so they carry ``meta["mmcompile.pass"]``.
    """

    name: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ()
    exact: ClassVar[bool] = True          # False for lossy passes (quantization)
    tolerance: ClassVar[float | None] = None
    # the options run() reads (``explain`` is always allowed): any other is refused with the list, so a
    # misspelled option never passes silently; () for a pass that takes none, None (a pass that does not
    # say) for any
    options: ClassVar[tuple[str, ...] | None] = None

    @classmethod
    def summary(cls) -> str:
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    def run(self, program: Program, options: dict[str, Any]) -> PassReport:  # pragma: no cover - abstract
        raise NotImplementedError(f"pass {self.name} does not implement run()")

    def report(self) -> PassReport:
        return PassReport(self.name)

    def tag(self, node: fx.Node) -> fx.Node:
        node.meta["mmcompile.pass"] = self.name
        return node

    def __call__(self, program: Program, options: dict[str, Any] | None = None, *, check_contract: bool = True) -> PassReport:
        """Run with the contract enforced: a PassReport comes back, and ``changed`` tells the truth."""
        unknown = sorted(set(options or {}) - set(self.options) - {"explain"}) if self.options is not None else []
        if unknown:
            takes = f"it takes {', '.join(self.options)}" if self.options else "it takes none"
            raise PipelineError(f"{self.name}: unknown option(s) {', '.join(map(repr, unknown))}; {takes}")
        before = str(program) if check_contract else None
        counts_before = program.op_counts()
        start = time.perf_counter()
        report = self.run(program, dict(options or {}))
        seconds = time.perf_counter() - start
        if not isinstance(report, PassReport):
            raise PassContractError(f"pass {self.name} returned {type(report).__name__}, not a PassReport")
        report.seconds = seconds
        report.ops_before, report.ops_after = counts_before, program.op_counts()
        if check_contract:
            program.graph_module.recompile()
            changed = str(program) != before
            if changed and not report.changed:
                raise PassContractError(f"pass {self.name} changed the graph but reported changed=False")
            if report.changed and not changed:
                report.changed = False  # e.g. rewrote a node into an identical one
        elif report.changed:  # regenerating the Python code of a 7B graph takes a while: only when needed
            program.graph_module.recompile()
        return report

    def __repr__(self) -> str:
        return f"<Pass {self.name}>"


@dataclasses.dataclass
class OptimizeResult:
    program: Program
    reports: list[PassReport]
    pipeline: list[str]

    def report(self, name: str) -> PassReport:
        for r in self.reports:
            if r.name == name:
                return r
        raise KeyError(f"no pass named {name!r} ran; ran {self.pipeline}")

    def summary(self) -> str:
        return "\n".join(str(r) for r in self.reports)


def resolve(passes: str | Sequence[str | Pass], already: Iterable[str] = ()) -> list[Pass]:
    """Turn ``"default"`` or a list of names/instances into Pass instances ordered by ``requires``.
    ``already``: passes that have run on the Program before; they satisfy requirements."""
    from mmcompile import passes as registry

    if isinstance(passes, str):
        names: list[str | Pass] = list(DEFAULT_PIPELINE) if passes == "default" else (
            [] if passes in ("none", "") else [p.strip() for p in passes.split(",") if p.strip()]
        )
    else:
        names = list(passes)
    instances = [p if isinstance(p, Pass) else registry.get(p) for p in names]
    seen = collections.Counter(p.name for p in instances)
    dup = [n for n, c in seen.items() if c > 1]
    if dup:
        raise PipelineError(f"pass {dup[0]!r} appears {seen[dup[0]]} times in the pipeline; list it once")
    return _order(instances, set(already))


def _order(instances: list[Pass], already: set[str] = frozenset()) -> list[Pass]:
    import networkx as nx

    by_name = {p.name: p for p in instances}
    graph = nx.DiGraph()
    for i, p in enumerate(instances):
        graph.add_node(p.name, index=i)
    for p in instances:
        for req in p.requires:
            if req not in by_name and req in already:
                continue
            if req not in by_name:
                raise PipelineError(
                    f"pass {p.name!r} requires {req!r} to run earlier, but the pipeline "
                    f"{[q.name for q in instances]} does not include it; add {req!r} before {p.name!r}"
                )
            graph.add_edge(req, p.name)
    try:
        cycle = nx.find_cycle(graph)
    except nx.NetworkXNoCycle:
        cycle = None
    if cycle:
        path = " -> ".join([u for u, _ in cycle] + [cycle[0][0]])
        raise PipelineError(f"pass requirements form a cycle: {path}; no order can satisfy them")
    order = nx.lexicographical_topological_sort(graph, key=lambda n: graph.nodes[n]["index"])
    return [by_name[n] for n in order]


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def optimize(
    program: Program,
    passes: str | Sequence[str | Pass] = "default",
    *,
    verify: bool | str | None = None,
    print_after_change: bool = False,
    dump_dir: str | os.PathLike | None = None,
    bisect: int | None = None,
    explain: bool = False,
    in_place: bool = False,
    progress: Any = None,
    **pass_options: Any,
) -> OptimizeResult:
    """Run a pipeline of passes on (a copy of) ``program``.

    Args:
        passes: ``"default"``, a comma-separated string, or a list of pass names / Pass instances.
        verify: ``True`` checks invariants after every pass, ``"full"`` also runs the graph on its
            example inputs; default from ``MMCOMPILE_VERIFY``.
        print_after_change: print the IR after each pass that changed it.
        dump_dir: write numbered IR dumps there.
        bisect: run only the first N passes (``MMCOMPILE_BISECT`` when not given).
        explain: ask passes for notes on every candidate they did not rewrite.
        in_place: mutate ``program`` itself instead of a copy.
        progress: optional callable ``progress(pass_name)`` called before each pass.
        pass_options: options per pass, keyed by pass name: ``fuse_attention={"...": ...}``.
    """
    ordered = resolve(passes, already=program.metadata.get("applied_passes", ()))
    if bisect is None and os.environ.get("MMCOMPILE_BISECT", "").strip():
        try:
            bisect = int(os.environ["MMCOMPILE_BISECT"])
        except ValueError:
            raise PipelineError(f"MMCOMPILE_BISECT must be an integer, got {os.environ['MMCOMPILE_BISECT']!r}") from None
    if bisect is not None:
        if bisect < 0:
            raise PipelineError(f"bisect limit must be >= 0, got {bisect}")
        skipped = [p.name for p in ordered[bisect:]]
        ordered = ordered[:bisect]
        if skipped:
            print(f"[mmcompile] bisect: running {[p.name for p in ordered]}, skipping {skipped}")
    if verify is None:
        verify = _env_flag("MMCOMPILE_VERIFY")
    unknown = set(pass_options) - {p.name for p in ordered} - _all_registered()
    if unknown:
        raise PipelineError(f"options given for unknown pass(es) {sorted(unknown)}")
    prog = program if in_place else program.clone()
    dump = Path(dump_dir) if dump_dir is not None else None
    if dump is not None:
        dump.mkdir(parents=True, exist_ok=True)
        (dump / "000_input.txt").write_text(str(prog) + "\n")
    reports: list[PassReport] = []
    done: list[str] = []
    for i, p in enumerate(ordered, start=1):
        if progress is not None:
            progress(p.name)
        options = dict(pass_options.get(p.name, {}))
        options.setdefault("explain", explain)
        try:
            report = p(prog, options, check_contract=bool(verify))
            if verify:
                prog.verify(run=(verify == "full"))
        except PipelineError as e:
            raise type(e)(f"pass {p.name!r} failed after {done}: {e}") from e
        except Exception as e:
            raise PipelineError(f"pass {p.name!r} failed after {done}: {type(e).__name__}: {e}") from e
        reports.append(report)
        done.append(p.name)
        prog.metadata["applied_passes"] = list(prog.metadata.get("applied_passes", [])) + [p.name]
        if report.changed and print_after_change:
            print(f"// ----- IR after {p.name} ({report}) -----\n{prog}")
        if dump is not None:
            (dump / f"{i:03d}_{p.name}.txt").write_text(str(prog) + "\n")
    prog.graph_module.recompile()  # the code matches the graph, whatever a pass reported
    return OptimizeResult(prog, reports, done)


def _all_registered() -> set[str]:
    from mmcompile import passes as registry

    return set(registry.names())

