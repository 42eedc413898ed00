"""The trtflow flow. ``GRAPH`` below is the whole pipeline: every stage, what it takes, and from where.

Run it from Python::

    from flows.pipeline import pipeline
    from tasks.config import PipelineConfig
    pipeline(PipelineConfig(precisions=["fp32", "int8"]))

Every stage finds its artifact in the content-addressed store when its inputs are unchanged (the task
then shows ``Cached``), so running the same config again does no work, and a run after a failure
recomputes only the failed stage and what depends on it. ``--refresh STAGE`` recomputes a stage and its
true descendants (``GRAPH.refreshed``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import Task, flow, get_run_logger
from prefect.futures import PrefectFuture, as_completed

from flows.report import publish, run_report
from flows.runtime import reclaim_sigterm, started_by_deployment
from flows.ui import Progress, publish_figures, publish_links
from tasks.artifacts import ensure_writable
from tasks.backends.registry import choose_backend
from tasks.caching import stage_task
from tasks.config import Backend, PipelineConfig, Precision
from tasks.data import arrays_from_npz, labels_in, splits_from_dataset
from tasks.engine import engine_from_variant, profile_for
from tasks.errors import DatasetError, PrecisionRepairError, StorageError, TrtflowError, VerificationError
from tasks.export import onnx_from_checkpoint
from tasks.graph import PRECISION, Config, Derived, Graph, Instance, Node
from tasks.models import factory_from_path, state_dict_from_file
from tasks.package import bundle_of_variants, check_policy
from tasks.policy import check_run
from tasks.precision import variant_from_onnx
from tasks.profile import profile_of_engine
from tasks.repair import REPORT as REPAIR_REPORT
from tasks.repair import repair_of_variant, repaired_refs
from tasks.train import checkpoint_from_splits
from tasks.validate import validated_onnx
from tasks.verify import verification_of_engine, write_latest

#: the profile of every engine: the configured batch sizes (fitted to memory on a CPU backend) and the
#: shape profile's dynamic axes beyond the batch, resolved against the model's inputs
BATCH = Derived(profile_for, (Config("batch"), Config("shapes"), Config("backend"), "train"))

# fmt: off
GRAPH = Graph(
    Node("data",      splits_from_dataset,    {"cfg": Config("data")}),
    Node("train",     checkpoint_from_splits, {"data": "data", "cfg": Config("train")}),
    Node("export",    onnx_from_checkpoint,   {"checkpoint": "train", "shapes": Config("shapes")}),
    Node("validate",  validated_onnx,         {"model": "export", "data": "data"}),
    # One branch per precision; branches run concurrently on the flow's task runner.
    Node("precision", variant_from_onnx,      {"model": "export", "data": "data", "precision": PRECISION,
                                               "calibration_samples": Config("calibration_samples")}, per_precision=True),
    Node("validate",  validated_onnx,         {"model": "precision", "data": "data"}, per_precision=True),
    Node("build",     engine_from_variant,    {"variant": "precision", "backend": Config("backend"), "batch": BATCH,
                                               "options": Config("engine")}, per_precision=True, after=("validate",)),
    # The variant too: an fp16 engine that computes in fp32 (ONNX Runtime) is also verified through its fp16 emulation.
    Node("verify",    verification_of_engine, {"engine": "build", "checkpoint": "train", "data": "data", "precision": PRECISION,
                                               "tolerance": Config("tolerances.{precision}"), "batch": BATCH,
                                               "variant": "precision"}, per_precision=True),
    # Only when verify failed (fp16, int8): keep the worst nodes in fp32, rebuild, re-verify; its engine replaces build's.
    Node("repair",    repair_of_variant,      {"model": "export", "checkpoint": "train", "data": "data", "variant": "precision",
                                               "engine": "build", "precision": PRECISION, "tolerance": Config("tolerances.{precision}"),
                                               "batch": BATCH, "options": Config("engine"),
                                               "calibration_samples": Config("calibration_samples"), "repair": Config("repair")},
                                              per_precision=True, recovers="verify", when=Config("repair.applies.{precision}")),
    # Timed alone, once every branch is done: a timing that shares the CPU with a build measures both.
    Node("profile",   profile_of_engine,      {"engine": "build", "checkpoint": "train", "data": "data", "batch": BATCH,
                                               "settings": Config("profile"), "threads": Config("engine.threads")},
                                              per_precision=True, after=("verify",), last=True, when=Config("profile.enabled")),
    # Once every branch is done: of the variants that passed, ship one (--ship) as a Triton model repository.
    Node("package",   bundle_of_variants,     {"engines": "build", "verifications": "verify", "profiles": "profile",
                                               "checkpoint": "train", "data": "data", "config": Config("")},
                                              gather=True, when=Config("ship.enabled")),
)
# fmt: on

#: the Prefect task of each stage (retries, logs, the Cached state); the store is the only cache
TASKS: dict[str, Task[..., Any]] = {n.name: stage_task(n.fn, n.name) for n in GRAPH.nodes}
#: the task of a stage whose failure a recovery node repairs, when that node is in the run's plan: a
#: failure recorded in the store comes back Cached (with the error) instead of failing on every re-run
RECOVERED: dict[str, Task[..., Any]] = {
    n.name: stage_task(n.fn, n.name, recovered=True)
    for n in GRAPH.nodes if any(r.recovers == n.name for r in GRAPH.nodes)
}


def preflight(config: PipelineConfig) -> tuple[Path, Any, str]:
    """Fail in milliseconds, before any training, on what can be checked up front.

    Returns:
        The resolved artifacts folder, the engine builder, and why that backend was chosen.

    Raises:
        ConfigError: unwritable artifacts folder, a ship policy this config cannot meet. DatasetError:
        missing dataset file. ModelError: unknown model factory, unreadable weights.
        BackendUnavailableError: requested backend missing. DatasetError: a dataset without labels and no weights.
    """
    check_policy(config)
    root = ensure_writable(config.artifacts_dir)
    if config.data.dataset is not None and not Path(config.data.dataset).expanduser().is_file():
        arrays_from_npz(Path(config.data.dataset))  # raises the dataset error with its fix
    factory_from_path(config.train.model)
    if config.train.weights is not None:
        state_dict_from_file(Path(config.train.weights))  # readable, and a state_dict
    elif config.data.dataset is not None and not labels_in(Path(config.data.dataset)):
        raise DatasetError(
            got=f"dataset {Path(config.data.dataset).name} without labels y, and no --weights",
            expected="labels y to train on, or trained weights to convert",
            because="training needs labels; without them trtflow can only convert a model that is already trained",
            fix="add y to the dataset (numpy.savez(path, ..., y=labels)), or pass --weights FILE with your --model",
        )
    builder, reason = choose_backend(config.backend)
    return root, builder, reason


def _error_of(future: Any) -> BaseException | None:
    """The error of a finished task: the one it failed with, or a recorded failure it came back Cached with."""
    # wait() keeps the final state on the future; .state alone asks the API server (one call each).
    future.wait()
    result = future.result(raise_on_failure=False)
    return result if isinstance(result, BaseException) else None


def _repair_outcome(future: Any, engine_before: Any, root: Path) -> tuple[dict[str, Any], BaseException | None]:
    """A repaired branch's outcome (engine, verify, repair) and its error (None when the repair passed)."""
    if (e := _error_of(future)) is not None:
        return {"failed_stage": "repair", "error": str(e)}, e
    repair = future.result()
    try:
        refs = repaired_refs(repair, root)
    except TrtflowError as exc:
        return {"failed_stage": "repair", "error": str(exc), "repair": repair}, exc
    if refs is not None:
        write_latest(refs[1], root)  # the repaired verification is this precision's latest, cached or not
        return {"engine": refs[0], "verify": refs[1], "repair": repair, "engine_before_repair": engine_before}, None
    m = repair.meta
    error = PrecisionRepairError(m["precision"], m["failures"], m["tried_fp32"], m["stopped"], str(repair.path(REPAIR_REPORT)), m.get("share_finding"))
    return {"failed_stage": "repair", "error": str(error), "repair": repair}, error


def _wait_all(futures: dict[str, Any], progress: Progress) -> None:
    ids = {f.task_run_id: i for i, f in futures.items()}
    for done in as_completed(list(futures.values())):
        done.wait()  # the final state without an API call
        progress.step(ids[done.task_run_id] + ("" if done.state.is_completed() else f" ({done.state.name})"))


@flow(name="trtflow", validate_parameters=True)
def pipeline(config: PipelineConfig = PipelineConfig()) -> dict[str, Any]:  # noqa: B008 - a form default
    """Turn a PyTorch model into verified inference engines, one per precision.

    Args:
        config: everything the run needs (the Prefect UI renders it as a form).

    Returns:
        The run report (also written to ``<artifacts_dir>/reports/run-….json``, copied to ``report.json``).

    Raises:
        TrtflowError: the first failing stage's error; VerificationError lists every failing check.
    """
    reclaim_sigterm()
    if started_by_deployment():
        # Parameters from the API (the UI's form): only the worker's allowed factories and folders,
        # checked before the run imports or reads anything it names.
        check_run(config)
    logger = get_run_logger()
    root, builder, backend_reason = preflight(config)
    logger.info("backend %s", backend_reason)
    run_config = config.model_copy(update={"backend": Backend(builder.name)})
    forced = GRAPH.refreshed(config.refresh, config.precisions)
    plan = [
        i for i in GRAPH.instances(config.precisions)
        if i.node.when is None or i.node.when.read(run_config, i.precision)
    ]
    # Recovery nodes (repair) count only once they run: a passing branch never runs them.
    progress = Progress(sum(1 for i in plan if not i.node.recovers))
    # Instances a planned recovery node stands behind (verify-int8 when repair-int8 may run).
    recoverable = {GRAPH.resolve(i, i.node.recovers).id for i in plan if i.node.recovers}

    def call(inst: Instance, done: dict[str, Any], submit: bool) -> Any:
        task = (RECOVERED if inst.id in recoverable else TASKS)[inst.node.name].with_options(task_run_name=inst.id)
        args = {**GRAPH.arguments(inst, run_config, done), "artifacts_dir": root, "refresh": inst.id in forced}
        if not submit:
            # A shared stage: every branch needs it, so its failure ends the run. (Called directly, a
            # task returns the State a Cached stage hands back; .result() unwraps either kind.)
            return task(**args, return_state=True).result()
        # Futures only: a repaired branch's verification is an artifact already, nothing to wait for.
        wait = [w for a in inst.node.after if isinstance(w := done[GRAPH.resolve(inst, a).id], PrefectFuture)]
        return task.submit(**args, wait_for=wait)

    done: dict[str, Any] = {}
    branches: dict[str, Any] = {}
    for inst in plan:
        if inst.node.last or inst.node.recovers or inst.node.gather:
            continue
        if inst.precision is None:
            done[inst.id] = call(inst, done, submit=False)
            progress.step(inst.id)
        else:
            done[inst.id] = branches[inst.id] = call(inst, done, submit=True)
    _wait_all(branches, progress)

    # A branch whose verification failed is repaired (fp16, int8), attempt by attempt; a passing one never,
    # nor one that failed in a way no repair can mend (too few operators in the precision).
    recovering = {
        i.id: i for i in plan
        if i.node.recovers and isinstance(e := _error_of(done[GRAPH.resolve(i, i.node.recovers).id]), VerificationError) and e.recoverable
    }
    progress.expect(progress.total + len(recovering))
    recovered = {i: call(inst, done, submit=True) for i, inst in recovering.items()}
    _wait_all(recovered, progress)

    outcomes: dict[Precision, dict[str, Any]] = {}
    errors: list[BaseException] = []
    for p in config.precisions:
        if (rid := f"repair-{p.value}") in recovered:
            original = done[f"build-{p.value}"].result()
            outcomes[p], error = _repair_outcome(recovered[rid], original, root)
            if error is not None:
                failed_verify = _error_of(done[f"verify-{p.value}"])
                if isinstance(failed_verify, VerificationError) and failed_verify.artifact is not None:
                    outcomes[p]["verify"] = failed_verify.artifact  # the verdict the repair started from
                errors.append(error)
            elif "engine" in outcomes[p]:
                # The repaired engine and its verification are the branch's from here on (profile, report).
                done[f"build-{p.value}"], done[f"verify-{p.value}"] = outcomes[p]["engine"], outcomes[p]["verify"]
            continue
        chain = [i for i in plan if i.precision is p and not i.node.last and not i.node.recovers]
        failed = next(((i, e) for i in chain if (e := _error_of(done[i.id])) is not None), None)
        if failed is None:
            outcomes[p] = {"engine": done[f"build-{p.value}"].result(), "verify": done[f"verify-{p.value}"].result()}
        else:
            outcomes[p] = {"failed_stage": failed[0].node.name, "error": str(failed[1])}
            if isinstance(failed[1], VerificationError) and failed[1].artifact is not None:
                outcomes[p]["verify"] = failed[1].artifact  # the failing verdict: what ran, and in which precision
            errors.append(failed[1])

    # Nodes marked last (profile) run for the branches that verified, after everything else.
    last = {i.id: i for i in plan if i.node.last and i.precision is not None and "engine" in outcomes[i.precision]}
    progress.expect(progress.total - sum(1 for i in plan if i.node.last) + len(last))
    timed = {i: call(inst, done, submit=True) for i, inst in last.items()}
    # A repaired branch's failing engine is timed too: the repair's speed cost.
    names, planned = {i: inst.node.name for i, inst in last.items()}, len(timed)
    for i, inst in list(last.items()):
        p = inst.precision
        if inst.node.name == "profile" and p is not None and "engine_before_repair" in outcomes[p]:
            before = {**done, f"build-{p.value}": outcomes[p]["engine_before_repair"]}
            timed[f"{i}-before-repair"], last[f"{i}-before-repair"] = call(inst, before, submit=True), inst
            names[f"{i}-before-repair"] = "profile_before_repair"
    progress.expect(progress.total + len(timed) - planned)
    _wait_all(timed, progress)
    for i, f in timed.items():
        p = last[i].precision
        assert p is not None
        if (e := _error_of(f)) is None:
            outcomes[p][names[i]] = f.result()
        else:
            outcomes[p][f"{names[i]}_error"] = str(e)
            errors.append(e)

    # Gather nodes (package) run once everything else is done, over the branches that passed.
    finished = {i: v for i, v in done.items() if not isinstance(v, PrefectFuture) or _error_of(v) is None}
    finished = {i: v.result() if isinstance(v, PrefectFuture) else v for i, v in finished.items()}
    finished.update({i: f.result() for i, f in timed.items() if names[i] == last[i].node.name and _error_of(f) is None})
    branch_of = {i.id: i.precision for i in plan}
    passed = {i: v for i, v in finished.items() if (branch := branch_of.get(i)) is None or "engine" in outcomes[branch]}
    gathered: dict[str, Any] = {}
    late_errors: list[BaseException] = []
    for inst in (i for i in plan if i.node.gather):
        if not any("engine" in o for o in outcomes.values()):
            # Nothing passed: the branches' own errors end the run; a gather over nothing adds a second
            # Failed task (on every cached re-run too) and no information.
            gathered[inst.node.name] = "no variant passed its gates"
            progress.step(inst.id + " (skipped)")
            continue
        future = call(inst, passed, submit=True)
        if (e := _error_of(future)) is None:
            gathered[inst.node.name] = future.result()
        else:
            gathered[inst.node.name] = str(e)
            late_errors.append(e)
        progress.step(inst.id + ("" if e is None else " (failed)"))

    progress.flush()  # the bar's last update was sent in the background
    data, checkpoint, onnx = done["data"], done["train"], done["export"]
    report = run_report(config, root, backend_reason, data, checkpoint, onnx, outcomes, bundle=gathered.get("package"))
    publish(report, root)
    publish_links(report)
    publish_figures(root, checkpoint, {p.value: o["verify"] for p, o in outcomes.items() if "engine" in o})
    # A bundle that could not be made fails the run only when nothing else did (its cause comes first).
    errors += late_errors if not errors else []
    if errors:
        # A full disk makes other stages fail in confusing ways (truncated files): name only the cause.
        storage = [e for e in errors if isinstance(e, StorageError)]
        if storage:
            raise storage[0]
        verification = [e for e in errors if isinstance(e, VerificationError)]
        if len(verification) == len(errors) and len(errors) > 1:
            raise VerificationError([f for e in verification for f in e.failures], str(root / report["report"]))
        raise errors[0]
    return report
