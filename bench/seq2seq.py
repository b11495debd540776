"""Encoder-decoder decode benchmark: an unmodified transformers BART of the bart-large shape.

    python bench/seq2seq.py                              # batch 1, 128-token source, 128 new tokens, bf16
    python bench/seq2seq.py --batch 8 --systems eager,mmcompile

Systems, measured in the same run on the same card:
- ``eager``: ``model.generate`` (dynamic cache; the cross-attention cache is computed at the first step).
- ``static-compile``: ``model.generate(cache_implementation="static")`` with the decoder step under
  ``torch.compile`` -- transformers' documented fast path, where this model supports it.
- ``mmcompile``: ``compile_generator(model)`` (inductor; the cross-attention cache written once by prefill
  and kept, the self-attention cache rewritten into static buffers, K-step CUDA graphs).

Random weights (speed does not depend on values). Prints one table; ``--json`` appends JSON lines.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import mmcompile as mmc

SHAPES = {  # bart-large (facebook/bart-large config.json) and a tiny one for a CPU smoke run
    "large": dict(vocab_size=50265, d_model=1024, encoder_layers=12, decoder_layers=12, encoder_attention_heads=16,
                  decoder_attention_heads=16, encoder_ffn_dim=4096, decoder_ffn_dim=4096,
                  max_position_embeddings=1024),
    "tiny": dict(vocab_size=128, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                 decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=256),
}


def build(shape: str, dtype, device):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BartConfig(**SHAPES[shape], forced_eos_token_id=None, forced_bos_token_id=None,
                                  attn_implementation="sdpa")
    return transformers.BartForConditionalGeneration(cfg).to(device, dtype).eval()


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_hf(model, sources, new_tokens, **extra) -> dict:
    ids = torch.stack(sources).to(model.device)
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None, num_beams=1, **extra)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=8, min_new_tokens=8, **kw)  # warm-up (and compile, for the static path)
        _sync(model.device)
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        _sync(model.device)
        t1 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
        _sync(model.device)
        t2 = time.perf_counter()
    first = t1 - t0
    return {"ttft_ms": first * 1e3, "tok_s": (new_tokens - 1) / max((t2 - t1) - first, 1e-9), "tokens": out}


def time_mmcompile(gen, sources, new_tokens) -> dict:
    gen.generate(sources, 8)  # warm-up
    out = gen.generate(sources, new_tokens)
    s = gen.stats
    return {"ttft_ms": s.prefill_seconds * 1e3, "tok_s": s.decode_tokens_per_second, "tokens": out}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="large", choices=sorted(SHAPES))
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--source-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--systems", default="eager,static-compile,mmcompile")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None, help="append JSON lines here")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    model = build(args.shape, dtype, args.device)
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    sources = [torch.randint(3, vocab, (args.source_len,), generator=g) for _ in range(args.batch)]
    rows = []
    for system in args.systems.split(","):
        t0 = time.perf_counter()
        try:
            if system == "eager":
                r = time_hf(model, sources, args.new_tokens)
                compile_s = 0.0
            elif system == "static-compile":
                model.generation_config.cache_implementation = "static"
                model.generation_config.compile_config = None
                model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=False)
                r = time_hf(model, sources, args.new_tokens)
                compile_s = time.perf_counter() - t0
                del model.forward  # back to the class's forward
                model.generation_config.cache_implementation = None
            elif system == "mmcompile":
                gen = mmc.compile_generator(model, max_batch=args.batch, max_seq_len=args.new_tokens + 8,
                                            max_source_len=args.source_len, prefill_buckets=[args.source_len])
                compile_s = time.perf_counter() - t0
                r = time_mmcompile(gen, [s.to(args.device) for s in sources], args.new_tokens)
                r["cuda_graphs"] = gen.cuda_graphs
            else:
                raise SystemExit(f"unknown system {system!r}: choose from eager, static-compile, mmcompile")
        except SystemExit:
            raise
        except Exception as e:  # a peer that does not run on this model is reported, not fatal
            rows.append({"system": system, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"})
            continue
        r.update(system=system, compile_s=compile_s)
        rows.append(r)
    base = next((r["tok_s"] for r in rows if r["system"] == "eager" and "tok_s" in r), None)
    ref = next((r["tokens"] for r in rows if r["system"] == "eager" and "tokens" in r), None)
    print(f"\nBART {args.shape}, {args.dtype}, batch {args.batch}, source {args.source_len}, {args.new_tokens} new tokens, "
          f"{torch.cuda.get_device_name() if args.device == 'cuda' else args.device}")
    print(f"{'system':<16}{'tok/s':>10}{'vs eager':>10}{'TTFT ms':>10}{'compile s':>11}  tokens = eager")
    for r in rows:
        if "error" in r:
            print(f"{r['system']:<16}  failed: {r['error']}")
            continue
        same = "-" if ref is None or r["system"] == "eager" else \
            f"{(r['tokens'].cpu() == ref.cpu()[:, :r['tokens'].shape[1]]).float().mean():.0%}"
        ratio = f"{r['tok_s'] / base:.2f}x" if base else "-"
        print(f"{r['system']:<16}{r['tok_s']:>10.1f}{ratio:>10}{r['ttft_ms']:>10.1f}{r['compile_s']:>11.1f}  {same}")
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps({k: v for k, v in r.items() if k != "tokens"} | {
                    "shape": args.shape, "batch": args.batch, "source_len": args.source_len,
                    "new_tokens": args.new_tokens, "dtype": args.dtype,
                    "device": torch.cuda.get_device_name() if args.device == "cuda" else args.device}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
