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
    want = prog(tokens, pos, tiny_llama.empty_cache(2, 16))
    for skip, plain in ((True, 2), (False, 5)):
        result = mmc.optimize(prog, ["fuse_rmsnorm", "eliminate_dead_code"], verify=True, fuse_rmsnorm={"skip": skip})
        stats = result.report("fuse_rmsnorm").stats
        assert stats["fused"] == 5  # 2 per layer + the final norm
        # the norms after a residual add whose sum the block reads again: layer 0's second, layer 1's two
        assert stats["fused.skip"] == (3 if skip else 0)
        counts = result.program.op_counts()
        assert counts["mmcompile.rms_norm.default"] == plain and counts["aten.rsqrt.default"] == 0
        assert counts["mmcompile.skip_rms_norm.default"] == 5 - plain
        for backend in ("eager", "inductor"):
            got = mmc.lower(result.program, backend)(tokens, pos, tiny_llama.empty_cache(2, 16))
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_leaves_a_mean_over_another_dimension_alone_and_says_why():
    _, report = testing.check_pass(captured(Norm(dim=16, over=1)), "fuse_rmsnorm", changed=False,
                                   options={"explain": True})
    assert any("not the last" in n for n in report.notes)


def test_leaves_a_computed_weight_alone():
    prog = captured(Norm(learned=False), w=torch.randn(16))
    _, report = testing.check_pass(prog, "fuse_rmsnorm", changed=False, options={"explain": True})
    assert any("constant weight" in n for n in report.notes)


def test_skip_rule_is_idempotent_and_leaves_a_broadcast_add_as_a_plain_norm():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(16))
            self.bias = torch.nn.Parameter(torch.randn(16))

        def norm(self, h):
            hf = h.float()
            return self.w * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(h.dtype)

        def forward(self, x, y):
            h = x + y                 # residual: same shapes, the sum read again below
            g = h + self.bias         # broadcast add: a plain norm
            return self.norm(h) + h, self.norm(g) * g

    prog = mmc.capture(Block(), (torch.randn(3, 16), torch.randn(3, 16)))
    after, report = testing.check_pass(prog, "fuse_rmsnorm", changed=True)
    assert report.stats["fused"] == 2 and report.stats["fused.skip"] == 1
    assert after.op_counts()["mmcompile.skip_rms_norm.default"] == 1
