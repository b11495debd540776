"""Testing utilities for passes — what a user calls in their own CI, and what our tests use.

    from mmcompile import testing
    prog = mmc.capture(MyBlock(), (x,))
    after, report = testing.check_pass(
        prog, "canonicalize",
        changed=True,
        checks="CHECK: aten.permute\\nCHECK-NOT: aten.transpose",
        op_counts={"aten.transpose.int": 0},
    )

``check_pass`` runs the pass on a copy, verifies the Program's invariants, compares numerics with the
Program before the pass on its example inputs (outputs and in-place state), applies FileCheck directives
to the printed IR, checks op counts, and checks that a second run changes nothing.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.utils._pytree as pytree

from mmcompile.pipeline import Pass, PassReport
from mmcompile.program import Program

__all__ = ["run_pass", "run_program", "relative_error", "assert_close", "check_numerics", "assert_op_counts", "filecheck",
           "check_pass", "attention_modules"]


def _as_pass(p: str | Pass) -> Pass:
    from mmcompile import passes

    return passes.get(p) if isinstance(p, str) else p


def run_pass(program: Program, pass_: str | Pass, *, verify: bool = True, **options: Any) -> tuple[Program, PassReport]:
    """Run one pass on a copy of ``program`` with the contract enforced; returns (new program, report)."""
    p = _as_pass(pass_)
    out = program.clone()
    report = p(out, options, check_contract=True)
    if verify:
        out.verify()
    return out, report


def _clone_inputs(inputs):
    return [x.clone() if isinstance(x, torch.Tensor) else x for x in inputs]


def run_program(program: Program | Any, inputs: list[Any] | None = None) -> tuple[list[Any], list[Any]]:
    """Run a Program (or Compiled) on copies of flat inputs; returns (flat outputs, inputs after the run)."""
    prog = program if isinstance(program, Program) else program.program
    flat = _clone_inputs(inputs if inputs is not None else prog.example_inputs)
    runner = program.run_flat
    outs = runner(flat)
    return list(outs), flat


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """The largest difference of ``actual`` from ``expected``, as a fraction of ``expected``'s largest
    magnitude (1 where that is 0): one number for "how far is a compiled result from the reference",
    meaningful across layers and dtypes. NaN when either holds a NaN."""
    a, e = actual.detach().float(), expected.detach().float()
    return ((a - e).abs().max() / (e.abs().max().item() or 1.0)).item()


def assert_close(actual: Any, expected: Any, *, rtol: float = 1e-5, atol: float = 1e-5, msg: str = "") -> None:
    """``torch.testing.assert_close`` over matching pytrees, with a message naming the leaf that differs.

    NaNs in the same places are equal: a Program compared with itself must pass.
    """
    a_leaves, a_spec = pytree.tree_flatten(actual)
    e_leaves, e_spec = pytree.tree_flatten(expected)
    if a_spec != e_spec:
        raise AssertionError(f"{msg}structure differs: {a_spec} vs {e_spec}")
    for i, (a, e) in enumerate(zip(a_leaves, e_leaves)):
        if isinstance(e, torch.Tensor):
            torch.testing.assert_close(a, e, rtol=rtol, atol=atol, equal_nan=True,
                                       msg=lambda m: f"{msg}leaf {i}: {m}")
        elif a != e:
            raise AssertionError(f"{msg}leaf {i}: {a!r} != {e!r}")


def check_numerics(reference: Program | Any, candidate: Program | Any, inputs: list[Any] | None = None, *,
                   rtol: float = 1e-5, atol: float = 1e-5) -> None:
    """Outputs and in-place state of ``candidate`` equal ``reference``'s on the same flat inputs."""
    ref_prog = reference if isinstance(reference, Program) else reference.program
    inputs = inputs if inputs is not None else ref_prog.example_inputs
    ref_out, ref_state = run_program(reference, inputs)
    out, state = run_program(candidate, inputs)
    assert_close(out, ref_out, rtol=rtol, atol=atol, msg="outputs: ")
    assert_close(state, ref_state, rtol=rtol, atol=atol, msg="inputs after the run (state): ")


def assert_op_counts(program: Program, expected: Mapping[str, int]) -> None:
    """Each named op appears exactly that many times (0: absent). Names as in ``Program.op_counts()``."""
    counts = program.op_counts()
    wrong = {name: (counts.get(name, 0), n) for name, n in expected.items() if counts.get(name, 0) != n}
    if wrong:
        detail = ", ".join(f"{k}: found {got}, expected {want}" for k, (got, want) in wrong.items())
        raise AssertionError(f"op counts of {program.name} differ: {detail}\n{program}")


def filecheck(program_or_text: Program | str, checks: str) -> None:
    """Apply FileCheck directives (``CHECK:``, ``CHECK-NEXT:``, ``CHECK-NOT:``, ``CHECK-COUNT-N:``) to the IR text."""
    text = str(program_or_text)
    # torch's FileCheck reads directives only after a '#' comment marker: accept bare `CHECK: ...` lines too
    checks = "\n".join(f"# {line.strip()}" if line.strip().startswith("CHECK") else line
                       for line in checks.splitlines())
    try:
        torch.testing.FileCheck().run(checks, text)
    except RuntimeError as e:
        raise AssertionError(f"FileCheck failed: {e}\n--- IR ---\n{text}") from None


def check_pass(
    program: Program,
    pass_: str | Pass,
    *,
    changed: bool | None = None,
    checks: str | None = None,
    op_counts: Mapping[str, int] | None = None,
    numerics: bool = True,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    idempotent: bool = True,
    options: Mapping[str, Any] | None = None,
) -> tuple[Program, PassReport]:
    """Run ``pass_`` and check everything a pass promises. Returns (program after, report)."""
    p = _as_pass(pass_)
    after, report = run_pass(program, p, **dict(options or {}))
    if changed is not None and report.changed != changed:
        raise AssertionError(
            f"pass {p.name} reported changed={report.changed}, expected {changed}; stats={dict(report.stats)} "
            f"notes={report.notes}\n{after}"
        )
    if checks:
        filecheck(after, checks)
    if op_counts:
        assert_op_counts(after, op_counts)
    if numerics:
        tol = (p.tolerance, p.tolerance) if not p.exact and p.tolerance is not None else (rtol, atol)
        check_numerics(program, after, rtol=tol[0], atol=tol[1])
    if idempotent:
        again, second = run_pass(after, p, **dict(options or {}))
        if second.changed or str(again) != str(after):
            raise AssertionError(f"pass {p.name} is not idempotent: second run reported {dict(second.stats)}")
    return after, report


# ---------------------------------------------------------------------------------------- strategies
def attention_modules(*, dtypes=(torch.float32, torch.bfloat16), max_heads: int = 4, max_len: int = 9):
    """Hypothesis strategy of ``(module, args)``: softmax attention written in the ways models write it.

    Varies batch, heads, grouped-query ratio (repeat_kv expand+reshape or repeat_interleave), head dim,
    query/key lengths (self- and cross-attention), dtype, layout ([B,H,S,D], [B,S,H,D] with transposes,
    the 3-D bmm form, q/k/v split from one fused projection), scale placement (on the scores by mul or
    div, on q alone, on q and k, or none) and value, softmax upcast to fp32, per-head QK-norm, and masks
    (none, boolean via masked_fill/where with -inf or finfo.min, additive float, causal from tril or
    arange, ALiBi-style bias). Every generated module is attention a fusion pass should fuse.
    """
    from hypothesis import strategies as st

    @st.composite
    def build(draw):
        dtype = draw(st.sampled_from(list(dtypes)))
        B = draw(st.integers(1, 2))
        H = draw(st.sampled_from([h for h in (1, 2, 4, 8) if h <= max_heads]))
        Hkv = draw(st.sampled_from([h for h in (1, 2, 4, 8) if h <= H and H % h == 0]))
        D = draw(st.sampled_from([4, 8, 16]))
        S = draw(st.integers(1, max_len))
        cross = draw(st.booleans())
        T = draw(st.integers(1, max_len)) if cross else S
        spec = dict(
            B=B, H=H, Hkv=Hkv, D=D, S=S, T=T, cross=cross, dtype=dtype,
            layout=draw(st.sampled_from(["bhsd", "bshd", "bmm3d"])),
            fused_qkv=(not cross) and draw(st.booleans()),
            repeat=draw(st.sampled_from(["repeat_kv", "repeat_interleave"])),
            scale_at=draw(st.sampled_from(["scores_mul", "scores_div", "q", "qk", "none"])),
            scale=draw(st.sampled_from([D ** -0.5, 0.125, 1.7])),
            upcast=draw(st.booleans()),
            qk_norm=draw(st.booleans()),
            mask=draw(st.sampled_from(["none", "bool_inf", "bool_min", "additive", "causal", "alibi"]
                                      if S == T else ["none", "bool_inf", "bool_min", "additive", "alibi"])),
        )
        module = _AttentionModule(**spec).eval().to(dtype)
        gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
        x = torch.randn(B, S, module.E, generator=gen).to(dtype)
        args = [x]
        if cross:
            args.append(torch.randn(B, T, module.E, generator=gen).to(dtype))
        if spec["mask"] in ("bool_inf", "bool_min"):
            keep = torch.rand(B, 1, 1, T, generator=gen) > 0.3
            keep[..., 0] = True  # every query sees at least one key
            args.append(keep)
        elif spec["mask"] == "additive":
            add = torch.where(torch.rand(B, 1, S, T, generator=gen) > 0.3, 0.0, float("-inf"))
            add[..., 0] = 0.0
            args.append(add.to(dtype))
        return module, tuple(args)

    return build()


class _AttentionModule(torch.nn.Module):
    def __init__(self, *, B, H, Hkv, D, S, T, cross, dtype, layout, fused_qkv, repeat, scale_at, scale, upcast,
                 qk_norm, mask):
        super().__init__()
        self.H, self.Hkv, self.D, self.S, self.T = H, Hkv, D, S, T
        self.E = H * D
        self.cross, self.layout, self.fused_qkv, self.repeat = cross, layout, fused_qkv, repeat
        self.scale_at, self.scale, self.upcast, self.mask = scale_at, scale, upcast, mask
        kv = Hkv * D
        if fused_qkv:
            self.qkv = torch.nn.Linear(self.E, self.E + 2 * kv, bias=False)
        else:
            self.wq = torch.nn.Linear(self.E, self.E, bias=False)
            self.wk = torch.nn.Linear(self.E, kv, bias=False)
            self.wv = torch.nn.Linear(self.E, kv, bias=False)
        self.q_norm = torch.nn.LayerNorm(D) if qk_norm else None
        self.k_norm = torch.nn.LayerNorm(D) if qk_norm else None
        if mask == "alibi":
            slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)])
            dist = torch.arange(T)[None, :] - torch.arange(S)[:, None]
            self.register_buffer("alibi", slopes[:, None, None] * dist[None].float())  # [H, S, T]

    def _heads(self, x, n):  # [B, L, n*D] -> [B, n, L, D]
        B, L, _ = x.shape
        return x.view(B, L, n, self.D).transpose(1, 2)

    def _repeat(self, x):  # [B, Hkv, T, D] -> [B, H, T, D]
        r = self.H // self.Hkv
        if r == 1:
            return x
        if self.repeat == "repeat_interleave":
            return x.repeat_interleave(r, dim=1)
        B, n, L, D = x.shape
        return x[:, :, None, :, :].expand(B, n, r, L, D).reshape(B, n * r, L, D)

    def forward(self, x, *rest):
        rest = list(rest)
        y = rest.pop(0) if self.cross else x
        mask_in = rest.pop(0) if rest else None
        kvd = self.Hkv * self.D
        if self.fused_qkv:
            q, k, v = self.qkv(x).split([self.E, kvd, kvd], dim=-1)
        else:
            q, k, v = self.wq(x), self.wk(y), self.wv(y)
        q, k, v = self._heads(q, self.H), self._heads(k, self.Hkv), self._heads(v, self.Hkv)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        k, v = self._repeat(k), self._repeat(v)
        if self.scale_at == "q":
            q = q * self.scale
        elif self.scale_at == "qk":
            q, k = q * self.scale ** 0.5, k * self.scale ** 0.5
        B, H, S, T, D = q.shape[0], self.H, self.S, self.T, self.D
        flat = self.layout == "bmm3d"  # the 3-D form: scores [B*H, S, T] all the way to the softmax

        def fit(m):  # a mask broadcastable to [B, H, S, T], shaped for the scores
            return m.expand(B, H, S, T).reshape(B * H, S, T) if flat else m

        if flat:
            scores = torch.bmm(q.reshape(B * H, S, D), k.reshape(B * H, T, D).transpose(1, 2))
        elif self.layout == "bshd":
            qs, ks = q.transpose(1, 2), k.transpose(1, 2)  # [B, S, H, D]
            scores = qs.transpose(1, 2) @ ks.permute(0, 2, 3, 1)
        else:
            scores = q @ k.transpose(-2, -1)
        if self.scale_at == "scores_mul":
            scores = scores * self.scale
        elif self.scale_at == "scores_div":
            scores = scores / (1.0 / self.scale)
        if self.mask == "bool_inf":
            scores = scores.masked_fill(~fit(mask_in), float("-inf"))
        elif self.mask == "bool_min":
            scores = torch.where(fit(mask_in), scores, torch.finfo(scores.dtype).min)
        elif self.mask == "additive":
            scores = scores + fit(mask_in)
        elif self.mask == "causal":
            causal = torch.arange(T, device=scores.device)[None, :] <= torch.arange(S, device=scores.device)[:, None]
            scores = scores.masked_fill(~causal, float("-inf"))
        elif self.mask == "alibi":
            scores = scores + fit(self.alibi.to(scores.dtype))
        if self.upcast:
            probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        else:
            probs = torch.softmax(scores, dim=-1)
        if flat:
            return torch.bmm(probs, v.reshape(B * H, T, D)).view(B, H, S, D)
        return probs @ v
