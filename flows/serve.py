"""Run the pipeline without a work pool (``trtflow serve``) and choose its task runner (threads or Dask).

    trtflow serve                                   # deployment 'trtflow/trtflow-serve', runs on demand
    trtflow serve --cron "0 2 * * *" --config nightly.json
    trtflow run --task-runner dask                  # a local Dask cluster of 2 worker processes
    trtflow run --task-runner dask --dask-address tcp://10.0.0.5:8786

``serve`` registers a deployment with the Prefect server (``PREFECT_API_URL``) and executes its runs in
this process until interrupted: the UI's Run button, ``prefect deployment run 'trtflow/trtflow-serve'``,
the schedule and the Retry button all work as with a worker, minus the work pool.

From Python::

    from flows.serve import pipeline_on
    pipeline_on("dask", dask_workers=2)(PipelineConfig(...))
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path
from typing import Any, Literal, cast

TaskRunnerName = Literal["threads", "dask"]
TASK_RUNNERS: tuple[TaskRunnerName, ...] = ("threads", "dask")
DEFAULT_NAME = "trtflow-serve"


def pipeline_on(task_runner: TaskRunnerName = "threads", dask_address: str | None = None, dask_workers: int = 2) -> Any:
    """Return the pipeline flow with the chosen task runner.

    A flow's task runner is fixed when it is decorated, so this returns ``pipeline.with_options(...)``.
    On Dask the stage tasks run in worker processes; the per-precision branches spread over them.

    Args:
        task_runner: "threads" (the default, one process) or "dask".
        dask_address: scheduler of an existing Dask cluster (``tcp://host:8786``); None starts a local
            cluster of ``dask_workers`` processes for the run.
        dask_workers: worker processes of the local cluster (one thread each).

    Returns:
        The flow, callable like ``pipeline``.

    Raises:
        ConfigError: Dask was asked for but prefect-dask is not installed, or the options conflict.
    """
    from flows.pipeline import pipeline
    from tasks.errors import ConfigError

    if task_runner == "threads":
        if dask_address:
            raise ConfigError(got="--dask-address with --task-runner threads", expected="--task-runner dask", because="only Dask uses a scheduler address", fix="add --task-runner dask or drop --dask-address")
        return pipeline
    if task_runner != "dask":
        raise ConfigError(got=f"task runner '{task_runner}'", expected="threads or dask", because="those are the runners trtflow supports", fix="pass --task-runner threads or --task-runner dask")
    try:
        from prefect_dask.task_runners import DaskTaskRunner
    except ImportError:
        raise ConfigError(got="--task-runner dask without prefect-dask", expected="prefect-dask installed", because="it provides Prefect's Dask task runner", fix='pip install ".[dask]"') from None
    if dask_workers < 1:
        raise ConfigError(got=f"--dask-workers {dask_workers}", expected="at least 1", because="a cluster needs a worker", fix="pass --dask-workers 2")
    if dask_address:
        runner = DaskTaskRunner(address=dask_address)
    else:
        # Processes, one thread each: stages hold the GIL (torch, onnx) and ORT/torch pick their own threads.
        runner = DaskTaskRunner(cluster_kwargs={"n_workers": dask_workers, "processes": True, "threads_per_worker": 1, "dashboard_address": None})
    # cast: prefect's annotation of with_options is invariant in the future type, DaskTaskRunner's is narrower.
    return pipeline.with_options(task_runner=cast(Any, runner))


def add_serve_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``serve`` subcommand to the CLI's subparsers."""
    p = sub.add_parser(
        "serve",
        help="serve the pipeline as a deployment from this process (no work pool)",
        description=textwrap.fill(
            "Register the deployment 'trtflow/NAME' with the Prefect server (PREFECT_API_URL) and run its "
            "flow runs in this process until Ctrl-C: the UI's Run and Retry buttons, `prefect deployment run` and the "
            "schedule all work, without a work pool or worker.", 88),
        epilog="examples:\n  trtflow serve\n  trtflow serve --cron '0 2 * * *' --config nightly.json\n  trtflow serve --name gpu-box --limit 1",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--name", default=DEFAULT_NAME, help=f"deployment name (default {DEFAULT_NAME}; runs as 'trtflow/NAME')")
    p.add_argument("--cron", help="schedule, e.g. '0 2 * * *' (UTC); default: on demand only")
    p.add_argument("--config", type=Path, help="JSON file of PipelineConfig: the deployment's default parameters")
    p.add_argument("--limit", type=int, help="most runs executing at once (default: unlimited)")
    add_runner_options(p)
    return p


def add_runner_options(p: argparse.ArgumentParser) -> None:
    """Add --task-runner, --dask-address and --dask-workers to a subcommand."""
    g = p.add_argument_group("task runner")
    g.add_argument("--task-runner", choices=TASK_RUNNERS, default="threads", help="where stages run: threads of this process (default) or a Dask cluster")
    g.add_argument("--dask-address", help="scheduler address of an existing Dask cluster; default: start a local one")
    g.add_argument("--dask-workers", type=int, default=2, help="worker processes of the local Dask cluster (default 2)")


def default_parameters(config_file: Path | None) -> dict[str, Any]:
    """The deployment's default parameters: the JSON file's config, validated now rather than at run time.

    Raises:
        ConfigError: the file is unreadable or not a valid PipelineConfig.
    """
    from pydantic import ValidationError

    from tasks.config import PipelineConfig, read_config_file, validation_problems
    from tasks.errors import ConfigError

    if config_file is None:
        return {}
    raw = read_config_file(config_file)
    try:
        PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(got=f"config file {config_file} ({validation_problems(exc)})", expected="a JSON object valid as PipelineConfig", because="it becomes the deployment's default parameters", fix="fix the file or drop --config") from None
    return {"config": raw}


def _resolve_annotations(fn: Any) -> None:
    """Replace the flow function's string annotations by the classes they name.

    ``serve`` runs each flow run in a spawned process that receives the flow by cloudpickle, by value:
    the function's globals shrink to the names its body uses, so the string annotation
    "PipelineConfig" (``from __future__ import annotations``) can no longer be resolved there and
    Prefect's parameter validation fails with "PipelineModel is not fully defined". Real classes
    travel by reference. Workers are unaffected: they import the flow from its entrypoint.
    """
    import typing

    fn.__annotations__ = typing.get_type_hints(fn)


def serve(args: argparse.Namespace) -> int:
    """Serve the pipeline until interrupted (Ctrl-C); returns the exit status.

    Raises:
        ConfigError: invalid --config or task-runner options.
    """
    flow = pipeline_on(args.task_runner, args.dask_address, args.dask_workers)
    _resolve_annotations(flow.fn)
    flow.serve(
        name=args.name,
        cron=args.cron,
        parameters=default_parameters(args.config),
        limit=args.limit,
        tags=["trtflow", "served"],
        description="trtflow pipeline served by `trtflow serve` (runs execute in that process).",
    )
    return 0
