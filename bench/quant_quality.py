"""Quality of each quantization mode: next-token agreement and KL divergence against the float model.

    python bench/quant_quality.py --model llama:tiny --prompts 256
    python bench/quant_quality.py --model hf-llama:7b --device cuda --dtype bfloat16 --prompts 256

For random prompts, the float model's logits at every position are compared with those of the same
Program after ``quantize_linear`` in each mode: top-1 agreement (the argmax token is the same) and
the mean KL(p_float || p_quantized) of the next-token distributions. Random weights measure the
numerical effect only; quality on language needs a real checkpoint (``hf:PATH``).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

import mmcompile as mmc

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from decode import build_model  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama:tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--modes", default="int8,int4,w8a8,fp8")
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    model = build_model(args.model, dtype, args.device) if args.model.startswith("hf-") else \
        mmc.models.build(args.model, dtype=dtype, device=args.device)
    B, S, V = args.batch, args.seq_len, model.config.vocab_size
    pos = torch.arange(S, device=args.device).expand(B, S)
    hf = not hasattr(model, "empty_cache")

    def call(tokens):
        if hf:
            return (), {"input_ids": tokens, "position_ids": pos, "use_cache": False}
        return (tokens, pos, model.empty_cache(B, S)), {}

    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, V, (B, S), generator=g).to(args.device) for _ in range(max(1, args.prompts // B))]
    args0, kw0 = call(batches[0])
    base = mmc.optimize(mmc.capture(model, args0, kw0), "default").program

    def logits(prog, tokens):
        a, k = call(tokens)
        out = prog(*a, **k)
        return (out.logits if hasattr(out, "logits") else out).float()

    ref = [logits(base, t) for t in batches]
    rows = []
    for mode in args.modes.split(","):
        q = mmc.optimize(base, ["quantize_linear", "eliminate_dead_code"],
                         quantize_linear={"mode": mode, "group_size": args.group_size}).program
        agree, kl, n = 0.0, 0.0, 0
        for t, r in zip(batches, ref):
            o = logits(q, t)
            agree += float((o.argmax(-1) == r.argmax(-1)).float().sum())
            kl += float(torch.nn.functional.kl_div(o.log_softmax(-1), r.log_softmax(-1), log_target=True,
                                                   reduction="sum"))
            n += r.shape[0] * r.shape[1]
        counts = q.op_counts()
        row = dict(model=args.model, mode=mode, top1_agreement=agree / n, kl=kl / n, positions=n,
                   quantized_layers=sum(v for k, v in counts.items() if k.startswith("mmcompile.linear_")),
                   device=args.device, dtype=args.dtype, torch=torch.__version__)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")
    print(f"\n{args.model} {args.dtype} on {args.device}: {n} positions of {len(batches) * B} random prompts")
    print("| mode | layers | top-1 agreement with float | mean KL(float || quantized) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['quantized_layers']} | {r['top1_agreement']:.2%} | {r['kl']:.2e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
