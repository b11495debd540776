"""How fast a weights file reaches the GPU: ``mmcompile.backends.read_spans`` over threads and piece
sizes, against hashing the file (the artifact check) and a memory map copied with ``.to("cuda")``.

    python bench/read_spans.py /tmp/a7/prefill_64/model.onnx.data     # a 7B ONNX Runtime artifact's weights

Run it on a file in the page cache (load the artifact once first) to measure the host and the copy, not
the disk. Prints one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", help="a large file, e.g. an artifact's model.onnx.data")
    ap.add_argument("--spans", type=int, default=256, help="the file cut into this many spans (default 256)")
    ap.add_argument("--json", default=None, help="append the JSON lines here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/read_spans.py measures copies to a CUDA device; there is none here", file=sys.stderr)
        return 2
    from mmcompile import artifact
    from mmcompile.backends import read_spans

    size = os.stat(args.path).st_size
    step = -(-size // args.spans)
    spans = {i: (i * step, min(step, size - i * step)) for i in range(args.spans) if i * step < size}
    torch.empty(1, device="cuda")  # the CUDA context first
    rows = []

    def record(row):
        rows.append(row)
        print(json.dumps(row), flush=True)

    for workers, chunk in [(1, 16), (2, 16), (4, 16), (8, 16), (16, 16), (4, 64), (8, 64), (8, 4)]:
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = read_spans(args.path, spans, "cuda", chunk=chunk << 20, workers=workers)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
        record(dict(what="read_spans", workers=workers, chunk_mib=chunk, s=dt, gbps=size / dt / 1e9))
        del out
        gc.collect()
        torch.cuda.empty_cache()
    artifact._DIGESTS.clear()
    t = time.perf_counter()
    artifact._sha256(args.path)
    dt = time.perf_counter() - t
    record(dict(what="sha256 chunks, 16 threads", s=dt, gbps=size / dt / 1e9))
    import numpy as np

    t = time.perf_counter()
    mapped = np.memmap(args.path, dtype=np.uint8, mode="c")
    torch.from_numpy(mapped[: size // 4]).to("cuda")
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    record(dict(what="memmap quarter .to(cuda)", s=dt, gbps=size / 4 / dt / 1e9))
    if args.json:
        with open(args.json, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
