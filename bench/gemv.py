"""Decode-sized linear layers (GEMV) on the GPU: how close each kernel comes to the copy bandwidth.

    python bench/gemv.py                 # Llama-2-7B shapes, 1 and 8 rows, every kernel choice
    python bench/gemv.py --sweep         # also sweep the Triton kernels' tile sizes per shape

Decode multiplies a few rows by every weight matrix, so each product is bound by reading its weight
once. For each shape and row count this times, on the same card and in the same run:

- bf16 weights: cuBLAS (``torch.mm``), Inductor's lowering of ``aten.mm``, the Triton reduction Inductor
  generates from ``sum(x * W)`` (batch 1 only; the ``reduce_gemv`` pass), and mmcompile's Triton GEMV;
- int8 weight-only: Inductor's decomposition of ``mmcompile::linear_int8`` (dequantize in the load),
  aten's ``_weight_int8pack_mm`` and mmcompile's Triton GEMV;
- int4 weight-only (groups of 128): Inductor's decomposition of ``mmcompile::linear_int4`` and
  mmcompile's Triton GEMV;
- bf16 with a neighbour (``--kinds bf16+norm,bf16+glu,bf16+res``): the RMSNorm before the product (``+norm``), the SiLU gate
  (``+glu``) or the residual add after it (``+res``) as Inductor's kernel plus the GEMV, against
  mmcompile's GEMV with it inside (``kernels.gemv_fused``);

and prints microseconds, GB/s of weight bytes read and the fraction of the measured copy bandwidth.
``--json`` appends every row as a JSON line; ``--sweep`` prints the best tile sizes found per shape,
which is where ``mmcompile.kernels.config_for`` comes from.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch

SHAPES = {"q / k / v / o (4096 x 4096)": (4096, 4096), "gate / up (4096 x 11008)": (4096, 11008),
          "down (11008 x 4096)": (11008, 4096), "lm head (4096 x 32000)": (4096, 32000),
          "q+k+v fused (4096 x 12288)": (4096, 12288)}


SWEEP = ("q / k / v / o (4096 x 4096)", "gate / up (4096 x 11008)", "down (11008 x 4096)", "lm head (4096 x 32000)")


def timed(fn, reps: int = 40) -> float:
    """Seconds per call of ``fn(i)`` (i: which weight copy), replayed from a CUDA graph of ``reps``
    calls so the host's launch cost is out of the number, as it is in graph-replayed decode. The calls
    cycle over copies of the weight that together exceed the L2 cache, so no call finds its weight
    there."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(3):
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(reps):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (5 * reps) / 1e3


def unavailable(script: str) -> str | None:
    """Why ``script`` cannot time mmcompile's GEMV kernels on this machine, or None when it can."""
    if not torch.cuda.is_available():
        return f"{script} needs a CUDA device"
    from mmcompile import kernels

    ok, why = kernels.available("cuda")
    return None if ok else f"{script}: {why}"


def copy_bandwidth() -> float:
    a = torch.empty(1 << 29, dtype=torch.bfloat16, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        b.copy_(a)
    end.record()
    torch.cuda.synchronize()
    return 2 * a.numel() * 2 * 20 / (start.elapsed_time(end) / 1e3)


def compiled(fn):
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


def variants(M: int, K: int, N: int):
    """(kind, name, fn(i), weight bytes, reference output) for one shape; ``fn(i)`` reads copy
    ``i % copies`` of the weight."""
    from mmcompile import kernels, ops
    from mmcompile.quant import (dequantize_int4, dequantize_int8, int4_words, quantize_int4, quantize_int8,
                                 tinygemm_layout)

    copies = max(2, -(-3 * 50 * 2 ** 20 // (N * K)))  # more than three times an H100's 50 MB of L2 (int4: 0.75)
    x = torch.randn(M, K, dtype=torch.bfloat16, device="cuda")
    w = torch.randn(N, K, dtype=torch.bfloat16, device="cuda") / K ** 0.5  # nn.Linear layout [N, K]
    ws = [w] + [w.clone() for _ in range(copies - 1)]
    ref = (x.float() @ w.float().t())
    out = [("bf16", "cuBLAS (torch.mm)", lambda i: x @ ws[i % copies].t(), w.numel() * 2, ref)]
    f = compiled(lambda x, w: x @ w.t())
    out.append(("bf16", "Inductor aten.mm", lambda i: f(x, ws[i % copies]), w.numel() * 2, ref))
    if M == 1:
        r = compiled(lambda x, w: (x[:, None, :].float() * w[None].float()).sum(-1).to(x.dtype))
        out.append(("bf16", "Inductor reduction (reduce_gemv)", lambda i: r(x, ws[i % copies]), w.numel() * 2, ref))
    out.append(("bf16", "mmcompile Triton GEMV", lambda i: kernels.gemv(x, ws[i % copies]), w.numel() * 2, ref))

    q, s = quantize_int8(w)
    s = s.to(torch.bfloat16)
    qs = [q] + [q.clone() for _ in range(copies - 1)]
    ref8 = x.float() @ dequantize_int8(q, s).t()
    d8 = compiled(ops._linear_int8_decomposed)
    nb8 = q.numel() + s.numel() * 2
    out.append(("int8", "Inductor decomposition", lambda i: d8(x, qs[i % copies], s), nb8, ref8))
    if M == 1 or M % 8 == 0:
        out.append(("int8", "aten _weight_int8pack_mm", lambda i: torch._weight_int8pack_mm(x, qs[i % copies], s),
                    nb8, ref8))
    out.append(("int8", "mmcompile Triton GEMV", lambda i: kernels.gemv_int8(x, qs[i % copies], s), nb8, ref8))

    p, s4, z4 = quantize_int4(w, 128)
    s4, z4 = s4.to(torch.bfloat16), z4.to(torch.bfloat16)
    ps = [p] + [p.clone() for _ in range(copies - 1)]
    ref4 = x.float() @ dequantize_int4(p, s4, z4).t()
    d4 = compiled(ops._linear_int4_decomposed)
    nb4 = p.numel() + 2 * s4.numel() * 2
    out.append(("int4", "Inductor decomposition", lambda i: d4(x, ps[i % copies], s4, z4), nb4, ref4))
    out.append(("int4", "mmcompile Triton GEMV", lambda i: kernels.gemv_int4(x, ps[i % copies], s4, z4), nb4, ref4))
    if M == 1:  # the streaming kernel on the codes as words (mmcompile.quant.int4_words)
        words = [int4_words(pp, s4.shape[1]) for pp in ps]
        out.append(("int4", "mmcompile int4 word kernel",
                    lambda i: kernels.gemv_int4_words(x, words[i % copies], s4, z4), nb4, ref4))
        pdl = {**kernels.config_for("int4_words", 1, N, K), "PDL": True}  # as decode replays it
        out.append(("int4", "mmcompile int4 word kernel, dependent launches",
                    lambda i: kernels.gemv_int4_words(x, words[i % copies], s4, z4, config=pdl), nb4, ref4))
    try:  # torch's tinygemm kernel, on our codes repacked as it reads them
        tg = [tinygemm_layout(pp, s4, z4) for pp in ps]  # mmcompile.quant
        out.append(("int4", "aten _weight_int4pack_mm (tinygemm)",
                    lambda i: torch._weight_int4pack_mm(x, tg[i % copies][0], 128, tg[i % copies][1]), nb4, ref4))
    except Exception as e:  # not built for this card or torch
        print(f"int4: aten _weight_int4pack_mm skipped: {type(e).__name__}: {str(e)[:160]}", file=sys.stderr)
    nw = torch.rand(K, dtype=torch.bfloat16, device="cuda") + 0.5
    gu = torch.randn(M, 2 * K, dtype=torch.bfloat16, device="cuda")
    res = torch.randn(M, N, dtype=torch.bfloat16, device="cuda")
    gate, up = gu[:, :K], gu[:, K:]
    nb = w.numel() * 2
    norm_ref = torch.nn.functional.rms_norm(x.float(), (K,), nw.float(), 1e-5) @ w.float().t()
    glu_ref = (torch.nn.functional.silu(gate.float()) * up.float()) @ w.float().t()
    res_ref = ref + res.float()
    apart = {"+norm": compiled(lambda x, w: torch.nn.functional.rms_norm(x, (K,), nw, 1e-5) @ w.t()),
             "+glu": compiled(lambda g, u, w: (torch.nn.functional.silu(g) * u) @ w.t()),
             "+res": compiled(lambda x, w: x @ w.t() + res)}
    out += [("bf16+norm", "Inductor norm + mmcompile GEMV",
             lambda i: kernels.gemv(torch.nn.functional.rms_norm(x, (K,), nw, 1e-5), ws[i % copies]), nb, norm_ref),
            ("bf16+norm", "Inductor norm + mm (compiled)", lambda i: apart["+norm"](x, ws[i % copies]), nb, norm_ref),
            ("bf16+norm", "mmcompile fused GEMV",
             lambda i: kernels.gemv_fused(x, ws[i % copies], norm_weight=nw, eps=1e-5), nb, norm_ref),
            ("bf16+glu", "Inductor gate + mm (compiled)", lambda i: apart["+glu"](gate, up, ws[i % copies]), nb, glu_ref),
            ("bf16+glu", "mmcompile fused GEMV", lambda i: kernels.gemv_fused(gate, ws[i % copies], up=up), nb, glu_ref),
            ("bf16+res", "Inductor mm + add (compiled)", lambda i: apart["+res"](x, ws[i % copies]), nb, res_ref),
            ("bf16+res", "mmcompile fused GEMV", lambda i: kernels.gemv_fused(x, ws[i % copies], residual=res), nb, res_ref)]
    sweepers = {"bf16": lambda c, i=0: kernels.gemv(x, ws[i % copies], config=c),
                "bf16+norm": lambda c, i=0: kernels.gemv_fused(x, ws[i % copies], norm_weight=nw, eps=1e-5, config=c),
                "bf16+glu": lambda c, i=0: kernels.gemv_fused(gate, ws[i % copies], up=up, config=c),
                "int8": lambda c, i=0: kernels.gemv_int8(x, qs[i % copies], s, config=c),
                "int4": lambda c, i=0: kernels.gemv_int4(x, ps[i % copies], s4, z4, config=c)}
    if M == 1:
        sweepers["int4_words"] = lambda c, i=0: kernels.gemv_int4_words(x, words[i % copies], s4, z4, config=c)
    return out, sweepers, {"bf16": (nb, ref), "int8": (nb8, ref8), "int4": (nb4, ref4), "int4_words": (nb4, ref4),
                           "bf16+norm": (nb, norm_ref), "bf16+glu": (nb, glu_ref)}


def sweep_configs(kind: str, M: int):
    if kind == "int4_words":  # one row only; both conversions of the codes, loads pipelined or not
        return [{"BLOCK_N": bn, "GROUPS": g, "num_warps": nw, "STAGES": st, "INT4_CVT": "prmt"}
                for bn, g, nw, st in itertools.product((4, 8, 16, 32), (8, 16, 32), (4, 8), (2, 3))] + \
            [{"BLOCK_N": 8, "GROUPS": 16, "num_warps": 4, "STAGES": 2, "INT4_CVT": "bits"}]
    if kind == "int4":  # (bf16+norm and bf16+glu sweep the bf16 tiles)
        if M > 1:
            return [{"BLOCK_N": bn, "num_warps": nw} for bn, nw in itertools.product((16, 32, 64, 128), (4, 8))]
        return [{"BLOCK_N": bn, "GROUPS": g, "num_warps": nw}
                for bn, g, nw in itertools.product((4, 8, 16), (4, 8, 16), (4, 8))]
    if M > 1:
        return [{"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": 4} for bn, bk in itertools.product((16, 32, 64), (64, 128, 256))]
    if "+" in kind:
        return [{"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": nw}
                for bn, bk, nw in itertools.product((4, 8, 16), (256, 512, 1024), (4, 8))]
    return [{"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": nw}
            for bn, bk, nw in itertools.product((2, 4, 8), (512, 1024, 2048), (4, 8))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,8", help="comma-separated row counts (decode batch sizes)")
    ap.add_argument("--sweep", action="store_true", help="sweep the Triton kernels' tile sizes per shape")
    ap.add_argument("--json", default=None, help="append JSON lines here")
    ap.add_argument("--kinds", default="bf16,int8,int4",
                    help="weight kinds to time: bf16, int8, int4 (and int4_words: its sweep on the word kernel), "
                         "and the fused bf16+norm, bf16+glu, bf16+res")
    ap.add_argument("--shapes", default=None, help="comma-separated substrings of the layer names to keep (e.g. 'down,lm')")
    args = ap.parse_args(argv)
    why = unavailable("bench/gemv.py")
    if why:
        print(why, file=sys.stderr)
        return 2
    bw = copy_bandwidth()
    gpu = torch.cuda.get_device_name()
    print(f"{gpu}, torch {torch.__version__}, copy bandwidth {bw / 1e9:.0f} GB/s")
    rows = []
    best = []
    for M in (int(r) for r in args.rows.split(",")):
        kinds = args.kinds.split(",")
        for label, (K, N) in SHAPES.items():
            if args.shapes and not any(p in label for p in args.shapes.split(",")):
                continue
            found, sweepers, refs = variants(M, K, N)
            for kind, name, fn, nbytes, ref in found:
                if kind not in kinds:
                    continue
                try:
                    y = fn(0)
                except Exception as e:  # e.g. an aten kernel this build lacks
                    print(f"  {label}, {kind}, {name}: not run ({type(e).__name__}: {str(e)[:120]})", file=sys.stderr)
                    continue
                err = (y.float() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-6)
                s = timed(fn)
                print(f"| {M} | {label} | {kind} | {name} | {s * 1e6:.1f} | {nbytes / s / bw:.2f} |", flush=True)
                row = dict(rows=M, layer=label, kind=kind, kernel=name, us=s * 1e6, gbs=nbytes / s / 1e9,
                           frac_copy_bw=nbytes / s / bw, rel_err=err, gpu=gpu, torch=torch.__version__)
                rows.append(row)
                if args.json:
                    with open(args.json, "a") as f:
                        f.write(json.dumps(row) + "\n")
            if args.sweep and label in SWEEP:
                for kind, run in sweepers.items():
                    if kind not in kinds:
                        continue
                    nbytes, ref = refs[kind]
                    timings = []
                    for cfg in sweep_configs(kind, M):
                        try:
                            y = run(cfg)
                            if (y.float() - ref).abs().max().item() > 3e-2 * ref.abs().max().item():
                                continue
                            timings.append((timed(lambda i: run(cfg, i)), cfg))
                        except Exception as e:  # a tile that does not fit this shape
                            print(f"  skip {kind} {cfg}: {type(e).__name__}", file=sys.stderr)
                    timings.sort(key=lambda t: t[0])
                    for s, cfg in timings[:3]:
                        print(f"  best {M} {label} {kind} {cfg} {s * 1e6:.1f} us", flush=True)
                        best.append(f"| {M} | {label} | {kind} | {cfg} | {s * 1e6:.1f} | {nbytes / s / bw:.2f} |")
    print("\n| rows | layer | weights | kernel | us | GB/s | of copy bw | max rel. error |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['rows']} | {r['layer']} | {r['kind']} | {r['kernel']} | {r['us']:.1f} | {r['gbs']:.0f} | "
              f"{r['frac_copy_bw']:.2f} | {r['rel_err']:.1e} |")
    if best:
        print("\nBest tiles (three per shape and weight kind):\n")
        print("| rows | layer | weights | config | us | of copy bw |")
        print("|---|---|---|---|---|---|")
        print("\n".join(best))
    return 0


if __name__ == "__main__":
    sys.exit(main())
