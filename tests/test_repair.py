import json
import math
import pickle

import numpy as np
import onnx
import pytest
from _precision_models import outlier_channel_mlp, overflowing_mlp, run
from onnx import TensorProto

from tasks.compare import compare_outputs
from tasks.config import Precision, default_tolerances
from tasks.emulation import emulation_of, tensor_types
from tasks.precisions.fp16 import fp16_from_onnx
from tasks.precisions.int8 import int8_from_onnx
from tasks.precisions.onnx_graph import named_nodes
from tasks.repair import Decision, NodeError, _stop_of, _TensorError, decide, next_nodes, node_errors

FP16 = TensorProto.FLOAT16


def _rerun(root, batch, precision, data, ckpt, exported, variant, engine, calibration_samples=64):
    """The branch rerun the graph hands the repair node (``Rerun`` in GRAPH), over these artifacts."""
    from flows.pipeline import GRAPH
    from tasks.config import PipelineConfig
    from tasks.graph import BranchRerun, Instance, Rerun

    config = PipelineConfig(precisions=[precision], batch=batch, calibration_samples=calibration_samples, backend="onnxruntime",
                            engine={"threads": 1}, artifacts_dir=str(root))
    node = next(n for n in GRAPH.nodes if n.recovers)
    source = next(s for s in node.inputs.values() if isinstance(s, Rerun))
    done = {"data": data, "train": ckpt, "export": exported, f"precision-{precision.value}": variant, f"build-{precision.value}": engine}
    return BranchRerun(GRAPH, Instance(node, precision), source, config, done, lambda inst: {"store": root, "refresh": False})


def _variant(tmp_path, model, precision, x, keep=()):
    src, dst = tmp_path / "fp32.onnx", tmp_path / f"{precision.value}.onnx"
    onnx.save(model, str(src))
    if precision is Precision.fp16:
        fp16_from_onnx(src, dst, keep)
    else:
        int8_from_onnx(src, dst, x[:128], keep)
    return onnx.load(str(dst))


def _passes(model, variant, x, precision):
    out = run(emulation_of(variant, FP16)[0], x, optimize=False) if precision is Precision.fp16 else run(variant, x)
    return compare_outputs({"logits": run(model, x)}, {"logits": out}, default_tolerances()[precision], precision.value)


def _repair(tmp_path, model, x, precision, budget=4):
    """The repair loop of ``repair_of_variant`` on plain files: (kept, rankings)."""
    kept, rankings = [], []
    variant = _variant(tmp_path, model, precision, x)
    while not _passes(model, variant, x, precision).passed:
        errors = node_errors(named_nodes(model), variant, {"x": x[:64]}, precision)
        rankings.append(errors)
        new = next_nodes(errors, kept)
        assert new and len(kept) + len(new) <= budget, f"repair stuck at {kept}: {errors}"
        kept += new
        variant = _variant(tmp_path, model, precision, x, kept)
    return kept, rankings, variant


def test_fp16_overflow_is_repaired_keeping_two_nodes(tmp_path):
    model, x = overflowing_mlp()
    kept, rankings, variant = _repair(tmp_path, model, x, Precision.fp16)
    assert sorted(kept) == ["fc1", "fc2"] and len(rankings) == 1  # both found in one attempt by the range rule
    worst = {e.node: e for e in rankings[0]}
    assert math.isinf(worst["fc1"].contribution) and math.isinf(worst["fc2"].contribution)
    assert "past fp16" in worst["fc2"].reason and worst["fc0"].contribution < 1e-2
    # fc0 and relu still compute in fp16
    types = tensor_types(variant)
    assert types["h0"] == TensorProto.FLOAT16 and types["logits"] == TensorProto.FLOAT


def test_int8_outlier_channel_is_repaired_keeping_two_nodes(tmp_path):
    model, x = outlier_channel_mlp()
    first = _passes(model, _variant(tmp_path, model, Precision.int8, x), x, Precision.int8)
    assert first.outputs["logits"].top1_agreement < 0.5  # int8 breaks top-1
    kept, rankings, variant = _repair(tmp_path, model, x, Precision.int8)
    # Only compute ops' inputs are quantized (tasks.precisions.int8.INT8_OPS): fc2 reads the outlier tensor.
    assert kept == ["fc2"]
    assert rankings[0][0].node == "fc2" and rankings[0][0].contribution > 0.5
    assert _passes(model, variant, x, Precision.int8).outputs["logits"].top1_agreement >= 0.97
    ops = {n.name for n in variant.graph.node}
    assert "fc1" in ops and any(n.op_type == "QuantizeLinear" for n in variant.graph.node)  # the rest stays int8


@pytest.mark.parametrize("precision", [Precision.fp16, Precision.int8])
def test_repaired_variants_stay_strongly_typed(tmp_path, precision):
    """What a strongly typed TensorRT network needs: valid, sorted, no int32 biases, no node mixing float types."""
    model, x = (overflowing_mlp if precision is Precision.fp16 else outlier_channel_mlp)()
    keep = ["fc1", "fc2"] if precision is Precision.fp16 else ["fc2"]
    variant = _variant(tmp_path, model, precision, x, keep)
    onnx.checker.check_model(variant, full_check=True)  # includes the topological order
    assert all(t.data_type != TensorProto.INT32 for t in variant.graph.initializer)
    types = tensor_types(variant)
    floats = {TensorProto.FLOAT, TensorProto.FLOAT16}
    for node in variant.graph.node:
        if node.op_type in ("Cast", "QuantizeLinear", "DequantizeLinear"):
            continue
        seen = {types[t] for t in [*node.input, *node.output] if t and types.get(t) in floats}
        assert len(seen) <= 1, f"{node.name} mixes {seen}: an fp32 island needs explicit Casts"


def test_a_channel_rounded_to_zero_counts_even_when_a_huge_channel_dominates():
    ref = np.ones((8, 32), np.float32)
    ref[:, 0] = 1000.0
    got = ref.copy()
    got[:, 1:] = 0.0  # what per-tensor int8 does to the small channels
    t = _TensorError()
    t.add(ref, got)
    assert t.error() == pytest.approx(31 / 32)
    whole = np.sqrt(((got - ref) ** 2).sum() / (ref**2).sum())
    assert whole < 0.01  # a whole-tensor relative error would call this fine
    t.add(ref, np.full_like(ref, np.inf))
    assert math.isinf(t.error())


def test_next_nodes_takes_every_overflow_at_once_else_the_worst():
    e = lambda n, c: NodeError(n, "Gemm", 0.0, 0.0, c, "")  # noqa: E731
    assert next_nodes([e("a", math.inf), e("b", math.inf), e("c", 0.5)], []) == ["a", "b"]
    assert next_nodes([e("a", math.inf), e("c", 0.5), e("d", 0.1)], ["a"]) == ["c"]
    assert next_nodes([e("c", 0.0)], []) == []
    assert NodeError.from_dict(json.loads(json.dumps(e("a", math.inf).to_dict()))).contribution == math.inf


def test_a_decision_keeps_what_next_nodes_adds_within_the_budget_else_says_why_it_stops():
    e = lambda n, c: NodeError(n, "Gemm", 0.0, 0.0, c, "")  # noqa: E731
    ranked = [e("a", math.inf), e("b", math.inf), e("c", 0.5)]
    assert decide(ranked, [], budget=2) == Decision(["a", "b"], ["a", "b"])
    assert decide(ranked, ["a", "b"], budget=3) == Decision(["a", "b", "c"], ["c"])
    over = decide(ranked, ["a", "b"], budget=2)
    assert over.keep_fp32 == ["a", "b"] and over.added == ["c"]
    assert over.stop == "the next attempt would keep 3 nodes in fp32 (c added), over the budget of 2"
    flat = decide([e("c", 0.0)], [], budget=4)
    assert flat.added == [] and flat.stop is not None and "no node of the variant adds error" in flat.stop


def test_a_verdict_stops_the_repair_when_it_passes_or_finds_too_few_operators_left_in_the_precision():
    from tasks.errors import PrecisionShareError, VerificationError

    tol = default_tolerances()[Precision.int8]
    assert _stop_of(None, Precision.int8, tol, first=False) == ("verification passed", None)
    assert _stop_of(VerificationError(["logits.top1_agreement = 0.5"], "r.json"), Precision.int8, tol, first=False) == (None, None)
    share = PrecisionShareError("int8", "int8: 0 of 2 compute operators run in int8", ["x"], "r.json")
    stop, finding = _stop_of(share, Precision.int8, tol, first=True)
    assert finding == share.finding and stop == f"{share.finding}; keeping nodes in fp32 cannot add int8 operators"
    stop, finding = _stop_of(share, Precision.int8, tol, first=False)
    assert finding == share.finding and stop is not None and f"min_compute_share={tol.min_compute_share:g}" in stop


@pytest.mark.slow
def test_int8_repair_of_a_trained_model_keeps_two_nodes_and_caches_each_attempt(tmp_path, monkeypatch):
    """OutlierNet (one channel ×1000): int8 breaks top-1 on the pipeline's own stages; repair fixes it."""
    from tasks.config import Backend, BatchProfile, DataConfig, RepairConfig, TrainConfig
    from tasks.data import splits_from_dataset
    from tasks.engine import engine_from_variant
    from tasks.errors import VerificationError
    from tasks.export import onnx_from_checkpoint
    from tasks.precision import variant_from_onnx
    from tasks.repair import repair_of_variant, repaired_refs
    from tasks.train import checkpoint_from_splits
    from tasks.verify import verification_of_engine

    root, batch, tol = tmp_path / "art", BatchProfile(min=1, opt=8, max=64), default_tolerances()[Precision.int8]
    data = splits_from_dataset(DataConfig(), root)
    ckpt = checkpoint_from_splits(data, TrainConfig(model="_precision_models:OutlierNet", epochs=2), root)
    exported = onnx_from_checkpoint(ckpt, root)
    variant = variant_from_onnx(exported, data, Precision.int8, 64, root)
    engine = engine_from_variant(variant, Backend.onnxruntime, batch, {"threads": 1}, root)
    with pytest.raises(VerificationError, match="top1_agreement"):
        verification_of_engine(engine, ckpt, data, Precision.int8, tol, batch, root, variant=variant)

    # pickled as a distributed task runner sends it to a worker
    rerun = pickle.loads(pickle.dumps(_rerun(root, batch, Precision.int8, data, ckpt, exported, variant, engine)))
    assert set(rerun.key["code"]) >= {"tasks/precision.py", "tasks/validate.py", "tasks/engine.py", "tasks/verify.py"}
    repair = repair_of_variant(exported, ckpt, data, variant, engine, Precision.int8, tol, RepairConfig(), rerun, root)
    m = repair.meta
    ops = {n.name: n.op_type for n in onnx.load(str(exported.path("model.onnx"))).graph.node}
    assert m["passed"] and len(m["kept_fp32"]) == 2 and {ops[n] for n in m["kept_fp32"]} <= {"Gemm", "MatMul"}, m["kept_fp32"]
    assert m["before"]["top1_agreement"] < 0.9 <= m["after"]["top1_agreement"]
    report = json.loads(repair.path("repair.json").read_text())
    assert [a["passed"] for a in report["attempts"]][-1] and all(a["added"] for a in report["attempts"])
    fixed_engine, verified = repaired_refs(repair, root)
    assert verified.meta["passed"] and fixed_engine.meta["precision"] == "int8"
    # every attempt left its artifacts: one ranking and one variant per attempt
    assert len(list((root / "sensitivity").glob("*/node_errors.json"))) == len(report["attempts"])
    assert len(list((root / "precision").glob("*/model.onnx"))) == 1 + len(report["attempts"])
    again = repair_of_variant(exported, ckpt, data, variant, engine, Precision.int8, tol, RepairConfig(), rerun, root)
    assert again.digest == repair.digest

    small = repair_of_variant(exported, ckpt, data, variant, engine, Precision.int8, tol, RepairConfig(budget=1), rerun, root)
    assert not small.meta["passed"] and "budget of 1" in small.meta["stopped"] and repaired_refs(small, root) is None
    # what the reruns read from the config is in the repair's key: other calibration, another repair
    other = _rerun(root, batch, Precision.int8, data, ckpt, exported, variant, engine, calibration_samples=32)
    assert repair_of_variant(exported, ckpt, data, variant, engine, Precision.int8, tol, RepairConfig(budget=1), other, root).key != small.key

    import tasks.repair

    def unrankable(*_, **__):
        raise RuntimeError("cannot expose tensor")

    monkeypatch.setattr(tasks.repair, "node_errors", unrankable)
    # refresh: the repair and its rankings again (cached rankings would hide the broken ranking)
    stuck = repair_of_variant(exported, ckpt, data, variant, engine, Precision.int8, tol, RepairConfig(budget=2), rerun, root, refresh=True)
    assert not stuck.meta["passed"] and "could not be ranked (RuntimeError: cannot expose tensor)" in stuck.meta["stopped"]


def test_a_repair_that_cannot_pass_says_what_it_tried_and_how_to_go_on():
    from tasks.errors import PrecisionRepairError, VerificationError

    err = PrecisionRepairError("int8", ["int8 batch 8: logits.top1_agreement = 0.5 (threshold >= 0.97)"], ["fc1", "fc2"], "over the budget of 2", "repair/x/repair.json")
    assert isinstance(err, VerificationError) and err.failures and err.report_path == "repair/x/repair.json"
    msg = str(err)
    assert "kept fc1, fc2 in fp32" in msg and "over the budget of 2" in msg and "--repair-budget" in msg


@pytest.fixture(scope="module")
def overflow_branch(tmp_path_factory):
    """OverflowNet trained one epoch, exported, its fp16 variant and engine: verification fails (overflow)."""
    from tasks.config import Backend, BatchProfile, DataConfig, TrainConfig
    from tasks.data import splits_from_dataset
    from tasks.engine import engine_from_variant
    from tasks.export import onnx_from_checkpoint
    from tasks.precision import variant_from_onnx
    from tasks.train import checkpoint_from_splits

    root, batch = tmp_path_factory.mktemp("overflow"), BatchProfile(min=1, opt=8, max=64)
    data = splits_from_dataset(DataConfig(), root)
    ckpt = checkpoint_from_splits(data, TrainConfig(model="_precision_models:OverflowNet", epochs=1), root)
    exported = onnx_from_checkpoint(ckpt, root)
    variant = variant_from_onnx(exported, data, Precision.fp16, 64, root)
    engine = engine_from_variant(variant, Backend.onnxruntime, batch, {"threads": 1}, root)
    return root, batch, data, ckpt, exported, variant, engine


def test_a_repair_that_needs_exactly_the_budget_passes_and_one_less_fails(overflow_branch):
    from tasks.config import RepairConfig
    from tasks.repair import repair_of_variant

    root, batch, data, ckpt, exported, variant, engine = overflow_branch
    tol = default_tolerances()[Precision.fp16]

    def repair(budget):
        rerun = _rerun(root, batch, Precision.fp16, data, ckpt, exported, variant, engine)
        return repair_of_variant(exported, ckpt, data, variant, engine, Precision.fp16, tol, RepairConfig(budget=budget), rerun, root).meta

    generous = repair(10)
    needed = len(generous["kept_fp32"])
    assert generous["passed"] and needed >= 2, generous  # the range rule keeps every overflowing node at once
    exact = repair(needed)
    assert exact["passed"] and exact["kept_fp32"] == generous["kept_fp32"]
    short = repair(needed - 1)
    assert not short["passed"] and f"over the budget of {needed - 1}" in short["stopped"], short
    # what the repaired variant computes in: the overflow is in fp32, the products still in fp16
    assert exact["after"]["compute"]["share"] > 0.5 and exact["after"]["compute"]["precision"] == "fp16"
