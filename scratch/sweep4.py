import itertools, sys
sys.path.insert(0, "bench")
import gemv
def configs(kind, M):
    if kind != "int4_words":
        return []
    out = []
    for bn, g, nw, st in itertools.product((1, 2, 4, 8, 16), (4, 8, 16, 32), (2, 4, 8), (1, 2, 3)):
        if bn * g * 16 // (32 * nw) > 32 or bn * g * 16 // (32 * nw) < 1:
            continue  # words per thread
        out.append({"BLOCK_N": bn, "GROUPS": g, "num_warps": nw, "STAGES": st, "INT4_CVT": "prmt"})
    return out
gemv.sweep_configs = configs
sys.exit(gemv.main(sys.argv[1:]))
