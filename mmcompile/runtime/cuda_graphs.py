"""CUDA-graph replay of a decode step: one graph per step, or K steps with on-device greedy sampling.

Both wrap a compiled decode step ``step(tokens [B, 1], input_pos [B, 1], cache) -> logits [B, 1, V]``
that ``capture_decode_loop`` proved capturable. Inputs are copied into static buffers, the KV cache is
the Generator's own (static addresses), and the graph is recorded once, when the Generator is built:
its warm-up runs write cache slot 0, which every prefill rewrites before it is read.

``MultiStepGraph`` records K consecutive decode steps in one graph — each step's argmax feeds the next
step's token and the positions advance on the device — so the host touches the GPU once per K tokens;
``with_choice`` records a variant whose choice applies a ``LogitsRule`` (guidance, allowed tokens) first;
the Generator checks stop conditions between replays and discards tokens past a row's stop.
"""

from __future__ import annotations

from typing import Callable

import torch

from mmcompile.runtime import greedy

__all__ = ["StepGraph", "MultiStepGraph", "PhaseGraph", "ShapeGraphs", "graphed"]


def _warm_up(fn: Callable[[], object], runs: int = 2) -> None:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(runs):
            fn()
    torch.cuda.current_stream().wait_stream(stream)


class PhaseGraph:
    """Any compiled phase of static shapes replayed as one CUDA graph (a prefill bucket, an encoder, a
    vocoder): ``graph(*args, **kwargs)`` as the phase is called. Tensor arguments are copied into the
    graph's own buffers at every call; containers (a list or tuple of tensors, such as a KV cache) are
    used as they are — the phase may update them in place — and must be the same objects at every call.
    Outputs are cloned from the graph's buffers, so a later replay cannot change what a caller holds.
    Recorded at construction from the first call's arguments (two warm-up runs on a side stream first,
    which have the side effects of that call on containers; ``keep`` names tensor arguments that are
    likewise used as they are, whose warm-up runs update copies)."""

    def __init__(self, fn, args: tuple, kwargs: dict | None = None, pool=None, keep: tuple[int, ...] = ()):
        # ``keep``: positions of tensor arguments used as they are (state updated in place, such as a KV
        # cache), which must then be the same tensors at every call
        self.fn = fn
        self.keep = frozenset(keep)
        self.args = [a.clone() if isinstance(a, torch.Tensor) and i not in keep else a for i, a in enumerate(args)]
        self.kwargs = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in (kwargs or {}).items()}
        # kept tensors warm up on copies: the first call's update must then happen once, in its replay
        warm = [a.clone() if i in self.keep else a for i, a in enumerate(self.args)]
        _warm_up(lambda: fn(*warm, **self.kwargs))
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.out = fn(*self.args, **self.kwargs)

    @staticmethod
    def _load(static, given, name, kept: bool = False):
        if static is given:
            return
        if kept and isinstance(given, torch.Tensor) and given.data_ptr() == static.data_ptr() \
                and given.shape == static.shape and given.stride() == static.stride():
            return  # another tensor object over the same memory (a parameter handed again)
        if isinstance(static, torch.Tensor) and not kept:
            if static.shape != given.shape:
                raise ValueError(f"{name}: shape {tuple(given.shape)} differs from the recorded {tuple(static.shape)}")
            static.copy_(given)
        elif kept or isinstance(static, (torch.Tensor, list, tuple, dict)) or static != given:
            raise ValueError(f"{name}: a PhaseGraph replays against the state it was recorded with")

    def __call__(self, *args, **kwargs):
        for i, (static, given) in enumerate(zip(self.args, args)):
            self._load(static, given, f"argument {i}", i in self.keep)
        for k, given in kwargs.items():
            self._load(self.kwargs[k], given, k)
        self.graph.replay()
        return torch.utils._pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, self.out)


def graphed(compiled, args: tuple, pool=None, kwargs: dict | None = None):
    """``compiled`` as a ``PhaseGraph`` recorded from ``args`` (and ``kwargs``) when ``pool`` is set (graphs
    are on) and ``capture_decode_loop`` proved its Program capturable; otherwise ``compiled`` itself
    (a phase loaded from an artifact carries no proof and runs as it is)."""
    program = getattr(compiled, "program", None)
    if pool is None or program is None or not program.metadata.get("capturable"):
        return compiled
    return PhaseGraph(compiled, args, kwargs, pool=pool)


class ShapeGraphs:
    """A compiled function of flat arguments replayed as CUDA graphs, one per distinct set of input shapes
    and dtypes (the Inductor backend's ``mode="reduce-overhead"``): the first call with new shapes records
    a ``PhaseGraph`` (two warm-up runs, then the capture), later calls copy their tensors into its buffers
    and replay it. ``state`` are the positions of inputs updated in place, used as they are (the same
    tensors at every call). Parameters and buffers passed as inputs (``nn.Parameter``, or what TorchDynamo
    marks static, as ``torch.compile(backend="mmcompile")`` hands them) are also used where they lie
    rather than copied at every call; a graph is recorded per address of each such input. The graphs
    share one memory pool — safe because each replay's outputs are cloned before the next can run.
    Called while another graph is being captured (a Generator recording a phase), the function runs as
    it is, so that capture takes its kernels."""

    def __init__(self, fn, state: tuple[int, ...] = ()):
        self.fn = fn
        self.state = tuple(state)
        self.graphs: dict[tuple, PhaseGraph] = {}
        self.pool = None

    @staticmethod
    def _static(x) -> bool:
        return isinstance(x, torch.nn.Parameter) or getattr(x, "_dynamo_static_input_type", None) is not None

    def __call__(self, flat: list) -> list:
        if torch.cuda.is_current_stream_capturing():
            return self.fn(flat)
        kept = tuple(i for i, x in enumerate(flat) if i in self.state or self._static(x))
        key = tuple((tuple(x.shape), x.dtype, x.device) if isinstance(x, torch.Tensor) else (type(x), x)
                    for i, x in enumerate(flat) if i not in kept)
        key += tuple((i, flat[i].data_ptr()) for i in kept)
        graph = self.graphs.get(key)
        if graph is None:
            self.pool = self.pool or torch.cuda.graph_pool_handle()
            graph = self.graphs[key] = PhaseGraph(lambda *args: self.fn(list(args)), tuple(flat), pool=self.pool,
                                                  keep=kept)
        return graph(*flat)


class StepGraph:
    """One decode step as a CUDA graph: ``graph(tokens, input_pos, cache) -> logits`` (a static buffer,
    valid until the next replay). With ``rows=L`` the step also takes the beam-search row table
    ``cache_rows`` [B, L]: ``graph(tokens, input_pos, cache, cache_rows)``."""

    def __init__(self, step, cache, batch: int, device: torch.device, pool=None, rows: int | None = None):
        self.step = step  # the compiled step the graph was recorded from
        self.cache = cache
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(batch, 1, dtype=torch.long, device=device)
        extra = ()
        if rows is not None:  # each row reads its own cache until told otherwise
            self.rows = torch.arange(batch, device=device)[:, None].expand(batch, rows).contiguous()
            extra = (self.rows,)
        with torch.no_grad():
            _warm_up(lambda: step(self.tokens, self.pos, cache, *extra))
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=pool):
                self.logits = step(self.tokens, self.pos, cache, *extra)

    def __call__(self, tokens: torch.Tensor, input_pos: torch.Tensor, cache, cache_rows=None) -> torch.Tensor:
        assert cache is self.cache, "a StepGraph replays against the cache it was recorded with"
        self.tokens.copy_(tokens)
        self.pos.copy_(input_pos)
        if cache_rows is not None:
            self.rows.copy_(cache_rows)
        self.graph.replay()
        return self.logits


class MultiStepGraph:
    """K greedy decode steps in one CUDA graph: ``graph(tokens [B], input_pos [B]) -> next K tokens [B, K]``
    (a host tensor).

    The graph leaves its token and position inputs at the step after its last, so ``launch()`` without
    arguments continues on the device with no host data at all; ``fetch()`` returns the tokens of the
    last launch. Between the two the host is free: a caller that knows it needs the next K tokens
    launches them before it handles these (``Generator`` does), so the GPU does not wait for the host
    between replays."""

    def __init__(self, step, cache, batch: int, device: torch.device, k: int, pool=None, choose=None):
        if k < 2:
            raise ValueError(f"a multi-step graph needs k >= 2, got {k}")
        self.k = k
        self.step, self.cache, self.batch, self.device, self.pool = step, cache, batch, device, pool
        # plain greedy decoding: argmax, the token fed back and the position advanced in one kernel
        # (runtime.greedy) where it applies; recorded in ``greedy_kernel``
        self.greedy_kernel = choose is None
        self._work = greedy.workspace(batch, device) if self.greedy_kernel else None
        choose = choose or (lambda logits: logits.argmax(dim=-1))  # logits [B, V] -> tokens [B]
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.out = torch.zeros(batch, k, dtype=torch.long, device=device)
        # the tokens' way to the host: a page-locked buffer, copied into after each replay without a sync
        self._host = torch.zeros(batch, k, dtype=torch.long, pin_memory=True)
        self._copied = torch.cuda.Event()
        self._pending = False

        def k_steps():  # tokens and pos advance in place: after the last step they are the next call's inputs
            for i in range(k):
                logits = step(self.tokens, self.pos, cache)[:, -1]  # [B, V]
                if self.greedy_kernel and greedy.supported(logits)[0]:
                    greedy.advance(logits, self.out, i, self.tokens, self.pos, self._work)
                    continue
                self.greedy_kernel = False
                nxt = choose(logits)  # [B]
                self.out[:, i].copy_(nxt)
                self.tokens.copy_(nxt[:, None])
                self.pos.add_(1)

        with torch.no_grad():
            _warm_up(k_steps, runs=1)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=pool):
                k_steps()

    def with_choice(self, choose) -> "MultiStepGraph":
        """Another K-step graph of the same step and cache whose tokens are ``choose(logits [B, V])``
        (e.g. classifier-free guidance, then argmax over allowed tokens), recorded now."""
        return MultiStepGraph(self.step, self.cache, self.batch, self.device, self.k, pool=self.pool, choose=choose)

    def launch(self, tokens: torch.Tensor | None = None, input_pos: torch.Tensor | None = None) -> None:
        """Queue K steps from ``tokens`` [B] at ``input_pos`` [B], or, without them, from where the last
        launch ended (its last token, its position + K); returns at once. ``fetch()`` gives the tokens;
        those of a launch not fetched before the next are dropped."""
        if (tokens is None) != (input_pos is None):
            raise ValueError("give both tokens and input_pos, or neither to continue from the last launch")
        if tokens is not None:
            self.tokens.copy_(tokens.reshape(-1, 1))
            self.pos.copy_(input_pos.reshape(-1, 1))
        self.graph.replay()
        self._host.copy_(self.out, non_blocking=True)
        self._copied.record()
        self._pending = True

    def fetch(self) -> torch.Tensor:
        """The K tokens of each row from the last ``launch`` ([B, K], on the host), once they are there."""
        if not self._pending:
            raise RuntimeError("nothing launched: call launch() first")
        self._copied.synchronize()
        self._pending = False
        return self._host.clone()

    def __call__(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        self.launch(tokens, input_pos)
        return self.fetch()
