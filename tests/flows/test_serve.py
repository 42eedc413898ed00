"""``trtflow serve``: a deployment served from one process, triggered through the API like the UI does."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from prefect_env import Api, Server, stop, tiny


def test_serve_options_and_config_file(tmp_path: Path) -> None:
    from flows.cli import _parser, main
    from flows.serve import default_parameters

    args = _parser().parse_args(["serve", "--cron", "0 2 * * *", "--name", "nightly-local"])
    assert (args.command, args.cron, args.name, args.task_runner) == ("serve", "0 2 * * *", "nightly-local", "threads")
    assert default_parameters(None) == {}
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"train": {"epochs": 2}, "precisions": ["fp16"]}))
    assert default_parameters(good) == {"config": {"train": {"epochs": 2}, "precisions": ["fp16"]}}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train": {"epochs": 0}}))
    # Rejected before anything is registered, with the field named (exit status 2 = invalid options).
    assert main(["serve", "--config", str(bad)]) == 2


@pytest.mark.slow
def test_served_deployment_runs_a_triggered_run(prefect_server: Server, tmp_path: Path, shared_root: Path) -> None:
    cfg = tmp_path / "serve.json"
    cfg.write_text(json.dumps(tiny(shared_root, precisions=["fp32"])))
    trtflow = str(Path(sys.executable).with_name("trtflow"))
    proc = prefect_server.start([trtflow, "serve", "--name", "served-test", "--config", str(cfg)], "serve.log")
    try:
        with Api(prefect_server) as api:
            deadline = time.monotonic() + 90
            while True:
                try:
                    dep = api.client.read_deployment_by_name("trtflow/served-test")
                    break
                except Exception:  # noqa: BLE001 - not registered yet
                    assert proc.poll() is None, (prefect_server.home / "serve.log").read_text()[-3000:]
                    assert time.monotonic() < deadline, "trtflow serve did not register its deployment in 90 s"
                    time.sleep(1)
            # The deployment's default parameters are the config file's; a Quick run uses them.
            assert dep.parameters == {"config": json.loads(cfg.read_text())}
            run = api.client.create_flow_run_from_deployment(dep.id)
            fr = api.wait(run.id, timeout=240)
            assert fr.state.type.value == "COMPLETED", fr.state.message
            assert api.task_states(run.id)["verify"][0] in ("Completed", "Cached")
    finally:
        stop(proc)
    assert proc.poll() is not None
