"""The pipeline on a Dask cluster of several worker processes (prefect-dask), against a real server.

Checks that the per-precision branches really spread over more than one worker process, that the
ArtifactRef results and the content cache work there (a second run is Cached), and the CLI's options.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from prefect_env import Api, Server, tiny

pytest.importorskip("prefect_dask", reason="prefect-dask is not installed (pip install '.[dask]')")


@pytest.mark.slow
def test_branches_run_on_several_dask_worker_processes(prefect_server: Server, shared_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from distributed import Client, LocalCluster
    from distributed.diagnostics.task_stream import TaskStreamPlugin  # noqa: F401 - the stream needs it
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.serve import pipeline_on
    from tasks.config import PipelineConfig

    # Worker processes inherit the environment: point them at the test server, not a temporary one.
    for k, v in prefect_server.env.items():
        if k.startswith("PREFECT_"):
            monkeypatch.setenv(k, v)
    # The shared folder: upstream stages may come back Cached from other tests; fp16 is built here.
    config = PipelineConfig.model_validate(tiny(shared_root, precisions=["fp32", "fp16", "int8"]))
    try:
        cluster_cm: Any = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)  # type: ignore[arg-type]
        with cluster_cm as cluster, Client(cluster) as client_cm:
            client: Any = client_cm
            worker_pids = set(client.run(os.getpid).values())
            assert len(worker_pids) == 2 and os.getpid() not in worker_pids
            flow = pipeline_on("dask", dask_address=cluster.scheduler_address)
            with temporary_settings(updates={PREFECT_API_URL: prefect_server.api}):
                from distributed import get_task_stream

                stream: Any
                with get_task_stream(client) as stream:
                    state = flow(config, return_state=True)
                assert state.is_completed(), state.message
                report = state.result()
                second = flow(config, return_state=True)
            with Api(prefect_server) as api:
                cached = api.task_states(second.state_details.flow_run_id)
    finally:
        # This process's events worker was started against the test server's URL (task-run states
        # travel as events); drain it so later flows in this process report to their own API again.
        from prefect.events.worker import EventsWorker

        EventsWorker.drain_all()
    workers = {t["worker"] for t in stream.data}
    assert len(workers) >= 2, f"all branch tasks ran on one worker: {workers}"
    assert report["passed"] and set(report["precisions"]) == {"fp32", "fp16", "int8"}
    # The artifact store (the only cache) is found from inside Dask workers too.
    assert set(cached["verify"]) == {"Cached"} and set(cached["build"]) == {"Cached"}, cached


def test_task_runner_options() -> None:
    from flows.cli import _parser
    from flows.serve import pipeline_on
    from tasks.errors import ConfigError

    args = _parser().parse_args(["run", "--task-runner", "dask", "--dask-address", "tcp://127.0.0.1:8786"])
    assert (args.task_runner, args.dask_address, args.dask_workers) == ("dask", "tcp://127.0.0.1:8786", 2)
    assert _parser().parse_args(["run"]).task_runner == "threads"
    from flows.pipeline import pipeline

    assert pipeline_on("threads") is pipeline
    flow = pipeline_on("dask", dask_workers=3)
    assert type(flow.task_runner).__name__ == "DaskTaskRunner"
    assert flow.name == pipeline.name
    with pytest.raises(ConfigError, match="--task-runner dask"):
        pipeline_on("threads", dask_address="tcp://x:1")
    with pytest.raises(ConfigError, match="at least 1"):
        pipeline_on("dask", dask_workers=0)
