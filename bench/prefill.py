"""Prefill benchmark: attention fusion on a long prompt, before and after, eager and Inductor.

    python bench/prefill.py --model llama:7b --seq-len 4096

Our Llama with attention written out as transformers' eager attention does (repeat_kv, matmuls,
masked fp32 softmax — ``attn_impl="eager"``), so the fusion pass has real work to do. Systems:

  eager                 the model as written, in PyTorch eager
  eager backend, fused  mmcompile with the default pipeline (attention fused into SDPA), eager backend
  inductor, unfused     mmcompile without fuse_attention, Inductor backend
  inductor, fused       mmcompile default pipeline, Inductor backend
  inductor, fp8         the same with quantize_linear mode fp8 (e4m3 weights per row, activations per row
                        at run time, torch._scaled_mm; a GPU of compute capability 8.9 or newer)
  inductor, fp8 per tensor   the same with one scale per weight and per activation (fp8_scales="tensor")
  inductor, w8a8        the same with quantize_linear mode w8a8 (int8 weights and activations)

``--systems`` picks them by short name: eager, eager-backend, inductor-unfused, inductor, inductor-fp8,
inductor-fp8-tensor, inductor-w8a8 (default: the first four). The table's last column compares each system
with ``inductor`` when it ran (what quantization buys over the bf16 compiled model).

Prints prefill latency (median of --reps after warm-up), peak memory, the largest difference of each
system's logits from the model's run in fp32 and, for the fused Inductor program, which attention
kernels the GPU ran (flash or memory-efficient expected). The bf16 model itself is some distance from
fp32 (on the 7B shape at 2048 tokens with random weights, eager bf16 was 10% from fp32, compiled bf16
6%): a system is flagged ``DIFFERS`` past the larger of ``ERROR_BUDGET`` (``LOSSY_BUDGET`` for the
quantized systems) and 1.5 times eager bf16's own distance.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

import mmcompile as mmc
from mmcompile.testing import relative_error

UNFUSED = ["canonicalize", "fold_constants", "eliminate_dead_code"]
# short name -> (table name, passes, backend, quantize_linear options)
SYSTEMS = {
    "eager-backend": ("eager backend, fused", "default", "eager", None),
    "inductor-unfused": ("inductor, unfused", UNFUSED, "inductor", None),
    "inductor": ("inductor, fused", "default", "inductor", None),
    "inductor-fp8": ("inductor, fp8", "default", "inductor", {"mode": "fp8"}),
    "inductor-fp8-tensor": ("inductor, fp8 per tensor", "default", "inductor",
                            {"mode": "fp8", "fp8_scales": "tensor"}),
    "inductor-w8a8": ("inductor, w8a8", "default", "inductor", {"mode": "w8a8"}),
}


def timed(fn, reps: int) -> tuple[float, float]:
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, torch.cuda.max_memory_allocated() / 1e9


# the largest difference from eager's logits, relative to their largest magnitude, past which a system is
# flagged: bf16 arithmetic in another order, and quantized linears (fp8, W8A8) on top of it
ERROR_BUDGET, LOSSY_BUDGET = 0.03, 0.15


def _logits(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def attention_kernels(fn) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = {e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA}
    keys = ("flash", "fmha", "attention", "efficient", "prefill_kernel")
    return sorted(n[:90] for n in names if any(k in n.lower() for k in keys))


def kernel_profile(fn, top: int = 12) -> list[tuple[str, float, int]]:
    """(kernel, ms, calls) for one call of ``fn``, the costliest ``top`` first, and a last row with the
    whole: where a prefill's GPU time goes."""
    from collections import defaultdict

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    total, calls = defaultdict(float), defaultdict(int)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            total[e.name] += e.device_time / 1e3
            calls[e.name] += 1
    ranked = sorted(total, key=total.get, reverse=True)
    return [(n, total[n], calls[n]) for n in ranked[:top]] + [("(all kernels)", sum(total.values()),
                                                                 sum(calls.values()))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama:7b")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", default=None)
    ap.add_argument("--profile", action="store_true",
                    help="also print each compiled system's costliest GPU kernels (one profiled call)")
    ap.add_argument("--systems", default="eager,eager-backend,inductor-unfused,inductor",
                    help=f"comma-separated, from eager, {', '.join(SYSTEMS)}")
    args = ap.parse_args(argv)
    names = args.systems.split(",")
    unknown = [n for n in names if n != "eager" and n not in SYSTEMS]
    if unknown:
        ap.error(f"unknown system(s) {', '.join(unknown)}; choose from eager, {', '.join(SYSTEMS)}")
    if not torch.cuda.is_available():
        print("bench/prefill.py measures GPU prefill; no CUDA device here", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    S = args.seq_len
    model = mmc.models.build(args.model, dtype=dtype, device="cuda", attn_impl="eager", max_seq_len=S)
    cache = model.empty_cache(1, S)
    tokens = torch.randint(0, model.config.vocab_size, (1, S), device="cuda")
    pos = torch.arange(S, device="cuda")[None]
    out_pos = torch.tensor([S - 1], device="cuda")
    call = (tokens, pos, cache)

    rows = []
    with torch.no_grad():
        eager_logits = _logits(model(*call, output_pos=out_pos))
        # the reference in fp32: the parameters only (buffers such as the rotary tables keep their dtype);
        # bf16 -> fp32 -> bf16 gives back the same weights
        for p in model.parameters():
            p.data = p.data.float()
        want = _logits(model(tokens, pos, model.empty_cache(1, S), output_pos=out_pos)).float()
        for p in model.parameters():
            p.data = p.data.to(dtype)
        torch.cuda.empty_cache()
    noise = relative_error(eager_logits, want)
    print(f"eager {args.dtype} is {noise:.1e} from fp32 (the noise floor of the error column)")

    def record(system, fn, compile_s=0.0, extra=None):
        with torch.no_grad():
            ms, peak = timed(fn, args.reps)
            # the largest difference from eager's logits, relative to their largest magnitude
            error = relative_error(_logits(fn()), want)
        row = dict(system=system, model=args.model, seq_len=S, dtype=args.dtype, ms=ms, peak_gb=peak,
                   compile_s=compile_s, error=error, gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                   **(extra or {}))
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")

    if "eager" in names:
        record("eager", lambda: model(*call, output_pos=out_pos))
    prog = mmc.capture(model, call, {"output_pos": out_pos}, name="llama.prefill")
    kernels = None
    for system, passes, backend, quantize in (SYSTEMS[n] for n in names if n != "eager"):
        t0 = time.perf_counter()
        if quantize:
            result = mmc.optimize(prog, [*mmc.DEFAULT_PIPELINE, "quantize_linear"], quantize_linear=quantize)
        else:
            result = mmc.optimize(prog, passes)
        compiled = mmc.lower(result.program, backend)
        compiled(*call, output_pos=out_pos)
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - t0
        counts = result.program.op_counts()
        extra = dict(sdpa=counts["aten.scaled_dot_product_attention.default"], softmax=counts["aten._softmax.default"])
        if system == "inductor, fused":
            with torch.no_grad():
                kernels = attention_kernels(lambda: compiled(*call, output_pos=out_pos))
            extra["attention_kernels"] = kernels
        record(system, lambda: compiled(*call, output_pos=out_pos), compile_s, extra)
        if args.profile:
            with torch.no_grad():
                ranked = kernel_profile(lambda: compiled(*call, output_pos=out_pos))
            print(f"\n{system}: costliest GPU kernels of one prefill")
            print("| kernel | ms | calls | share |\n|---|---|---|---|")
            for name, ms, n in ranked:
                print(f"| {name[:100]} | {ms:.2f} | {n} | {ms / ranked[-1][1]:.0%} |")
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(dict(system=system, profile=ranked)) + "\n")
        compiled = None  # its memory goes before the next system compiles
        torch.cuda.empty_cache()

    eager_ms = next((r["ms"] for r in rows if r["system"] == "eager"), None)
    inductor_ms = next((r["ms"] for r in rows if r["system"] == "inductor, fused"), None)
    print(f"\n{args.model} prefill of {S} tokens, {args.dtype}, batch 1, {torch.cuda.get_device_name()}; eager "
          f"{args.dtype} is {noise:.1e} from fp32")
    print("| system | SDPA ops | softmax ops | prefill ms | x eager | peak GB | compile s | x inductor | "
          "error vs fp32 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        x_eager = f"{eager_ms / r['ms']:.2f}" if eager_ms else ""
        x_inductor = f"{inductor_ms / r['ms']:.2f}" if inductor_ms else ""
        lossy = any(q in r["system"] for q in ("fp8", "w8a8"))
        flag = " DIFFERS" if r["error"] > max(LOSSY_BUDGET if lossy else ERROR_BUDGET, 1.5 * noise) else ""
        print(f"| {r['system']} | {r.get('sdpa', 0)} | {r.get('softmax', model.config.n_layers)} | {r['ms']:.1f} | "
              f"{x_eager} | {r['peak_gb']:.1f} | {r['compile_s']:.1f} | {x_inductor} | {r['error']:.1e}{flag} |")
    print(f"attention kernels run by the fused Inductor program: {kernels}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
