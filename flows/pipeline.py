"""The trtflow flow: data -> train -> export -> validate -> per precision (variant -> validate -> build -> verify) -> profile.

Run it from Python::

    from flows.pipeline import pipeline
    from tasks.config import PipelineConfig
    pipeline(PipelineConfig(precisions=["fp32", "int8"]))

Every stage is content-cached, so running the same config again comes back Cached, and a run after a
failure recomputes only the failed stage and what depends on it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import Task, flow, get_run_logger
from prefect.futures import as_completed

from flows.report import publish, run_report
from flows.ui import Progress, publish_figures, publish_links
from tasks.artifacts import ArtifactRef, ensure_writable
from tasks.backends.registry import choose_backend
from tasks.config import Backend, PipelineConfig, Precision, Stage
from tasks.data import arrays_from_npz, data_task
from tasks.engine import build_task
from tasks.errors import VerificationError
from tasks.export import export_task
from tasks.models import factory_from_path
from tasks.precision import precision_task
from tasks.profile import profile_task
from tasks.train import train_task
from tasks.validate import validate_task
from tasks.verify import verify_task

#: the branch stages, in order, as they appear in the report
BRANCH = (Stage.precision, Stage.validate, Stage.build, Stage.verify)


class _Runner:
    """Applies the run's result storage and refresh choices to each stage task."""

    def __init__(self, config: PipelineConfig, root: Path) -> None:
        self.storage = root / ".prefect" / "results"
        self.refresh = config.refreshed()

    def __call__(self, stage: Stage, t: Task[..., Any]) -> tuple[Task[..., Any], bool]:
        forced = stage in self.refresh
        return t.with_options(result_storage=self.storage, refresh_cache=True if forced else None), forced


def _error_of(future: Any) -> BaseException | None:
    # wait() keeps the final state on the future; .state alone asks the API server (one call each).
    future.wait()
    state = future.state
    if state.is_completed():
        return None
    result = future.result(raise_on_failure=False)
    return result if isinstance(result, BaseException) else None


def preflight(config: PipelineConfig) -> tuple[Path, Any, str]:
    """Fail in milliseconds, before any training, on what can be checked up front.

    Returns:
        The resolved artifacts folder, the engine builder, and why that backend was chosen.

    Raises:
        ConfigError: unwritable artifacts folder. DatasetError: missing dataset file.
        ModelError: unknown model factory. BackendUnavailableError: requested backend missing.
    """
    root = ensure_writable(config.artifacts_dir)
    if config.data.dataset is not None and not Path(config.data.dataset).expanduser().is_file():
        arrays_from_npz(Path(config.data.dataset))  # raises the dataset error with its fix
    factory_from_path(config.train.model)
    builder, reason = choose_backend(config.backend)
    return root, builder, reason


@flow(name="trtflow", validate_parameters=True)
def pipeline(config: PipelineConfig = PipelineConfig()) -> dict[str, Any]:  # noqa: B008 - a form default
    """Turn a PyTorch model into verified inference engines, one per precision.

    Args:
        config: everything the run needs (the Prefect UI renders it as a form).

    Returns:
        The run report (also written to ``<artifacts_dir>/report.json``).

    Raises:
        TrtflowError: the first failing stage's error; VerificationError lists every failing check.
    """
    logger = get_run_logger()
    root, builder, backend_reason = preflight(config)
    logger.info("backend %s", backend_reason)
    stage = _Runner(config, root)
    # The UI's progress bar: stages finished / stages planned (4 shared + the branch stages).
    progress = Progress(4 + len(BRANCH) * len(config.precisions))

    t, r = stage(Stage.data, data_task)
    # .under(root): a cached result names the folder it was made in, which may have moved since.
    data: ArtifactRef = t(config.data, root, refresh=r).under(root)
    progress.step("data")
    t, r = stage(Stage.train, train_task)
    checkpoint: ArtifactRef = t(data, config.train, root, refresh=r).under(root)
    progress.step("train")
    t, r = stage(Stage.export, export_task)
    onnx: ArtifactRef = t(checkpoint, root, refresh=r).under(root)
    progress.step("export")
    t, r = stage(Stage.validate, validate_task)
    t(onnx, data, root, refresh=r)
    progress.step("validate")

    # One branch per precision; they run concurrently on the flow's task runner.
    branches: dict[Precision, dict[Stage, Any]] = {}
    for p in config.precisions:
        t, r = stage(Stage.precision, precision_task)
        variant = t.submit(onnx, data, p, config.calibration_samples, root, refresh=r)
        t, r = stage(Stage.validate, validate_task)
        checked = t.submit(variant, data, root, refresh=r)
        t, r = stage(Stage.build, build_task)
        options = config.engine.model_dump()
        engine = t.submit(variant, Backend(builder.name), config.batch, options, root, refresh=r, wait_for=[checked])
        t, r = stage(Stage.verify, verify_task)
        verified = t.submit(engine, checkpoint, data, p, config.tolerance(p), config.batch, root, refresh=r)
        branches[p] = {Stage.precision: variant, Stage.validate: checked, Stage.build: engine, Stage.verify: verified}
    names = {f.task_run_id: f"{s.value} {p.value}" for p, b in branches.items() for s, f in b.items()}
    progress.expect(4 + len(names))
    for done in as_completed([f for b in branches.values() for f in b.values()]):
        done.wait()  # the final state without an API call
        state = done.state
        progress.step(names[done.task_run_id] + ("" if state.is_completed() else f" ({state.name})"))

    outcomes: dict[Precision, dict[str, Any]] = {}
    errors: list[BaseException] = []
    for p, futures in branches.items():
        failed = next(((s, e) for s in BRANCH if (e := _error_of(futures[s])) is not None), None)
        if failed is None:
            outcomes[p] = {"engine": futures[Stage.build].result().under(root), "verify": futures[Stage.verify].result().under(root)}
        else:
            outcomes[p] = {"failed_stage": failed[0].value, "error": str(failed[1])}
            errors.append(failed[1])

    # Timed only once every branch is done: a timing that shares the CPU with a build or a
    # verification measures those too (the stage also never overlaps its own measurements).
    # A profiling error fails the run like any other stage, after the report is written.
    if config.profile.enabled:
        t, r = stage(Stage.profile, profile_task)
        timed = {
            p: t.submit(o["engine"], checkpoint, data, config.batch, config.profile, config.engine.threads, root, refresh=r)
            for p, o in outcomes.items()
            if "engine" in o
        }
        progress.expect(progress.total + len(timed))
        for done in as_completed(list(timed.values())):
            done.wait()  # the final state without an API call
            progress.step("profile" + ("" if done.state.is_completed() else f" ({done.state.name})"))
        for p, f in timed.items():
            if (e := _error_of(f)) is None:
                outcomes[p]["profile"] = f.result().under(root)
            else:
                outcomes[p]["profile_error"] = str(e)
                errors.append(e)

    report = run_report(config, root, backend_reason, data, checkpoint, onnx, outcomes)
    publish(report, root)
    publish_links(report)
    publish_figures(root, checkpoint, data, {p.value: o["engine"] for p, o in outcomes.items() if "engine" in o})
    if errors:
        verification = [e for e in errors if isinstance(e, VerificationError)]
        if len(verification) == len(errors) and len(errors) > 1:
            raise VerificationError([f for e in verification for f in e.failures], str(root / "report.json"))
        raise errors[0]
    return report
