"""Where compile_generator spends its time: one line per stage, for a model spec of bench/decode.py.

    python bench/compile_time.py --model hf-llama:7b
"""

from __future__ import annotations

import argparse
import cProfile
import json
import sys
import time

import torch

import mmcompile as mmc

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from decode import build_model  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="hf-llama:7b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--inductor-config", type=json.loads, default={},
                    help='torch._inductor.config overrides as JSON, e.g. \'{"loop_ordering_after_fusion": false}\'')
    ap.add_argument("--regions", default="auto", choices=["off", "auto", "on"],
                    help="inductor backend option regions: 'auto' (default) compiles each distinct decoder "
                         "layer once on CUDA, 'off' compiles whole graphs")
    ap.add_argument("--decode-tokens", type=int, default=0,
                    help="then decode this many tokens greedily and print tok/s (CUDA), to see what a setting costs")
    ap.add_argument("--check-layers", type=int, default=0,
                    help="also check greedy tokens against model.generate in float32 on a model cut to N layers")
    ap.add_argument("--layers", type=int, default=0,
                    help="cut the model to its first N decoder layers (compile time grows with depth; 0 keeps all)")
    ap.add_argument("--cprofile", metavar="FILE",
                    help="also write a cProfile of the compile to FILE (read it with python -m pstats FILE)")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(args.model, getattr(torch, args.dtype), device)
    if args.layers:
        cut_layers(model, args.layers)
    marks = [("start", time.perf_counter())]
    profiler = cProfile.Profile() if args.cprofile else None
    if profiler:
        profiler.enable()
    gen = mmc.compile_generator(model, max_batch=1, max_seq_len=args.max_seq_len,
                                prefill_buckets=sorted({args.prompt_len, args.max_seq_len}),
                                backend_options={"inductor_config": args.inductor_config, "regions": args.regions},
                                progress=lambda stage: marks.append((stage, time.perf_counter())))
    marks.append(("done", time.perf_counter()))
    if profiler:
        profiler.disable()
        profiler.dump_stats(args.cprofile)
    print("| stage | seconds |\n|---|---|")
    for (stage, t), (_, t_next) in zip(marks, marks[1:]):
        print(f"| {stage} | {t_next - t:.1f} |")
    print(f"| total | {marks[-1][1] - marks[0][1]:.1f} |")
    if args.decode_tokens:
        prompt = [torch.randint(0, model.config.vocab_size, (args.prompt_len,))]
        gen.generate(prompt, 16)
        gen.generate(prompt, args.decode_tokens)
        print(f"decode: {gen.stats.decode_tokens_per_second:.1f} tok/s, inductor config {args.inductor_config}, "
              f"regions {args.regions}")
    if args.check_layers:
        del gen
        cut = build_model(args.model, torch.float32, device)
        cut_layers(cut, args.check_layers)
        gen = mmc.compile_generator(cut, max_batch=2, max_seq_len=128)
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, cut.config.vocab_size, (n,), generator=g) for n in (9, 30)]
        out = gen.generate(prompts, 48)
        for row, p in zip(out, prompts):
            ref = cut.generate(p[None].to(device), max_new_tokens=48, do_sample=False, eos_token_id=None,
                               pad_token_id=0)[0]
            same = (row[: ref.numel()] == ref).float().mean().item()
            print(f"float32, {args.check_layers} layers, prompt {p.numel()}: tokens equal to model.generate: {same:.0%}")
    return 0


def cut_layers(model, n: int) -> None:
    """Keep the first ``n`` decoder layers of a transformers causal LM or an mmcompile Llama."""
    if hasattr(model, "model") and hasattr(model.model, "layers"):  # transformers
        model.model.layers = model.model.layers[:n]
        model.config.num_hidden_layers = n
    else:
        model.layers = model.layers[:n]
        model.config.n_layers = n


if __name__ == "__main__":
    sys.exit(main())
