"""Registers, spills and programs per multiprocessor of mmcompile's Triton kernels, compiled for a GPU
architecture on any machine — no GPU needed.

    python bench/kernel_resources.py                 # sm_90 (H100), every kernel at its default tiles
    python bench/kernel_resources.py --arch 80       # another architecture

Each kernel is compiled by Triton for the target (``triton.compile`` with a ``GPUTarget``) at the tiles
``mmcompile.kernels.config_for`` picks for the Llama-2-7B decode shapes, and the generated PTX is
assembled by the ``ptxas`` that ships with Triton, whose report gives registers per thread and spill
bytes. Programs per multiprocessor are what the register file (64K 32-bit registers) and the 2048
threads of a multiprocessor allow (shared memory and allocation granularity aside). A kernel
that spills, or that fits few programs per multiprocessor, is where to look first when a profile shows
it below the memory bandwidth; this is a reading of the compiled code, not a measurement of speed.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

REGISTERS_PER_SM = 65536
THREADS_PER_SM = 2048
# Integer arguments that are multiples of 16 at the 7B decode shapes (sizes and row strides of the GEMVs):
# Triton's launcher specializes such values (and every pointer, torch's allocations being aligned), so the
# kernels a card runs read their rows in 16-byte vectors; compiled without it they read one byte at a time.
ALIGNED_INTS = ("N", "K", "KH", "KW", "stride_xm", "stride_wn", "stride_ym", "stride_um", "stride_rm")


def ptxas() -> str:
    import triton

    base = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for name in ("ptxas-blackwell", "ptxas"):  # the newer one reads the PTX versions newer Triton writes
        path = os.path.join(base, name)
        if os.path.exists(path):
            return path
    raise SystemExit(f"no ptxas in {base}: this Triton build has no NVIDIA backend binaries")


def resources(kernel, types: dict, constexprs: dict, num_warps: int, arch: int) -> dict:
    """Compile ``kernel`` (a ``@triton.jit`` function) for ``sm_{arch}`` as a launch specializes it (pointers
    and ``ALIGNED_INTS`` divisible by 16): registers, spill bytes, programs/SM and the widest global load in
    bytes."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if not isinstance(kernel, triton.runtime.jit.JITFunction):  # under TRITON_INTERPRET=1: compile the source
        kernel = triton.runtime.jit.JITFunction(kernel.fn)
    names = kernel.arg_names
    unknown = set(constexprs) - set(names)
    if unknown:
        raise ValueError(f"{kernel.__name__} has no argument(s) {sorted(unknown)}")
    signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n not in constexprs
               and (signature[n].startswith("*") or (n in ALIGNED_INTS and signature[n] == "i32"))}
    src = ASTSource(kernel, signature, constexprs={(names.index(k),): v for k, v in constexprs.items()},
                    attrs=aligned)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as d:
        ptx = os.path.join(d, "k.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        r = subprocess.run([ptxas(), f"-arch=sm_{arch}{suffix}", "-v", ptx, "-o", os.path.join(d, "k.cubin")],
                           capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"ptxas failed on {kernel.__name__}: {r.stderr.strip()[-500:]}")
    regs = int(re.search(r"Used (\d+) registers", r.stderr).group(1))
    spills = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", r.stderr))
    threads = 32 * num_warps
    ptx_text = compiled.asm["ptx"]
    widest = max([int(v) * int(b) // 8 for v, b in re.findall(r"ld\.global[.\w]*?\.v(\d)\.b(\d+)", ptx_text)]
                 + [int(b) // 8 for b in re.findall(r"ld\.global[.\w]*?\.[bu](\d+)\s", ptx_text)]
                 + [int(n, 0) for n in re.findall(r"cp\.async\.c[ag]\.shared\.global[^;]*?\],\s*(0x[0-9a-f]+|\d+)",
                                                  ptx_text)]
                 or [0])
    return {"registers": regs, "spill_bytes": spills, "warps": num_warps, "widest_load_bytes": widest,
            "programs_per_sm": min(REGISTERS_PER_SM // (regs * threads), THREADS_PER_SM // threads)}


def cases():
    """(label, kernel, argument types, constexprs, warps) for each kernel at its default tiles."""
    import torch

    from mmcompile import decode_attention, hstu_attention, kernels, prefill_attention

    bf16 = {n: "*bf16" for n in ("x_ptr", "w_ptr", "s_ptr", "b_ptr", "y_ptr", "g_ptr", "u_ptr", "r_ptr", "z_ptr",
                                 "q_ptr", "k_ptr", "v_ptr", "o_ptr", "pw_ptr", "tw_ptr")}
    gemv = {**bf16, "eps": "fp32"}
    plain = dict(HAS_SCALE=False, HAS_BIAS=False, USE_DOT=False, NORM=False, GLU=False, HAS_RES=False, INT8_CVT=0,
                 PDL=False, GDC=False, STAGES=0, VEC=1)

    def tiles(kind, prologue=None, m=1):
        c = dict(kernels.config_for(kind, m, 4096, 4096, prologue))
        return c.pop("num_warps"), c

    w, c = tiles("bf16")
    yield "GEMV bf16, one row", kernels._gemv_kernel, gemv, {**plain, **c}, w
    yield "GEMV bf16 + residual add", kernels._gemv_kernel, gemv, {**plain, **c, "HAS_RES": True}, w
    w, c = tiles("bf16", "norm")
    yield "GEMV bf16 with its RMSNorm", kernels._gemv_kernel, gemv, {**plain, **c, "NORM": True}, w
    yield "GEMV bf16 with its RMSNorm, launched dependently (PDL)", kernels._gemv_kernel, gemv, \
        {**plain, **c, "NORM": True, "PDL": True, "GDC": True}, w
    w, c = tiles("bf16", "glu")
    yield "GEMV bf16 with the SiLU gate + residual", kernels._gemv_kernel, gemv, \
        {**plain, **c, "GLU": True, "HAS_RES": True}, w
    w, c = tiles("int8")
    for cvt in kernels.INT8_CONVERSIONS:
        default = " (default)" if cvt == "prmt" else ""
        yield f"GEMV int8, one row, conversion {cvt}{default}", kernels._gemv_kernel, {**gemv, "w_ptr": "*i8"}, \
            {**plain, **c, "HAS_SCALE": True, "INT8_CVT": kernels.INT8_CONVERSIONS.index(cvt)}, w
    yield "GEMV int8, one row, launched dependently (PDL, as a replayed decode step runs it)", kernels._gemv_kernel, \
        {**gemv, "w_ptr": "*i8"}, {**plain, **c, "HAS_SCALE": True, "INT8_CVT": 2, "PDL": True, "GDC": True}, w
    w, c = tiles("int8", "norm")
    yield "GEMV int8 with its RMSNorm, launched dependently", kernels._gemv_kernel, {**gemv, "w_ptr": "*i8"}, \
        {**plain, **c, "HAS_SCALE": True, "INT8_CVT": 2, "NORM": True, "PDL": True, "GDC": True}, w
    yield "GEMV int8, 16 x 1024 tile, runs of 16 inputs per accumulator (VEC), launched dependently", \
        kernels._gemv_kernel, {**gemv, "w_ptr": "*i8"}, {**plain, **c, "BLOCK_N": 16, "BLOCK_K": 1024, "VEC": 16,
                                                          "HAS_SCALE": True, "INT8_CVT": 2, "PDL": True, "GDC": True}, w
    w, c = tiles("bf16", m=8)
    yield "GEMV bf16, 8 rows (tl.dot)", kernels._gemv_kernel, gemv, {**plain, **c, "USE_DOT": True}, w
    w, c = tiles("int4")
    yield "GEMV int4 (groups of 128), one row", kernels._gemv_int4_kernel, {**bf16, "p_ptr": "*u8"}, \
        dict(HAS_BIAS=False, USE_DOT=False, BLOCK_N=c["BLOCK_N"], GROUPS=c["GROUPS"], GROUP_BYTES=64), w
    attention = {**bf16, "m_ptr": "*i1", "lse_ptr": "*fp32", "out_ptr": "*bf16", "count_ptr": "*i32", "scale": "fp32",
                 "o_ptr": "*fp32", "pos_ptr": "*i64", "cos_ptr": "*bf16", "sin_ptr": "*bf16"}
    split = dict(G=1, GP=16, D=128, BLOCK_N=64, SPLITS=8, SP=8)
    yield "decode attention (split-KV), 32 heads of 128", decode_attention._decode_kernel, attention, \
        dict(split, HAS_MASK=True, APPEND=False, ROPE=False, GDC=False), 4
    yield "decode attention with rotary and the cache write", decode_attention._decode_kernel, attention, \
        dict(split, HAS_MASK=False, APPEND=True, ROPE=True, GDC=False), 4
    yield "decode attention with rotary and the cache write, launched dependently", decode_attention._decode_kernel, \
        attention, dict(split, HAS_MASK=False, APPEND=True, ROPE=True, GDC=True), 4
    cfg = prefill_attention.config_for(128, torch.device("cuda"))
    warps = cfg.pop("num_warps")
    cfg.pop("num_stages")
    yield "prefill attention (position-bounded), 32 heads of 128", prefill_attention._prefill_kernel, \
        {**bf16, "pos_ptr": "*i64", "qk_scale": "fp64"}, dict(cfg, G=1, D=128), warps
    hstu = {**bf16, "m_ptr": "*i1", "b_ptr": "*bf16", "scale": "fp32", "p_ptr": "*i64", "t_ptr": "*i64",
            "time_divisor": "fp32", "len_ptr": "*i64", "hist_ptr": "*i64"}
    rule = dict(DQK=32, DV=32, PQK=32, PV=32, BLOCK_M=64, BLOCK_N=64, HAS_BIAS=False, HAS_MASK=False,
                HAS_POS=True, HAS_TIME=True, HAS_LEN=True, HAS_HIST=True, IEEE=False)
    yield "HSTU attention (relative bias, visibility rule)", hstu_attention._hstu_kernel, hstu, rule, \
        hstu_attention.NUM_WARPS


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, help="compute capability as an integer (90: H100)")
    args = ap.parse_args(argv)
    from mmcompile.kernels import triton

    if triton is None:
        raise SystemExit("triton is not installed: pip install triton")
    print(f"| kernel (sm_{args.arch}) | warps | registers / thread | spill bytes | programs / SM | widest load |")
    print("|---|---|---|---|---|---|")
    for label, kernel, types, constexprs, warps in cases():
        r = resources(kernel, types, constexprs, warps, args.arch)
        print(f"| {label} | {r['warps']} | {r['registers']} | {r['spill_bytes']} | {r['programs_per_sm']} | "
              f"{r['widest_load_bytes']} B |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
