import torch, mmcompile as mmc
from mmcompile.testing import relative_error
S = 2048
torch.manual_seed(0)
model = mmc.models.build("llama:7b", dtype=torch.bfloat16, device="cuda", attn_impl="eager", max_seq_len=S)
cache = model.empty_cache(1, S)
tokens = torch.randint(0, model.config.vocab_size, (1, S), device="cuda")
pos = torch.arange(S, device="cuda")[None]
out_pos = torch.tensor([S - 1], device="cuda")
lg = lambda o: (o[0] if isinstance(o, (tuple, list)) else o).float()
with torch.no_grad():
    bf = lg(model(tokens, pos, cache, output_pos=out_pos))
    prog = mmc.capture(model, (tokens, pos, cache), {"output_pos": out_pos})
    outs = {}
    for name, passes, backend in (("eager-backend fused", "default", "eager"), ("inductor fused", "default", "inductor")):
        c = mmc.lower(mmc.optimize(prog, passes).program, backend)
        outs[name] = lg(c(tokens, pos, cache, output_pos=out_pos)); del c
    # fp32 truth on half the layers' worth of memory: move to fp32
    model = model.float(); cache = model.empty_cache(1, S)
    f32 = lg(model(tokens, pos, cache, output_pos=out_pos))
print("logit scale", f32.abs().max().item(), f32.std().item())
print("eager bf16 vs fp32", relative_error(bf, f32))
for k, v in outs.items():
    print(k, "vs eager bf16", relative_error(v, bf), "vs fp32", relative_error(v, f32))
print("top1 eager bf16/fp32/inductor", bf.argmax().item(), f32.argmax().item(), outs["inductor fused"].argmax().item())
