"""One run over several targets: the shared artifacts once here, each target's engines on its own pool.

A target is a Prefect work pool whose workers run one backend on one kind of machine (``Target`` in
tasks/config.py). The parent run makes what no machine changes (the portable part of ``GRAPH``: data,
train, export and the precision variants, ``Graph.portable``), then starts the trtflow deployment of
every target through ``run_deployment``. Each target run is the ordinary flow on its machine: its
shared stages come back Cached from the store, and it builds, verifies and profiles its precisions
there (an engine's key holds the backend's versions and device, so targets never share one). It
leaves its report in the store under ``reports/targets/<its flow run id>.json``; the parent reads
those and writes one report whose ``precisions`` are ``<target>/<precision>`` rows, with ``targets``
saying where each ran and how it ended.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any
from uuid import UUID

from tasks.artifacts import ArtifactRef
from tasks.config import PipelineConfig, Target
from tasks.errors import ConfigError, TargetError
from tasks.graph import RunPlan
from tasks.store import Store

#: where a target run leaves its report for the parent (relative to the artifacts folder / store)
TARGET_REPORTS = "reports/targets"
#: how often the parent looks at its target runs (seconds)
POLL_S = 2.0


def target_config(config: PipelineConfig, target: Target, root: Path, bound: frozenset[str] = frozenset()) -> PipelineConfig:
    """The config of one target's run: the parent's, with that target's backend and precisions.

    Paths are made absolute: the target's worker starts the run in its own working folder.

    Args:
        config: the parent run's config.
        target: the target.
        root: the parent's artifacts folder (the target's too, unless it names its own: with a local
            store, the parent's folder is then the target's store, where the shared artifacts are).
    """
    data = config.data
    if data.dataset is not None:
        data = data.model_copy(update={"dataset": Path(data.dataset).expanduser().resolve()})
    train = config.train
    if train.weights is not None:
        train = train.model_copy(update={"weights": Path(train.weights).expanduser().resolve()})
    return config.model_copy(update={
        "targets": [], "target": target.name, "backend": target.backend, "precisions": list(target.precisions),
        "refresh": [s for s in config.refresh if getattr(s, "value", s) in bound],
        "artifacts_dir": _target_folder(config, target, root),
        "store": config.store if config.store is not None or target.artifacts_dir is None else str(root.resolve()),
        "data": data, "train": train,
    })


def _target_folder(config: PipelineConfig, target: Target, root: Path) -> Path:
    """The local folder of a target's run: its own when it names one; with a remote store, the
    deployment's ``artifacts`` (relative: in the project folder of the target's machine, its read
    cache); with a local store, this run's folder, which every target must then see."""
    if target.artifacts_dir is not None:
        return Path(target.artifacts_dir).expanduser().resolve()
    if config.store and "://" in config.store and not config.store.lower().startswith("file://"):
        return Path("artifacts")
    return root.resolve()


def target_report_name(flow_run_id: UUID | str) -> str:
    """The name a target run's report is kept under, for the parent to read."""
    return f"{TARGET_REPORTS}/{flow_run_id}.json"


def _missing_deployment(t: Target) -> ConfigError:
    name = t.deployment_name.partition("/")[2]
    return ConfigError(
        got=f"target {t.name}: no deployment {t.deployment_name}",
        expected=f"a deployment of the trtflow flow on work pool {t.pool}",
        because="each target's engines are built by a run of its deployment on its pool's workers",
        fix=f"run `prefect deploy flows/pipeline.py:pipeline --name {name} --pool {t.pool}` in the project root (docs/targets.md)",
    )


def check_target_deployments(config: PipelineConfig) -> None:
    """Fail before any work when a target's deployment is missing or on another pool than the target names.

    Raises:
        ConfigError: the first target whose deployment is missing or elsewhere (with the command that fixes it).
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        for t in config.targets:
            try:
                d = client.read_deployment_by_name(t.deployment_name)
            except ObjectNotFound:
                raise _missing_deployment(t) from None
            if d.work_pool_name != t.pool:
                raise ConfigError(
                    got=f"target {t.name}: deployment {t.deployment_name} runs on pool {d.work_pool_name}",
                    expected=f"pool {t.pool}, as the target says", because="a target's engines must be built on its own machines",
                    fix=f"name pool {d.work_pool_name} in the target, or deploy it to {t.pool}: "
                        f"`prefect deploy flows/pipeline.py:pipeline --name {t.deployment_name.partition('/')[2]} --pool {t.pool}`",
                )


def start_targets(config: PipelineConfig, root: Path, parent_id: UUID | None, bound: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Start every target's deployment run (they run concurrently on their pools); return them by target.

    Raises:
        ConfigError: a target's deployment does not exist (named, with the command that creates it).
    """
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    runs: dict[str, Any] = {}
    for t in config.targets:
        child = target_config(config, t, root, bound)
        try:
            runs[t.name] = run_deployment(
                t.deployment_name, parameters={"config": child.model_dump(mode="json")}, timeout=0,
                tags=["trtflow-target", t.name], flow_run_name=f"{t.name}",
                # a retried parent finds the run it started before instead of starting a second one
                idempotency_key=f"{parent_id}-{t.name}" if parent_id else None,
            )
        except ObjectNotFound:
            raise _missing_deployment(t) from None
    return runs


def run_targets(plan: RunPlan, device_bound: Iterable[tuple[str, bool]], parent_id: str,
                told: Callable[[str], None]) -> tuple[dict[str, Any], dict[str, dict[str, Any] | None]]:
    """Start every target's run, wait until each is final, and read the report each left in the store.

    Args:
        plan: the parent's plan (its store, and the config every target's is made from).
        device_bound: the graph's device-bound nodes (``Graph.device_bound``): of ``--refresh``, a target
            recomputes only those (the parent recomputed the rest).
        parent_id: the parent's flow run id ("local" outside a flow run: no idempotency key).
        told: gets a line as each target's run ends (its final state).

    Returns:
        The final flow run of every target, and the report each left (None: it ended before writing one).

    Raises:
        ConfigError: a target's deployment does not exist.
    """
    from prefect import get_run_logger

    config, store = plan.given, plan.store
    bound = frozenset(name for name, _ in device_bound)
    runs = start_targets(config, store.local, None if parent_id == "local" else UUID(parent_id), bound)
    logger = get_run_logger()
    for t in config.targets:
        logger.info("target %s: started %s on pool %s (flow run %s)", t.name, t.deployment_name, t.pool, runs[t.name].id)
    finished = wait_for_targets(runs, told)
    return finished, {name: read_target_report(store, fr.id) for name, fr in finished.items()}


def wait_for_targets(runs: Mapping[str, Any], progress: Callable[[str], None], timeout_s: float | None = None) -> dict[str, Any]:
    """Poll the target runs until each is final; return the final flow runs by target.

    Args:
        runs: target name -> its flow run (from ``start_targets``).
        progress: told each target run's final state as it ends.
        timeout_s: give up after this long (None: wait as long as they run).
    """
    from prefect.client.orchestration import get_client

    pending, done = dict(runs), {}
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while pending:
            for name, fr in list(pending.items()):
                fresh = client.read_flow_run(fr.id)
                if fresh.state is not None and fresh.state.is_final():
                    done[name] = fresh
                    progress(f"target {name}: {fresh.state.name}")
                    del pending[name]
            if pending:
                if deadline is not None and time.monotonic() > deadline:
                    done.update(pending)
                    break
                time.sleep(POLL_S)
    return done


def read_target_report(store: Store, flow_run_id: UUID | str) -> dict[str, Any] | None:
    """The report a target run left for the parent in the store, or None (it ended before writing one)."""
    blob = store.get(target_report_name(flow_run_id))
    try:
        return None if blob is None else json.loads(blob)
    except ValueError:
        return None


def targets_report(config: PipelineConfig, store: Store, shared: Mapping[str, ArtifactRef], finished: Mapping[str, Any],
                   reports: Mapping[str, dict[str, Any] | None], tasks: Mapping[str, str]) -> tuple[dict[str, Any], TargetError | None]:
    """The parent's report: one ``<target>/<precision>`` row per target and precision, and each target's run.

    A target whose run failed before verifying (a crashed worker, a missing backend) still has a row per
    precision: not passed, with the run's state and message, so the report never shows a gap as a pass.

    Args:
        config: the parent's config.
        store: the run's store.
        shared: the shared stages' artifacts by stage name (the report's data and model sections).
        finished: target name -> its final flow run.
        reports: target name -> its run's report (None: none was written).
        tasks: the parent's own task runs' final states.

    Returns:
        The report (written to the store), and the error that ends the run when a target's
        precisions did not all pass (``failed_targets``; None when they did).
    """
    from flows.report import RUN_REPORTS, _run_tag, put_report, shared_facts

    created = dt.datetime.now(dt.timezone.utc)
    own = f"{RUN_REPORTS}/run-{created.strftime('%Y%m%dT%H%M%S')}-{_run_tag()}.json"
    precisions: dict[str, Any] = {}
    targets: dict[str, Any] = {}
    for t in config.targets:
        fr, rep = finished.get(t.name), reports.get(t.name)
        state = fr.state.name if fr is not None and fr.state is not None else "not started"
        entry: dict[str, Any] = {"pool": t.pool, "deployment": t.deployment_name, "flow_run": str(fr.id) if fr is not None else None, "state": state}
        if rep is not None:
            entry.update(backend=rep.get("backend"), report=rep.get("report"), passed=rep.get("passed"))
        else:
            message = (fr.state.message if fr is not None and fr.state is not None else None) or "the run left no report"
            entry.update(passed=False, error=f"{state}: {message}")
        targets[t.name] = entry
        for p in t.precisions:
            row = (rep or {}).get("precisions", {}).get(p.value)
            if row is None:
                row = {"passed": False, "failed_stage": "target", "error": f"target {t.name} ({state}): {entry.get('error') or 'no result for ' + p.value}"}
            precisions[f"{t.name}/{p.value}"] = row
    report = {
        "created": created.isoformat(timespec="seconds"),
        "report": own,
        "passed": all(v.get("passed") for v in precisions.values()),
        "backend": "; ".join(f"{n}: {e.get('backend') or e['state']}" for n, e in targets.items()),
        **shared_facts(shared, store.local),
        "targets": targets,
        "precisions": precisions,
        "tasks": dict(tasks),
        "config": config.model_dump(mode="json", exclude={"artifacts_dir", "store"}),
    }
    if config.store is not None:
        report["store"] = store.url
    put_report(store, own, report)
    return report, failed_targets(report)


def failed_targets(report: Mapping[str, Any]) -> TargetError | None:
    """The error that ends a parent run whose targets did not all pass (None when they did)."""
    bad = [f"{name}/{p.split('/', 1)[1]}" for name, e in report["targets"].items() for p, r in report["precisions"].items()
           if p.startswith(name + "/") and not r.get("passed")]
    if not bad:
        return None
    where = "; ".join(f"{n}: {e['state']}" + (f" ({e['error'][:160]})" if e.get("error") else "") for n, e in report["targets"].items() if not e.get("passed"))
    return TargetError(
        got=f"not passed on their targets: {', '.join(bad)}", expected="every target's precisions verified",
        because=where or "a target's verification failed",
        fix=f"read each target's own report ({report['report']} lists them) or its flow run in the UI; fix and re-run: what passed comes back Cached",
    )
