"""quantize_linear mode=auto on the 7B decode step, H100: per distinct layer shape, the times and choice."""
import time, torch, mmcompile as mmc
from mmcompile import testing
model = mmc.models.build("llama:7b", device="cuda", dtype=torch.bfloat16)
call = (torch.randint(0, 32000, (1, 1), device="cuda"), torch.full((1, 1), 64, device="cuda"), model.empty_cache(1, 512))
program = mmc.optimize(mmc.capture(model, call), mmc.DEFAULT_PIPELINE).program
for budget in (0.01, 0.011, 0.2):
    t0 = time.perf_counter()
    after, report = testing.run_pass(program, "quantize_linear", mode="auto", error_budget=budget, verify=False)
    print(f"budget {budget}: {time.perf_counter() - t0:.1f} s")
    seen = set()
    for name, e in after.metadata["quantization"].items():
        key = (name.split(".")[-2] if "." in name else name.split("_")[-3], e["mode"])
        if key in seen: continue
        seen.add(key)
        print(name, e.get("shape"), e["mode"], {m: f"{v:.1f}" for m, v in e["times_us"].items()}, {m: f"{v:.4f}" for m, v in e["errors"].items()})
    print([n for n in report.notes if n.startswith("auto")])
    from collections import Counter
    print(Counter(e["mode"] for e in after.metadata["quantization"].values()))
