"""The ``mmcompile`` command line.

    mmcompile passes                         list the registered passes
    mmcompile compile llama:tiny             compile, generate, compare with eager, print a summary
    mmcompile explain llama:tiny --pass canonicalize
    mmcompile compile llama:tiny --backend onnxruntime -o out/   then   mmcompile run out/
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import sys
import time

EPILOG_COMPILE = """\
examples:
  mmcompile compile llama:tiny
  mmcompile compile llama:tiny --backend eager --max-new-tokens 64 --prompt-ids 1,2,3,4
  mmcompile compile llama:7b --device cuda --dtype bfloat16 --batch 8
  mmcompile compile llama:7b --device cuda --dtype bfloat16 --quantize int8
  mmcompile compile llama:tiny --quantize int4 --pass-option quantize_linear.group_size=32
  mmcompile compile llama:7b --device cuda --quantize auto --pass-option quantize_linear.error_budget=0.02
  mmcompile compile hf:./my-llama-checkpoint --passes canonicalize,eliminate_dead_code
  mmcompile compile py:my_models.py:make_model

HSTU recommenders (a random jagged batch of users; the step compiled once for the padded length):
  mmcompile compile hstu:tiny --task rank --batch 4 --candidates 8
  mmcompile compile hstu:ml20m --task retrieve --batch 64 --top-k 10
  mmcompile compile hstu:ml20m --device cuda --dtype bfloat16 --task rank --batch 256
  mmcompile compile hstu:ml20m --task rank --backend onnxruntime -o rank/   # then mmc.load("rank/") in Python

Chameleon's tasks (the decoder and its VQ-GAN image tokenizer, every phase compiled):
  mmcompile compile chameleon:tiny --task text-to-image --out image.png
  mmcompile compile chameleon:tiny --task image-to-text --image photo.png --max-new-tokens 16
  mmcompile compile chameleon:tiny --task text-image-to-image --image photo.png --guidance-scale 5
  mmcompile compile chameleon:7b --device cuda --dtype bfloat16 --task text-to-image --prompt-ids 9000,9001

Seamless's tasks (speech encoder, text decoder, text-to-unit model and vocoder, every phase compiled):
  mmcompile compile seamless:tiny --task speech-to-text --input in.wav --tgt-lang fra
  mmcompile compile seamless:tiny --task speech-to-speech --input in.wav --out out.wav
  mmcompile compile seamless:tiny --task text-to-speech --prompt-ids 5,17,42 --out out.wav
  mmcompile compile seamless:large --device cuda --dtype bfloat16 --task speech-to-text --num-beams 4

MODEL is a spec: llama:tiny|7b|8b, chameleon:tiny|7b|34b, seamless:tiny|large or hstu:tiny|ml20m|large
(random weights; chameleon is the early-fusion text+image decoder, seamless the speech translator, hstu
the generative recommender), hf:PATH (a local transformers config or checkpoint directory),
py:FILE.py:FACTORY (a function returning a model that follows the generation protocol of
mmcompile.models.llama).
"""

EPILOG_RUN = """\
examples:
  mmcompile compile llama:tiny -o tiny/                      # AOTInductor packages (inductor)
  mmcompile compile llama:tiny --backend onnxruntime -o tiny-ort/
  mmcompile run tiny/ --prompt-ids 1,2,3 --max-new-tokens 16
  mmcompile run tiny-ort/ --batch 2 --num-beams 2

The artifact keeps the prompt-length buckets compiled before it was saved; a longer prompt is an error
that names them. Loading checks the manifest, the file hashes and the torch / ONNX Runtime versions;
it needs neither the model's code nor a compile.
"""

EPILOG_EXPLAIN = """\
examples:
  mmcompile explain llama:tiny --pass canonicalize
  mmcompile explain llama:tiny --pass fold_constants --phase prefill --full
  mmcompile explain hf:./gpt2-checkpoint --pass rewrite_kv_cache
  mmcompile explain seamless:tiny --pass fold_constants --phase encoder

The passes the named pass requires run first; the output shows the IR before and after the named pass
(as a diff, or in full with --full) and the pass's notes on what it did not rewrite and why.
"""


def _dtype(name: str):
    import torch

    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise argparse.ArgumentTypeError(f"unknown dtype {name!r}; choose from {', '.join(table)}")
    return table[name]


def _backend_option(text: str) -> tuple[str, object]:
    """KEY=VALUE: the value as JSON where it parses (numbers, true/false, {...}), else the string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--backend-option takes KEY=VALUE (e.g. regions=auto), got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def _pass_option(text: str) -> tuple[str, str, object]:
    """PASS.KEY=VALUE: (pass, key, value), the value as JSON where it parses."""
    target, sep, value = text.partition("=")
    name, dot, key = target.partition(".")
    if not sep or not dot or not name or not key:
        raise argparse.ArgumentTypeError(f"--pass-option takes PASS.KEY=VALUE (e.g. quantize_linear.group_size=64), "
                                         f"got {text!r}")
    try:
        return name, key, json.loads(value)
    except ValueError:
        return name, key, value


def _passes_and_options(args) -> tuple:
    """The passes and their options from --passes, --quantize and --pass-option: --quantize adds
    quantize_linear (and its mode) to the pipeline; an option for a pass the pipeline does not run is an
    error, not a silent no-op."""
    import mmcompile as mmc

    passes, options = args.passes, {}
    if args.quantize:
        passes = [p.name for p in mmc.pipeline.resolve(args.passes)]
        passes += [] if "quantize_linear" in passes else ["quantize_linear"]
        options["quantize_linear"] = {"mode": args.quantize}
    if args.pass_options:
        resolved = {p.name: p for p in mmc.pipeline.resolve(passes)}
        for name, key, value in args.pass_options:
            if name not in resolved:
                raise SystemExit(f"error: --pass-option {name}.{key}: the pipeline does not run {name} "
                                 f"(it runs {', '.join(resolved)}); add it to --passes"
                                 + (" or give --quantize" if name == "quantize_linear" else ""))
            takes = resolved[name].options
            if takes is not None and key not in takes:
                raise SystemExit(f"error: --pass-option {name}.{key}: {name} has no option {key!r}; it takes "
                                 + (", ".join(takes) or "none"))
            if name == "quantize_linear" and key == "mode" and args.quantize:
                raise SystemExit("error: give the quantization mode once: --quantize or --pass-option "
                                 "quantize_linear.mode, not both")
            options.setdefault(name, {})[key] = value
    return passes, options


def _prompt_ids(text: str) -> list[list[int]]:
    rows = []
    for row in text.split(";"):
        try:
            ids = [int(t) for t in row.replace(" ", "").split(",") if t]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"--prompt-ids takes comma-separated integers, rows separated by ';' (e.g. 1,2,3;4,5), got {text!r}"
            ) from None
        if not ids:
            raise argparse.ArgumentTypeError(f"--prompt-ids has an empty row in {text!r}")
        rows.append(ids)
    return rows


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmcompile",
        description="Compile generative models for fast inference: capture with torch.export, optimize with a "
                    "pass pipeline, lower to a backend, generate.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    sub.add_parser("passes", help="list the registered passes with one-line docs")

    c = sub.add_parser("compile", help="compile a model, generate tokens, compare with eager",
                       epilog=EPILOG_COMPILE, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("model", metavar="MODEL", help="model spec: llama:tiny, hf:PATH, py:FILE.py:FACTORY")
    c.add_argument("--backend", default="inductor", help="backend to lower to: eager, inductor, onnxruntime (default: inductor)")
    c.add_argument("--passes", default="default", help="'default', 'none', or comma-separated pass names")
    c.add_argument("--backend-option", dest="backend_options", type=_backend_option, action="append", default=[],
                   metavar="KEY=VALUE", help="a backend option, repeatable; VALUE is read as JSON where it parses. "
                   "inductor: regions=auto|on|off (compile each distinct layer once), gemv=auto|triton|cublas, "
                   "attention=auto|triton|sdpa, attention_fusion=auto|off (rotary and cache writes in the decode "
                   "attention kernel), gemv_fusion=auto|off, int4_kernel=auto|tinygemm|words|triton (one-row "
                   "int4 products on torch's tinygemm, mmcompile's word kernel or its packed-code kernel), "
                   "pdl=auto|on|all|off (GEMVs and decode attention "
                   "started while the kernel before finishes, sm_90+), mode=default|reduce-overhead|max-autotune|"
                   "max-autotune-no-cudagraphs (reduce-overhead: CUDA graphs for a step you call, the HSTU tasks' "
                   "default on CUDA), "
                   "inductor_config={...}; onnxruntime: opset=N, contrib_ops=false, cuda_graph=false")
    c.add_argument("--quantize", choices=("int8", "int4", "w8a8", "fp8", "auto"), default=None,
                   help="quantization of the linear layers (the quantize_linear pass; the LM head stays in floating "
                        "point): int8 and int4 weight-only, w8a8 and fp8 weights and activations; auto picks per "
                        "layer within a 1%% output-error budget")
    c.add_argument("--pass-option", dest="pass_options", type=_pass_option, action="append", default=[],
                   metavar="PASS.KEY=VALUE", help="an option of one pass, repeatable; VALUE is read as JSON where it "
                   "parses. quantize_linear: group_size=32|64|128 (int4), fp8_scales=row|tensor, error_budget=0.01 "
                   "and candidates=[\"int8\",\"int4\"] (auto), lm_head=true, layers=[...] / exclude=[...] (name "
                   "patterns); fuse_linears: min_layers=N; see `mmcompile passes` for the passes")
    c.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    c.add_argument("--dtype", type=_dtype, default=None, help="float32 | bfloat16 | float16 (default: float32)")
    c.add_argument("--max-new-tokens", type=_positive, default=32, help="tokens to generate per row (default: 32)")
    c.add_argument("--prompt-ids", type=_prompt_ids, default=None,
                   help="prompt token ids, e.g. 1,2,3 or several rows 1,2,3;4,5 (default: random, seeded)")
    c.add_argument("--batch", type=_positive, default=1, help="rows of random prompts when --prompt-ids is not given")
    c.add_argument("--prompt-len", type=_positive, default=16, help="length of random prompts (default: 16)")
    c.add_argument("--max-seq-len", type=_positive, default=None, help="KV-cache length (default: prompt + new tokens)")
    c.add_argument("--seed", type=int, default=0, help="seed for weights and random prompts (default: 0)")
    c.add_argument("--no-eager", action="store_true", help="skip the eager baseline (no speed or token comparison)")
    c.add_argument("--dump-dir", default=None, help="write numbered IR dumps of every pass there")
    c.add_argument("--verify", action="store_true", help="check Program invariants after every pass")
    c.add_argument("--task", choices=("text-to-text", "image-to-text", "text-to-image", "text-image-to-image",
                                       "speech-to-text", "speech-to-speech", "text-to-speech", "rank", "retrieve"),
                   default=None, help="chameleon and seamless models: run this task end to end (text tasks print "
                                      "tokens, image and speech tasks write --out); hstu models: rank candidates or "
                                      "retrieve the top items for a batch of users; without it, plain token generation")
    c.add_argument("--seq-len", type=_positive, default=None,
                   help="hstu: padded sequence length compiled, history plus candidates (default: the config's "
                        "max_seq_len); each user's history gets a random length up to it")
    c.add_argument("--candidates", type=_positive, default=8, help="hstu rank: candidates per user (default: 8)")
    c.add_argument("--top-k", type=_positive, default=10, help="hstu retrieve: items returned per user (default: 10)")
    c.add_argument("--image", default=None, metavar="FILE",
                   help="input image of image-to-text and text-image-to-image (PNG, JPEG, ...; cropped and resized "
                        "to the tokenizer's resolution; default: random pixels, seeded)")
    c.add_argument("--out", default=None, metavar="FILE",
                   help="where image tasks write the generated image (default: image.png) and speech tasks the "
                        "waveform (default: speech.wav)")
    c.add_argument("--input", default=None, metavar="FILE",
                   help="seamless speech tasks: a 16 kHz 16-bit PCM WAV file (default: 2 s of random noise, seeded)")
    c.add_argument("--tgt-lang", default="eng", help="seamless: the target language (default: eng)")
    c.add_argument("--speaker", type=int, default=0, help="seamless speech output: the vocoder's speaker id (default: 0)")
    c.add_argument("--num-beams", type=_positive, default=1, help="seamless: beam search with this many beams "
                                                                  "(default: greedy)")
    c.add_argument("--guidance-scale", type=float, default=3.0,
                   help="classifier-free guidance of image tasks; 1 or less turns it off (default: 3.0)")
    c.add_argument("-o", "--output", default=None, metavar="DIR",
                   help="write the compiled Generator to DIR as an artifact (AOTInductor packages with the inductor "
                        "backend, ONNX models with onnxruntime); run it with "
                        "`mmcompile run DIR`")

    r = sub.add_parser("run", help="load a compiled artifact and generate",
                       epilog=EPILOG_RUN, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("artifact", metavar="DIR", help="a directory written by `mmcompile compile MODEL -o DIR`")
    r.add_argument("--max-new-tokens", type=_positive, default=32, help="tokens to generate per row (default: 32)")
    r.add_argument("--prompt-ids", type=_prompt_ids, default=None,
                   help="prompt token ids, e.g. 1,2,3 or several rows 1,2,3;4,5 (default: random, seeded)")
    r.add_argument("--batch", type=_positive, default=1, help="rows of random prompts when --prompt-ids is not given")
    r.add_argument("--prompt-len", type=_positive, default=16, help="length of random prompts (default: 16)")
    r.add_argument("--num-beams", type=_positive, default=1, help="beam search with this many beams (default: greedy)")
    r.add_argument("--seed", type=int, default=0, help="seed for random prompts (default: 0)")

    e = sub.add_parser("explain", help="show what a pass did to a model's IR, and why it left things alone",
                       epilog=EPILOG_EXPLAIN, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("model", metavar="MODEL", help="model spec: llama:tiny, hf:PATH, py:FILE.py:FACTORY")
    e.add_argument("--pass", dest="pass_name", required=True, help="the pass to explain (see `mmcompile passes`)")
    e.add_argument("--phase", choices=("decode", "prefill", "encoder"), default="decode",
                   help="which phase to capture (default: decode; encoder: Seamless's speech encoder)")
    e.add_argument("--full", action="store_true", help="print the whole IR before and after instead of a diff")
    e.add_argument("--seed", type=int, default=0)
    return parser


def _version() -> str:
    from mmcompile import __version__

    return f"mmcompile {__version__}"


def _console():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


@contextlib.contextmanager
def _progress(console, title: str):
    """A spinner on a terminal, plain stage lines elsewhere. Yields ``stage(text)``."""
    if console.is_terminal:
        with console.status(title) as status:
            yield lambda text: status.update(f"{title}: {text}")
    else:
        start = time.perf_counter()
        yield lambda text: console.print(f"[{time.perf_counter() - start:6.1f}s] {title}: {text}")


def cmd_passes(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from mmcompile import passes

    table = Table(title="mmcompile passes", show_lines=False)
    table.add_column("name", style="bold")
    table.add_column("requires")
    table.add_column("exact")
    table.add_column("what it does")
    table.add_column("options (--pass-option PASS.KEY=VALUE)")
    from mmcompile.pipeline import DEFAULT_PIPELINE

    for name in passes.names():
        cls = type(passes.get(name))
        mark = " (default)" if name in DEFAULT_PIPELINE else ""
        options = "any" if cls.options is None else ", ".join(cls.options) or "-"
        table.add_row(name + mark, ", ".join(cls.requires) or "-", "yes" if cls.exact else "no", cls.summary(),
                      options)
    Console(width=140).print(table)
    return 0


def _prompts(args, vocab: int):
    import torch

    if args.prompt_ids is not None:
        bad = [t for row in args.prompt_ids for t in row if not 0 <= t < vocab]
        if bad:
            raise SystemExit(f"error: --prompt-ids {bad[:5]} outside the model's vocabulary [0, {vocab})")
        return [torch.tensor(r, dtype=torch.long) for r in args.prompt_ids]
    g = torch.Generator().manual_seed(args.seed)
    return [torch.randint(0, vocab, (args.prompt_len,), generator=g) for _ in range(args.batch)]


def cmd_compile(args) -> int:
    import torch
    from rich.table import Table

    import mmcompile as mmc

    console = _console()
    backend = mmc.backends.get(args.backend)  # fail fast on an unknown backend
    if args.task in ("rank", "retrieve"):
        return cmd_recommend(args, console)
    if args.task is not None and _is_seamless(args.model):
        return cmd_seamless(args, console)
    if args.task is not None:
        return cmd_task(args, console)
    if args.image is not None:
        raise SystemExit("error: --image is an input of --task image-to-text or text-image-to-image")
    if args.output and not backend.saves_artifacts:
        raise mmc.BackendError(f"-o needs a backend that writes artifacts; the {args.backend} backend does not: "
                               "use --backend inductor or onnxruntime")
    with _progress(console, "mmcompile") as stage:
        stage(f"building {args.model}")
        model = mmc.models.build(args.model, dtype=args.dtype, device=args.device, seed=args.seed)
        from mmcompile.integrations import transformers as hf_integration

        hf = hf_integration.is_causal_lm(model)
        if not hf and not hasattr(model, "empty_cache"):
            raise mmc.ModelSpecError(
                f"{args.model} builds a {type(model).__name__}, which neither is a transformers causal LM nor "
                "follows the generation protocol (forward(tokens, input_pos, cache, output_pos), empty_cache); "
                "`mmcompile compile` generates with such models — use torch.compile(model, backend='mmcompile') "
                "for a plain forward"
            )
        prompts = _prompts(args, model.config.vocab_size)
        longest = max(p.numel() for p in prompts)
        max_seq_len = args.max_seq_len or longest + args.max_new_tokens
        t0 = time.perf_counter()
        passes, pass_options = _passes_and_options(args)
        gen = mmc.compile_generator(
            model, backend=args.backend, passes=passes, max_batch=len(prompts), max_seq_len=max_seq_len,
            device=args.device, verify=args.verify or None, progress=stage, pass_options=pass_options,
            backend_options=dict(args.backend_options),
        )
        compile_s = time.perf_counter() - t0
        if args.dump_dir:
            for phase, prog in gen.programs.items():
                import pathlib

                d = pathlib.Path(args.dump_dir)
                d.mkdir(parents=True, exist_ok=True)
                (d / f"{phase}.txt").write_text(str(prog) + "\n")
        stage("warm-up")
        gen.generate(prompts, min(2, args.max_new_tokens))
        if args.output:
            stage(f"writing the artifact to {args.output}")
            gen.save(args.output)
        stage(f"generating {args.max_new_tokens} tokens")
        out = gen.generate(prompts, args.max_new_tokens)
        stats = gen.stats
        eager_out = eager_stats = None
        if not args.no_eager:
            stage("eager baseline")
            eager = (hf_integration.ReferenceGenerator(model) if hf else
                     mmc.Generator.from_module(model, max_batch=len(prompts), max_seq_len=max_seq_len, device=args.device))
            eager.generate(prompts, min(2, args.max_new_tokens))
            eager_out = eager.generate(prompts, args.max_new_tokens)
            eager_stats = eager.stats

    console.print(f"[bold]{args.model}[/] on {args.device}, backend {args.backend}, passes {args.passes}")
    table = Table(title="passes (ops before -> after)")
    table.add_column("phase")
    table.add_column("pass")
    table.add_column("rewrites")
    table.add_column("ops")
    table.add_column("ms", justify="right")
    for phase, reports in gen.reports.items():
        for r in reports:
            rewrites = ", ".join(f"{k}={v}" for k, v in sorted(r.stats.items())) or "-"
            table.add_row(phase, r.name, rewrites, f"{sum(r.ops_before.values())} -> {sum(r.ops_after.values())}",
                          f"{r.seconds * 1e3:.1f}")
    console.print(table)
    top = Table(title="ops after the pipeline (decode step)")
    top.add_column("op")
    top.add_column("count", justify="right")
    for name, n in gen.programs["decode"].op_counts().most_common(8):
        top.add_row(name, str(n))
    console.print(top)
    summary = Table(title="generation")
    summary.add_column("")
    summary.add_column("mmcompile", justify="right")
    if eager_stats is not None:
        summary.add_column("eager", justify="right")
        summary.add_column("speed-up", justify="right")
    rows = [("compile time (s)", f"{compile_s:.1f}", "-", "-"),
            ("prefill (ms)", f"{stats.prefill_seconds * 1e3:.1f}",
             f"{eager_stats.prefill_seconds * 1e3:.1f}" if eager_stats else "", ""),
            ("decode tokens/s (per row)", f"{stats.decode_tokens_per_second:.1f}",
             f"{eager_stats.decode_tokens_per_second:.1f}" if eager_stats else "",
             f"{stats.decode_tokens_per_second / eager_stats.decode_tokens_per_second:.2f}x"
             if eager_stats and eager_stats.decode_tokens_per_second else "")]
    for row in rows:
        summary.add_row(*(row if eager_stats is not None else row[:2]))
    console.print(summary)
    console.print(f"tokens generated: {stats.new_tokens} over {stats.steps} steps, batch {stats.batch_size}")
    console.print(f"CUDA graphs: {gen.cuda_graphs}" + "".join(f"\n  {n}" for n in gen.cuda_graph_notes))
    from mmcompile.runtime.generator import _unwrap

    for note in getattr(_unwrap(gen.decode_fn), "regions", []):  # the inductor backend's regions, when asked for
        console.print(f"decode step {note}")
    console.print("first row: " + " ".join(str(int(t)) for t in out[0][-min(16, out.shape[1]):]))
    if eager_out is not None:
        same = torch.equal(out, eager_out)
        if args.quantize:  # lossy: tokens may differ from the float model; say how many agree
            agree = float((out == eager_out).float().mean()) if out.shape == eager_out.shape else 0.0
            console.print(f"quantized ({args.quantize}): {agree:.0%} of tokens equal to the float eager model")
            return 0
        console.print(f"matches eager token for token: {'yes' if same else 'NO'}")
        return 0 if same else 3
    return 0


def cmd_recommend(args, console) -> int:
    """``compile hstu:NAME --task rank|retrieve``: compile the task's step, run a random jagged batch of
    users through it and through the eager model, print both speeds and whether the results agree."""
    import torch
    from rich.table import Table

    import mmcompile as mmc
    from mmcompile.backends.inductor import GRAPH_MODES
    from mmcompile.models import hstu, specs

    family, _ = specs.parse_spec(args.model)
    if family != "hstu":
        raise SystemExit(f"error: --task {args.task} runs HSTU recommenders (hstu:tiny|ml20m|large); "
                         f"{args.model} is not one")
    if args.output and not mmc.backends.get(args.backend).saves_artifacts:
        raise mmc.BackendError(f"-o needs a backend that writes artifacts; the {args.backend} backend does not: "
                               "use --backend inductor or onnxruntime")
    with _progress(console, "mmcompile") as stage:
        stage(f"building {args.model}")
        model = mmc.models.build(args.model, dtype=args.dtype, device=args.device, seed=args.seed)
        c = model.config
        n = args.seq_len or c.max_seq_len
        if n > c.max_seq_len:
            raise SystemExit(f"error: --seq-len {n} is longer than {args.model}'s max_seq_len {c.max_seq_len}")
        rank = args.task == "rank"
        if rank and args.candidates >= n:
            raise SystemExit(f"error: --candidates {args.candidates} leaves no history in --seq-len {n}")
        batch = hstu.example_batch(c, args.batch, n, num_candidates=args.candidates if rank else 0, seed=args.seed,
                                   device=args.device)
        step = hstu.RankStep(model) if rank else hstu.RetrieveStep(model, min(args.top_k, c.num_items))
        inputs = tuple(batch.values())
        t0 = time.perf_counter()
        stage(f"compiling the {args.task} step ({args.backend})")
        options = dict(args.backend_options)
        if args.backend == "inductor" and args.device.startswith("cuda"):
            # a ranking step of a few hundred positions is bound by launching its kernels: replay it as a CUDA
            # graph unless told otherwise (--backend-option mode=default)
            options.setdefault("mode", "reduce-overhead")
        passes, pass_options = _passes_and_options(args)
        compiled = mmc.compile(step, inputs, backend=args.backend, passes=passes, pass_options=pass_options,
                               backend_options=options)
        compile_s = time.perf_counter() - t0
        fused = sum(r.stats.get("fused.silu", 0) for r in compiled.reports if r.name == "fuse_attention")
        if args.output:
            stage(f"writing {args.output}")
            compiled.save(args.output)

        def timed(fn, repeats=5):
            with torch.no_grad():
                out = fn(*inputs)  # warm-up
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(repeats):
                    out = fn(*inputs)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
            return out, (time.perf_counter() - start) / repeats

        stage(f"{args.task}: {args.batch} users")
        out, seconds = timed(compiled)
        eager_out = eager_s = None
        if not args.no_eager:
            stage(f"{args.task}: eager baseline")
            eager_out, eager_s = timed(step)
    console.print(f"[bold]{args.model}[/] {args.task} on {args.device}, backend {args.backend}: {args.batch} users, "
                  f"sequences padded to {n}, rows of {batch['lengths'].min().item()}..{batch['lengths'].max().item()}"
                  f" valid positions; {fused} SiLU attention layers fused into mmcompile::hstu_attention")
    table = Table(title=f"{args.task} (one batch)")
    for col in ("system", "ms", "users/s"):
        table.add_column(col, justify="right" if col != "system" else "left")
    table.add_row("mmcompile", f"{seconds * 1e3:.2f}", f"{args.batch / seconds:.0f}")
    if eager_s is not None:
        table.add_row("eager", f"{eager_s * 1e3:.2f}", f"{args.batch / eager_s:.0f}")
    console.print(table)
    console.print(f"compile time: {compile_s:.1f} s")
    if options.get("mode") in GRAPH_MODES:
        console.print(getattr(compiled, "cuda_graphs", "cuda graphs: off (this backend has none)"))
    if args.output:
        console.print(f"wrote {args.output}: in Python, mmc.load({str(args.output)!r})(item_ids, timestamps, lengths"
                      + (", num_targets)" if rank else ")") + f" for batches of {args.batch} users padded to {n}")
    if rank:
        got = hstu.gather_targets(out, batch["lengths"], batch["num_targets"])
        console.print("candidate scores, first user: " + " ".join(f"{float(x):.3f}" for x in got[0]))
    else:
        console.print("top items, first user: " + " ".join(str(int(i)) for i in out[1][0]))
    if eager_out is None:
        return 0
    if rank:
        want = hstu.gather_targets(eager_out, batch["lengths"], batch["num_targets"])
        diff = max(float((a.float() - b.float()).abs().max()) for a, b in zip(got, want))
        order = sum(int(a.argmax() == b.argmax()) for a, b in zip(got, want)) / len(got)
        console.print(f"largest candidate-score difference to eager: {diff:.2e}; best candidate equal for {order:.0%} "
                      "of users")
        same = diff <= (1e-4 if model.item_embedding.weight.dtype == torch.float32 else 5e-2) * max(
            1.0, max(float(b.abs().max()) for b in want))
    else:
        agree = float((out[1] == eager_out[1]).float().mean())
        console.print(f"top-{out[1].shape[1]} items equal to eager: {agree:.0%}")
        same = agree == 1.0 if model.item_embedding.weight.dtype == torch.float32 else agree >= 0.9
    console.print(f"matches eager: {'yes' if same else 'NO'}")
    return 0 if same else 3


def _print_phase_table(console, task: str, timings: dict, seconds: float, eager_timings: dict | None,
                       eager_s: float | None) -> None:
    """A task's seconds per phase and in total, beside eager's and the speed-up when it ran."""
    from rich.table import Table

    table = Table(title=f"{task} (seconds)")
    table.add_column("phase")
    table.add_column("mmcompile", justify="right")
    if eager_s is not None:
        table.add_column("eager", justify="right")
        table.add_column("speed-up", justify="right")
    for phase in list(timings) + ["total"]:
        mine = seconds if phase == "total" else timings[phase]
        row = [phase, f"{mine:.3f}"]
        if eager_s is not None:
            theirs = eager_s if phase == "total" else eager_timings.get(phase, 0.0)
            row += [f"{theirs:.3f}", f"{theirs / mine:.2f}x" if mine > 0 else ""]
        table.add_row(*row)
    console.print(table)


def _is_seamless(spec: str) -> bool:
    from mmcompile.models import specs

    try:
        family, name = specs.parse_spec(spec)
    except Exception:
        return False
    return family == "seamless" or (family == "hf" and specs.model_type(name) == "seamless_m4t_v2")


def cmd_seamless(args, console) -> int:
    """``compile seamless:NAME --task T``: compile every phase of Seamless, translate, compare with eager."""
    import torch

    import mmcompile as mmc
    from mmcompile.runtime.seamless import SeamlessTranslator, compile_seamless, read_wav, write_wav

    if args.task not in ("speech-to-text", "speech-to-speech", "text-to-text", "text-to-speech"):
        raise SystemExit(f"error: --task {args.task} is not a Seamless task; use speech-to-text, speech-to-speech, "
                         "text-to-text or text-to-speech")
    if args.output:
        raise SystemExit("error: -o (artifacts) is not available with --task yet; drop one of them")
    if args.quantize or args.pass_options:
        raise SystemExit("error: --quantize and --pass-option are not available for Seamless's tasks yet; drop them")
    speech_in, speech_out = args.task.startswith("speech"), args.task.endswith("speech")
    if args.input is not None and not speech_in:
        raise SystemExit(f"error: --task {args.task} reads token ids (--prompt-ids), not --input")
    if args.prompt_ids is not None and speech_in:
        raise SystemExit(f"error: --task {args.task} reads speech (--input FILE.wav), not --prompt-ids")
    with _progress(console, "mmcompile") as stage:
        stage(f"building {args.model}")
        model = mmc.models.build(args.model, dtype=args.dtype, device=args.device, seed=args.seed)
        c = model.config
        if args.tgt_lang not in c.languages:
            raise SystemExit(f"error: --tgt-lang {args.tgt_lang!r} is not one of this model's languages: "
                             f"{', '.join(c.languages)}")
        if speech_in:
            if args.input is not None:
                try:
                    inputs = [read_wav(args.input, c.sample_rate)]
                except (FileNotFoundError, ValueError) as e:
                    raise SystemExit(f"error: --input: {e}") from None
            else:
                g = torch.Generator().manual_seed(args.seed)
                inputs = [torch.randn(2 * c.sample_rate, generator=g) * 0.1 for _ in range(args.batch)]
        else:
            inputs = _prompts(args, c.vocab_size)
        rows = len(inputs) * args.num_beams
        kwargs = dict(tgt_lang=args.tgt_lang, max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
                      speaker=args.speaker)
        if speech_out and not 0 <= args.speaker < c.vocoder_speakers:
            raise SystemExit(f"error: --speaker {args.speaker} is outside the vocoder's {c.vocoder_speakers} speakers")
        t0 = time.perf_counter()
        runner = compile_seamless(model, backend=args.backend, max_batch=rows, max_seq_len=args.max_seq_len,
                                  passes=args.passes, progress=stage, verify=args.verify or None,
                                  backend_options=dict(args.backend_options))
        stage(f"{args.task}: compile the phases and warm up")
        runner.translate(inputs, args.task, **kwargs)
        compile_s = time.perf_counter() - t0
        stage(args.task)
        t0 = time.perf_counter()
        out = runner.translate(inputs, args.task, **kwargs)
        seconds = time.perf_counter() - t0
        timings = dict(runner.timings)
        eager_out = eager_s = eager_timings = None
        if not args.no_eager:
            stage(f"{args.task}: eager baseline")
            eager = SeamlessTranslator.from_module(model, max_batch=rows, max_seq_len=runner.generator.max_seq_len)
            t0 = time.perf_counter()
            eager_out = eager.translate(inputs, args.task, **kwargs)
            eager_s = time.perf_counter() - t0
            eager_timings = dict(eager.timings)

    console.print(f"[bold]{args.model}[/] {args.task} on {args.device}, backend {args.backend}, target {args.tgt_lang}")
    _print_phase_table(console, args.task, timings, seconds, eager_timings, eager_s)
    console.print(f"compile time (with the first request's buckets): {compile_s:.1f} s; CUDA graphs: "
                  f"{runner.generator.cuda_graphs}" + "".join(f"\n  {n}" for n in runner.generator.cuda_graph_notes))
    console.print("translated tokens, first row: " + " ".join(str(int(t)) for t in out.tokens[0]))
    same = eager_out is not None and all(torch.equal(a, b) for a, b in zip(out.tokens, eager_out.tokens))
    if speech_out:
        path = write_wav(args.out or "speech.wav", out.waveforms[0], out.sample_rate)
        console.print(f"wrote {path} ({out.waveforms[0].numel() / out.sample_rate:.2f} s at {out.sample_rate} Hz, "
                      f"{out.units[0].numel()} speech units)")
        if eager_out is not None:
            same = same and all(torch.equal(a, b) for a, b in zip(out.units, eager_out.units))
            loud = max((float(w.abs().max()) for w in eager_out.waveforms if w.numel()), default=0.0)
            err = max((float((a - b).abs().max()) for a, b in zip(out.waveforms, eager_out.waveforms) if a.numel()),
                      default=0.0) if same else 0.0
            tol = 1e-4 if model.lm_head.weight.dtype == torch.float32 else 5e-2
            same = same and err <= tol * max(loud, 1.0)
    if eager_out is None:
        return 0
    console.print(f"matches eager {'token for token, unit for unit' if speech_out else 'token for token'}: "
                  f"{'yes' if same else 'NO'}")
    return 0 if same else 3


def cmd_task(args, console) -> int:
    """``compile MODEL --task T``: compile every phase of a Chameleon model, run the task, compare with eager."""
    import torch

    from mmcompile.models import chameleon, specs
    from mmcompile.runtime.chameleon import ChameleonGenerator, compile_chameleon, load_image, save_image

    family, name = specs.parse_spec(args.model)
    checkpoint = family == "hf" and specs.model_type(name) == "chameleon"
    if args.task in ("speech-to-text", "speech-to-speech", "text-to-speech"):
        raise SystemExit(f"error: --task {args.task} runs Seamless models (seamless:tiny|large, or hf:DIR of a "
                         f"SeamlessM4T v2 checkpoint); {args.model} is not one")
    if family != "chameleon" and not checkpoint:
        raise SystemExit(f"error: --task runs Chameleon models (chameleon:tiny|7b|34b, or hf:DIR of a Chameleon "
                         f"checkpoint); {args.model} generates tokens without it")
    if args.output:
        raise SystemExit("error: -o (artifacts) is not available with --task yet; drop one of them")
    image_task = args.task in ("text-to-image", "text-image-to-image")
    needs_image = args.task in ("image-to-text", "text-image-to-image")
    if args.image is not None and not needs_image:
        raise SystemExit(f"error: --task {args.task} takes no --image")
    if args.guidance_scale <= 0:
        raise SystemExit(f"error: --guidance-scale must be positive, got {args.guidance_scale}")
    guidance = args.guidance_scale if image_task and args.guidance_scale > 1 else None
    with _progress(console, "mmcompile") as stage:
        stage(f"building {args.model} and its image tokenizer")
        if checkpoint:
            model, vq = chameleon.from_pretrained(name, dtype=args.dtype, device=args.device)
        else:
            model, vq = chameleon.build_with_tokenizer(name, dtype=args.dtype, device=args.device, seed=args.seed)
        c = model.config
        if args.prompt_ids is not None:
            prompts = _prompts(args, c.vocab_size)
        else:  # random text: ids above the image codes and their markers
            low = max(max(c.image_token_table()), c.boi_token, c.eoi_token) + 1
            g = torch.Generator().manual_seed(args.seed)
            prompts = [torch.randint(low, c.vocab_size, (args.prompt_len,), generator=g) for _ in range(args.batch)]
        images = None
        if needs_image:
            R = vq.config.resolution
            images = (load_image(args.image, R) if args.image else
                      torch.rand(1, 3, R, R, generator=torch.Generator().manual_seed(args.seed)) * 2 - 1)
        kwargs = dict(guidance_scale=guidance) if image_task else dict(max_new_tokens=args.max_new_tokens)
        t0 = time.perf_counter()
        passes, pass_options = _passes_and_options(args)
        runner = compile_chameleon(model, vq, backend=args.backend, max_batch=len(prompts), max_seq_len=args.max_seq_len,
                                   guidance=guidance is not None, passes=passes, pass_options=pass_options,
                                   progress=stage, verify=args.verify or None,
                                   backend_options=dict(args.backend_options))
        compile_s = time.perf_counter() - t0
        stage(f"{args.task}: warm-up")
        runner.run(args.task, prompts, images, **kwargs)
        stage(f"{args.task}")
        t0 = time.perf_counter()
        out = runner.run(args.task, prompts, images, **kwargs)
        seconds = time.perf_counter() - t0
        timings = dict(runner.timings)
        eager_out = eager_s = eager_timings = None
        if not args.no_eager:
            stage(f"{args.task}: eager baseline")
            eager = ChameleonGenerator.from_modules(model, vq, max_batch=len(prompts),
                                                    max_seq_len=runner.generator.max_seq_len)
            t0 = time.perf_counter()
            eager_out = eager.run(args.task, prompts, images, **kwargs)
            eager_s = time.perf_counter() - t0
            eager_timings = dict(eager.timings)

    console.print(f"[bold]{args.model}[/] {args.task} on {args.device}, backend {args.backend}"
                  + (f", guidance scale {guidance}" if guidance else ""))
    _print_phase_table(console, args.task, timings, seconds, eager_timings, eager_s)
    console.print(f"compile time: {compile_s:.1f} s; CUDA graphs: {runner.generator.cuda_graphs}"
                  + "".join(f"\n  {n}" for n in runner.generator.cuda_graph_notes))
    if image_task:
        path = save_image(out.pixels, args.out or "image.png")
        console.print(f"wrote {path} ({vq.config.resolution}x{vq.config.resolution}, {out.codes.shape[1]} image "
                      f"codes; first codes: {' '.join(str(int(t)) for t in out.codes[0, :8])})")
        same = eager_out is not None and torch.equal(out.codes, eager_out.codes)
    else:
        console.print("new tokens, first row: " + " ".join(str(int(t)) for t in out[0]))
        same = eager_out is not None and torch.equal(out, eager_out)
    if eager_out is None:
        return 0
    if args.quantize:  # lossy: say how much agrees with the float model
        a, b = (out.codes, eager_out.codes) if image_task else (out, eager_out)
        agree = float((a == b).float().mean()) if a.shape == b.shape else 0.0
        console.print(f"quantized ({args.quantize}): {agree:.0%} of {'codes' if image_task else 'tokens'} equal to "
                      "the float eager model")
        return 0
    console.print(f"matches eager {'image code for code' if image_task else 'token for token'}: {'yes' if same else 'NO'}")
    return 0 if same else 3


def cmd_run(args) -> int:
    import mmcompile as mmc
    from mmcompile.runtime import Generator

    console = _console()
    t0 = time.perf_counter()
    gen = mmc.load(args.artifact)
    load_s = time.perf_counter() - t0
    if not isinstance(gen, Generator):
        raise mmc.BackendError(f"{args.artifact} holds one compiled Program, not a Generator; load it in Python "
                               "with mmc.load(DIR)")
    prompts = _prompts(args, gen.vocab_size)
    out = gen.generate(prompts, args.max_new_tokens, num_beams=args.num_beams)
    stats = gen.stats
    console.print(f"loaded {args.artifact} ({gen.backend}, max_batch {gen.max_batch}, max_seq_len "
                  f"{gen.max_seq_len}) in {load_s:.2f} s")
    for row in out:
        console.print(" ".join(str(int(t)) for t in row))
    console.print(f"prefill {stats.prefill_seconds * 1e3:.1f} ms, decode {stats.decode_tokens_per_second:.1f} "
                  f"tokens/s per row, {stats.steps} steps")
    return 0


def cmd_explain(args) -> int:
    import mmcompile as mmc

    console = _console()
    target = mmc.passes.get(args.pass_name)
    with _progress(console, "mmcompile explain") as stage:
        stage(f"building {args.model}")
        model = mmc.models.build(args.model, seed=args.seed)
        phased = hasattr(model, "empty_cache") or type(model).__name__ == "Seamless"
        stage(f"capturing {args.phase if phased else 'forward'}")
        prog = _capture_for_explain(model, args)
        before_passes = [p.name for p in _requirements(target.name)]
        if before_passes:
            stage(f"running {before_passes}")
            prog = mmc.optimize(prog, before_passes).program
        stage(f"running {target.name}")
        result = mmc.optimize(prog, [target.name], explain=True,
                              rewrite_kv_cache={"max_seq_len": 64})  # buffer length for explain's tiny inputs
    report = result.reports[0]
    before, after = str(prog), str(result.program)
    if args.full:
        print(f"// ----- IR before {target.name} -----\n{before}\n// ----- IR after {target.name} -----\n{after}")
    else:
        diff = difflib.unified_diff(before.splitlines(), after.splitlines(), f"before {target.name}",
                                    f"after {target.name}", lineterm="", n=1)
        print("\n".join(diff) or f"// {target.name} did not change the IR")
    print(f"\n{report}")
    for note in report.notes:
        print(f"  note: {note}")
    if not report.notes:
        print("  (no notes)")
    return 0


def _capture_for_explain(model, args):
    """The Program explain shows: a generation phase for protocol models, else a plain forward of a
    transformers model on a short random prompt."""
    import torch

    import mmcompile as mmc

    g = torch.Generator().manual_seed(args.seed)
    from mmcompile.models import hstu, seamless

    if isinstance(model, seamless.Seamless):  # the speech encoder, or the text decoder's steps
        if args.phase == "encoder":
            feats = torch.randn(1, 64, model.config.feature_dim, generator=g)
            from mmcompile.runtime.seamless import Phase

            return mmc.capture(Phase(model, "encode_speech"), (feats, torch.ones(1, 64, dtype=torch.bool)),
                               name="seamless.speech_encoder")
        model = seamless.TextDecoderLM(model)
        cache = model.empty_cache(1, 16)
        S = 1 if args.phase == "decode" else 8
        tokens = torch.randint(0, model.config.vocab_size, (1, S), generator=g)
        return mmc.capture(model, (tokens, torch.arange(S)[None], cache), name=f"seamless.{args.phase}")
    if args.phase == "encoder":
        raise SystemExit(f"error: --phase encoder explains Seamless's speech encoder; {args.model} has none")
    if isinstance(model, hstu.HSTU):  # a ranking step over a small jagged batch with candidates
        n = min(32, model.config.max_seq_len)
        batch = hstu.example_batch(model.config, 2, n, num_candidates=min(4, n - 1), seed=args.seed)
        return mmc.capture(hstu.RankStep(model), tuple(batch.values()), name="hstu.rank")
    if hasattr(model, "empty_cache"):
        cache = model.empty_cache(1, 16)
        S = 1 if args.phase == "decode" else 8
        tokens = torch.randint(0, model.config.vocab_size, (1, S), generator=g)
        pos = torch.arange(S)[None]
        return mmc.capture(model, (tokens, pos, cache), name=f"{type(model).__name__.lower()}.{args.phase}")
    from mmcompile.integrations import transformers as hf_integration

    if hf_integration.is_causal_lm(model):  # the Generator's own captures: a decode step on a DynamicCache
        if args.phase == "decode":
            kwargs, shapes = hf_integration.decode_example(model, 1, torch.device("cpu"))
            return mmc.capture(model, (), kwargs, dynamic_shapes=shapes, name=f"{type(model).__name__}.decode")
        return mmc.capture(model, (), hf_integration.prefill_example(model, 1, 8, "cpu"),
                           name=f"{type(model).__name__}.prefill")
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    import inspect

    if vocab is None or "input_ids" not in inspect.signature(model.forward).parameters:
        raise mmc.ModelSpecError(
            f"{args.model}: explain needs a generation-protocol model (see mmcompile.models.llama) or a "
            "transformers model that takes input_ids"
        )
    ids = torch.randint(0, vocab, (1, 8), generator=g)
    kwargs = {"input_ids": ids, "use_cache": False}
    if getattr(config, "is_encoder_decoder", False):
        kwargs["decoder_input_ids"] = ids[:, :4]
    return mmc.capture(model, (), kwargs, name=type(model).__name__)


def _requirements(name: str):
    """Transitive requirements of a pass, in a valid order (not including the pass itself)."""
    from mmcompile import passes
    from mmcompile.pipeline import resolve

    needed, stack = [], list(type(passes.get(name)).requires)
    while stack:
        n = stack.pop()
        if n not in needed:
            needed.append(n)
            stack.extend(type(passes.get(n)).requires)
    return resolve(needed) if needed else []


def main(argv: list[str] | None = None) -> int:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    parser = build_parser()
    args = parser.parse_args(argv)
    from mmcompile.errors import MMCompileError

    try:
        if args.command == "passes":
            return cmd_passes(args)
        if args.command == "compile":
            return cmd_compile(args)
        if args.command == "explain":
            return cmd_explain(args)
        if args.command == "run":
            return cmd_run(args)
    except MMCompileError as e:
        print(f"mmcompile {args.command}: error: {e}", file=sys.stderr)
        return 1
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
