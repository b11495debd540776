"""Tests of the pass pipeline (mmcompile/pipeline.py) and the pass registry (mmcompile/passes/__init__.py).

Registry, ordering by ``requires``, the verifier between passes, the Pass contract, error chaining,
instrumentation (print-after-change, numbered dumps, timing, bisect) and the default pipeline end to end
on our tiny Llama. Custom passes are registered under ``tp_*`` names and unregistered after each test.
"""

import pytest
import torch

import mmcompile as mmc
from mmcompile import testing


def new_node(pass_, graph, target, args=(), kwargs=None, *, val=None):
    """A tagged node with a hand-set meta["val"] (the verifier tests set wrong ones on purpose)."""
    node = graph.call_function(target, tuple(args), dict(kwargs or {}))
    pass_.tag(node)
    if val is not None:
        node.meta["val"] = val
    return node

aten = torch.ops.aten


class Toy(torch.nn.Module):
    """relu(linear(x)).sum(-1): canonicalize changes it (positive_dims); the other built-ins do not."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        return torch.relu(self.lin(x)).sum(-1)


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv("MMCOMPILE_VERIFY", raising=False)
    monkeypatch.delenv("MMCOMPILE_BISECT", raising=False)


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    return mmc.capture(Toy(), (torch.randn(2, 4),))


@pytest.fixture
def register():
    """register(cls, **kw) for the test's duration; every name it registered is unregistered afterwards."""
    added = []

    def _register(cls, **kw):
        added.append(cls.name)
        return mmc.passes.register(cls, **kw)

    yield _register
    for name in added:
        mmc.passes.unregister(name)


def make_pass(name, run=None, requires=()):
    """A Pass subclass named ``name``; the default run appends the name to ``LOG`` and changes nothing."""

    def _log_run(self, program, options):
        LOG.append((self.name, dict(options)))
        return self.report()

    return type(f"Pass_{name}", (mmc.Pass,), {"name": name, "requires": tuple(requires), "run": run or _log_run})


LOG: list = []


@pytest.fixture(autouse=True)
def _clear_log():
    LOG.clear()


def _nodes(program):
    return {n.name: n for n in program.graph.nodes}


# ---------------------------------------------------------------------------------------------- registry


def test_registry_lists_the_builtins():
    names = mmc.passes.names()
    assert {"canonicalize", "fold_constants", "eliminate_dead_code"} <= set(names)
    assert names == sorted(names)
    assert set(mmc.DEFAULT_PIPELINE) <= set(names)
    p = mmc.passes.get("canonicalize")
    assert isinstance(p, mmc.Pass) and p.name == "canonicalize" and p.summary()
    assert mmc.passes.get("canonicalize") is not p  # a fresh instance each time


def test_unknown_pass_suggests_the_close_name():
    with pytest.raises(mmc.PipelineError, match=r"unknown pass 'canonicalise'; did you mean 'canonicalize'\?"):
        mmc.passes.get("canonicalise")
    with pytest.raises(mmc.PipelineError, match=r"unknown pass 'zzz' Known passes: .*canonicalize"):
        mmc.passes.get("zzz")


def test_register_custom_pass(register, toy):
    cls = register(make_pass("tp_custom"))
    assert "tp_custom" in mmc.passes.names()
    assert isinstance(mmc.passes.get("tp_custom"), cls)
    assert register(cls) is cls  # registering the same class again is harmless
    result = mmc.optimize(toy, "tp_custom")
    assert result.pipeline == ["tp_custom"] and LOG == [("tp_custom", {"explain": False})]


def test_register_duplicate_name_needs_override(register):
    register(make_pass("tp_dup"))
    other = make_pass("tp_dup")
    with pytest.raises(mmc.PipelineError, match=r"'tp_dup' is already registered; pass override=True"):
        register(other)
    register(other, override=True)
    assert isinstance(mmc.passes.get("tp_dup"), other)


def test_register_as_decorator_and_unregister(register):
    @mmc.passes.register()
    class Decorated(mmc.Pass):
        name = "tp_decorated"

    try:
        assert "tp_decorated" in mmc.passes.names()
    finally:
        mmc.passes.unregister("tp_decorated")
    assert "tp_decorated" not in mmc.passes.names()
    mmc.passes.unregister("tp_decorated")  # unknown names are ignored


def test_register_rejects_non_passes_and_bad_names():
    with pytest.raises(mmc.PipelineError, match="needs a Pass subclass"):
        mmc.passes.register(object)
    with pytest.raises(mmc.PipelineError, match="letters, digits and '_'"):
        mmc.passes.register(make_pass("tp-dash"))
    with pytest.raises(mmc.PipelineError, match="letters, digits and '_'"):
        mmc.passes.register(make_pass(""))
    assert "tp-dash" not in mmc.passes.names()


# ---------------------------------------------------------------------------------------------- ordering


def test_requirements_run_first(register, toy):
    register(make_pass("tp_a", requires=("tp_b",)))
    register(make_pass("tp_b"))
    result = mmc.optimize(toy, ["tp_a", "tp_b"])
    assert result.pipeline == ["tp_b", "tp_a"]
    assert [name for name, _ in LOG] == ["tp_b", "tp_a"]
    assert [r.name for r in result.reports] == ["tp_b", "tp_a"]


def test_independent_passes_keep_the_listed_order(toy):
    result = mmc.optimize(toy, ["eliminate_dead_code", "canonicalize"])
    assert result.pipeline == ["eliminate_dead_code", "canonicalize"]


def test_missing_requirement_names_both_passes(register, toy):
    register(make_pass("tp_a", requires=("tp_b",)))
    register(make_pass("tp_b"))
    with pytest.raises(mmc.PipelineError, match=r"pass 'tp_a' requires 'tp_b' to run earlier.*add 'tp_b' before 'tp_a'"):
        mmc.optimize(toy, ["tp_a", "canonicalize"])
    assert LOG == []  # nothing ran


def test_requirement_cycle(register, toy):
    register(make_pass("tp_a", requires=("tp_b",)))
    register(make_pass("tp_b", requires=("tp_a",)))
    with pytest.raises(mmc.PipelineError, match=r"cycle: (tp_a -> tp_b -> tp_a|tp_b -> tp_a -> tp_b)"):
        mmc.optimize(toy, ["tp_a", "tp_b"])


def test_duplicate_pass_in_the_list(toy):
    with pytest.raises(mmc.PipelineError, match=r"'canonicalize' appears 2 times"):
        mmc.optimize(toy, ["canonicalize", "fold_constants", "canonicalize"])
    with pytest.raises(mmc.PipelineError, match=r"appears 2 times"):
        mmc.optimize(toy, "canonicalize,canonicalize")


def test_pipeline_spellings(toy):
    assert mmc.optimize(toy, "default").pipeline == list(mmc.DEFAULT_PIPELINE)
    assert mmc.optimize(toy).pipeline == list(mmc.DEFAULT_PIPELINE)
    assert mmc.optimize(toy, " eliminate_dead_code , canonicalize ").pipeline == ["eliminate_dead_code", "canonicalize"]
    for nothing in ("none", "", []):
        result = mmc.optimize(toy, nothing)
        assert result.pipeline == [] and result.reports == []
        assert str(result.program) == str(toy)
    instance = mmc.passes.get("canonicalize")
    assert mmc.optimize(toy, [instance]).pipeline == ["canonicalize"]
    with pytest.raises(mmc.PipelineError, match="unknown pass 'canonicalise'; did you mean 'canonicalize'"):
        mmc.optimize(toy, "canonicalise")


# ---------------------------------------------------------------------------------------------- verifier


def _insert_linear(self, program, options):
    """Replace addmm(b, x, permute(w)) by the non-core aten.linear(x, w, b), with a correct meta val."""
    report = self.report()
    n = _nodes(program)
    addmm = n["addmm"]
    with program.graph.inserting_after(addmm):
        lin = new_node(self, program.graph, aten.linear.default, (n["x"], n["lin_weight"], n["lin_bias"]),
                       val=addmm.meta["val"])
    addmm.replace_all_uses_with(lin)
    program.graph.erase_node(addmm)
    report.count("linear")
    return report


def _wrong_shape(self, program, options):
    """Add relu(x) whose meta val claims f32[3, 3] (x is f32[2, 4])."""
    report = self.report()
    x = _nodes(program)["x"]
    with x.meta["val"].fake_mode:
        bad = torch.empty(3, 3)
    with program.graph.inserting_after(x):
        new_node(self, program.graph, aten.relu.default, (x,), val=bad)
    report.count("relu")
    return report


def _write_intermediate(self, program, options):
    """copy_ into relu's result: an in-place write to a value that is not a state input."""
    report = self.report()
    n = _nodes(program)
    relu = n["relu"]
    with program.graph.inserting_after(relu):
        new_node(self, program.graph, aten.copy_.default, (relu, n["addmm"]), val=relu.meta["val"])
    report.count("copy")
    return report


def test_verifier_rejects_a_non_core_op(register, toy):
    register(make_pass("tp_linear", run=_insert_linear))
    with pytest.raises(mmc.PipelineError) as info:
        mmc.optimize(toy, ["canonicalize", "tp_linear"], verify=True)
    msg = str(info.value)
    assert "pass 'tp_linear' failed after ['canonicalize']" in msg
    assert "(made by pass tp_linear)" in msg
    assert "aten.linear.default is not an ATen core op" in msg
    assert isinstance(info.value.__cause__, mmc.VerificationError)


def test_without_verify_the_non_core_op_goes_through(register, toy):
    register(make_pass("tp_linear", run=_insert_linear))
    result = mmc.optimize(toy, ["tp_linear"], verify=False)
    assert result.program.op_counts()["aten.linear.default"] == 1
    assert result.report("tp_linear").stats == {"linear": 1}
    testing.check_numerics(toy, result.program)


def test_env_turns_verification_on(register, toy, monkeypatch):
    register(make_pass("tp_linear", run=_insert_linear))
    monkeypatch.setenv("MMCOMPILE_VERIFY", "1")
    with pytest.raises(mmc.PipelineError, match="not an ATen core op"):
        mmc.optimize(toy, ["tp_linear"])


def test_verifier_catches_a_wrong_meta_val(register, toy):
    register(make_pass("tp_shape", run=_wrong_shape))
    with pytest.raises(mmc.PipelineError,
                       match=r"pass 'tp_shape' failed after \[\].*node %relu\w* claims f32\[3, 3\] but its inputs "
                             r"give f32\[2, 4\]"):
        mmc.optimize(toy, ["tp_shape"], verify=True)


def test_verifier_catches_an_in_place_write_to_a_non_state_value(register, toy):
    register(make_pass("tp_write", run=_write_intermediate))
    with pytest.raises(mmc.PipelineError, match=r"pass 'tp_write'.*in-place op aten\.copy_\.default writes %relu; "
                                                 r"in-place updates are allowed only on state inputs"):
        mmc.optimize(toy, ["tp_write"], verify=True)


# ---------------------------------------------------------------------------------------------- contract


def _returns_none(self, program, options):
    return None


def _silent_change(self, program, options):
    x = _nodes(program)["x"]
    with program.graph.inserting_after(x):
        new_node(self, program.graph, aten.neg.default, (x,), val=x.meta["val"])
    return self.report()  # changed=False: a lie


def _claims_change(self, program, options):
    report = self.report()
    report.count("nothing")
    return report


def test_pass_returning_none_breaks_the_contract(register, toy):
    register(make_pass("tp_none", run=_returns_none))
    for verify in (True, False):
        with pytest.raises(mmc.PassContractError, match=r"pass tp_none returned NoneType, not a PassReport"):
            mmc.optimize(toy, ["tp_none"], verify=verify)


def test_pass_hiding_a_change_breaks_the_contract(register, toy):
    register(make_pass("tp_silent", run=_silent_change))
    with pytest.raises(mmc.PassContractError, match=r"pass 'tp_silent' failed after \[\].*changed the graph but "
                                                     r"reported changed=False"):
        mmc.optimize(toy, ["tp_silent"], verify=True)
    # Unchecked without verify: the pass's own report stands.
    assert mmc.optimize(toy, ["tp_silent"], verify=False).report("tp_silent").changed is False


def test_claimed_change_without_a_graph_change_is_corrected(register, toy):
    register(make_pass("tp_claims", run=_claims_change))
    assert mmc.optimize(toy, ["tp_claims"], verify=True).report("tp_claims").changed is False


def test_failure_names_the_pass_and_what_ran_before(register, toy):
    def boom(self, program, options):
        raise RuntimeError("boom")

    register(make_pass("tp_boom", run=boom))
    with pytest.raises(mmc.PipelineError,
                       match=r"^pass 'tp_boom' failed after \['canonicalize'\]: RuntimeError: boom$") as info:
        mmc.optimize(toy, ["canonicalize", "tp_boom"])
    assert isinstance(info.value.__cause__, RuntimeError)


# ---------------------------------------------------------------------------------------------- instrumentation


def test_print_after_change_prints_only_changed_passes(toy, capsys):
    result = mmc.optimize(toy, print_after_change=True)
    out = capsys.readouterr().out
    assert [r.changed for r in result.reports] == [True, False, False, False, False]
    assert "IR after canonicalize (canonicalize: positive_dims=1" in out
    assert "aten.sum.dim_IntList(%relu, [1])" in out
    assert "IR after fold_constants" not in out and "IR after eliminate_dead_code" not in out
    assert "IR after fuse_attention" not in out
    mmc.optimize(toy)
    assert capsys.readouterr().out == ""


def test_dump_dir_writes_numbered_ir(toy, tmp_path):
    dump = tmp_path / "dumps"
    result = mmc.optimize(toy, dump_dir=dump)
    files = sorted(p.name for p in dump.iterdir())
    assert files == ["000_input.txt", "001_canonicalize.txt", "002_fold_constants.txt", "003_fuse_attention.txt",
                     "004_fuse_linears.txt", "005_eliminate_dead_code.txt"]
    assert (dump / "000_input.txt").read_text() == str(toy) + "\n"
    after_canon = (dump / "001_canonicalize.txt").read_text()
    assert after_canon.startswith("program Toy(%x: f32[2, 4]) {")
    assert "[1])" in after_canon and "[-1])" not in after_canon
    assert (dump / "005_eliminate_dead_code.txt").read_text() == str(result.program) + "\n"


def test_every_report_is_timed_and_counts_ops(toy):
    result = mmc.optimize(toy)
    assert all(r.seconds > 0 for r in result.reports)
    canon = result.report("canonicalize")
    assert canon.stats == {"positive_dims": 1}
    assert canon.ops_before["aten.sum.dim_IntList"] == 1 == canon.ops_after["aten.sum.dim_IntList"]
    assert "canonicalize: positive_dims=1 (" in result.summary()
    with pytest.raises(KeyError, match="no pass named 'fuse' ran"):
        result.report("fuse")


def test_bisect_runs_only_the_first_passes(toy, capsys):
    result = mmc.optimize(toy, bisect=1)
    assert result.pipeline == ["canonicalize"]
    assert ("bisect: running ['canonicalize'], skipping ['fold_constants', 'fuse_attention', 'fuse_linears', "
            "'eliminate_dead_code']" in capsys.readouterr().out)
    assert mmc.optimize(toy, bisect=0).pipeline == []
    assert mmc.optimize(toy, bisect=10).pipeline == list(mmc.DEFAULT_PIPELINE)
    with pytest.raises(mmc.PipelineError, match="bisect limit must be >= 0"):
        mmc.optimize(toy, bisect=-1)


def test_bisect_from_the_environment(toy, monkeypatch):
    monkeypatch.setenv("MMCOMPILE_BISECT", "2")
    assert mmc.optimize(toy).pipeline == ["canonicalize", "fold_constants"]
    assert mmc.optimize(toy, bisect=1).pipeline == ["canonicalize"]  # the argument wins
    monkeypatch.setenv("MMCOMPILE_BISECT", "two")
    with pytest.raises(mmc.PipelineError, match="MMCOMPILE_BISECT must be an integer, got 'two'"):
        mmc.optimize(toy)


def test_pass_options_reach_the_pass_and_unknown_ones_are_rejected(register, toy):
    register(make_pass("tp_opts"))
    mmc.optimize(toy, ["tp_opts"], explain=True, tp_opts={"threshold": 3})
    assert LOG == [("tp_opts", {"threshold": 3, "explain": True})]
    with pytest.raises(mmc.PipelineError, match=r"options given for unknown pass\(es\) \['nosuch_pass'\]"):
        mmc.optimize(toy, nosuch_pass={"x": 1})
    # a pass that says which options it reads refuses any other, naming them: a misspelling never passes
    with pytest.raises(mmc.PipelineError, match=r"quantize_linear: unknown option\(s\) 'fp8_scale'; it takes mode, "
                                                 r"layers, .*fp8_scales"):
        mmc.optimize(toy, ["quantize_linear"], quantize_linear={"mode": "fp8", "fp8_scale": "tensor"})
    with pytest.raises(mmc.PipelineError, match="canonicalize: unknown option.* it takes none"):
        mmc.optimize(toy, ["canonicalize"], canonicalize={"aggressive": True})


def test_progress_is_called_before_each_pass(toy):
    seen = []
    mmc.optimize(toy, progress=seen.append)
    assert seen == list(mmc.DEFAULT_PIPELINE)


def test_optimize_does_not_mutate_its_input(toy):
    before, counts, constants = str(toy), toy.op_counts(), toy.constants()
    result = mmc.optimize(toy, verify=True)
    assert result.program is not toy and str(result.program) != before
    assert str(toy) == before and toy.op_counts() == counts
    assert toy.constants().keys() == constants.keys()
    assert all(toy.constants()[k] is v for k, v in constants.items())


def test_in_place_mutates_the_program(toy):
    prog = toy.clone()
    result = mmc.optimize(prog, in_place=True)
    assert result.program is prog
    assert str(prog) == str(result.program) != str(toy)


# ---------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def llama_decode():
    model = mmc.models.build("llama:tiny")
    g = torch.Generator().manual_seed(0)
    cache = [(torch.randn(k.shape, generator=g), torch.randn(v.shape, generator=g)) for k, v in model.empty_cache(2, 16)]
    return mmc.capture(model, (torch.tensor([[3], [200]]), torch.tensor([[4], [11]]), cache))


def test_default_pipeline_on_llama_decode_keeps_numerics_and_is_idempotent(llama_decode):
    result = mmc.optimize(llama_decode, verify="full")
    assert result.pipeline == list(mmc.DEFAULT_PIPELINE)
    assert result.report("canonicalize").changed
    testing.check_numerics(llama_decode, result.program)
    assert result.program.op_counts()["aten.scaled_dot_product_attention.default"] == 2
    assert len(result.program.state_inputs()) == 4

    again = mmc.optimize(result.program, verify=True)
    assert [(r.name, r.changed) for r in again.reports] == [(n, False) for n in mmc.DEFAULT_PIPELINE]
    assert str(again.program) == str(result.program)


def test_passes_that_already_ran_satisfy_requirements():
    import torch

    class M(torch.nn.Module):
        def forward(self, x):
            return torch.relu(x).sum(-1)

    prog = mmc.capture(M(), (torch.randn(2, 3),))
    with pytest.raises(mmc.PipelineError, match="requires 'canonicalize'"):
        mmc.optimize(prog, ["fuse_attention"])
    step = mmc.optimize(prog, ["canonicalize"]).program
    assert step.metadata["applied_passes"] == ["canonicalize"]
    result = mmc.optimize(step, ["fuse_attention"])
    assert result.pipeline == ["fuse_attention"]
    assert result.program.metadata["applied_passes"] == ["canonicalize", "fuse_attention"]
