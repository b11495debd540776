"""fuse_rmsnorm: RMSNorm as one mmcompile::rms_norm op, checked against the unfused graph."""

import pytest
import torch

import mmcompile as mmc
from mmcompile import testing


class Norm(torch.nn.Module):
    """transformers' LlamaRMSNorm, with knobs that break the pattern."""

    def __init__(self, dim=16, over=-1, learned=True):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(dim))
        self.over, self.learned = over, learned

    def forward(self, x, w=None):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(self.over, keepdim=True) + 1e-6)
        return (self.weight if self.learned else w) * xf.to(x.dtype)


def captured(module, dtype=torch.float32, **extra):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16).to(dtype)
    args = (x,) + tuple(extra.values())
    return mmc.optimize(mmc.capture(module.to(dtype), args), ["canonicalize"]).program


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fuses_rmsnorm_with_and_without_the_float_upcast(dtype):
    checks = """
    CHECK: = mmcompile.rms_norm(%x, %weight, 1e-06)
    CHECK-NOT: aten.rsqrt
    CHECK: return
    """
    after, report = testing.check_pass(captured(Norm(), dtype), "fuse_rmsnorm", changed=True, checks=None,
                                       rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=1e-2 if dtype == torch.bfloat16 else 1e-6)
    after = mmc.optimize(after, ["eliminate_dead_code"]).program
    testing.filecheck(after, checks)
    assert report.stats["fused"] == 1


def test_fuses_every_norm_of_a_llama_and_every_backend_agrees(tiny_llama):
    tokens, pos = torch.randint(0, 256, (2, 1)), torch.full((2, 1), 3)
    prog = mmc.optimize(mmc.capture(tiny_llama, (tokens, pos, tiny_llama.empty_cache(2, 16))), "default").program
    result = mmc.optimize(prog, ["fuse_rmsnorm", "eliminate_dead_code"], verify=True)
    assert result.report("fuse_rmsnorm").stats["fused"] == 5  # 2 per layer + the final norm
    after = result.program
    assert after.op_counts()["mmcompile.rms_norm.default"] == 5 and after.op_counts()["aten.rsqrt.default"] == 0
    want = prog(tokens, pos, tiny_llama.empty_cache(2, 16))
    for backend in ("eager", "inductor"):
        got = mmc.lower(after, backend)(tokens, pos, tiny_llama.empty_cache(2, 16))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_leaves_a_mean_over_another_dimension_alone_and_says_why():
    _, report = testing.check_pass(captured(Norm(dim=16, over=1)), "fuse_rmsnorm", changed=False,
                                   options={"explain": True})
    assert any("not the last" in n for n in report.notes)


def test_leaves_a_computed_weight_alone():
    prog = captured(Norm(learned=False), w=torch.randn(16))
    _, report = testing.check_pass(prog, "fuse_rmsnorm", changed=False, options={"explain": True})
    assert any("constant weight" in n for n in report.notes)
