"""Quality of each quantization mode: next-token agreement and KL divergence against the float model,
and perplexity on a text when there is a real checkpoint.

    python bench/quant_quality.py --model llama:tiny --prompts 256
    python bench/quant_quality.py --model hf-llama:7b --device cuda --dtype bfloat16 --prompts 256 \
        --float32-reference
    python bench/quant_quality.py --model hf:/models/Llama-2-7b-hf --text wiki.test.raw --device cuda \
        --dtype bfloat16 --seq-len 1024 --prompts 64

For random prompts (or, with ``--text``, windows of ``--seq-len`` tokens cut from a local text file),
the float model's logits at every position are compared with those of the same Program after
``quantize_linear`` in each mode: top-1 agreement (the argmax token is the same) and the mean
KL(p_float || p_quantized) of the next-token distributions. Random weights measure the numerical effect
only; quality on language needs a real checkpoint (``hf:PATH``) and a text: with ``--text`` each mode's
perplexity on it is printed beside the float model's (the exponential of the mean negative
log-likelihood of every next token in the windows). The tokenizer is read from ``--tokenizer`` or, for
``hf:PATH``, from the checkpoint directory; nothing is downloaded.
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
    ap.add_argument("--modes", default="int8,int4,w8a8,fp8,fp8-tensor",
                    help="comma-separated quantize_linear modes; fp8-tensor: fp8 with one scale per weight and per "
                         "activation (fp8_scales='tensor')")
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--text", default=None, metavar="FILE",
                    help="a local text file: measure on windows of --seq-len tokens cut from it (up to --prompts "
                         "windows) and print each mode's perplexity")
    ap.add_argument("--tokenizer", default=None, metavar="DIR",
                    help="a local tokenizer directory for --text (default: the checkpoint directory of hf:PATH)")
    ap.add_argument("--float32-reference", action="store_true",
                    help="also compare the unquantized model in --dtype with the same weights in float32: what "
                         "rounding to --dtype alone changes, the floor against which each mode's numbers are read")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    reference32 = args.float32_reference and dtype != torch.float32
    built = torch.float32 if reference32 else dtype
    model = build_model(args.model, built, args.device) if args.model.startswith("hf-") else \
        mmc.models.build(args.model, dtype=built, device=args.device)
    B, S, V = args.batch, args.seq_len, model.config.vocab_size
    pos = torch.arange(S, device=args.device).expand(B, S)
    hf = not hasattr(model, "empty_cache")

    def call(tokens):
        if hf:
            return (), {"input_ids": tokens, "position_ids": pos, "use_cache": False}
        return (tokens, pos, model.empty_cache(B, S)), {}

    if args.text:
        windows = text_windows(args, S)
        if len(windows) < B:
            raise SystemExit(f"--text {args.text} gives {len(windows)} windows of {S} tokens; lower --batch or "
                             "--seq-len, or give a longer text")
        batches = [windows[i:i + B].to(args.device) for i in range(0, len(windows) - B + 1, B)]
    else:
        g = torch.Generator().manual_seed(0)
        batches = [torch.randint(0, V, (B, S), generator=g).to(args.device) for _ in range(max(1, args.prompts // B))]

    def logits(prog, tokens):
        a, k = call(tokens)
        out = prog(*a, **k)
        return (out.logits if hasattr(out, "logits") else out).float()

    args0, kw0 = call(batches[0])
    rows = []
    if reference32:  # the float32 logits first, then the same weights rounded to --dtype become the base
        prog32 = mmc.optimize(mmc.capture(model, args0, kw0), "default").program
        ref32 = [logits(prog32, t) for t in batches]
        del prog32
        model.to(dtype)
        args0, kw0 = call(batches[0])  # the cache in the new dtype
    base = mmc.optimize(mmc.capture(model, args0, kw0), "default").program

    ref = [logits(base, t) for t in batches]
    float_ppl = perplexity(ref, batches) if args.text else None

    def compare(outs, refs):
        agree, kl, n = 0.0, 0.0, 0
        for o, r in zip(outs, refs):
            agree += float((o.argmax(-1) == r.argmax(-1)).float().sum())
            kl += float(torch.nn.functional.kl_div(o.log_softmax(-1), r.log_softmax(-1), log_target=True,
                                                   reduction="sum"))
            n += r.shape[0] * r.shape[1]
        return agree / n, kl / n, n

    def emit(row):
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")

    if reference32:
        agree, kl, n = compare(ref, ref32)
        row = dict(model=args.model, mode=f"{args.dtype}, not quantized (against float32)", top1_agreement=agree,
                   kl=kl, positions=n, quantized_layers=0, device=args.device, dtype=args.dtype,
                   torch=torch.__version__)
        if args.text:
            row.update(text=args.text, perplexity=float_ppl, float_perplexity=perplexity(ref32, batches))
        emit(row)
        del ref32
    for mode in args.modes.split(","):
        options = {"mode": mode, "group_size": args.group_size}
        if mode == "fp8-tensor":
            options.update(mode="fp8", fp8_scales="tensor")
        q = mmc.optimize(base, ["quantize_linear", "eliminate_dead_code"], quantize_linear=options).program
        outs = [logits(q, t) for t in batches]
        agree, kl, n = compare(outs, ref)
        counts = q.op_counts()
        row = dict(model=args.model, mode=mode, top1_agreement=agree, kl=kl, positions=n,
                   quantized_layers=sum(v for k, v in counts.items() if k.startswith("mmcompile.linear_")),
                   device=args.device, dtype=args.dtype, torch=torch.__version__)
        if args.text:
            row.update(text=args.text, perplexity=perplexity(outs, batches), float_perplexity=float_ppl)
        emit(row)
    source = f"windows of {args.text}" if args.text else "random prompts"
    print(f"\n{args.model} {args.dtype} on {args.device}: {n} positions of {len(batches) * B} {source}")
    if args.text:
        print(f"float perplexity: {float_ppl:.3f}")
        print("| mode | layers | top-1 agreement with float | mean KL(float || quantized) | perplexity | vs float |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['mode']} | {r['quantized_layers']} | {r['top1_agreement']:.2%} | {r['kl']:.2e} | "
                  f"{r['perplexity']:.3f} | {r['perplexity'] / r['float_perplexity'] - 1:+.2%} |")
        return 0
    print("| mode | layers | top-1 agreement with float | mean KL(float || quantized) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['quantized_layers']} | {r['top1_agreement']:.2%} | {r['kl']:.2e} |")
    return 0


def text_windows(args, seq_len: int) -> torch.Tensor:
    """Token windows [n, seq_len] cut end to end from the tokenized ``--text`` file (up to ``--prompts``)."""
    from pathlib import Path

    directory = args.tokenizer or (args.model.split(":", 1)[1] if args.model.startswith("hf:") else None)
    if directory is None:
        raise SystemExit("--text needs a tokenizer: give --tokenizer DIR, or a checkpoint as --model hf:PATH")
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError) as e:
        raise SystemExit(f"no tokenizer could be loaded from {directory}: {e}") from None
    ids = tokenizer(Path(args.text).read_text(), add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    n = min(args.prompts, ids.numel() // seq_len)
    return ids[:n * seq_len].reshape(n, seq_len)


def perplexity(logits: list[torch.Tensor], batches: list[torch.Tensor]) -> float:
    """exp of the mean negative log-likelihood of each window's next tokens (positions 1 .. S-1)."""
    nll, count = 0.0, 0
    for lg, t in zip(logits, batches):
        nll += float(torch.nn.functional.cross_entropy(lg[:, :-1].flatten(0, 1).float(), t[:, 1:].flatten(),
                                                       reduction="sum"))
        count += t[:, 1:].numel()
    return float(torch.exp(torch.tensor(nll / count)))


if __name__ == "__main__":
    sys.exit(main())
