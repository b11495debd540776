"""inductor: torch's own compiler, the embedded default, on CPU and CUDA.

The Program's GraphModule is compiled with ``torch._inductor.compile_fx`` on fake copies of the
Program's placeholder values, so a Program captured with dynamic dimensions compiles once for the
whole range. Options:

- ``mode``: as in ``torch.compile``: ``"default"``, ``"reduce-overhead"`` (replay the compiled program as
  CUDA graphs, one per set of input shapes, recorded at its first call: no Python and no kernel launches
  from the host — for steps small enough to be bound by launching, such as ranking a batch of users;
  ``compiled.cuda_graphs`` says whether they run, and a Program that cannot be replayed — on the CPU, a
  host synchronization, random numbers — runs without them, with a warning that says why),
  ``"max-autotune"`` (Inductor's autotuning, and CUDA graphs) or ``"max-autotune-no-cudagraphs"``.
  Inputs replayed from a graph are copied into its buffers; outputs are fresh tensors;
- ``inductor_config``: a dict of ``torch._inductor.config`` overrides for this compile;
- ``gemv``: how products of 1..16 rows (decode) with float16/bfloat16 activations run on CUDA:
  ``"auto"`` (default: the Triton GEMV kernels of ``mmcompile.kernels`` for float, int8 and int4
  weights when triton is installed, else cuBLAS and Inductor's reductions), ``"triton"`` (required) or
  ``"cublas"`` (never the kernels);
- ``attention``: how decode attention (one query per row, a boolean mask — or an additive one made from
  a boolean, as transformers writes it — over a static KV cache) runs
  on CUDA: ``"auto"`` (default: the split-KV kernel of ``mmcompile.decode_attention``, which reads the
  cache only up to the visible keys, when triton is installed), ``"triton"`` (required) or ``"sdpa"``
  (torch's fused SDPA kernels, which read every slot). The same choice covers prefill attention —
  several queries per row under a mask proven to be ``arange(L) <= positions``: ``"auto"`` runs it with
  the position-bounded kernel of ``mmcompile.prefill_attention``, which never reads the keys past each
  block of queries' positions (``route_prefill_attention``; SDPA calls it does not take are noted in
  ``compiled.fusions`` with why). Other attention always stays on SDPA.
- ``attention_fusion``: ``"auto"`` (default: where the decode kernel runs and the step writes its new
  key and value into the cache just before attending, the rotary embedding of q and k, the cache
  writes and the attention run as one kernel, see ``inductor_fusions.fuse_cache_writes_into_attention``)
  or ``"off"``.
- ``gemv_fusion``: ``"auto"`` (default: where the GEMV kernels run, a decode-sized linear takes its
  RMSNorm or SiLU-gate prologue and its residual add into the same kernel, see ``inductor_fusions``;
  ``compiled.fusions`` lists what moved and what was left, with why) or ``"off"``.
- ``pdl``: programmatic dependent launch on sm_90 and later GPUs, where a kernel starts while the one
  before it finishes: ``"auto"`` (default: the one-row GEMV kernels, which read their first weight tile
  meanwhile, see ``inductor_fusions.launch_gemvs_dependently``, and the decode attention with its cache
  write, which reads its first block of cached keys meanwhile, ``launch_attention_dependently`` — where
  the step is replayed from CUDA graphs: a ``mode`` that records them, or a Program
  ``capture_decode_loop`` proved capturable, which a Generator replays. Launched one by one, these go
  through opaque ops, about 65 us each on an H100 against Inductor's own launches), ``"on"`` (the same,
  replayed or not), ``"all"`` (those and Inductor's own kernels,
  ``torch._inductor.config.triton.enable_pdl``) or ``"off"``.
- ``int4_kernel``: ``"auto"`` (default: one-row int4 weight-only products on CUDA run torch's tinygemm
  kernel, ``aten._weight_int4pack_mm``, where it takes them — bfloat16 activations — and mmcompile's int4
  word kernel otherwise — float16 —, each on a copy of the weights laid out for it, see
  ``inductor_fusions.int4_one_row_products``), ``"tinygemm"``, ``"words"`` or ``"triton"`` (mmcompile's
  kernel on the packed codes, as several-row products always run).
- ``regions``: ``"auto"`` (default: on CUDA, a graph of four or more identical layers is compiled layer by
  layer, each distinct layer once, see ``inductor_regions``; ``compiled.regions`` says what was done or
  why not), ``"on"`` (also on the CPU, from two layers) or ``"off"`` (the whole graph at once).

Artifacts: ``compiled.save(DIR)`` compiles the same graph (decompositions, kernel choices) ahead of
time with AOTInductor into ``DIR/model.pt2`` — code and kernels — with the weights beside it in
``weights.safetensors`` and a ``manifest.json``; ``mmc.load(DIR)`` loads the package with
``torch._inductor.aoti_load_package`` and hands it the weights where they lie on the device, no Python
model and no compile. A Generator's phases share one copy of each weight on disk and in memory. State
inputs (the KV cache) are updated in place, as the Program does.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import torch

from mmcompile.errors import BackendError
from mmcompile.program import Program
from mmcompile.rewrite import is_call, sdpa_arguments

from . import Backend, Compiled, LoadedFile, check_options, drop_constant_inputs, loaded_file, register, replayed


OPTIONS = ("mode", "inductor_config", "gemv", "attention", "attention_fusion", "gemv_fusion", "pdl", "regions",
           "int4_kernel")
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
GRAPH_MODES = ("reduce-overhead", "max-autotune")  # the modes that replay CUDA graphs


@register
class InductorBackend(Backend):
    name = "inductor"
    saves_artifacts = True

    def available(self) -> tuple[bool, str]:
        try:
            import torch._inductor.compile_fx  # noqa: F401
        except Exception as e:  # pragma: no cover - part of every torch build we support
            return False, f"torch._inductor cannot be imported ({e}); install a full torch build"
        return True, ""

    def warm_up(self, device: torch.device) -> None:
        """Start Inductor's kernel-compiling worker processes now, as ``torch.compile`` does when it begins to
        trace: they come up while the model is captured instead of when the first graph is lowered. Only
        for CUDA, where Triton compiles many kernels."""
        if torch.device(device).type == "cuda":
            from torch._inductor.async_compile import maybe_warm_pool

            maybe_warm_pool()

    def lower(self, program: Program, options: dict[str, Any]) -> Compiled:
        from torch._functorch import config as functorch_config
        from torch._inductor import config as inductor_config
        from torch._inductor.compile_fx import compile_fx
        from torch._inductor.decomposition import select_decomp_table

        from mmcompile.ops import inductor_decompositions

        check_options(self.name, options, OPTIONS)
        config = dict(options.get("inductor_config", {}))
        mode = options.get("mode") or "default"
        if mode not in MODES:
            raise BackendError(f"inductor: unsupported mode {mode!r}; use one of {', '.join(map(repr, MODES))}")
        if mode.startswith("max-autotune"):
            config.setdefault("max_autotune", True)
        use_kernels = _kernel_choice(options, "gemv", "cublas",
                                     "Triton GEMV kernels for decode-sized products on CUDA when triton is installed")
        gm, fusions = program.graph_module, []
        attention_fusion = options.get("attention_fusion", "auto")
        if attention_fusion not in ("auto", "off"):
            raise BackendError(f"inductor: attention_fusion={attention_fusion!r} is not an option; use 'auto' (rotary, "
                               "cache writes and decode attention in one kernel where the kernel runs) or 'off'")
        if _kernel_choice(options, "attention", "sdpa", "the split-KV decode kernel on CUDA when triton is installed"):
            if attention_fusion == "auto":
                from .inductor_fusions import fuse_cache_writes_into_attention

                gm, fusions = fuse_cache_writes_into_attention(gm, {n.name for n in program.state_inputs()})
            gm = route_decode_attention(gm)
            gm, more = route_prefill_attention(gm)
            fusions = fusions + more
        fusion = options.get("gemv_fusion", "auto")
        if fusion not in ("auto", "off"):
            raise BackendError(f"inductor: gemv_fusion={fusion!r} is not an option; use 'auto' (RMSNorm, SiLU gate "
                               "and residual add in the GEMV kernel when it runs) or 'off'")
        if use_kernels and fusion == "auto":
            from .inductor_fusions import fuse_gemv_neighbours

            gm, more = fuse_gemv_neighbours(gm)
            fusions = fusions + more
        int4 = options.get("int4_kernel", "auto")
        if int4 not in ("auto", "words", "tinygemm", "triton"):
            raise BackendError(f"inductor: int4_kernel={int4!r} is not an option; use 'auto' (one-row products on "
                               "CUDA on torch's tinygemm where it takes them, else on mmcompile's int4 word kernel), "
                               "'tinygemm', 'words' or 'triton' (mmcompile's kernel on the packed codes)")
        if int4 != "triton":
            from .inductor_fusions import int4_one_row_products

            # gemv="cublas" keeps mmcompile's GEMV kernels out: "auto" then means torch's tinygemm alone
            gm, more = int4_one_row_products(gm, "tinygemm" if int4 == "auto" and not use_kernels else int4)
            fusions = fusions + more
        aot_gm = gm  # AOTInductor packages launch every kernel their own way
        gm, more = _dependent_launches(gm, options, use_kernels, mode in GRAPH_MODES or replayed(program), config)
        fusions = fusions + more
        example = [n.meta["val"] for n in program.placeholders()]
        regions, why_not = _region_plan(program, gm, options)
        try:
            # AOTAutograd's cache keys a graph before decomposition, without this table: a graph compiled
            # once with the GEMV kernels and once without would get the first compile back
            with inductor_config.patch(config), functorch_config.patch(enable_autograd_cache=False), torch.no_grad(), \
                    kernel_analysis_once():
                # mmcompile:: ops are decomposed into ops Inductor fuses (or, for decode-sized products on
                # CUDA, the Triton GEMV kernels), not called as opaque functions
                base = select_decomp_table()
                table = {**base, **inductor_decompositions(use_kernels, base)}
                fn = None
                if regions is not None:
                    from .inductor_regions import RegionalRunner, example_inputs

                    try:
                        fn = RegionalRunner(gm, regions,
                                            lambda region, args: compile_fx(region, args, decompositions=table),
                                            example_inputs(program))
                    except Exception as e:
                        if options.get("regions", "auto") == "on":
                            raise
                        # "auto" must never cost a working compile: the whole graph, and the reason why
                        why_not = f"compiling a region failed ({type(e).__name__}: {str(e)[:200]}); compiled whole"
                        regions = None
                if fn is None:
                    fn = compile_fx(gm, example, decompositions=table)
        except Exception as e:
            raise BackendError(f"inductor failed to compile {program.name}: {type(e).__name__}: {e}") from e
        compiled = _InductorCompiled(program, fn, self.name)
        if mode in GRAPH_MODES:
            compiled.cuda_graphs = _use_cuda_graphs(compiled, mode)
        compiled.fusions = fusions
        compiled.regions = ([regions.describe() + f": {len(fn.compiled)} compiled"] if regions is not None
                            else [f"regions: off ({why_not})"] if why_not else [])
        compiled._aot_source = (aot_gm, use_kernels, config)  # what save() compiles ahead of time
        return compiled

    def load_artifact(self, directory, manifest: dict) -> Compiled:
        from mmcompile.artifact import Signature

        device = torch.device(manifest["device"])
        if device.type == "cuda" and not torch.cuda.is_available():
            raise BackendError(f"{directory} was compiled for {device}, and this machine has no CUDA device")
        import mmcompile.ops  # noqa: F401  (mmcompile:: ops the package may call must be registered)

        try:
            runner = torch._inductor.aoti_load_package(str(directory / "model.pt2"))
            refs = manifest["weights"]
            wanted = runner.get_constant_fqns()  # the package may have folded some constants into its code
            missing = [fqn for fqn in wanted if fqn not in refs]
            if missing:
                raise KeyError(f"the manifest names no weights for {missing[:3]}")
            files = {path: _weights_file(directory / path, device) for path in {refs[fqn][0] for fqn in wanted}}
            weights = {fqn: files[refs[fqn][0]][refs[fqn][1]] for fqn in wanted}
            runner.load_constants(weights, check_full_update=True, user_managed=True)
        except Exception as e:
            raise BackendError(f"{directory}: the package or its weights could not be loaded ({_first_line(e)}); "
                               "recompile the artifact") from e
        compiled = _AotiCompiled(Signature(manifest), runner, manifest["dropped_inputs"], manifest["state"])
        compiled._weights = weights  # the package reads these tensors where they are (user-managed)
        compiled._weight_files = list(files.values())  # and other phases find them loaded while this lives
        return compiled


@contextlib.contextmanager
def kernel_analysis_once():
    """While compiling, analyse each of mmcompile's Triton kernels once per specialization, not once per call.

    Inductor finds out which tensors a user-defined Triton kernel reads and writes by generating the
    kernel's Triton IR and walking it — at every call site, twice (functionalization, then lowering).
    A 7B decode step calls the GEMV and attention kernels 161 times with five specializations, and these
    analyses alone took longer than the rest of Inductor. The answer depends only on the kernel and
    the arguments that specialize its IR (constexprs and integers by value, tensors by dtype), so inside
    this block it is computed once per such key, for ``mmcompile``'s kernels only. On a torch without
    the analysis function (renamed or removed) nothing is patched."""
    from torch._higher_order_ops import triton_kernel_wrap as wrap

    name = next((n for n in ("identify_accessed_tensors", "identify_mutated_tensors") if hasattr(wrap, n)), None)
    if name is None:
        yield
        return
    original = getattr(wrap, name)
    memo: dict = {}

    def analysed(kernel, kwargs, tma_descriptor_metadata, *rest, **kw):
        fn = getattr(kernel, "fn", kernel)  # an Autotuner wraps the JITFunction
        key = None
        if getattr(fn, "__module__", "").startswith("mmcompile.") and not rest and not kw:
            try:
                key = (fn, tuple(sorted((k, _specialization(v)) for k, v in kwargs.items())),
                       repr(tma_descriptor_metadata))
                hash(key)
            except TypeError:
                key = None
        if key is None:
            return original(kernel, kwargs, tma_descriptor_metadata, *rest, **kw)
        if key not in memo:
            memo[key] = original(kernel, kwargs, tma_descriptor_metadata)
        return copy.deepcopy(memo[key])

    setattr(wrap, name, analysed)
    try:
        yield
    finally:
        setattr(wrap, name, original)


def _specialization(value):
    """What of a kernel argument can change the kernel's IR: a tensor's dtype, a number's value."""
    dtype = getattr(value, "dtype", None)
    if dtype is None and hasattr(value, "get_dtype"):  # an Inductor TensorBox
        dtype = value.get_dtype()
    if dtype is not None:
        return ("tensor", str(dtype))
    if isinstance(value, (bool, int, float, str, type(None))):
        return (type(value).__name__, value)
    raise TypeError(f"no specialization key for {type(value).__name__}")  # symbolic sizes and the rest: no memo


def _dependent_launches(gm: torch.fx.GraphModule, options: dict, use_kernels: bool, will_replay: bool,
                        config: dict) -> tuple[torch.fx.GraphModule, list[str]]:
    """Option ``pdl``: ``gm`` with its GEMVs launched dependently where that pays (``will_replay``: the step
    is replayed from CUDA graphs), the notes, and Inductor's own switch set in ``config`` for ``"all"``."""
    pdl = options.get("pdl", "auto")
    if pdl not in ("auto", "on", "all", "off"):
        raise BackendError(f"inductor: pdl={pdl!r} is not an option; use 'auto' (the GEMV kernels start while "
                           "the kernel before them finishes, on sm_90 and later, where the step is replayed "
                           "from CUDA graphs), 'on' (also launched one by one), 'all' (Inductor's kernels "
                           "too) or 'off'")
    if pdl == "all":
        config.setdefault("triton.enable_pdl", True)
    if pdl == "off":
        return gm, []
    from mmcompile import kernels

    kernels.register()
    if pdl == "auto" and not will_replay:
        if use_kernels and any(n.target is torch.ops.mmcompile.triton_gemv_fused.default for n in gm.graph.nodes):
            return gm, ["gemv: ordinary launches: the step is not replayed from CUDA graphs (no capturable mark, "
                        "or its driver said it launches it one by one; no graph mode), and launched one by one a "
                        "dependently launched GEMV costs more than it saves; pdl='on' launches them so anyway"]
        return gm, []
    from .inductor_fusions import launch_attention_dependently, launch_gemvs_dependently

    gm, notes = launch_gemvs_dependently(gm) if use_kernels else (gm, [])
    gm, more = launch_attention_dependently(gm)
    return gm, notes + more


def _region_plan(program: Program, gm: torch.fx.GraphModule, options: dict):
    """The ``regions`` option: (plan, why not). "auto" (the default) compiles repeated layers once for CUDA
    programs with at least four layers; "on" wherever the graph qualifies; "off" never."""
    from .inductor_regions import plan

    choice = options.get("regions", "auto")
    if choice not in ("auto", "on", "off"):
        raise BackendError(f"inductor: regions={choice!r} is not an option; use 'auto' (compile repeated layers "
                           "once on CUDA), 'on' or 'off'")
    if choice == "off":
        return None, ""
    if choice == "auto":
        if _devices(program) != {"cuda"}:
            return None, ""
    return plan(gm, min_layers=4 if choice == "auto" else 2)


def _devices(program: Program) -> set[str]:
    """The device types of a Program's example inputs."""
    return {x.device.type for x in program.example_inputs if isinstance(x, torch.Tensor)}


def _kernel_choice(options: dict, name: str, off: str, auto: str) -> bool:
    """Whether option ``name`` ("auto" | "triton" | ``off``) asks for mmcompile's Triton kernels and they
    can run: "triton" requires them (a BackendError says why they cannot), ``off`` never uses them."""
    from mmcompile import kernels

    choice = options.get(name, "auto")
    if choice not in ("auto", "triton", off):
        raise BackendError(f"inductor: {name}={choice!r} is not an option; use 'auto' ({auto}), 'triton' or {off!r}")
    ok, why = kernels.available("cuda")
    if choice == "triton" and not ok:
        raise BackendError(f"inductor: {name}='triton' but {why}; use {name}={off!r}")
    return choice != off and ok


def route_decode_attention(gm: torch.fx.GraphModule, devices=("cuda",)) -> torch.fx.GraphModule:
    """A copy of ``gm`` (sharing its parameters and buffers) whose decode-shaped SDPA calls on ``devices``
    — one query per row, a boolean mask, an additive mask made from one (see
    ``cache_patterns.boolean_source``) or none, not causal, no dropout, fp16/bf16 — run
    ``mmcompile::decode_attention``. ``gm`` itself is left
    as it is (the Program keeps portable ops)."""
    import copy

    from mmcompile import decode_attention

    from .cache_patterns import boolean_source

    sdpa = torch.ops.aten.scaled_dot_product_attention.default
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is sdpa]
    if not calls:
        return gm
    graph = copy.deepcopy(gm.graph)
    changed = False
    for node in [n for n in graph.nodes if n.op == "call_function" and n.target is sdpa]:
        a = sdpa_arguments(node)
        q, k, v, mask = a["query"], a["key"], a["value"], a.get("attn_mask")
        vals = [x.meta.get("val") if isinstance(x, torch.fx.Node) else x for x in (q, k, v, mask)]
        if a.get("dropout_p", 0.0) or a.get("is_causal", False) or any(x is None for x in vals[:3]):
            continue
        if mask is not None and not isinstance(mask, torch.fx.Node):
            continue
        negate = False
        if mask is not None and vals[3] is not None and vals[3].dtype != torch.bool:
            found = boolean_source(mask)  # transformers' masks: where(visible, 0, finfo.min)
            if found is None:
                continue
            mask, negate = found
            vals[3] = mask.meta["val"]  # negated or not, the same shape and dtype for supported()
        if vals[0].device.type not in devices:
            continue
        if vals[0].shape[1] != vals[1].shape[1] and not a.get("enable_gqa", False):
            continue
        if not decode_attention.supported(*vals)[0]:
            continue
        scale = a.get("scale")
        scale = vals[0].shape[-1] ** -0.5 if scale is None else float(scale)
        with graph.inserting_before(node):
            if negate:  # the mask was where(hidden, m, 0): the kernel takes the visible keys
                mask = graph.call_function(torch.ops.aten.logical_not.default, (mask,))
                mask.meta["val"] = torch.logical_not(vals[3])
            decode_attention.register()
            new = graph.call_function(torch.ops.mmcompile.decode_attention.default, (q, k, v, mask, scale))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        changed = True
    if not changed:
        return gm
    return torch.fx.GraphModule(gm, graph, class_name=type(gm).__name__)


def route_prefill_attention(gm: torch.fx.GraphModule, devices=("cuda",)) -> tuple[torch.fx.GraphModule, list[str]]:
    """A copy of ``gm`` (sharing its parameters and buffers) whose SDPA calls on ``devices`` with several
    queries per row under a mask proven to be ``arange(L) <= positions`` (boolean, or additive made from
    one, see ``cache_patterns.visible_positions``), not causal, no dropout, fp16/bf16, run
    ``mmcompile::prefill_attention``: the keys past each block of queries' positions are never read.
    Returns the graph and notes: one per SDPA of several queries left alone, with why. ``gm`` itself is
    left as it is (the Program keeps portable ops)."""
    import copy

    from mmcompile import prefill_attention

    from .cache_patterns import visible_positions

    aten = torch.ops.aten
    sdpa = aten.scaled_dot_product_attention.default
    if not any(n.op == "call_function" and n.target is sdpa for n in gm.graph.nodes):
        return gm, []
    graph, notes, routed = copy.deepcopy(gm.graph), [], 0
    for node in [n for n in graph.nodes if n.op == "call_function" and n.target is sdpa]:
        a = sdpa_arguments(node)
        q, k, v, mask = a["query"], a["key"], a["value"], a.get("attn_mask")
        qv, kv, vv = (x.meta.get("val") if isinstance(x, torch.fx.Node) else None for x in (q, k, v))
        if not all(isinstance(x, torch.Tensor) for x in (qv, kv, vv)) or qv.dim() != 4 or qv.shape[2] == 1:
            continue  # decode (one query per row) is route_decode_attention's
        if qv.device.type not in devices:
            continue
        B, H, S, D = qv.shape
        p = visible_positions(mask, kv.shape[2]) if isinstance(mask, torch.fx.Node) else None
        pv = p.meta["val"] if p is not None else None
        mv = mask.meta.get("val") if isinstance(mask, torch.fx.Node) else None
        why = None
        if a.get("dropout_p", 0.0) or a.get("is_causal", False):
            why = "dropout or is_causal"
        elif not all(isinstance(n, int) for n in (*qv.shape, *kv.shape)):
            why = "its shapes are dynamic; the kernel is routed for static ones"
        elif p is None:
            why = "the mask is not arange(keys) <= positions"
        elif not _one_per_query(pv, mv, _comparison(mask).meta["val"], B, S, kv.shape[2]):
            why = f"the positions {list(pv.shape)} are not one per query of [{B}, {S}]"
        elif H != kv.shape[1] and not a.get("enable_gqa", False):
            why = "query heads differ from key heads without enable_gqa"
        else:
            rows = pv.numel() // S
            ok, reason = prefill_attention.supported(qv, kv, vv, pv.reshape(rows, S))
            why = None if ok else reason
        if why:
            notes.append(f"attention: {node.name} ({S} queries) stays on SDPA: {why}")
            continue
        prefill_attention.register()
        scale = a.get("scale")
        scale = D ** -0.5 if scale is None else float(scale)
        with graph.inserting_before(node):
            pos = graph.call_function(aten.reshape.default, (p, [rows, S]))
            pos.meta["val"] = pv.reshape(rows, S)
            new = graph.call_function(torch.ops.mmcompile.prefill_attention.default, (q, k, v, pos, scale))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        routed += 1
    if routed:
        notes.append(f"attention: {routed} attention(s) of several queries read the keys up to their positions only "
                     "(mmcompile::prefill_attention)")
        gm = torch.fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    return gm, notes


def _one_per_query(positions: torch.Tensor, mask: torch.Tensor, comparison: torch.Tensor, B: int, S: int,
                   L: int) -> bool:
    """Whether ``positions`` ([..., S, 1], compared with the keys into ``comparison``, which views and
    broadcasts make the SDPA ``mask``) hold one position per (row or every row, query): the comparison
    and the mask end in [S, L] (queries, keys), and before those the comparison has at most the batch."""
    lead = [n for n in comparison.shape[:-2] if n != 1]
    return (mask.dim() == 4 and tuple(mask.shape[-2:]) == (S, L) and comparison.dim() >= 2
            and tuple(comparison.shape[-2:]) == (S, L) and lead in ([], [B]) and positions.dim() >= 2
            and positions.shape[-2] == S and positions.numel() == S * (lead[0] if lead else 1))


def _comparison(mask: torch.fx.Node) -> torch.fx.Node:
    """The comparison a mask that ``visible_positions`` matched is made from, under views (which keep the
    order of its elements), broadcasts and its additive or negated form."""
    from .cache_patterns import boolean_source, strip

    core = strip(mask if mask.meta["val"].dtype == torch.bool else boolean_source(mask)[0])
    while is_call(core, torch.ops.aten.bitwise_not.default, torch.ops.aten.logical_not.default):
        core = strip(core.args[0])
    return core


def _use_cuda_graphs(compiled: "_InductorCompiled", mode: str) -> str:
    """Turn on CUDA-graph replay for ``mode`` when the Program allows it; what was done, or why not (also
    warned: a mode that asks for graphs never loses them silently)."""
    import warnings

    from mmcompile.passes.capture_decode_loop import reasons_not_capturable
    from mmcompile.runtime.cuda_graphs import ShapeGraphs

    program = compiled.program
    devices = {n.meta["val"].device.type for n in program.placeholders() if isinstance(n.meta.get("val"), torch.Tensor)}
    # a graph per set of input sizes is recorded as they arrive, so dimensions compiled as ranges are fine
    reasons = [r for r in reasons_not_capturable(program) if "has a dynamic shape" not in r]
    if "cuda" not in devices:
        reasons = [f"the Program runs on {', '.join(sorted(devices)) or 'no device'}; CUDA graphs replay GPU work"]
    if reasons:
        why = f"cuda graphs: off ({'; '.join(reasons)})"
        warnings.warn(f"inductor mode {mode!r}: {program.name} runs without CUDA graphs: {'; '.join(reasons)}",
                      stacklevel=3)
        return why
    state_nodes = set(program.state_inputs())
    state = tuple(i for i, n in enumerate(program.placeholders()) if n in state_nodes)
    compiled._graphs = ShapeGraphs(compiled._run_flat_uncaptured, state)
    return "cuda graphs: on (one per set of input shapes, recorded at its first call)"


class _InductorCompiled(Compiled):
    """Inductor's code asserts the input strides it was compiled for; inputs that are not state
    (updated in place) and arrive with other strides are copied into that layout first. With a mode
    that uses CUDA graphs, ``cuda_graphs`` says whether they run (or why not)."""

    _graphs = None
    cuda_graphs = "cuda graphs: off (mode has none)"

    def __init__(self, program: Program, fn, backend: str):
        super().__init__(program, fn, backend)
        state = set(program.state_inputs())
        self._layouts = [
            (i, tuple(n.meta["val"].stride()))
            for i, n in enumerate(program.placeholders())
            if n not in state and isinstance(n.meta.get("val"), torch.Tensor)
            and all(isinstance(s, int) for s in n.meta["val"].stride())
        ]

    def save(self, directory, *, shared_weights: dict | None = None) -> None:
        """Write ``model.pt2`` (an AOTInductor package of this graph, without weights), ``weights.safetensors``
        and ``manifest.json``. ``shared_weights`` (a dict a Generator passes to each of its phases) lets
        a later phase point at tensors an earlier one wrote instead of writing them again."""
        import os
        from pathlib import Path

        from safetensors.torch import save_file
        from torch._inductor.decomposition import select_decomp_table

        from mmcompile.artifact import write_manifest
        from mmcompile.ops import inductor_decompositions

        gm, use_kernels, config = self._aot_source
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        gm, example, dropped = _tensor_inputs_only(self.program, gm)
        device = next((x.device for x in example), torch.device("cpu"))
        try:
            with torch.no_grad():
                ep = torch.export.export(gm, tuple(example), strict=False)
                ep = ep.run_decompositions(inductor_decompositions(use_kernels, select_decomp_table()))
                torch._inductor.aoti_compile_and_package(
                    ep, package_path=str(directory / "model.pt2"),
                    inductor_configs={**config, "aot_inductor.package_constants_in_so": False})
        except Exception as e:
            raise BackendError(f"inductor: compiling {self.program.name} ahead of time failed: {_first_line(e)}") from e
        shared = {} if shared_weights is None else shared_weights
        weights_file = (directory / "weights.safetensors").resolve()
        own, refs = {}, {}
        for fqn, t in {**ep.state_dict, **ep.constants}.items():
            if not isinstance(t, torch.Tensor):
                continue
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
            if key not in shared:  # one copy per tensor, however many names and phases read it
                shared[key] = (weights_file, fqn)
                own[fqn] = t.detach().to("cpu", copy=True).contiguous()
            path, name = shared[key]
            refs[fqn] = [os.path.relpath(path, directory.resolve()), name]
        save_file(own, str(directory / "weights.safetensors"), metadata={"format": "pt"})
        files = ["model.pt2", "weights.safetensors"] + sorted({r[0] for r in refs.values()} - {"weights.safetensors"})
        write_manifest(directory, backend="inductor", backend_version=torch.__version__, program=self.program,
                       files=files, state=[n.name for n in self.program.state_inputs()],
                       extra={"device": str(device), "dropped_inputs": dropped, "weights": refs})

    def run_flat(self, flat):
        if self._graphs is not None:
            if self.check_inputs:  # here: a replay runs no Python of the compiled function
                self.program.check_inputs(flat)
            return self._graphs(list(flat))
        return self._run_flat_uncaptured(flat)

    def _run_flat_uncaptured(self, flat):
        for i, stride in self._layouts:
            x = flat[i]
            if isinstance(x, torch.Tensor) and x.stride() != stride:
                flat = list(flat)
                flat[i] = torch.empty_strided(x.shape, stride, dtype=x.dtype, device=x.device).copy_(x)
        return super().run_flat(flat)


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def _weights_file(path, device: torch.device) -> LoadedFile:
    """The tensors of a ``weights.safetensors`` on ``device``, read once however many loaded phases share
    them (kept while any of them lives)."""
    from safetensors.torch import load_file

    with loaded_file(path, device) as weights:
        if not weights:
            weights.update(load_file(str(path), device=str(device)))
    return weights


def _tensor_inputs_only(program: Program, gm: torch.fx.GraphModule):
    """A copy of ``gm`` without the placeholders that are Python constants of the capture (transformers'
    ``use_cache=True``), which an AOTInductor package does not take: (graph module, example tensors,
    indices of the dropped inputs)."""
    import copy

    graph = copy.deepcopy(gm.graph)
    dropped = drop_constant_inputs(graph, "inductor")
    # example caches may be expanded zeros, and export writes into them: contiguous copies
    example = [x.contiguous() for i, x in enumerate(program.example_inputs) if i not in dropped]
    return torch.fx.GraphModule(gm, graph, class_name=type(gm).__name__), example, dropped


class _AotiCompiled(Compiled):
    """A loaded AOTInductor package, called like the Program it was compiled from."""

    def __init__(self, signature, runner, dropped, state):
        super().__init__(signature, runner, "inductor")
        self._dropped = set(dropped)
        names = [spec["name"] for spec in signature.inputs]
        self._state = {names.index(s) for s in state}

    def run_flat(self, flat):
        if self.check_inputs:
            self.program.check_inputs(flat)
        args, write_back = [], []
        for i, x in enumerate(flat):
            if i in self._dropped:
                continue
            if isinstance(x, torch.Tensor) and not x.is_contiguous():  # the package takes contiguous inputs
                dense = x.contiguous()
                if i in self._state:
                    write_back.append((x, dense))  # the package updates the copy: write it back
                x = dense
            args.append(x)
        with torch.no_grad():
            out = self._fn(*args)
        for target, dense in write_back:
            target.copy_(dense)
        return list(out) if isinstance(out, (list, tuple)) else [out]

    def save(self, directory, *, shared_weights: dict | None = None) -> None:
        raise BackendError("this Compiled was loaded from an artifact; copy the artifact directory instead")
