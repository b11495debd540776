"""Ahead-of-time artifacts: compile and save a model's Generator, then load it in a fresh process and
time its first token.

    python bench/artifact.py --model llama:7b --backend inductor --out /tmp/llama7b-aot

The first process builds the model (random weights), compiles the Generator (one prefill bucket for the
prompt, the decode step) and saves it; the second imports mmcompile, loads the artifact and generates —
the time from its start to the first token is what a deployment waits for. Both print one JSON line;
the second's breaks the load down (CUDA context, the backend's import, then mmcompile's debug log of
each step: hash checks, weights read to the device, sessions created).
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

T0 = time.perf_counter()

import torch  # noqa: E402


def build_and_save(args) -> dict:
    import mmcompile as mmc

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = mmc.models.build(args.model, dtype=getattr(torch, args.dtype), device=device)
    t0 = time.perf_counter()
    passes = [*mmc.DEFAULT_PIPELINE, "fuse_rmsnorm"] if args.backend == "onnxruntime" else "default"
    gen = mmc.compile_generator(model, backend=args.backend, max_batch=1, max_seq_len=args.max_seq_len,
                                prefill_buckets=[args.prompt_len], passes=passes)
    compile_s = time.perf_counter() - t0
    prompt = [torch.arange(1, args.prompt_len + 1) % model.config.vocab_size]
    want = gen.generate(prompt, args.new_tokens)
    shutil.rmtree(args.out, ignore_errors=True)
    t0 = time.perf_counter()
    gen.save(args.out)
    save_s = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in Path(args.out).rglob("*") if f.is_file())
    torch.save(want.cpu(), f"{args.out}.tokens.pt")
    return dict(phase="compile+save", model=args.model, backend=args.backend, compile_s=compile_s, save_s=save_s,
                artifact_gb=size / 1e9)


def load_and_run(args) -> dict:
    import logging

    import mmcompile as mmc

    imported = time.perf_counter() - T0
    steps = []  # where the load's time goes, from mmcompile's debug log

    class Steps(logging.Handler):
        def emit(self, record):
            steps.append(f"{time.perf_counter() - T0:7.2f} s  {record.getMessage()}")

    logging.getLogger("mmcompile").addHandler(Steps())
    logging.getLogger("mmcompile").setLevel(logging.DEBUG)
    t0 = time.perf_counter()
    if torch.cuda.is_available():
        torch.cuda.init()
        torch.empty(1, device="cuda")  # the CUDA context, which any load pays first
    cuda_init_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    if args.backend == "onnxruntime":
        import onnxruntime  # noqa: F401
    backend_import_s = time.perf_counter() - t0
    # every allocation on the card, ONNX Runtime's included (torch's allocator sees only its own)
    used = (lambda: (lambda free, total: (total - free) / 1e9)(*torch.cuda.mem_get_info())
            if torch.cuda.is_available() else 0.0)
    before = used()
    t0 = time.perf_counter()
    gen = mmc.load(args.out)
    load_s = time.perf_counter() - t0
    used_gb = used() - before
    prompt = [torch.arange(1, args.prompt_len + 1) % gen.vocab_size]
    first = gen.generate(prompt, 1)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    first_token_s = time.perf_counter() - T0
    out = gen.generate(prompt, args.new_tokens)
    want = torch.load(f"{args.out}.tokens.pt")
    return dict(phase="load+generate", model=args.model, backend=args.backend, import_s=imported,
                cuda_init_s=cuda_init_s, backend_import_s=backend_import_s, load_s=load_s, load_steps=steps,
                first_token_s=first_token_s, gpu_gb_taken_by_load=used_gb,
                decode_tok_s=gen.stats.decode_tokens_per_second,
                same_tokens_as_compiled=bool(torch.equal(out.cpu(), want)), first=int(first[0, -1]),
                gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama:7b")
    ap.add_argument("--backend", default="inductor", choices=["inductor", "onnxruntime"])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--out", required=True, help="artifact directory (replaced)")
    ap.add_argument("--json", default=None, help="append the JSON lines here")
    ap.add_argument("--loads", type=int, default=1, help="fresh processes that each load the artifact and time "
                    "their first token (default 1)")
    ap.add_argument("--load-only", action="store_true", help=argparse.SUPPRESS)  # the second process
    args = ap.parse_args(argv)
    if args.load_only:
        rows = [load_and_run(args)]
    else:
        rows = [build_and_save(args)]
        print(json.dumps(rows[0]), flush=True)
        gc.collect()  # the model and its Generator are gone: leave the loading processes the card
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        for _ in range(args.loads):
            child = subprocess.run([sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]),
                                    "--load-only"], capture_output=True, text=True)
            if child.returncode:
                print(child.stderr[-3000:], file=sys.stderr)
                return child.returncode
            rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    if args.load_only:
        print(json.dumps(rows[-1]), flush=True)
    if args.json and not args.load_only:  # the first process writes every row
        with open(args.json, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
