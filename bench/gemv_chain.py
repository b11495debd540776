"""The GEMVs of a whole batch-1 decode step, one after another as the step runs them, from one CUDA graph.

    python bench/gemv_chain.py                      # Llama-2-7B shape, bf16 and int8 weights
    python bench/gemv_chain.py --kinds int8 --sweep # int8 tiles and conversions, measured in the chain
    python bench/gemv_chain.py --kinds int8 --conversions  # each int8 conversion at the default tile
    python bench/gemv_chain.py --timeline           # each product's time inside the replayed chain

``bench/gemv.py`` times each product alone, over weight copies; a decode step runs 129 different
products back to back, each with its neighbours inside (``kernels.gemv_fused``): per layer q+k+v with
the RMSNorm before it, o with the residual add, gate+up with the RMSNorm, down with the SiLU gate and the
residual add, then the LM head (bf16) with the final norm. Kernel boundaries, the tail of each grid and
the mix of shapes are in this number and not in the per-product one, so tiles are chosen here
(``mmcompile.kernels.config_for``). Every variant's output is compared with the first one's (the same
arithmetic up to the order of the sums).

Prints the copy bandwidth, then per variant: milliseconds per step (best and median of 5 groups of
replays), GB/s of weight bytes read and the largest difference from the first variant's output.
``--timeline`` profiles one replay of the default chain (launched dependently, as a decode step runs it)
and prints, per kind of product, its mean *share* — from the end of the product before it to its own
end, the time the chain spends on it — against the time its weight bytes take at the copy bandwidth,
and how early it starts (before the product before it ends). A product below the bandwidth in its share
is slow while it streams; one whose shares add up to less than the chain's time loses it between
products.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys

import torch

SHAPES = {"llama:7b": (32, 4096, 11008, 32000)}  # layers, model dim, FFN dim, vocabulary


def build(layers: int, d: int, f: int, vocab: int, kinds: list[str], seed: int = 0, device: str = "cuda") -> dict:
    """Random weights of the step's products (``nn.Linear`` layout), bf16 and int8 as asked."""
    from mmcompile.quant import quantize_int8

    g = torch.Generator(device=device).manual_seed(seed)

    def w(n, k):
        return (torch.randn(n, k, device=device, generator=g) / k ** 0.5).to(torch.bfloat16)

    def norm():
        return (torch.rand(d, device=device, generator=g) + 0.5).to(torch.bfloat16)

    out = {"layers": [], "lm": w(vocab, d), "norm": norm()}
    for _ in range(layers):
        ly = {"qkv": w(3 * d, d), "o": w(d, d), "gu": w(2 * f, d), "down": w(d, f), "g1": norm(), "g2": norm()}
        if "int8" in kinds:
            for name in ("qkv", "o", "gu", "down"):
                q, s = quantize_int8(ly[name])
                ly[name + "8"] = (q, s.to(torch.bfloat16))
            if "bf16" not in kinds:
                for name in ("qkv", "o", "gu", "down"):
                    del ly[name]
        out["layers"].append(ly)
    return out


PRODUCTS = ("qkv", "o", "gu", "down")  # with the RMSNorm, the residual add, the RMSNorm, the gate and add


PROLOGUES = dict(zip(PRODUCTS, ("norm", None, "norm", "glu")))


def step(x: torch.Tensor, weights: dict, kind: str, config, dependent: bool = False) -> torch.Tensor:
    """``config``: None (the defaults), one tile config for every product, or a dict from product name
    (``PRODUCTS``) to its config (the others keep the defaults). ``dependent``: every product launched as
    a programmatic dependent launch, with its kind's default pipelining unless its config names one (as a
    replayed decode step launches them)."""
    from mmcompile.kernels import config_for, gemv_fused

    d = x.shape[-1]
    for ly in weights["layers"]:
        def mm(name, a, **kw):
            cfg = config.get(name) if isinstance(config, dict) and set(config) <= set(PRODUCTS) else config
            if dependent:
                default = config_for(kind, 1, 0, 0, PROLOGUES[name])
                cfg = dict(default if cfg is None else {"STAGES": default.get("STAGES", 0), **cfg}, PDL=True)
            if kind == "int8":
                q, s = ly[name + "8"]
                return gemv_fused(a, q, scales=s, config=cfg, **kw)
            return gemv_fused(a, ly[name], config=cfg, **kw)

        qkv = mm("qkv", x, norm_weight=ly["g1"], eps=1e-5)
        x = mm("o", qkv[:, :d], residual=x)  # attention's output stands in: same shape, same bytes
        gu = mm("gu", x, norm_weight=ly["g2"], eps=1e-5)
        f = gu.shape[-1] // 2
        x = mm("down", gu[:, :f], up=gu[:, f:], residual=x)
    return gemv_fused(x, weights["lm"], norm_weight=weights["norm"], eps=1e-5)


def timed(fn, groups: int = 5, reps: int = 10) -> tuple[float, float, torch.Tensor]:
    """(best, median) milliseconds of one call of ``fn`` replayed from a CUDA graph, and its output."""
    graph, out = _graph(fn)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(groups):
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return min(times), statistics.median(times), out.clone()


def timeline(fn, layers: int, dims: tuple[int, int], kind: str, bandwidth: float) -> list[dict]:
    """Per product of ``PRODUCTS``: mean running time, share and early start in µs inside one replay of
    ``fn`` (the chain) from a CUDA graph, and the µs its weight bytes take at ``bandwidth`` (bytes/s)."""
    from torch.profiler import ProfilerActivity, profile

    d, f = dims
    graph, _ = _graph(fn)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
    kernels = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                      and "gemv" in e.name), key=lambda e: e.time_range.start)[-(len(PRODUCTS) * layers + 1):]
    size = {"qkv": 3 * d * d, "o": d * d, "gu": 2 * f * d, "down": d * f}
    per = {name: {"running": [], "share": [], "early": []} for name in PRODUCTS}
    for i, e in enumerate(kernels[:-1]):
        name = PRODUCTS[i % len(PRODUCTS)]
        per[name]["running"].append(e.time_range.end - e.time_range.start)
        if i:
            before = kernels[i - 1].time_range.end
            per[name]["share"].append(e.time_range.end - before)
            per[name]["early"].append(before - e.time_range.start)
    width = 1 if kind == "int8" else 2
    return [dict(product=name, **{k: statistics.mean(v) for k, v in per[name].items()},
                 ideal=size[name] * width / bandwidth * 1e6) for name in PRODUCTS]


def _graph(fn):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    graph.replay()
    torch.cuda.synchronize()
    return graph, out


def sweep_configs(kind: str, vec: int = 1) -> list[dict]:
    tiles = [{"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": nw, **({"VEC": vec} if vec > 1 else {})}
             for bn, bk, nw in itertools.product((2, 4, 8, 16) if vec == 1 else (8, 16, 32), (512, 1024, 2048), (4, 8))]
    if kind == "int8":
        from mmcompile.kernels import INT8_CONVERSIONS

        return [dict(t, INT8_CVT=cvt) for cvt in INT8_CONVERSIONS for t in tiles]
    return tiles


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama:7b", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=None, help="fewer layers than the model's (a quicker run)")
    ap.add_argument("--kinds", default="bf16,int8", help="comma-separated weight kinds: bf16, int8")
    ap.add_argument("--sweep", action="store_true",
                    help="also time every tile (and, for int8, every weight conversion) for the whole chain")
    ap.add_argument("--sweep-each", action="store_true",
                    help="also time every tile for one kind of product at a time (q+k+v, o, gate+up, down), "
                         "the others at their defaults: the best tile per prologue")
    ap.add_argument("--conversions", action="store_true",
                    help="also time each int8 weight conversion to fp32 (INT8_CVT) at the default tile")
    ap.add_argument("--pdl", action="store_true",
                    help="also time the default tiles launched as programmatic dependent launches: each product's "
                         "first weight tile is read while the product before it finishes")
    ap.add_argument("--stages", default="",
                    help="comma-separated depths (e.g. 0,2,3,4; 0: a plain loop): also time the dependently launched "
                         "default tiles with their loads software-pipelined that deep (the kernels' STAGES)")
    ap.add_argument("--dependent", action="store_true",
                    help="launch the tiles of --sweep and --sweep-each as programmatic dependent launches, "
                         "pipelined as deep as their kind's default (as a replayed decode step runs them); "
                         "--pdl adds the default tiles launched the same way, to compare with")
    ap.add_argument("--vec", type=int, default=1,
                    help="the tiles of --sweep and --sweep-each fold each thread's runs of this many inputs into one "
                         "accumulator (the kernels' VEC: 16 for int8, 8 for bf16, one 16-byte load), with wider row "
                         "blocks (8, 16, 32): wide tiles in few registers")
    ap.add_argument("--timeline", action="store_true",
                    help="also profile one replay of the default chain launched dependently: each kind of product's "
                         "share of the chain's time against its weight bytes at the copy bandwidth")
    ap.add_argument("--json", default=None, help="append one JSON line per variant here")
    args = ap.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = sorted(set(kinds) - {"bf16", "int8"})
    if unknown:
        ap.error(f"unknown --kinds {', '.join(unknown)}; choose from bf16, int8")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from gemv import copy_bandwidth, unavailable

    from mmcompile.kernels import INT8_CONVERSIONS, config_for

    why = unavailable("bench/gemv_chain.py")
    if why:
        print(why, file=sys.stderr)
        return 2

    layers, d, f, vocab = SHAPES[args.model]
    layers = args.layers or layers
    weights = build(layers, d, f, vocab, kinds)
    lm_bytes = vocab * d * 2
    per_layer = {"bf16": (3 * d * d + d * d + 2 * f * d + d * f) * 2, "int8": 3 * d * d + d * d + 2 * f * d + d * f}
    bw = copy_bandwidth()
    gpu = torch.cuda.get_device_name()
    print(f"{args.model}, {layers} layers, batch 1; {gpu}, torch {torch.__version__}, copy bandwidth {bw / 1e9:.0f} GB/s")
    print("| weights | tiles | best ms | median ms | GB/s | of copy bw | difference from the first |")
    print("|---|---|---|---|---|---|---|")
    x = torch.randn(1, d, device="cuda", dtype=torch.bfloat16)
    for kind in kinds:
        nbytes = layers * per_layer[kind] + lm_bytes
        first = None
        each = [{name: c} for name in PRODUCTS for c in sweep_configs(kind, args.vec)
                if c.get("INT8_CVT", "prmt") == "prmt"]
        conversions = [dict(config_for("int8", 1, d, d), INT8_CVT=c) for c in INT8_CONVERSIONS] \
            if kind == "int8" and args.conversions else []
        swept = sweep_configs(kind, args.vec) if args.sweep else []
        for cfg in [None] + conversions + swept + (each if args.sweep_each else []) \
                + (["pdl"] if args.pdl else []) + [f"pdl{s}" for s in args.stages.split(",") if s]:
            try:
                if isinstance(cfg, str):  # "pdl", "pdlN": dependent launches, loads pipelined N deep
                    best, med, out = timed(lambda: step(x, weights, kind, {
                        name: dict(config_for(kind, 1, 0, 0, prologue), PDL=True,
                                   **({"STAGES": int(cfg[3:])} if cfg[3:] else {}))
                        for name, prologue in PROLOGUES.items()}))
                else:
                    best, med, out = timed(lambda: step(x, weights, kind, cfg, args.dependent and cfg is not None
                                                        and cfg not in conversions))
            except Exception as e:  # a tile that does not fit
                print(f"| {kind} | {cfg} | not run: {type(e).__name__}: {str(e).splitlines()[0][:100]} | | | | |")
                continue
            first = out if first is None else first
            diff = (out.float() - first.float()).abs().max().item()
            label = "default" if cfg is None else "default, programmatic dependent launches" if cfg == "pdl" \
                else f"default, dependent launches, loads pipelined {cfg[3:]} deep" if isinstance(cfg, str) \
                else "; ".join(
                f"{k}: " + ", ".join(f"{a}={b}" for a, b in v.items()) if isinstance(v, dict) else f"{k}={v}"
                for k, v in cfg.items()) + (", dependent launches" if args.dependent and cfg not in conversions else "")
            print(f"| {kind} | {label} | {best:.3f} | {med:.3f} | {nbytes / best / 1e6:.0f} | "
                  f"{nbytes / best * 1e3 / bw:.2f} | {diff:.3g} |", flush=True)
            if args.json:
                with open(args.json, "a") as fh:
                    fh.write(json.dumps(dict(model=args.model, layers=layers, kind=kind, config=cfg, best_ms=best,
                                             dependent=args.dependent and isinstance(cfg, dict)
                                             and cfg not in conversions,
                                             median_ms=med, gbs=nbytes / best / 1e6, copy_gbs=bw / 1e9,
                                             diff=diff, gpu=gpu, torch=torch.__version__)) + "\n")
        if args.timeline:
            rows = timeline(lambda: step(x, weights, kind, {name: dict(config_for(kind, 1, 0, 0, prologue), PDL=True)
                                                            for name, prologue in PROLOGUES.items()}),
                            layers, (d, f), kind, bw)
            print(f"\n{kind}, default tiles launched dependently, one replay (µs, mean over {layers} layers):")
            print("| product | running | share | of copy bw in its share | starts early by |")
            print("|---|---|---|---|---|")
            for r in rows:
                print(f"| {r['product']} | {r['running']:.1f} | {r['share']:.1f} | {r['ideal'] / r['share']:.2f} | "
                      f"{r['early']:.1f} |")
            if args.json:
                with open(args.json, "a") as fh:
                    for r in rows:
                        fh.write(json.dumps(dict(model=args.model, layers=layers, kind=kind, timeline=r, gpu=gpu,
                                                 copy_gbs=bw / 1e9, torch=torch.__version__)) + "\n")
            print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
