"""Decode benchmark: mmcompile against its peers, in one run, on one card.

    python bench/decode.py --model llama:7b --dtype bfloat16 --batch 1 --new-tokens 200
    python bench/decode.py --model hf-llama:7b      # transformers LlamaForCausalLM of the same shape

Models: ``llama:NAME`` is our reference Llama (static KV cache); ``hf-llama:NAME`` is an unmodified
transformers ``LlamaForCausalLM`` built from the same config (random weights, dynamic cache), which
mmcompile rewrites to static buffers itself.

Systems:
  eager          the model as written, run eagerly: Generator.from_module for ours, ``model.generate``
                 (dynamic cache) for transformers
  torch.compile  gpt-fast style: our Llama of the same shape with a static cache, its decode step under
                 torch.compile(mode="reduce-overhead", fullgraph=True)
  hf-static      (transformers models, opt-in) transformers' static cache + torch.compile of forward
  mmcompile      compile_generator(backend="inductor"), default pipeline, decode replayed as K-step CUDA
                 graphs; the same Generator is also timed with one graph per step and with no graphs
                 (its GEMVs are compiled for replay: launched one by one, each goes through an op that
                 launches it dependently, slower than a Generator built with cuda_graphs="off")
  onnxruntime    compile_generator(backend="onnxruntime") with fuse_rmsnorm on the CUDA provider
                 (onnxruntime-gpu): GroupQueryAttention with rotary over the static cache, decode replayed
                 as ONNX Runtime's own CUDA graph (the prompt bucket is compiled up front, as for mmcompile)
  mmcompile-int8 the same with quantize_linear (int8 weight-only linears; the LM head stays bf16)
  mmcompile-int4 the same with int4 weight-only linears (groups of 128 inputs; one-row products on torch's
                 tinygemm kernel; -words: on mmcompile's int4 word kernel; -triton: on mmcompile's
                 kernel over the packed codes)
  ...-cublas     any mmcompile system without mmcompile's Triton GEMV kernels (inductor backend option
                 gemv="cublas": cuBLAS for float weights, Inductor's decompositions for quantized ones)
  ...-unfused    any mmcompile system without fuse_linears (q/k/v and gate/up as separate matmuls);
                 mmcompile-unfused-cublas is the default pipeline before both
  ...-sdpa       decode attention on torch's SDPA instead of the split-KV kernel
  ...-whole      any mmcompile system with the decode step and prompt buckets compiled as whole graphs
                 (inductor backend option regions="off") instead of each distinct decoder layer once
  ...-separate   RMSNorm, the SiLU gate and the residual adds as kernels of their own instead of inside
                 the GEMV kernel (inductor backend option gemv_fusion="off")
  ...-combo      Inductor's combo kernels: independent kernels (RoPE of q and k, the cache writes) launched
                 as one (inductor_config {"combo_kernels": True})
  ...-pdl        Inductor's kernels launched with programmatic dependent launch too, not only the GEMVs
                 (inductor backend option pdl="all")
  ...-nopdl      the GEMV kernels launched after the kernel before them has finished, not while it finishes
                 (pdl="off")

Prints a table (decode tok/s, ratio to eager, fraction of the memory-bandwidth roofline, time to first
token, compile time, peak memory) and writes JSON lines to --json. The roofline is the measured copy
bandwidth divided by the bytes one decode step reads (every weight once, the KV cache up to the mean
position, one embedding row). ``--profile`` prints each mmcompile decode step's kernels (run without
graphs); ``--timeline`` profiles the decode as replayed from its graphs: the time some kernel runs, the
idle gaps within and between replays, and each kernel's share of the time line, per token.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time

import torch

import mmcompile as mmc
from mmcompile.runtime import Generator
from mmcompile.runtime.generator import GenerationStats


def copy_bandwidth(device) -> float:
    """Measured bytes/s of a device-to-device copy (read + write counted)."""
    n = 1 << 29  # 1 GiB of bf16
    a = torch.randn(n, device=device, dtype=torch.bfloat16)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    reps = 20
    t0 = time.perf_counter()
    for _ in range(reps):
        b.copy_(a)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / reps
    del a, b
    return 2 * n * 2 / dt


def step_bytes(model, batch: int, mean_pos: float) -> float:
    cfg = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    emb = model.get_input_embeddings().weight if hasattr(model, "get_input_embeddings") else model.tok_embeddings.weight
    dim, layers, kv_heads, head_dim, tied = _shape(cfg)
    weights -= emb.numel() * emb.element_size()
    weights += batch * dim * emb.element_size()  # one row per sequence
    if tied:
        weights += emb.numel() * emb.element_size()  # the LM head still reads the table
    kv = 2 * layers * batch * kv_heads * mean_pos * head_dim * emb.element_size()
    return weights + kv


def _shape(cfg):
    if hasattr(cfg, "n_layers"):  # ours
        return cfg.dim, cfg.n_layers, cfg.kv_heads, cfg.head_dim, cfg.tie_word_embeddings
    heads = cfg.num_attention_heads
    return (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_key_value_heads or heads,
            getattr(cfg, "head_dim", None) or cfg.hidden_size // heads, cfg.tie_word_embeddings)


def build_model(spec: str, dtype, device):
    """``llama:NAME`` (ours) or ``hf-llama:NAME``: transformers LlamaForCausalLM with CONFIGS[NAME]'s shape."""
    if not spec.startswith("hf-llama:"):
        return mmc.models.build(spec, dtype=dtype, device=device)
    from transformers import LlamaConfig, LlamaForCausalLM

    from mmcompile.models.llama import CONFIGS

    c = CONFIGS[spec.split(":", 1)[1]]
    cfg = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.dim, num_hidden_layers=c.n_layers,
                      num_attention_heads=c.n_heads, num_key_value_heads=c.kv_heads, intermediate_size=c.ffn_dim,
                      rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta, max_position_embeddings=c.max_seq_len,
                      tie_word_embeddings=c.tie_word_embeddings)
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(cfg).to(dtype).eval()


class HFGenerate:
    """``model.generate`` timed like a Generator: TTFT from a one-token call, decode rate from the rest."""

    cuda_graphs = None

    def __init__(self, model, **generate_kwargs):
        self.model, self.kwargs = model, generate_kwargs

    def generate(self, prompts, new_tokens: int):
        ids = torch.stack(prompts).to(self.model.device)
        kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None, **self.kwargs)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        self.model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        out = self.model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        self.stats = GenerationStats(batch_size=len(prompts), steps=new_tokens, prefill_seconds=t1 - t0,
                                     decode_seconds=max((t2 - t1) - (t1 - t0), 1e-9))
        return out


def gpt_fast_generator(model, batch, max_seq_len, device, dtype) -> Generator:
    cache = model.empty_cache(batch, max_seq_len, device=device, dtype=dtype)
    for k, v in cache:  # static addresses, as gpt-fast's buffers, so CUDA graphs can replay
        torch._dynamo.mark_static_address(k)
        torch._dynamo.mark_static_address(v)
    step = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    return Generator(model, step, cache, max_batch=batch, max_seq_len=max_seq_len, device=device, backend="torch.compile")


def run_system(name, gen, prompts, new_tokens, compile_s=None):
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    gen.generate(prompts, min(new_tokens, 16))  # compiles lazily for torch.compile; warms caches
    compile_s = compile_s if compile_s is not None else time.perf_counter() - t0
    gen.generate(prompts, new_tokens)
    torch.cuda.synchronize()
    s = gen.stats
    return dict(system=name, tok_s=s.decode_tokens_per_second * s.batch_size,
                ttft_ms=s.prefill_seconds * 1e3, compile_s=compile_s,
                peak_gb=torch.cuda.max_memory_allocated() / 1e9, steps=s.steps)


def kernel_profile(gen, prompts, tokens: int = 10, top: int = 12) -> list[tuple[str, float, int]]:
    """GPU kernel time per generated token by kernel name, from ``torch.profiler`` over ``tokens``
    decode steps run without CUDA graphs (the profiler does not see inside a replayed graph; the
    kernels are the same ones). Returns (name, ms per token, launches per token), largest first."""
    from torch.profiler import ProfilerActivity, profile

    gen.generate(prompts, 2)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        gen.generate(prompts, tokens + 1)
        torch.cuda.synchronize()
    totals: dict[str, list] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            t = totals.setdefault(e.name[:90], [0.0, 0])
            t[0] += e.device_time_total / 1e3
            t[1] += 1
    rows = sorted(((k, v[0] / tokens, v[1] // tokens) for k, v in totals.items()), key=lambda r: -r[1])
    return rows[:top] + [("(all kernels)", sum(r[1] for r in rows), sum(r[2] for r in rows))]


def print_kernel_profile(system: str, gen, prompts) -> None:
    """``kernel_profile`` as a markdown table."""
    print(f"\nGPU kernel time per token of the {system} decode step (prefill of the profiled call included "
          "once, spread over the tokens):\n\n| kernel | ms per token | launches per token |\n|---|---|---|")
    for name, ms, n in kernel_profile(gen, prompts):
        print(f"| `{name}` | {ms:.3f} | {n} |")
    print(flush=True)


def graph_timeline(gen, prompts, tokens: int = 64) -> dict:
    """Where a decode replayed from CUDA graphs spends its wall time: ``torch.profiler`` over one
    ``generate`` of ``tokens`` new tokens (K-step graphs if the Generator has them), the GPU's kernels
    laid on one timeline. Per token: the span from the first kernel to the last, the time some kernel
    runs (the union of kernel intervals: dependently launched kernels overlap), the idle time split by
    gap length (short gaps are between kernels of one replay; long ones are the host between replays),
    and the kernels by name. The profiled call's prefill is in the span, once."""
    from torch.profiler import ProfilerActivity, profile

    gen.generate(prompts, 2)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        gen.generate(prompts, tokens + 1)
        torch.cuda.synchronize()
    ks = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start)
    busy, gaps, end = 0.0, {"< 2 us": 0.0, "2-10 us": 0.0, "10-50 us": 0.0, ">= 50 us": 0.0}, ks[0][0]
    counts = dict.fromkeys(gaps, 0)
    names: dict[str, list] = {}
    for start, stop, name in ks:
        if start > end:
            gap = start - end
            key = "< 2 us" if gap < 2 else "2-10 us" if gap < 10 else "10-50 us" if gap < 50 else ">= 50 us"
            gaps[key] += gap
            counts[key] += 1
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
        t = names.setdefault(name[:80], [0.0, 0])
        t[0] += stop - start
        t[1] += 1
    # each kernel's share of the time line: from the end of the kernel that ended before it (or its
    # own start, after a gap) to its own end; with dependent launches this is what it adds to the chain
    # (a kernel launched early and waiting shows its full duration above, not here)
    last = ks[0][0]
    for start, stop, name in sorted(ks, key=lambda k: k[1]):
        names[name[:80]].append(max(0.0, stop - max(last, start)))
        last = max(last, stop)
    span = end - ks[0][0]
    top = sorted(names.items(), key=lambda kv: -kv[1][0])[:14]
    return {"tokens": tokens, "kernels": len(ks), "span_us_per_token": span / tokens,
            "busy_us_per_token": busy / tokens,
            "idle_us_per_token": {k: v / tokens for k, v in gaps.items()},
            "gaps_per_token": {k: v / tokens for k, v in counts.items()},
            "kernels_us_per_token": [(n, t / tokens, c / tokens, sum(shares) / tokens)
                                     for n, (t, c, *shares) in top]}


def print_graph_timeline(system: str, gen, prompts, json_path=None) -> None:
    """``graph_timeline`` as markdown (and a JSON line, appended to ``json_path`` too if given)."""
    t = graph_timeline(gen, prompts)
    print(f"\nTimeline of the {system} decode as replayed ({t['tokens']} tokens, {t['kernels']} kernels): "
          f"{t['span_us_per_token']:.1f} us per token, of which a kernel runs {t['busy_us_per_token']:.1f}\n")
    print("| idle gaps | us per token | gaps per token |\n|---|---|---|")
    for k, v in t["idle_us_per_token"].items():
        print(f"| {k} | {v:.1f} | {t['gaps_per_token'][k]:.1f} |")
    print("\n| kernel | us per token (running) | us per token (its share of the time line) | launches per token |"
          "\n|---|---|---|---|")
    for name, us, n, share in t["kernels_us_per_token"]:
        print(f"| `{name}` | {us:.1f} | {share:.1f} | {n:.1f} |")
    line = json.dumps({"timeline": system, "gpu": torch.cuda.get_device_name(), **t})
    print(line, flush=True)
    if json_path:
        with open(json_path, "a") as f:
            f.write(line + "\n")


# variants that set torch._inductor.config for the compile (backend option inductor_config)
INDUCTOR_VARIANTS = {"combo": ({"combo_kernels": True}, "independent kernels launched as one (combo kernels)")}
INT4_PARTS = ("triton", "tinygemm", "words")  # system name parts that pick int4_kernel
PDL_VARIANTS = {"pdl": ("all", "Inductor's kernels with programmatic dependent launch too"),
                "nopdl": ("off", "GEMVs launched after the kernel before has finished")}


def mmcompile_variants(model, args, quantize=None, gemv="auto", fuse=True, attention="auto", gemv_fusion="auto",
                       regions="auto", inductor=(), pdl="auto", attention_fusion="auto", steps=None,
                       int4_kernel="auto"):
    """One compiled Generator, timed three ways: K-step graphs, one graph per step, no graphs (or, for
    the variants — quantized, ``gemv="cublas"``, without ``fuse_linears``, decode attention on SDPA —
    only the K-step graphs)."""
    t0 = time.perf_counter()
    k = steps or args.steps_per_graph
    passes = [p for p in mmc.DEFAULT_PIPELINE if fuse or p != "fuse_linears"] + (["quantize_linear"] if quantize else [])
    # the prompt's prefill bucket is compiled up front, so compile time covers everything this run uses
    gen = mmc.compile_generator(model, backend="inductor", max_batch=args.batch, max_seq_len=args.max_seq_len,
                                steps_per_graph=k, passes=passes,
                                pass_options={"quantize_linear": {"mode": quantize}} if quantize else None,
                                backend_options={"gemv": gemv, "attention": attention, "gemv_fusion": gemv_fusion,
                                                 "attention_fusion": attention_fusion, "int4_kernel": int4_kernel,
                                                 "regions": regions, "pdl": pdl, "inductor_config": {
                                                     k: v for name in inductor for k, v in INDUCTOR_VARIANTS[name][0].items()}},
                                prefill_buckets=sorted({args.prompt_len, args.max_seq_len}))
    compile_s = time.perf_counter() - t0
    if quantize or gemv != "auto" or not fuse or attention != "auto" or gemv_fusion != "auto" or regions != "auto" \
            or inductor or pdl != "auto" or attention_fusion != "auto" or steps or int4_kernel != "auto":
        label = " ".join(x for x in ("mmcompile", quantize, "cuBLAS GEMV" if gemv == "cublas" else "",
                                     "" if fuse else "unfused linears",
                                     "SDPA decode attention" if attention == "sdpa" else "",
                                     "norms, gate and adds apart from the GEMV" if gemv_fusion == "off" else "",
                                     "rotary and cache writes apart from attention"
                                     if attention_fusion == "off" else "",
                                     "whole graphs" if regions == "off" else "",
                                     {"triton": "mmcompile's packed-code int4 kernel", "tinygemm": "int4 on tinygemm",
                                      "words": "mmcompile's int4 word kernel"}.get(int4_kernel, ""),
                                     *(INDUCTOR_VARIANTS[name][1] for name in inductor),
                                     *(v[1] for v in PDL_VARIANTS.values() if v[0] == pdl)) if x)
        yield f"{label}, {k}-step graphs", gen, compile_s
        if args.timeline:
            print_graph_timeline(f"{label}, {k}-step graphs", gen, args.prompts, args.json)
        return
    multi, step_graph = gen.multi_step, gen.decode_fn
    yield f"mmcompile, {args.steps_per_graph}-step graphs", gen, compile_s
    if args.timeline:
        print_graph_timeline(f"mmcompile {args.steps_per_graph}-step graphs", gen, args.prompts, args.json)
    gen.multi_step = None
    yield "mmcompile, graph per step", gen, compile_s
    gen.decode_fn = getattr(step_graph, "step", step_graph)
    yield "mmcompile, no graphs", gen, compile_s
    if args.profile:
        print_kernel_profile("mmcompile", gen, args.prompts)
    gen.multi_step, gen.decode_fn = multi, step_graph


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama:7b")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--systems", default="eager,torch.compile,mmcompile")
    ap.add_argument("--steps-per-graph", type=int, default=8)
    ap.add_argument("--json", default=None, help="append JSON lines here")
    ap.add_argument("--profile", action="store_true", help="print where the mmcompile decode step's GPU time goes")
    ap.add_argument("--timeline", action="store_true",
                    help="profile each mmcompile system's decode as replayed from its CUDA graphs: kernel time, "
                         "idle gaps within and between replays, per token")
    ap.add_argument("--verbose", action="store_true", help="print each compile stage of the onnxruntime system as it starts")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/decode.py measures GPU decode; no CUDA device here", file=sys.stderr)
        return 2
    device, dtype = torch.device("cuda"), getattr(torch, args.dtype)
    bw = copy_bandwidth(device)
    hf = args.model.startswith("hf-llama:")
    model = build_model(args.model, dtype, device)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, model.config.vocab_size, (args.prompt_len,), generator=g) for _ in range(args.batch)]
    args.prompts = prompts
    roof = bw / step_bytes(model, args.batch, args.prompt_len + args.new_tokens / 2) * args.batch

    def systems():
        for name in args.systems.split(","):
            if name == "eager":
                yield name, (HFGenerate(model) if hf else
                             Generator.from_module(model, max_batch=args.batch, max_seq_len=args.max_seq_len)), None
            elif name == "torch.compile":
                ours = mmc.models.build("llama:" + args.model.split(":", 1)[1], dtype=dtype, device=device) if hf else model
                yield name, gpt_fast_generator(ours, args.batch, args.max_seq_len, device, dtype), None
                del ours
            elif name == "hf-static" and hf:
                forward = model.forward
                model.forward = torch.compile(forward, mode="reduce-overhead", fullgraph=True)
                yield name, HFGenerate(model, cache_implementation="static"), None
                model.forward = forward
            elif name == "mmcompile":
                yield from mmcompile_variants(model, args)
            elif name == "onnxruntime":
                t0 = time.perf_counter()
                gen = mmc.compile_generator(model, backend="onnxruntime", max_batch=args.batch,
                                            max_seq_len=args.max_seq_len, passes=[*mmc.DEFAULT_PIPELINE, "fuse_rmsnorm"],
                                            prefill_buckets=[args.prompt_len],  # one session per bucket
                                            progress=(lambda stage: print(f"[{time.perf_counter() - t0:7.1f} s] {stage}",
                                                                          flush=True)) if args.verbose else None)
                timings = {phase: getattr(getattr(fn, "step", fn), "timings", None) for phase, fn in
                           (("prefill", gen.prefill_fn.compiled[args.prompt_len]), ("decode", gen.decode_fn))}
                print(f"onnxruntime lowering seconds: {timings}", flush=True)
                if args.profile:
                    print_kernel_profile("onnxruntime", gen, args.prompts)
                graph = "its CUDA graph" if getattr(gen.decode_fn, "cuda_graph", False) else "no graphs"
                yield f"mmcompile onnxruntime, {graph}", gen, time.perf_counter() - t0
            elif name.startswith("mmcompile-") and all(
                    p in {"int8", "int4", "cublas", "unfused", "sdpa", "separate", "whole", "attnapart",
                          *INT4_PARTS,
                          *INDUCTOR_VARIANTS, *PDL_VARIANTS} or re.fullmatch(r"k\d+", p) for p in name.split("-")[1:]):
                parts = name.split("-")[1:]
                quantize = next((p for p in parts if p.startswith("int")), None)
                yield from mmcompile_variants(model, args, quantize, "cublas" if "cublas" in parts else "auto",
                                              fuse="unfused" not in parts,
                                              attention="sdpa" if "sdpa" in parts else "auto",
                                              gemv_fusion="off" if "separate" in parts else "auto",
                                              regions="off" if "whole" in parts else "auto",
                                              attention_fusion="off" if "attnapart" in parts else "auto",
                                              steps=next((int(p[1:]) for p in parts if re.fullmatch(r"k\d+", p)), None),
                                              int4_kernel=next((p for p in parts if p in INT4_PARTS), "auto"),
                                              inductor=[p for p in parts if p in INDUCTOR_VARIANTS],
                                              pdl=next((PDL_VARIANTS[p][0] for p in parts if p in PDL_VARIANTS), "auto"))
            else:
                raise SystemExit(f"unknown system {name!r}; choose from eager, torch.compile, hf-static, mmcompile, "
                                 "onnxruntime (the onnxruntime backend on the CUDA provider: onnxruntime-gpu), "
                                 "mmcompile-int8, mmcompile-int4, each mmcompile one with -cublas (without the "
                                 "Triton GEMV kernels), -unfused (without fuse_linears), -sdpa (decode "
                                 "attention on SDPA instead of the split-KV kernel), -separate (RMSNorm, "
                                 "SiLU gate and residual adds as kernels of their own, not in the GEMV), -attnapart "
                                 "(rotary and cache writes as kernels of their own, not in decode attention), -kN "
                                 "(N-step graphs instead of --steps-per-graph), -triton "
                                 "(one-row int4 products on mmcompile's packed-code kernel), -words (on "
                                 "mmcompile's int4 word kernel), -tinygemm (on torch's tinygemm, also where "
                                 "-cublas would not) and/or "
                                 "-whole (graphs compiled whole, not layer by layer: inductor option regions='off'), "
                                 + ", ".join(f"-{k} ({v[1]})" for k, v in {**INDUCTOR_VARIANTS, **PDL_VARIANTS}.items()))

    rows, outputs = [], {}
    for name, gen, compile_s in systems():
        row = run_system(name, gen, prompts, args.new_tokens, compile_s)
        if name == "eager" or name.startswith("mmcompile") or name == "hf-static" or not hf:
            outputs[name] = gen.generate(prompts, 16)
        row.update(model=args.model, dtype=args.dtype, batch=args.batch, roofline_tok_s=roof,
                   frac_roofline=row["tok_s"] / roof, bandwidth_gbs=bw / 1e9,
                   gpu=torch.cuda.get_device_name(), torch=torch.__version__, cuda_graphs=getattr(gen, "cuda_graphs", None))
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")
        del gen
        torch.cuda.empty_cache()
    base = next((r["tok_s"] for r in rows if r["system"] == "eager"), None)
    print(f"\n{args.model} {args.dtype} batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens, "
          f"{torch.cuda.get_device_name()}, copy bandwidth {bw / 1e9:.0f} GB/s, roofline {roof:.1f} tok/s")
    print("| system | decode tok/s | x eager | of roofline | TTFT ms | compile s | peak GB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['tok_s'] / base:.2f}" if base else "-"
        print(f"| {r['system']} | {r['tok_s']:.1f} | {ratio} | {r['frac_roofline']:.2f} | {r['ttft_ms']:.1f} | "
              f"{r['compile_s']:.1f} | {r['peak_gb']:.1f} |")
    base_name = "eager" if "eager" in outputs else next(iter(outputs), None)
    ref = outputs.get(base_name)
    for name, out in outputs.items():
        if ref is not None and name != base_name and out.shape == ref.shape:
            agree = (out[:, args.prompt_len:] == ref[:, args.prompt_len:]).float().mean().item()
            print(f"{name}: first 16 greedy tokens agree with {base_name} on {agree:.0%} of positions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
