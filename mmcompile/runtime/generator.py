"""Generator: prefill, decode loop, sampling, stop conditions and streaming over a static KV cache.

The Generator owns the KV-cache buffers and two compiled phases captured from the same model:

- prefill: ``model(tokens [B, S], input_pos [B, S], cache, output_pos=[B])``, returning the logits at
  each row's last prompt token. Prompts are right-padded to a length bucket (16, 32, 64, ... up to
  max_seq_len) and each bucket is a static-shape Program, compiled the first time a prompt needs it;
  static shapes keep every backend on its fastest kernels and let decode graphs be captured later;
- decode step: ``model(tokens [B, 1], input_pos [B, 1], cache)``, one token per row.

Both update the cache in place at ``input_pos``. Rows of a batch may have different prompt lengths:
prompts are right-padded in prefill and every row then decodes at its own position, so padding never
enters attention. Models enter through the *generation protocol* (``models/llama.py`` follows it):
``forward(tokens, input_pos, cache, output_pos=None)`` and ``empty_cache(batch, max_seq_len, device=,
dtype=)``.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterator, Sequence

import torch

from mmcompile.errors import ModelSpecError, ShapeError
from mmcompile.runtime.sampling import LogitsRule, SamplingConfig, sample

__all__ = ["Generator", "Seq2SeqGenerator", "compile_generator", "GenerationStats"]


@dataclasses.dataclass
class GenerationStats:
    """Timing of the last ``generate``/``stream`` call."""

    batch_size: int = 0
    prompt_tokens: int = 0
    new_tokens: int = 0
    steps: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        """Decode steps per second per row (one token per row per step), excluding the first token."""
        return (self.steps - 1) / self.decode_seconds if self.decode_seconds > 0 and self.steps > 1 else 0.0


def _check_protocol(model: Any) -> None:
    if not (isinstance(model, torch.nn.Module) and callable(getattr(model, "empty_cache", None))):
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            raise ModelSpecError(
                f"{type(model).__name__} is an encoder-decoder model: compile_generator takes it as a transformers "
                "model (BartForConditionalGeneration, ...); Generator.from_module runs decoder-only models only")
        raise ModelSpecError(
            f"{type(model).__name__} does not follow the generation protocol: the Generator needs a transformers "
            "causal LM (LlamaForCausalLM, GPT2LMHeadModel, ...) or forward(tokens, input_pos, cache, output_pos=None) "
            "and empty_cache(batch, max_seq_len, device=, dtype=) (see mmcompile.models.llama). For a plain forward "
            "pass use mmc.compile or torch.compile(backend='mmcompile')."
        )


def _check_new_tokens(max_new_tokens: int) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")


def timed(timings: dict[str, float], device: torch.device, name: str, fn, *args):
    """``fn(*args)``, its wall time (the device synchronized around it) added to ``timings[name]``: the
    per-phase split the task runtimes report."""
    _sync(device)
    t0 = time.perf_counter()
    out = fn(*args)
    _sync(device)
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Generator:
    """Generates tokens with a prefill phase and a decode-step phase over a static KV cache.

    Build one with :func:`compile_generator` (compiled phases) or :meth:`from_module` (the model run
    eagerly, the reference). ``generate`` returns ``LongTensor [B, prompt + new]`` like transformers:
    each row holds its prompt and its new tokens, right-padded with ``pad_token_id``.
    """

    def __init__(
        self,
        prefill: Callable[..., torch.Tensor],
        decode: Callable[..., torch.Tensor],
        cache: list,
        *,
        max_batch: int,
        max_seq_len: int,
        device: torch.device,
        programs: dict | None = None,
        reports: dict | None = None,
        compile_seconds: float = 0.0,
        backend: str = "eager",
        multi_step: Any = None,
        cuda_graphs: str = "off",
        cuda_graph_notes: list[str] | None = None,
        compile_beam_step: Callable[[], Callable[..., torch.Tensor]] | None = None,
    ):
        self.prefill_fn = prefill
        self.decode_fn = decode
        self.cache = cache
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len
        self.device = torch.device(device)
        self.programs = programs or {}
        self.reports = reports or {}
        self.compile_seconds = compile_seconds
        self.backend = backend
        self.stats = GenerationStats()
        self.multi_step = multi_step
        self.cuda_graphs = cuda_graphs
        # the graph pool, when the decode step replays as graphs: phases that run beside it (prefill
        # buckets, a task's encoders) record their own graphs into it
        self.graph_pool = getattr(prefill, "graph_pool", None)
        self.cuda_graph_notes = list(cuda_graph_notes or [])
        self._compile_beam_step = compile_beam_step
        self.beam_step = None  # compiled on the first beam search
        self._rules: dict[bool, LogitsRule] = {}  # paired (guidance) or not -> the rule, made on first use
        self._rule_graphs: dict[bool, Any] = {}  # K-step graphs recorded with a rule's choice
        # rows of a batch must share their position when the model derives positions from the cache length
        self.shared_position = bool(self.programs.get("decode") is not None and "shared_position" in
                                    self.programs["decode"].metadata.get("kv_cache", {}))

    @classmethod
    def from_module(cls, model: torch.nn.Module, *, max_batch: int = 1, max_seq_len: int | None = None,
                    device=None, dtype=None) -> "Generator":
        """A Generator that runs ``model`` eagerly, as written — the baseline compiled Generators are checked against."""
        _check_protocol(model)
        model.eval()
        param = next(model.parameters())
        device = torch.device(device) if device is not None else param.device
        max_seq_len = max_seq_len or model.config.max_seq_len
        cache = model.empty_cache(max_batch, max_seq_len, device=device, dtype=dtype or param.dtype)
        return cls(model, model, cache, max_batch=max_batch, max_seq_len=max_seq_len, device=device)

    # ------------------------------------------------------------------ inputs
    def _prompts(self, input_ids, attention_mask, rows_per_prompt: int = 1) -> list[torch.Tensor]:
        if isinstance(input_ids, torch.Tensor):
            if input_ids.dim() == 1:
                input_ids = input_ids[None]
            if input_ids.dim() != 2:
                raise ShapeError(f"input_ids must be [batch, seq] or [seq], got shape {list(input_ids.shape)}")
            if attention_mask is not None:
                if attention_mask.shape != input_ids.shape:
                    raise ShapeError(
                        f"attention_mask has shape {list(attention_mask.shape)} but input_ids {list(input_ids.shape)}"
                    )
                rows = [ids[mask.bool()] for ids, mask in zip(input_ids, attention_mask)]
            else:
                rows = list(input_ids)
        elif isinstance(input_ids, Sequence) and input_ids and not isinstance(input_ids[0], int):
            rows = [torch.as_tensor(r, dtype=torch.long) for r in input_ids]
        elif isinstance(input_ids, Sequence) and input_ids:
            rows = [torch.as_tensor(input_ids, dtype=torch.long)]
        else:
            raise ShapeError("input_ids must be a LongTensor, a list of token ids, or a list of such lists")
        if len(rows) * rows_per_prompt > self.max_batch:
            beams = f" x {rows_per_prompt} beams" if rows_per_prompt > 1 else ""
            raise ShapeError(
                f"batch of {len(rows)} prompts{beams} exceeds max_batch={self.max_batch} the Generator was compiled "
                "for; recompile with a larger max_batch"
            )
        for i, r in enumerate(rows):
            if r.dim() != 1 or r.numel() == 0:
                raise ShapeError(f"prompt {i} is empty or not 1-D (shape {list(r.shape)})")
            if r.dtype not in (torch.int64, torch.int32):
                raise ShapeError(f"prompt {i} has dtype {r.dtype}; token ids must be integers")
        return [r.to(device=self.device, dtype=torch.long) for r in rows]

    def _check_length(self, prompts: list[torch.Tensor], max_new_tokens: int) -> int:
        """The longest prompt's length, once the request is known to fit the cache."""
        _check_new_tokens(max_new_tokens)
        longest = max(p.numel() for p in prompts)
        if longest + max_new_tokens > self.max_seq_len:
            raise ShapeError(
                f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds max_seq_len={self.max_seq_len} "
                "the Generator was compiled for; shorten the request or recompile with a larger max_seq_len"
            )
        return longest

    # ------------------------------------------------------------------ loop
    def _rule(self, guidance_scale, negative_input_ids, allowed_tokens, prompts) -> tuple[Any, list[torch.Tensor]]:
        """A request's (paired, scale, allowed tokens) for its LogitsRule (None when it has neither guidance
        nor allowed tokens), and the negative prompts of guided rows."""
        if guidance_scale is None and negative_input_ids is None and allowed_tokens is None:
            return None, []
        paired = guidance_scale is not None
        negatives: list[torch.Tensor] = []
        if paired:
            if negative_input_ids is None:
                raise ValueError("guidance_scale needs negative_input_ids: the unconditioned prompt of each row "
                                 "(e.g. just the begin-image token for text-to-image)")
            if self.max_batch % 2 or 2 * len(prompts) > self.max_batch:
                raise ShapeError(
                    f"classifier-free guidance runs each prompt and its negative prompt as two rows of one batch: "
                    f"{len(prompts)} prompt(s) need max_batch >= {2 * len(prompts)} (an even number), the Generator "
                    f"was compiled for max_batch={self.max_batch}")
            negatives = self._prompts(negative_input_ids, None)
            if len(negatives) == 1 and len(prompts) > 1:
                negatives = negatives * len(prompts)
            if len(negatives) != len(prompts):
                raise ShapeError(f"{len(negatives)} negative prompts for {len(prompts)} prompts; give one, or one per prompt")
        elif negative_input_ids is not None:
            raise ValueError("negative_input_ids is only used with guidance_scale")
        return (paired, guidance_scale, allowed_tokens), negatives

    def _decode_vocab(self) -> int:
        """The vocabulary size, from the compiled decode step's logits [B, 1, V]."""
        output = next(n for n in reversed(self.programs["decode"].graph_module.graph.nodes) if n.op == "output")
        return int(output.args[0][0].meta["val"].shape[-1])

    def _make_rule(self, request, vocab_size: int):
        """The Generator's LogitsRule of this kind, set to the request's values (None without a request)."""
        if request is None:
            return None
        paired, scale, allowed = request
        rule = self._rules.get(paired)
        if rule is None or rule.allowed.numel() != vocab_size:
            rule = self._rules[paired] = LogitsRule(vocab_size, self.device, paired=paired)
            self._rule_graphs.pop(paired, None)
        rule.set(scale, allowed)
        return rule

    def _steps(self, input_ids, max_new_tokens, sampling, stop_tokens, attention_mask, pad_token_id,
               guidance_scale=None, negative_input_ids=None, allowed_tokens=None
               ) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]]:
        """Yields (tokens [B], still_running_before_this_token [B] bool, prompts) per step."""
        cfg = SamplingConfig.coerce(sampling)
        prompts = self._prompts(input_ids, attention_mask)
        request, negatives = self._rule(guidance_scale, negative_input_ids, allowed_tokens, prompts)
        longest = self._check_length(prompts + negatives, max_new_tokens)
        stops = torch.tensor(sorted(set([stop_tokens] if isinstance(stop_tokens, int) else (stop_tokens or ()))),
                             dtype=torch.long)  # checked on the host, against host copies of the tokens
        gen = None
        if not cfg.greedy:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(cfg.seed if cfg.seed is not None else int(torch.randint(0, 2**62, ()).item()))

        B, Bmax = len(prompts), self.max_batch
        S = longest
        tokens = torch.full((Bmax, S), pad_token_id, dtype=torch.long, device=self.device)
        lens = torch.full((Bmax,), S, dtype=torch.long, device=self.device)  # unused rows: padding of full length
        for i, p in enumerate(prompts):
            tokens[i, : p.numel()] = p
            lens[i] = p.numel()
        for i, p in enumerate(negatives):  # guided: the unconditioned row of prompt i is row Bmax/2 + i
            tokens[Bmax // 2 + i, : p.numel()] = p
            lens[Bmax // 2 + i] = p.numel()
        stats = self.stats = GenerationStats(batch_size=B, prompt_tokens=int(lens[:B].sum()))

        if request is not None and cfg.greedy and self.multi_step is not None:
            # a K-step graph recorded now runs warm-up steps that write cache slots 0..K-1: record it
            # before the prefill fills the cache (once per kind of rule; later requests reuse it)
            self._multi_step_for(self._make_rule(request, self._decode_vocab()))
        _sync(self.device)
        t0 = time.perf_counter()
        logits, lens = self._prefill(tokens, lens)  # [Bmax, 1, V]; lens: where each row's decoding starts
        rule = self._make_rule(request, logits.shape[-1])
        first = sample(logits[:, -1], cfg, gen) if rule is None else rule.choose(logits[:, -1], cfg, gen)
        _sync(self.device)
        stats.prefill_seconds = time.perf_counter() - t0
        # bookkeeping (stops, padding) on the host: one transfer per token, or per K tokens with K-step graphs
        running = torch.ones(Bmax, dtype=torch.bool)
        running[B:] = False
        t0 = time.perf_counter()
        source = self._next_tokens(first, lens, cfg, gen, max_new_tokens, rule, stops, running)
        for step, nxt in enumerate(source):
            out = torch.where(running, nxt, torch.full_like(nxt, pad_token_id))
            yield out[:B], running[:B].clone(), prompts  # on the host: no device work between replays
            stats.steps += 1
            stats.new_tokens += int(running[:B].sum())
            if stops.numel():
                running &= ~torch.isin(nxt, stops)
            if not bool(running[:B].any()):
                source.close()  # tokens already computed past every row's stop are discarded
                break
        _sync(self.device)
        stats.decode_seconds = time.perf_counter() - t0

    def _prefill(self, tokens: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run prefill on right-padded prompts [Bmax, S] of lengths ``lens``: the logits at each row's last
        prompt token [Bmax, 1, V], and the cache position each row's first new token is fed back at."""
        if self.shared_position and bool((lens[:1] != lens).any()):
            raise ShapeError("this model derives its positions from the cache length, so every row of a batch must be "
                             "at the same position: give prompts of equal length, or one prompt per call")
        S = tokens.shape[1]
        input_pos = torch.arange(S, device=self.device).expand(tokens.shape[0], S).contiguous()
        return self.prefill_fn(tokens, input_pos, self.cache, output_pos=lens - 1), lens

    def _prefix(self, prompt: torch.Tensor) -> torch.Tensor:
        """What ``generate`` returns ahead of a row's new tokens: the prompt, for a decoder-only model."""
        return prompt

    def _multi_step_for(self, rule):
        """The K-step graph for greedy decoding under ``rule`` (recorded the first time it is needed)."""
        if rule is None or self.multi_step is None:
            return self.multi_step
        if rule.paired not in self._rule_graphs:  # recorded before a prefill (see _steps)
            greedy = SamplingConfig()
            self._rule_graphs[rule.paired] = self.multi_step.with_choice(lambda logits: rule.choose(logits, greedy))
        return self._rule_graphs[rule.paired]

    def _next_tokens(self, first, lens, cfg, gen, max_new_tokens, rule=None, stops=None,
                     running=None) -> Iterator[torch.Tensor]:
        """The successive next tokens of every row (host tensors [Bmax]): from the decode step, one
        graph replay per token, or K tokens per replay of a multi-step graph (greedy decoding).

        With a K-step graph, once K tokens are on the host and some row of ``running`` (host bool
        [Bmax]) is still running after them (none emitted one of ``stops``) and K more fit, the next K
        are launched before these are handed out: they continue on the device from the graph's own
        last token, and the GPU runs them while the host does its bookkeeping. Nothing is launched that
        a stop already made unnecessary."""
        nxt, produced = first, 1
        host = nxt.cpu()
        alive = (running if running is not None else torch.ones(host.shape[0], dtype=torch.bool)).clone()
        has_stops = stops is not None and stops.numel() > 0

        def still_running(tokens):  # tokens [Bmax] or [Bmax, K]: which rows stop on none of them
            if has_stops:
                alive.logical_and_(~torch.isin(tokens, stops).reshape(tokens.shape[0], -1).any(1))
            return bool(alive.any())

        yield host
        still_running(host)
        multi = self._multi_step_for(rule) if cfg.greedy else None
        launched = False
        while produced < max_new_tokens:
            if multi is not None and max_new_tokens - produced >= multi.k:
                if not launched:
                    multi.launch(nxt, lens + produced - 1)  # fed back at the position after each row's last
                chunk = multi.fetch()  # [Bmax, K]: one host transfer for K tokens
                produced += multi.k
                launched = still_running(chunk) and max_new_tokens - produced >= multi.k
                if launched:
                    multi.launch()  # the next K tokens, from the device's own state
                else:
                    nxt = chunk[:, -1].to(self.device)
                for i in range(multi.k):
                    yield chunk[:, i]
                continue
            pos = lens + produced - 1  # position of the token being fed back
            logits = self.decode_fn(nxt[:, None], pos[:, None], self.cache)  # [Bmax, 1, V]
            nxt = sample(logits[:, -1], cfg, gen) if rule is None else rule.choose(logits[:, -1], cfg, gen)
            produced += 1
            yield nxt.cpu()

    @torch.no_grad()
    def stream(self, input_ids, max_new_tokens: int = 32, *, sampling=None, stop_tokens=None, attention_mask=None,
               pad_token_id: int = 0, guidance_scale: float | None = None, negative_input_ids=None,
               allowed_tokens=None) -> Iterator[torch.Tensor]:
        """Yield one ``LongTensor [B]`` per step as tokens are produced, on the host (a streamed token is
        printed or detokenized there, and a copy to the GPU would wait for the steps already queued
        behind it); finished rows give ``pad_token_id``."""
        for tokens, _, _ in self._steps(input_ids, max_new_tokens, sampling, stop_tokens, attention_mask, pad_token_id,
                                        guidance_scale, negative_input_ids, allowed_tokens):
            yield tokens

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int = 32, *, sampling=None, stop_tokens=None, attention_mask=None,
                 pad_token_id: int = 0, num_beams: int = 1, guidance_scale: float | None = None,
                 negative_input_ids=None, allowed_tokens=None) -> torch.Tensor:
        """Generate up to ``max_new_tokens`` per row; a row stops after emitting one of ``stop_tokens``.

        ``num_beams > 1`` runs beam search instead (deterministic; no stop tokens): each prompt keeps
        ``num_beams`` hypotheses ranked by the sum of their log-probabilities and returns the best, as
        transformers' ``generate(num_beams=...)`` does without an end-of-sequence token.

        ``guidance_scale`` turns on classifier-free guidance: prompt ``i`` and its ``negative_input_ids``
        (one negative prompt for all, or one per prompt) decode as rows ``i`` and ``max_batch/2 + i`` of
        the same batch, through the same decode step (and CUDA graph), and each step's token comes from
        ``u + guidance_scale * (c - u)`` of the pair's logits (``LogitsRule``). ``allowed_tokens`` (a
        range, ids or a bool mask over the vocabulary) restricts the new tokens, e.g. to image codes.

        Returns ``LongTensor [B, max_b(prompt_b + new_b)]``, right-padded with ``pad_token_id``.
        """
        if num_beams > 1:
            if sampling is not None or stop_tokens is not None:
                raise ValueError("beam search is deterministic and runs to max_new_tokens: "
                                 "drop sampling= and stop_tokens= or use num_beams=1")
            if guidance_scale is not None or allowed_tokens is not None:
                raise ValueError("beam search does not take guidance_scale or allowed_tokens; use num_beams=1")
            return self._beam_search(input_ids, max_new_tokens, num_beams, attention_mask, pad_token_id)
        new: list[list[torch.Tensor]] = []
        prompts: list[torch.Tensor] = []
        for tokens, running, prompts in self._steps(input_ids, max_new_tokens, sampling, stop_tokens,
                                                    attention_mask, pad_token_id, guidance_scale,
                                                    negative_input_ids, allowed_tokens):
            new.append(torch.where(running, tokens, torch.full_like(tokens, -1)))
        steps = torch.stack(new, dim=1) if new else torch.empty(len(prompts), 0, dtype=torch.long)  # [B, T]
        rows = [torch.cat([self._prefix(p).cpu(), s[s >= 0]]) for p, s in zip(prompts, steps)]
        width = max(r.numel() for r in rows)
        out = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, : r.numel()] = r
        return out.to(self.device)

    def _beam_search(self, input_ids, max_new_tokens: int, num_beams: int, attention_mask, pad_token_id: int):
        prompts = self._prompts(input_ids, attention_mask, rows_per_prompt=num_beams)
        B, W, Bmax = len(prompts), num_beams, self.max_batch
        R = B * W
        longest = self._check_length(prompts, max_new_tokens)
        if self.beam_step is None and self._compile_beam_step is not None:
            self.beam_step = self._compile_beam_step()
        dev = self.device
        tokens = torch.full((Bmax, longest), pad_token_id, dtype=torch.long, device=dev)
        lens = torch.full((Bmax,), longest, dtype=torch.long, device=dev)
        for i, p in enumerate(prompts):
            tokens[i * W:(i + 1) * W, : p.numel()] = p  # every beam starts from its prompt
            lens[i * W:(i + 1) * W] = p.numel()
        stats = self.stats = GenerationStats(batch_size=B, prompt_tokens=sum(p.numel() for p in prompts))
        _sync(dev)
        t0 = time.perf_counter()
        logits, lens = self._prefill(tokens, lens)  # [Bmax, 1, V]
        V = logits.shape[-1]
        logp = torch.log_softmax(logits[:R, -1].float(), dim=-1).view(B, W, V)
        _sync(dev)
        stats.prefill_seconds, t0 = time.perf_counter() - t0, time.perf_counter()
        scores = torch.zeros(B, W, device=dev)
        scores[:, 1:] = -1e9  # all beams start as one: the first step expands beam 0 only
        seqs = torch.empty(R, 0, dtype=torch.long, device=dev)
        rows = torch.arange(Bmax, device=dev)[:, None].expand(Bmax, self.max_seq_len).contiguous()
        first = (torch.arange(B, device=dev) * W)[:, None]
        everyone = torch.arange(Bmax, device=dev)
        nxt = torch.full((Bmax,), pad_token_id, dtype=torch.long, device=dev)
        for step in range(max_new_tokens):
            scores, idx = (scores[:, :, None] + logp).view(B, W * V).topk(W, dim=-1)  # sorted, best first
            parent, token = (first + idx // V).view(R), (idx % V).view(R)
            seqs = torch.cat([seqs[parent], token[:, None]], dim=1)
            stats.steps += 1
            if step == max_new_tokens - 1:
                break
            pos = lens + step  # [Bmax]: where each row's new token goes
            nxt[:R] = token
            if self.beam_step is not None:  # indirection: beams take their parent's row table, not its cache
                rows[:R] = rows[parent]
                rows[everyone, pos] = everyone
                logits = self.beam_step(nxt[:, None], pos[:, None], self.cache, rows)
            else:  # the eager reference: reorder the cache rows by copying them
                for layer in self.cache:  # (k, v) per layer; cross-attention entries too where the model has them
                    for t in layer:
                        t[:R] = t[parent]
                logits = self.decode_fn(nxt[:, None], pos[:, None], self.cache)
            logp = torch.log_softmax(logits[:R, -1].float(), dim=-1).view(B, W, V)
        best = seqs.view(B, W, -1)[:, 0]
        _sync(dev)
        stats.decode_seconds = time.perf_counter() - t0
        stats.new_tokens = B * max_new_tokens
        rows = [torch.cat([self._prefix(p), best[i]]) for i, p in enumerate(prompts)]
        out = torch.full((B, max(r.numel() for r in rows)), pad_token_id, dtype=torch.long, device=dev)
        for i, r in enumerate(rows):
            out[i, : r.numel()] = r
        return out

    # ------------------------------------------------------------------ artifacts
    def save(self, directory) -> None:
        """Write the compiled phases (each prefill bucket compiled so far, the decode step, the beam step if
        built) as artifacts under ``directory``, with a manifest of the cache; ``mmc.load`` reads it back."""
        import json
        from pathlib import Path

        from mmcompile.artifact import GENERATOR_FORMAT, VERSION, _checksum

        if not isinstance(self.prefill_fn, BucketedPrefill):
            raise ModelSpecError("only a Generator from compile_generator can be saved (this one runs a module eagerly)")
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        phases, shared = {}, {}  # shared: weights the phases read in common are written once
        for length, fn in sorted(self.prefill_fn.compiled.items()):
            _unwrap(fn).save(d / f"prefill_{length}", shared_weights=shared)
            phases[f"prefill_{length}"] = {"kind": "prefill", "length": length, "gather": isinstance(fn, _LastLogits)}
        _unwrap(self.decode_fn).save(d / "decode", shared_weights=shared)
        phases["decode"] = {"kind": "decode"}
        if self.beam_step is not None:
            _unwrap(self.beam_step).save(d / "beam_decode", shared_weights=shared)
            phases["beam_decode"] = {"kind": "beam_decode"}
        logits = self.programs["decode"].graph.output_node().args[0][0].meta["val"]
        manifest = {"format": GENERATOR_FORMAT, "version": VERSION, "max_batch": self.max_batch,
                    "vocab_size": int(logits.shape[-1]),
                    "max_seq_len": self.max_seq_len, "device": str(self.device), "backend": self.backend,
                    "shared_position": self.shared_position,
                    "cache": [[list(t.shape), str(t.dtype)] for layer in self.cache for t in layer],
                    "phases": phases, **self._manifest_extra()}
        manifest["checksum"] = _checksum(manifest)
        (d / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")

    @classmethod
    def load(cls, directory, manifest: dict) -> "Generator":
        """The Generator saved in ``directory`` (use ``mmc.load``, which checks the manifest first)."""
        from pathlib import Path

        from mmcompile.artifact import _DTYPES, finish_checks, load

        d = Path(directory)
        from mmcompile import backends

        pending = []  # the weights' hashes, checked while the phases load
        names = list(manifest["phases"])
        one = lambda name: load(d / name, _deferred=pending)  # noqa: E731
        try:
            if getattr(backends.get(manifest["backend"]), "loads_in_parallel", False):
                from concurrent.futures import ThreadPoolExecutor

                with ThreadPoolExecutor(len(names)) as pool:  # e.g. one ONNX Runtime session per phase at once
                    phases = dict(zip(names, pool.map(one, names)))
            else:  # on this thread (its CUDA device and stream)
                phases = {name: one(name) for name in names}
        finally:  # a damaged weights file explains a failed load better than the loader's own error
            finish_checks(pending)
        device = torch.device(manifest["device"])
        cache = _allocate_cache([(shape, _DTYPES[dtype], device) for shape, dtype in manifest["cache"]])
        common = dict(max_batch=manifest["max_batch"], max_seq_len=manifest["max_seq_len"], device=device,
                      backend=manifest["backend"], cuda_graph_notes=["loaded from an artifact: no CUDA graphs"])
        s2s = manifest.get("seq2seq")
        if s2s:
            cross = _allocate_cache([(shape, _DTYPES[dtype], device) for shape, dtype in s2s["cross"]])
            mask = torch.zeros(manifest["max_batch"], s2s["max_source_len"], dtype=torch.long, device=device)
            prefill = _SourcePrefill(None, [], cross, mask, s2s["decoder_start"])
            bind = lambda step: _WithSource(step, cross, mask) if step is not None else None  # noqa: E731
        else:
            prefill, bind = BucketedPrefill(None, []), (lambda step: step)
        for name, info in manifest["phases"].items():
            if info["kind"] == "prefill":
                step = phases[name]
                prefill.compiled[info["length"]] = _LastLogits(step) if info["gather"] else step
        prefill.buckets = sorted(prefill.compiled)
        if s2s:
            gen = Seq2SeqGenerator(prefill, bind(phases["decode"]), cache, cross, mask,
                                   max_source_len=s2s["max_source_len"], decoder_start=s2s["decoder_start"], **common)
        else:
            gen = cls(prefill, phases["decode"], cache, **common)
        gen.beam_step = bind(phases.get("beam_decode"))
        gen.shared_position = bool(manifest.get("shared_position", False))
        gen.vocab_size = manifest["vocab_size"]
        return gen

    def _manifest_extra(self) -> dict:
        return {}

    def __repr__(self) -> str:
        return (f"<Generator backend={self.backend} max_batch={self.max_batch} max_seq_len={self.max_seq_len} "
                f"device={self.device} cuda_graphs={self.cuda_graphs}>")


class Seq2SeqGenerator(Generator):
    """Generation with an encoder-decoder model (transformers ``BartForConditionalGeneration`` and kin).

    Prefill runs the encoder over the source and the first decoder step, which writes the cross-attention
    cache (``cross``, [B, H, max_source_len, D] per layer) once; every decode step reads it as it is and the
    source mask kept beside it. ``input_ids`` given to ``generate`` are the sources; the result holds, per row,
    the decoder start token and the new tokens, as transformers' ``generate`` returns them.
    """

    def __init__(self, prefill, decode, cache, cross, source_mask, *, max_source_len: int, decoder_start: int,
                 **kwargs):
        super().__init__(prefill, decode, cache, **kwargs)
        self.cross, self.source_mask = cross, source_mask
        self.max_source_len, self.decoder_start = max_source_len, decoder_start

    def _check_length(self, prompts: list[torch.Tensor], max_new_tokens: int) -> int:
        _check_new_tokens(max_new_tokens)
        longest = max(p.numel() for p in prompts)
        if longest > self.max_source_len:
            raise ShapeError(f"a source of {longest} tokens exceeds max_source_len={self.max_source_len} the Generator "
                             "was compiled for; shorten it or recompile with a larger max_source_len")
        if 1 + max_new_tokens > self.max_seq_len:
            raise ShapeError(f"max_new_tokens={max_new_tokens} after the decoder start token exceeds max_seq_len="
                             f"{self.max_seq_len} the Generator was compiled for; ask for fewer or recompile")
        return longest

    def _prefill(self, tokens: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.prefill_fn(tokens, lens, self.cache), torch.ones_like(lens)  # decoding starts after the start token

    def _prefix(self, prompt: torch.Tensor) -> torch.Tensor:
        return torch.tensor([self.decoder_start], dtype=torch.long, device=self.device)

    def _manifest_extra(self) -> dict:
        return {"seq2seq": {"cross": [[list(t.shape), str(t.dtype)] for layer in self.cross for t in layer],
                            "max_source_len": self.max_source_len, "decoder_start": self.decoder_start}}

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f" max_source_len={self.max_source_len}>"


def compile_generator(
    model: torch.nn.Module,
    *,
    backend: str = "inductor",
    passes="default",
    max_batch: int = 1,
    max_seq_len: int | None = None,
    device=None,
    dtype=None,
    pass_options: dict | None = None,
    backend_options: dict | None = None,
    verify: bool | None = None,
    progress: Callable[[str], None] | None = None,
    prefill_buckets: Sequence[int] | None = None,
    cuda_graphs: str = "auto",
    steps_per_graph: int = 8,
    max_source_len: int | None = None,
) -> Generator:
    """Capture the model's prefill and decode step, optimize both with ``passes`` and lower them.

    Args:
        model: a model following the generation protocol (e.g. ``mmc.models.build("llama:tiny")``).
        backend: ``mmc.backends.names()``; ``inductor`` is the default.
        passes: ``"default"`` or a list of pass names.
        max_batch, max_seq_len: the static KV-cache shape; prompts + new tokens must fit in max_seq_len.
        device, dtype: where the cache lives (default: the model's parameters').
        progress: optional callable told each stage (``"capture prefill[16]"``, ``"lower decode"``, ...).
        prefill_buckets: prompt-length buckets (default 16, 32, ..., max_seq_len); the smallest is compiled
            now, the others the first time a prompt needs them.
        cuda_graphs: on a CUDA device, how the decode step is replayed once ``capture_decode_loop``
            proves it capturable: ``"auto"`` (K-step graphs for greedy decoding, one graph per step
            otherwise), ``"multi"``, ``"step"``, or ``"off"``. ``"auto"`` falls back to launching kernels
            and says why in ``gen.cuda_graph_notes``; the explicit modes raise instead. With graphs on, each
            prefill bucket of at most 512 tokens (rows x length) that ``capture_decode_loop`` proves
            capturable is recorded as a graph too, the first time it runs.
        steps_per_graph: K, the decode steps recorded in one multi-step graph.
        max_source_len: for encoder-decoder models, the longest source (the cross-attention cache's length;
            default: the model's position limit, at most 1024). ``prefill_buckets`` then bucket the source.
    """
    from mmcompile import backends
    from mmcompile.capture import capture
    from mmcompile.compile import lower
    from mmcompile.integrations import transformers as hf_integration
    from mmcompile.pipeline import optimize, resolve

    s2s = hf_integration.is_seq2seq_lm(model)
    hf = s2s or hf_integration.is_causal_lm(model)
    if not hf:
        _check_protocol(model)
    backend_impl = backends.get(backend)
    model.eval()
    param = next(model.parameters())
    device = torch.device(device) if device is not None else param.device
    dtype = dtype or param.dtype
    if hf:
        if dtype != param.dtype or device.type != param.device.type:
            raise ShapeError(f"the cache follows the model's own dtype and device ({param.dtype} on {param.device}); "
                             f"move the model first: model.to({str(device)!r}, {dtype})")
        limit = hf_integration.max_positions(model)
        max_seq_len = max_seq_len or min(limit or 2048, 4096)
        if s2s:
            max_source_len = max_source_len or min(limit or 1024, 1024)
            if max_source_len < 1:
                raise ShapeError(f"max_source_len must be >= 1, got {max_source_len}")
    max_seq_len = max_seq_len or model.config.max_seq_len
    if max_seq_len < 2:
        raise ShapeError(f"max_seq_len must be >= 2, got {max_seq_len}")
    cache = None if hf else model.empty_cache(max_batch, max_seq_len, device=device, dtype=dtype)
    step = progress or (lambda stage: None)
    t0 = time.perf_counter()
    backend_impl.warm_up(device)

    if cuda_graphs not in ("auto", "multi", "step", "off"):
        raise ValueError(f"cuda_graphs must be 'auto', 'multi', 'step' or 'off', got {cuda_graphs!r}")
    if cuda_graphs in ("multi", "step") and device.type != "cuda":
        raise ShapeError(f"cuda_graphs={cuda_graphs!r} needs a CUDA device; the Generator is on {device}")
    options = {k: dict(v) for k, v in (pass_options or {}).items()}
    # transformers models arrive with a growing DynamicCache: rewrite it into the Generator's buffers
    rewrite = ("fuse_attention", "rewrite_kv_cache") if hf else ()
    if hf:
        options.setdefault("rewrite_kv_cache", {}).setdefault("max_seq_len", max_seq_len)
    if s2s:  # the decoder's tokens, the cross-attention cache's length, the source inputs each phase keeps
        options["rewrite_kv_cache"].update(tokens="decoder_input_ids", max_source_len=max_source_len)
    traced = hf_integration.Seq2SeqStep(model) if s2s else model

    backend_options = dict(backend_options or {})

    def lowered(program):
        if cuda_graphs == "off":
            # no phase is replayed from a CUDA graph, whatever capture_decode_loop proved: backends then
            # neither record their own graphs nor compile for replay (launched one by one, the Inductor
            # backend's dependently launched kernels cost more than they save)
            program.metadata["replayed"] = False
        out = lower(program, backend, **backend_options)
        out.check_inputs = False  # the Generator builds every input itself
        return out

    def compile_phase(phase: str, args: tuple, kwargs: dict, extra_passes: tuple = (), dynamic_shapes=None,
                      keep: tuple = ()):
        step(f"capture {phase}")
        prog = capture(traced, args, kwargs, dynamic_shapes=dynamic_shapes, name=f"{type(model).__name__.lower()}.{phase}")
        step(f"optimize {phase}")
        names = [p.name for p in resolve(passes)]
        names += [p for p in extra_passes if p not in names]
        phase_options = dict(options)
        if keep:
            phase_options["rewrite_kv_cache"] = {**options["rewrite_kv_cache"], "inputs": list(keep)}
        result = optimize(prog, names, verify=verify, **phase_options)
        if hf:
            _check_rewritten(result, phase)
        step(f"lower {phase} ({backend})")
        return lowered(result.program), result

    def compile_prefill(length: int):
        if s2s:
            kwargs = hf_integration.seq2seq_prefill_example(model, max_batch, length, device)
            return compile_phase(f"prefill[{length}]", (), kwargs, rewrite, keep=("input_ids", "attention_mask"))
        if hf:
            kwargs = hf_integration.prefill_example(model, max_batch, length, device)
            out, result = compile_phase(f"prefill[{length}]", (), kwargs, rewrite + ("capture_decode_loop",))
            return _LastLogits(out), result
        tokens = torch.zeros(max_batch, length, dtype=torch.long, device=device)
        pos = torch.arange(length, device=device).expand(max_batch, length).contiguous()
        out_pos = torch.zeros(max_batch, dtype=torch.long, device=device)
        return compile_phase(f"prefill[{length}]", (tokens, pos, cache), {"output_pos": out_pos},
                             ("capture_decode_loop",))

    prompt_limit = max_source_len if s2s else max_seq_len
    buckets = sorted(set(prefill_buckets)) if prefill_buckets else default_buckets(prompt_limit)
    if buckets[-1] > prompt_limit or buckets[0] < 1:
        raise ShapeError(f"prefill buckets {buckets} must lie in [1, {'max_source_len' if s2s else 'max_seq_len'}="
                         f"{prompt_limit}]")
    cross = source_mask = None
    if s2s:
        decoder_start = hf_integration.decoder_start(model)
        source_mask = torch.zeros(max_batch, max_source_len, dtype=torch.long, device=device)
        cross = []  # allocated once the first prefill says its shape; the prefill object holds the same list
        prefill = _SourcePrefill(compile_prefill, buckets, cross, source_mask, decoder_start)
    else:
        prefill = BucketedPrefill(compile_prefill, buckets)
    first = prefill.compile(buckets[0])
    if hf:
        step("decode example (eager)")
        if s2s:
            kwargs, shapes = hf_integration.seq2seq_decode_example(model, max_batch, max_source_len, device)
        else:
            kwargs, shapes = hf_integration.decode_example(model, max_batch, device)
        decode, decode_result = compile_phase("decode", (), kwargs, rewrite + ("capture_decode_loop",), shapes,
                                              keep=("attention_mask",) if s2s else ())
        for prefix in ("kv_cache_", "cross_cache_") if s2s else ("kv_cache_",):
            a, b = _buffer_specs(first.program, prefix), _buffer_specs(decode_result.program, prefix)
            if a != b or not a:
                raise ModelSpecError(f"the prefill and decode steps disagree on the {prefix[:-1]} buffers: {a} vs {b}")
        cache = _allocate_cache(_buffer_specs(first.program, "kv_cache_"))
        if s2s:
            cross.extend(_allocate_cache(_buffer_specs(first.program, "cross_cache_")))
            decode = _WithSource(decode, cross, source_mask)
    else:
        one = torch.zeros(max_batch, 1, dtype=torch.long, device=device)
        decode, decode_result = compile_phase("decode", (one, one.clone(), cache), {}, ("capture_decode_loop",))
    programs = {"prefill": first.program, "decode": decode_result.program}
    reports = {"prefill": first.reports, "decode": decode_result.reports}
    multi, mode, notes = None, "off", []
    if device.type != "cuda":
        notes.append(f"CUDA graphs need a CUDA device; decoding on {device} launches kernels step by step")
    elif cuda_graphs == "off":
        notes.append("CUDA graphs turned off (cuda_graphs='off')")
    elif not backend_impl.torch_cuda_graphs:
        if cuda_graphs != "auto":
            raise ShapeError(f"the {backend} backend cannot be recorded in a torch CUDA graph; use cuda_graphs='off'")
        if getattr(_unwrap(decode), "cuda_graph", False):
            mode = f"one {backend} CUDA graph per step (the backend's own)"
        else:
            notes.append(f"the {backend} backend launches its own kernels: torch CUDA graphs do not apply")
    elif not decode_result.program.metadata.get("capturable"):
        reasons = decode_result.program.metadata.get("not_capturable", [])
        if cuda_graphs != "auto":
            raise ShapeError("the decode step cannot be replayed as a CUDA graph: " + "; ".join(reasons))
        notes += [f"no CUDA graphs: {r}" for r in reasons]
    else:
        from mmcompile.runtime.cuda_graphs import MultiStepGraph, StepGraph

        step("recording CUDA graphs")
        pool = torch.cuda.graph_pool_handle()
        compiled_step = decode
        decode = StepGraph(compiled_step, cache, max_batch, device, pool=pool)
        if type(prefill) is BucketedPrefill:  # short prompts' prefill buckets too, as they are first used
            prefill.graph_pool = pool
        mode = "step"
        if cuda_graphs in ("auto", "multi"):
            multi = MultiStepGraph(compiled_step, cache, max_batch, device, steps_per_graph, pool=pool)
            mode = f"multi-step (K={steps_per_graph}) for greedy decoding, one graph per step otherwise"
    graphs = mode != "off" and backend_impl.torch_cuda_graphs

    def compile_beam_step():
        """The decode step with beam indirection (``cache_rows``), made from the optimized decode Program
        the first time a beam search runs: no new capture."""
        step("compile beam-search decode step")
        result = optimize(decode_result.program, ["rewrite_kv_cache", "capture_decode_loop"], verify=verify,
                          rewrite_kv_cache={**options.get("rewrite_kv_cache", {}), "beam_rows": True})
        programs["beam_decode"], reports["beam_decode"] = result.program, result.reports
        if "cache_rows" not in [n.name for n in result.program.placeholders()]:
            notes = [n for r in result.reports for n in r.notes]
            raise ModelSpecError("beam search needs the decode step to read its cache through a row table: "
                                 + "; ".join(notes))
        out = lowered(result.program)
        if s2s:
            out = _WithSource(out, cross, source_mask)
        if graphs and result.program.metadata.get("capturable"):
            from mmcompile.runtime.cuda_graphs import StepGraph

            return StepGraph(out, cache, max_batch, device, rows=max_seq_len)
        return out

    common = dict(max_batch=max_batch, max_seq_len=max_seq_len, device=device, programs=programs, reports=reports,
                  compile_seconds=time.perf_counter() - t0, backend=backend, multi_step=multi, cuda_graphs=mode,
                  cuda_graph_notes=notes, compile_beam_step=compile_beam_step)
    if s2s:
        return Seq2SeqGenerator(prefill, decode, cache, cross, source_mask, max_source_len=max_source_len,
                                decoder_start=decoder_start, **common)
    return Generator(prefill, decode, cache, **common)


def _check_rewritten(result, phase: str) -> None:
    kv = result.program.metadata.get("kv_cache", {})
    expected = "decode" if phase == "decode" else "prefill"
    if kv.get("phase") != expected:
        notes = [n for r in result.reports if r.name == "rewrite_kv_cache" for n in r.notes]
        raise ModelSpecError(
            f"{result.program.name}: the KV cache of the {expected} step could not be rewritten into static buffers: "
            + ("; ".join(notes) or "rewrite_kv_cache did not run"))


def _unwrap(fn):
    """The compiled step under the Generator's wrappers (CUDA graphs, bound sources, last-logit gathers)."""
    while hasattr(fn, "step"):
        fn = fn.step
    return fn


def _buffer_specs(program, prefix: str = "kv_cache_") -> list[tuple]:
    """(shape, dtype, device) of each buffer ``rewrite_kv_cache`` named with ``prefix``, in the step's order."""
    return [(tuple(n.meta["val"].shape), n.meta["val"].dtype, n.meta["val"].device) for n in program.placeholders()
            if n.name.startswith(prefix)]


def _allocate_cache(specs: list[tuple]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Zeroed buffers of the (shape, dtype, device) ``specs``, in cache order, as ``[(k, v)]`` per layer."""
    flat = [torch.zeros(shape, dtype=dtype, device=device) for shape, dtype, device in specs]
    return [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]


class _LastLogits:
    """A rewritten prefill step, ``step(tokens, positions, cache) -> logits [B, S, V]``, called as the Generator
    calls prefill: with ``output_pos`` [B], returning the logits at each row's last prompt token [B, 1, V]."""

    def __init__(self, step):
        self.step = step
        self.program = step.program

    def __call__(self, tokens, input_pos, cache, output_pos):
        logits = self.step(tokens, input_pos, cache)
        B, _, V = logits.shape
        return logits.gather(1, output_pos.view(B, 1, 1).expand(B, 1, V))


def default_buckets(max_seq_len: int) -> list[int]:
    """16, 32, 64, ... and max_seq_len itself."""
    out, n = [], 16
    while n < max_seq_len:
        out.append(n)
        n *= 2
    return out + [max_seq_len]


class BucketedPrefill:
    """Prefill over static-shape buckets: pads the prompt batch to the smallest bucket that holds it and
    runs that bucket's compiled Program, compiling it on first use. Padding is written to cache slots
    past each row's prompt, which decoding overwrites before attention can see them."""

    def __init__(self, compile_fn, buckets: list[int]):
        self._compile_fn = compile_fn
        self.buckets = buckets
        self.compiled: dict[int, Any] = {}
        self.results: dict[int, Any] = {}
        # CUDA graphs of small buckets (set by compile_generator when the decode step replays as graphs):
        # a short prompt's prefill is bound by launching kernels, a long one by computing them
        self.graph_pool = None
        self.graph_tokens = 512  # rows x bucket up to which a bucket is recorded
        self.graphs: dict[int, Any] = {}

    def compile(self, length: int):
        if length not in self.compiled:
            self.compiled[length], self.results[length] = self._compile_fn(length)
        return self.results.get(length)  # None for buckets loaded from an artifact

    unit = "prompt"  # what the buckets hold, for errors

    def _padded(self, tokens: torch.Tensor) -> tuple[torch.Tensor, int]:
        """``tokens`` [B, S] right-padded with zeros to the smallest bucket that holds them (compiled on first
        use), and that bucket."""
        B, S = tokens.shape
        bucket = next((b for b in self.buckets if b >= S), None)
        if bucket is None:
            raise ShapeError(f"a {self.unit} of {S} tokens needs a prefill bucket of at least {S}; this Generator has "
                             f"{self.buckets} (an artifact keeps the buckets compiled before it was saved)")
        self.compile(bucket)
        if bucket != S:
            tokens = torch.cat([tokens, tokens.new_zeros(B, bucket - S)], dim=1)
        return tokens, bucket

    def __call__(self, tokens, input_pos, cache, output_pos):
        S = tokens.shape[1]
        tokens, bucket = self._padded(tokens)
        if bucket != S:
            input_pos = torch.arange(bucket, device=tokens.device).expand(tokens.shape[0], bucket).contiguous()
        if bucket not in self.graphs and tokens.shape[0] * bucket <= self.graph_tokens:
            from mmcompile.runtime.cuda_graphs import graphed

            self.graphs[bucket] = graphed(self.compiled[bucket], (tokens, input_pos, cache), self.graph_pool,
                                          {"output_pos": output_pos})
        return self.graphs.get(bucket, self.compiled[bucket])(tokens, input_pos, cache, output_pos=output_pos)


class _SourcePrefill(BucketedPrefill):
    """Encoder-decoder prefill over source-length buckets: pads the sources [B, S] to a bucket, writes the
    source mask the decode steps read (zero past each row's source), and runs the encoder and the first
    decoder step, which fills the cross-attention cache."""

    def __init__(self, compile_fn, buckets, cross, source_mask, decoder_start: int):
        super().__init__(compile_fn, buckets)
        self.cross, self.source_mask, self.decoder_start = cross, source_mask, decoder_start

    unit = "source"

    def __call__(self, tokens, lens, cache):
        tokens, bucket = self._padded(tokens)
        B = tokens.shape[0]
        mask = (torch.arange(bucket, device=tokens.device)[None] < lens[:, None]).long()
        self.source_mask.zero_()
        self.source_mask[:, :bucket] = mask
        start = torch.full((B, 1), self.decoder_start, dtype=torch.long, device=tokens.device)
        return self.compiled[bucket](start, torch.zeros_like(start), cache, self.cross, input_ids=tokens,
                                     attention_mask=mask)


class _WithSource:
    """A compiled encoder-decoder decode step called as a decoder-only one, ``step(tokens, positions, cache,
    [cache_rows])``: the cross-attention cache and the source mask are the Generator's own buffers, bound
    here, so CUDA graphs record their fixed addresses."""

    def __init__(self, step, cross, source_mask):
        self.step, self.cross, self.source_mask = step, cross, source_mask

    def __call__(self, tokens, positions, cache, *rows):
        return self.step(tokens, positions, cache, self.cross, *rows, attention_mask=self.source_mask)
