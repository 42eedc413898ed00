"""The trtflow flow. ``GRAPH`` below is the whole pipeline: every stage, what it takes, and from where.

Run it from Python::

    from flows.pipeline import pipeline
    from tasks.config import PipelineConfig, validation_problems
    pipeline(PipelineConfig(precisions=["fp32", "int8"]))

Every stage finds its artifact in the content-addressed store when its inputs are unchanged (the task
then shows ``Cached``), so running the same config again does no work, and a run after a failure
recomputes only the failed stage and what depends on it. ``--refresh STAGE`` recomputes a stage and its
true descendants (``GRAPH.refreshed``).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from typing import Any

from prefect import Task, flow, get_run_logger
from prefect.futures import PrefectFuture, as_completed
from pydantic import ValidationError

from flows.report import outcome_of, publish, run_error, run_report
from flows.runtime import reclaim_sigterm, started_by_deployment
from flows.targets import check_target_deployments, run_targets, target_report_name, targets_report
from flows.ui import Progress, failed_in_ui_terms, publish_figures, publish_links
from tasks.caching import stage_task
from tasks.config import PipelineConfig, validation_problems
from tasks.data import splits_from_dataset
from tasks.engine import engine_from_variant, profile_for
from tasks.errors import ConfigError, TrtflowError
from tasks.export import onnx_from_checkpoint
from tasks.graph import PRECISION, Config, Derived, Graph, Instance, Node, Rerun, schedule
from tasks.package import bundle_of_variants
from tasks.plan import plan_of
from tasks.precision import variant_from_onnx
from tasks.profile import profile_of_engine
from tasks.repair import repair_of_variant, stand_ins
from tasks.train import checkpoint_from_splits
from tasks.validate import validated_onnx
from tasks.verify import verification_of_engine

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
    # It only decides what stays in fp32; the graph runs the branch again from precision (Rerun), each stage cached.
    Node("repair",    repair_of_variant,      {"model": "export", "checkpoint": "train", "data": "data", "variant": "precision",
                                               "engine": "build", "precision": PRECISION, "tolerance": Config("tolerances.{precision}"),
                                               "repair": Config("repair"),
                                               "rerun": Rerun("precision", {"variant": "precision", "engine": "build", "verification": "verify"})},
                                              per_precision=True, recovers="verify", stands_in=stand_ins, when=Config("repair.applies.{precision}")),
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


@functools.cache
def _named_task(stage: str, run_name: str, recovered: bool) -> Task[..., Any]:
    """A stage's task named for one instance (``verify-fp16``); made once per process (each ``with_options``
    builds a new Task, ~4 ms, which a cached run would pay for every instance)."""
    return (RECOVERED if recovered else TASKS)[stage].with_options(task_run_name=run_name)


def _error_of(future: Any) -> BaseException | None:
    """The error of a finished task: the one it failed with, or a recorded failure it came back Cached with."""
    # wait() keeps the final state on the future; .state alone asks the API server (one call each).
    future.wait()
    result = future.result(raise_on_failure=False)
    return result if isinstance(result, BaseException) else None


def _wait_all(futures: dict[str, Any], progress: Progress, states: dict[str, str]) -> None:
    ids = {f.task_run_id: i for i, f in futures.items()}
    for done in as_completed(list(futures.values())):
        done.wait()  # the final state without an API call
        states[ids[done.task_run_id]] = done.state.name
        progress.step(ids[done.task_run_id] + ("" if done.state.is_completed() else f" ({done.state.name})"))


class _Tasks:
    """The flow's executor for ``tasks.graph.schedule``: each instance a Prefect task run.

    Branch instances are submitted to the flow's task runner (they run concurrently); a stage whose
    failure a planned recovery node repairs is the ``RECOVERED`` task, so a failure recorded in the
    store comes back Cached instead of failing again on every re-run.

    Args:
        progress: the run's progress bar.

    Attributes:
        states: each task run's final state name ("Cached", "Completed", "Failed") by instance id,
            in the order they finished (the report's ``tasks``).
    """

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.states: dict[str, str] = {}

    def shared(self, inst: Instance, args: dict[str, Any], recovered: bool = False) -> Any:
        # Called directly, a task returns the State a Cached stage hands back; .result() unwraps either kind.
        state = _named_task(inst.node.name, inst.id, recovered)(**args, return_state=True)
        self.states[inst.id] = state.name
        ref = state.result()
        self.progress.step(inst.id)
        return ref

    def submit(self, inst: Instance, args: dict[str, Any], after: list[Any], recovered: bool = False) -> Any:
        return _named_task(inst.node.name, inst.id, recovered).submit(**args, wait_for=[w for w in after if isinstance(w, PrefectFuture)])

    def settle(self, handles: Any) -> None:
        _wait_all(handles, self.progress, self.states)

    def outcome(self, handle: Any) -> tuple[Any, BaseException | None]:
        error = _error_of(handle)
        return (None, error) if error is not None else (handle.result(), None)

    def expect(self, total: int) -> None:
        self.progress.expect(total)


# The flow validates its parameters itself (``config_of``): a config the run cannot start with is then
# refused like any other error, in one line that names the form's fields, instead of by Prefect's engine.
@flow(name="trtflow", validate_parameters=False)
def pipeline(config: PipelineConfig = PipelineConfig()) -> dict[str, Any]:  # noqa: B008 - a form default
    """Turn a PyTorch model into verified inference engines, one per precision.

    Args:
        config: everything the run needs (the Prefect UI renders it as a form; a deployment's run
            gets it as JSON).

    Returns:
        The run report (written to ``reports/run-….json`` of the store and the artifacts folder, copied to ``report.json``).

    Raises:
        TrtflowError: the first failing stage's error; VerificationError lists every failing check;
        ConfigError: parameters the config refuses.
    """
    try:
        config = config_of(config)
        return _pipeline(config)
    except TrtflowError as exc:
        # Its message in the UI names the form's fields (config.train.lr), not the CLI's flags.
        return failed_in_ui_terms(exc)


def config_of(given: PipelineConfig | Mapping[str, Any]) -> PipelineConfig:
    """The run's config: as given from Python, else validated from a deployment's parameters (JSON).

    Raises:
        ConfigError: every value the config refuses, named by its field; or a ship policy it cannot meet.
    """
    if isinstance(given, PipelineConfig):
        return given
    try:
        return PipelineConfig.model_validate(given)
    except ValidationError as exc:
        problems = validation_problems(exc)
        raise ConfigError(got=problems, expected="valid parameters", because="the run cannot start with them",
                          fix="fix the fields named above in the run's parameters", summary=f"invalid parameters: {problems}") from None


def _pipeline(config: PipelineConfig) -> dict[str, Any]:
    """One run: its plan, the graph's stages, then (a parent over several targets) every target's run."""
    reclaim_sigterm()
    # Parameters from the API (the UI's form) are untrusted: only the worker's allowed factories and folders.
    plan = plan_of(config, GRAPH, untrusted=started_by_deployment())
    if plan.over_targets:
        check_target_deployments(config)  # before any work: each target's deployment, on its pool
    else:
        get_run_logger().info("backend %s", plan.backend)
    progress = Progress()
    executor = _Tasks(progress)
    targets = None
    try:
        outcome = schedule(plan, executor)
        if plan.over_targets:
            if outcome.errors:
                raise outcome.errors[0]  # a shared stage or a variant failed: no target is started
            progress.expect(progress.done + len(config.targets))  # a step as each target's run ends
            targets = run_targets(plan, GRAPH.device_bound(), _flow_run_id(), lambda line: _told(progress, line))
    finally:
        progress.close()
    progress.flush()  # the bar's last update was sent in the background
    root = plan.store.local
    if targets is not None:
        report, error = targets_report(config, plan.store, outcome.shared, *targets, executor.states)
    else:
        outcomes = {p: outcome_of(b) for p, b in outcome.branches.items()}
        bundle = next(iter([*outcome.gathered.values(), *outcome.not_gathered.values()]), None)
        report = run_report(config, plan.store, plan.backend, outcome.shared, outcomes, bundle=bundle, tasks=executor.states)
        if config.target:
            # A target's run (started by a parent over several targets): the parent reads this copy from the store.
            plan.store.put(target_report_name(_flow_run_id()), json.dumps(report, indent=2, default=str).encode())
        error = run_error(outcome.errors, root / report["report"])
    publish(report, root)
    publish_links(report)
    if targets is None:
        publish_figures(root, outcome.shared, {p.value: o["verify"] for p, o in outcomes.items() if "engine" in o})
    if error is not None:
        raise error
    return report


def _flow_run_id() -> str:
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    return str(ctx.flow_run.id) if ctx is not None and ctx.flow_run is not None else "local"


def _told(progress: Progress, line: str) -> None:
    """A target's run ended: logged, and the bar one step further."""
    get_run_logger().info(line)
    progress.step(line)
