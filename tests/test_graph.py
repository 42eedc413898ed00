"""The stage graph declared once: refresh closure, argument resolution, declaration checks.

    pytest tests/test_graph.py -q
"""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.pipeline import GRAPH
from tasks.config import PipelineConfig, Precision, Stage
from tasks.graph import PRECISION, Config, Graph, Instance, Node, Rerun, RunPlan

P = [Precision.fp32, Precision.int8]


def _ids(stages: list[str]) -> set[str]:
    return GRAPH.refreshed(stages, P)


def test_refresh_validate_reruns_validation_only() -> None:
    assert _ids(["validate"]) == {"validate", "validate-fp32", "validate-int8"}


def test_refresh_build_reruns_build_verify_repair_profile_and_package() -> None:
    assert _ids(["build"]) == {f"{s}-{p.value}" for s in ("build", "verify", "repair", "profile") for p in P} | {"package"}


def test_refresh_follows_true_dependencies() -> None:
    everything = {i.id for i in GRAPH.instances(P)}
    assert _ids(["data"]) == everything
    # export's descendants: not data or train
    assert _ids(["export"]) == everything - {"data", "train"}
    # verify feeds only the package stage (which ships what passed): refreshing it re-verifies and re-packages
    assert _ids([Stage.verify]) == {"verify-fp32", "verify-int8", "package"}
    assert _ids(["precision"]) == {f"{s}-{p.value}" for s in ("precision", "validate", "build", "verify", "repair", "profile") for p in P} | {"package"}
    assert _ids(["package"]) == {"package"}


def test_every_stage_is_in_the_graph_and_the_config_names_them() -> None:
    assert GRAPH.stages() == [s.value for s in Stage]
    text = GRAPH.describe()
    for s in Stage:
        assert s.value in text


def test_a_branch_node_takes_its_own_branchs_artifact_and_shared_ones_otherwise() -> None:
    verify = Instance(next(n for n in GRAPH.nodes if n.name == "verify"), Precision.int8)
    from types import SimpleNamespace

    done: dict[str, object] = {i.id: i.id for i in GRAPH.instances(P)}
    done["train"] = train = SimpleNamespace(digest="t", meta={})  # no memory plan: the profile stays
    cfg = PipelineConfig(precisions=P)
    args = GRAPH.arguments(verify, cfg, done)
    assert args["engine"] == "build-int8" and args["checkpoint"] is train and args["data"] == "data"
    assert args["batch"] == cfg.batch
    assert args["precision"] is Precision.int8
    assert args["tolerance"] == cfg.tolerance(Precision.int8)
    build = Instance(next(n for n in GRAPH.nodes if n.name == "build"), Precision.fp32)
    assert GRAPH.resolve(build, "validate").id == "validate-fp32"
    assert GRAPH.resolve(Instance(GRAPH.nodes[0]), "data").id == "data"


def test_the_declaration_is_checked() -> None:
    def f(**_: object) -> None: ...

    with pytest.raises(ValueError, match="not declared before"):
        Graph(Node("b", f, {"x": "a"}), Node("a", f))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="declared twice"):
        Graph(Node("a", f), Node("a", f))  # type: ignore[arg-type]
    g = Graph(Node("a", f), Node("b", f, {"x": "a", "p": PRECISION, "c": Config("seed")}, per_precision=True))  # type: ignore[arg-type]
    assert [i.id for i in g.instances(P)] == ["a", "b-fp32", "b-int8"]


def test_profile_runs_last_and_only_when_enabled() -> None:
    (profile,) = [n for n in GRAPH.nodes if n.name == "profile"]
    assert profile.last and profile.when is not None
    off = PipelineConfig.model_validate({"profile": {"enabled": False}})
    assert profile.when.read(off, None) is False


def test_the_docs_show_the_declared_graph() -> None:
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "pipeline.md").read_text()
    assert GRAPH.describe() in doc, "docs/pipeline.md is stale: paste GRAPH.describe() into it"


def test_repair_recovers_verify_for_fp16_and_int8_only() -> None:
    (repair,) = [n for n in GRAPH.nodes if n.name == "repair"]
    assert repair.recovers == "verify" and repair.when is not None and "if verify fails" in GRAPH.describe()
    cfg = PipelineConfig()
    assert [repair.when.read(cfg, p) for p in Precision] == [False, True, True, True]  # fp32 is never repaired
    off = PipelineConfig.model_validate({"repair": {"enabled": False}})
    assert not any(repair.when.read(off, p) for p in Precision)
    with pytest.raises(ValueError, match="not declared before"):
        Graph(Node("fix", lambda **_: None, per_precision=True, recovers="check", stands_in=lambda r, root: {}))  # type: ignore[arg-type, return-value]


class _Fixable(Exception):
    recoverable = True

    def __init__(self, artifact: str) -> None:
        super().__init__("fails its gate")
        self.artifact = artifact


def _toy_graph(calls: list[str], failing: set[str], fixes: bool = True) -> Graph:
    """a (shared) -> b, check per precision; fix recovers check; t (last) and g (gather) read b."""

    def stage(name: str):
        def fn(store, refresh, precision=None, **kw):  # noqa: ANN001, ANN202
            tag = f"{name}-{precision.value}" if precision else name
            calls.append(tag)
            if tag in failing:
                raise _Fixable(f"verdict of {tag}")
            if name == "g":
                return f"g({','.join(sorted(kw['bs']))})"
            return tag if name != "t" else f"t({kw['b']})"

        return fn

    def stands_in(ref: str, root: Path) -> dict[str, str]:
        if not fixes:
            raise RuntimeError("the fix did not pass")
        return {"b": f"{ref}/b", "check": f"{ref}/check"}

    return Graph(  # type: ignore[arg-type]
        Node("a", stage("a")),
        Node("b", stage("b"), {"x": "a", "precision": PRECISION}, per_precision=True),
        Node("check", stage("check"), {"y": "b", "precision": PRECISION}, per_precision=True),
        Node("fix", stage("fix"), {"y": "b", "precision": PRECISION}, per_precision=True, recovers="check", stands_in=stands_in),
        Node("t", stage("t"), {"b": "b", "precision": PRECISION}, per_precision=True, last=True),
        Node("g", stage("g"), {"bs": "b"}, gather=True),
    )


def _cfg(tmp_path: Path) -> PipelineConfig:
    return PipelineConfig(artifacts_dir=tmp_path, precisions=[Precision.fp32, Precision.int8], backend="onnxruntime")


def test_run_plain_runs_the_flows_phases_and_a_recovery_only_where_it_is_needed(tmp_path) -> None:
    from tasks.graph import _Plain, run_plain, schedule

    calls: list[str] = []
    refs = run_plain(_toy_graph(calls, failing={"check-int8"}), _cfg(tmp_path))
    # shared first; every branch; the recovery for the failed one only; last nodes (int8's twice: on the
    # recovery's stand-ins and on what they replaced); then the gather
    assert calls == ["a", "b-fp32", "b-int8", "check-fp32", "check-int8", "fix-int8", "t-fp32", "t-int8", "t-int8", "g"]
    # the recovery's stand-ins replace the branch's artifacts for what runs after it
    assert refs["b-int8"] == "fix-int8/b" and refs["check-int8"] == "fix-int8/check"
    assert refs["t-int8"] == "t(fix-int8/b)" and refs["t-fp32"] == "t(b-fp32)"
    assert refs["g"] == "g(fp32,int8)"
    out = schedule(RunPlan.of(_toy_graph([], failing={"check-int8"}), _cfg(tmp_path), tmp_path), _Plain())  # type: ignore[arg-type]
    int8 = out.branches[Precision.int8]
    assert int8.passed and int8.recovered_by == "fix" and int8.recovery == "fix-int8"
    assert int8.replaced == {"b": "b-int8"} and int8.replaced_late == {"t": "t(b-int8)"}


def test_schedule_tells_the_executor_which_instances_a_planned_recovery_stands_behind(tmp_path) -> None:
    """The Prefect executor makes only those failures a Cached result that the recovery then reads."""
    from tasks.graph import _Plain, schedule

    told: dict[str, bool] = {}

    class Recorder(_Plain):
        def shared(self, inst, args, recovered=False):  # type: ignore[no-untyped-def]
            told[inst.id] = recovered
            return super().shared(inst, args, recovered)

        def submit(self, inst, args, after, recovered=False):  # type: ignore[no-untyped-def]
            told.setdefault(inst.id, recovered)
            return super().submit(inst, args, after, recovered)

    plan = RunPlan.of(_toy_graph([], failing={"check-int8"}), _cfg(tmp_path), tmp_path)  # type: ignore[arg-type]
    assert plan.recoverable == {"check-fp32", "check-int8"}
    schedule(plan, Recorder())
    assert {i for i, r in told.items() if r} == {"check-fp32", "check-int8"} and told["a"] is False and told["b-int8"] is False


def test_a_failed_recovery_fails_the_branch_and_the_others_still_finish(tmp_path) -> None:
    from tasks.graph import _Plain, schedule

    calls: list[str] = []
    out = schedule(RunPlan.of(_toy_graph(calls, failing={"check-int8"}, fixes=False), _cfg(tmp_path), tmp_path), _Plain())  # type: ignore[arg-type]
    int8, fp32 = out.branches[Precision.int8], out.branches[Precision.fp32]
    assert (int8.failed, str(int8.error), int8.verdict) == ("fix", "the fix did not pass", "verdict of check-int8")
    assert fp32.passed and fp32.late == {"t": "t(b-fp32)"}
    assert "t-int8" not in calls and out.gathered == {"g": "g(fp32)"}  # the gather sees only the passed branch
    assert [str(e) for e in out.errors] == ["the fix did not pass"]


def test_nothing_passed_skips_the_gather_and_raises_the_first_failure(tmp_path) -> None:
    from tasks.graph import _Plain, run_plain, schedule

    calls: list[str] = []
    out = schedule(RunPlan.of(_toy_graph(calls, failing={"b-fp32", "b-int8"}), _cfg(tmp_path), tmp_path), _Plain())  # type: ignore[arg-type]
    assert calls == ["a", "b-fp32", "b-int8"]  # a failed upstream stops its branch; no recovery for a non-recovered node
    assert out.gathered == {} and out.not_gathered == {"g": "no variant passed its gates"} and out.branches[Precision.fp32].failed == "b"
    with pytest.raises(_Fixable, match="fails its gate"):
        run_plain(_toy_graph([], failing={"b-fp32"}), _cfg(tmp_path))


def test_a_recovery_node_must_say_what_it_stands_in_for() -> None:
    def f(**_: object) -> None: ...

    with pytest.raises(ValueError, match="stands_in"):
        Graph(Node("a", f, per_precision=True), Node("fix", f, {"x": "a"}, per_precision=True, recovers="a"))  # type: ignore[arg-type]


def test_a_derived_argument_reads_config_and_shared_artifacts_and_counts_as_an_edge() -> None:
    from tasks.graph import Derived

    def f(**_: object) -> None: ...

    def pick(seed: int, a: str) -> str:
        return f"{a}:{seed}"

    g = Graph(Node("a", f), Node("b", f, {"x": Derived(pick, (Config("train.seed"), "a"))}, per_precision=True))  # type: ignore[arg-type]
    (b,) = [i for i in g.instances([Precision.fp32]) if i.node.name == "b"]
    assert g.arguments(b, PipelineConfig(), {"a": "A"}) == {"x": "A:0"}
    assert g.refreshed(["a"], [Precision.fp32]) == {"a", "b-fp32"}
    assert "x←pick(config.train.seed, a)" in g.describe()
    with pytest.raises(ValueError, match="shared nodes only"):
        Graph(Node("a", f, per_precision=True), Node("b", f, {"x": Derived(pick, (Config("seed"), "a"))}, per_precision=True))  # type: ignore[arg-type]


def test_every_engine_stage_takes_the_batch_fitted_to_memory() -> None:
    from flows.pipeline import BATCH

    for name in ("build", "verify", "profile"):
        (node,) = [n for n in GRAPH.nodes if n.name == name]
        assert node.inputs["batch"] is BATCH and "train" in node.upstream
    # repair builds and verifies through its rerun of the branch: those nodes, with their batch
    (repair,) = [n for n in GRAPH.nodes if n.name == "repair"]
    (rerun,) = [s for s in repair.inputs.values() if isinstance(s, Rerun)]
    assert "batch" not in repair.inputs and (rerun.vary, rerun.give["engine"], rerun.give["verification"]) == ("precision", "build", "verify")


def test_a_gather_node_takes_every_passed_branch_and_the_whole_config() -> None:
    (package,) = [n for n in GRAPH.nodes if n.name == "package"]
    assert package.gather and not package.per_precision and package is GRAPH.nodes[-1]
    assert package.when is not None and "over the passed precisions" in GRAPH.describe()
    inst = Instance(package)
    cfg = PipelineConfig(precisions=P)
    # int8's branch failed: the flow hands the gather node only fp32's artifacts
    done = {"data": "D", "train": "T", "build-fp32": "B32", "verify-fp32": "V32", "profile-fp32": "P32"}
    args = GRAPH.arguments(inst, cfg, done)
    assert args["engines"] == {"fp32": "B32"} and args["verifications"] == {"fp32": "V32"} and args["profiles"] == {"fp32": "P32"}
    assert args["config"] is cfg and args["checkpoint"] == "T"
    assert GRAPH.upstream_ids(inst, P) == ["build-fp32", "build-int8", "verify-fp32", "verify-int8", "profile-fp32", "profile-int8", "train", "data"]


def test_gather_nodes_are_declared_shared_and_last() -> None:
    def f(**_: object) -> None: ...

    g = Graph(Node("a", f, per_precision=True), Node("all", f, {"x": "a"}, gather=True))  # type: ignore[arg-type]
    assert g.refreshed(["a"], P) == {"a-fp32", "a-int8", "all"}
    with pytest.raises(ValueError, match="must be shared"):
        Graph(Node("a", f, per_precision=True), Node("all", f, {"x": "a"}, gather=True, per_precision=True))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="after every other node"):
        Graph(Node("a", f, per_precision=True), Node("all", f, {"x": "a"}, gather=True), Node("b", f))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not declared before"):
        Graph(Node("a", f, per_precision=True), Node("b", f, {"x": "a"}))  # type: ignore[arg-type]


def test_run_plain_gives_a_gather_node_every_branch(tmp_path) -> None:
    from tasks.graph import run_plain

    seen: dict[str, object] = {}

    def branch(precision, store, refresh):  # noqa: ANN001, ANN202
        return f"art-{precision.value}"

    def gather(xs, store, refresh):  # noqa: ANN001, ANN202
        seen.update(xs)
        return "all"

    g = Graph(Node("a", branch, {"precision": PRECISION}, per_precision=True), Node("all", gather, {"xs": "a"}, gather=True))  # type: ignore[arg-type]
    out = run_plain(g, PipelineConfig(artifacts_dir=tmp_path, precisions=P, backend="onnxruntime"))
    assert seen == {"fp32": "art-fp32", "int8": "art-int8"} and out["all"] == "all"


def test_a_recovery_only_decides_and_the_graph_runs_its_branch_again(tmp_path) -> None:
    """A ``Rerun`` gives the recovery its branch: the changed node and all after it through the recovered one."""
    from tasks.errors import VerificationError
    from tasks.graph import Rerun, _Plain, schedule

    calls: list[tuple[str, bool]] = []

    def stage(name: str):
        def fn(store, refresh, precision, loose=False, **kw):  # noqa: ANN001, ANN202
            calls.append((f"{name}-{precision.value}", loose))
            if name == "check" and precision is Precision.int8 and "loose" not in str(kw.get("y")):
                raise VerificationError([f"{name} too strict"], "r.json")
            return f"{name}-{precision.value}" + ("(loose)" if loose else "") + (f"<{kw['y']}>" if "y" in kw else "")

        return fn

    seen: dict[str, object] = {}

    def fix(store, refresh, precision, rerun, **_):  # noqa: ANN001, ANN202
        seen["first"], seen["key"] = rerun(), rerun.key
        got, error = rerun(loose=True)
        assert error is None, error
        return f"fix({got['variant']}, {got['verdict']})"

    g = Graph(  # type: ignore[arg-type]
        Node("b", stage("b"), {"precision": PRECISION, "n": Config("calibration_samples")}, per_precision=True),
        Node("check", stage("check"), {"y": "b", "precision": PRECISION}, per_precision=True),
        Node("fix", fix, {"precision": PRECISION, "rerun": Rerun("b", {"variant": "b", "verdict": "check"})},
             per_precision=True, recovers="check", stands_in=lambda ref, store: {"check": ref}),
    )
    out = schedule(RunPlan.of(g, _cfg(tmp_path), tmp_path), _Plain())  # type: ignore[arg-type]
    # the fix ran once, for int8; without changes only the recovered node ran again, and failed as data
    first_got, first_error = seen["first"]  # type: ignore[misc]
    assert first_got == {"variant": "b-int8", "verdict": None} and isinstance(first_error, VerificationError)
    assert calls[4:] == [("check-int8", False), ("b-int8", True), ("check-int8", False)], calls
    assert out.branches[Precision.int8].passed and out.refs["check-int8"] == "fix(b-int8(loose), check-int8<b-int8(loose)>)"
    # what the reruns depend on beyond the fix's own inputs: the branch's config values, per node
    assert seen["key"] == {
        "arguments": {"b": {"precision": Precision.int8, "n": _cfg(tmp_path).calibration_samples}, "check": {"precision": Precision.int8}},
        "code": {},  # the toy stages are no project modules
    }
    with pytest.raises(ValueError, match="Rerun belongs to a recovery node"):
        Graph(Node("b", stage("b"), per_precision=True), Node("c", stage("c"), {"r": Rerun("b", {"x": "b"})}, per_precision=True))  # type: ignore[arg-type]
