"""The attack corpus through the flow as a deployment runs it: nothing executes, each is refused with one line.

The repo's prefect.yaml is deployed on a real server (conftest.py). Runs are created through the API
with parameter enforcement switched off for the run (``enforce_parameter_schema: false``, which any
API client may send), so that the worker-side gate is what is tested; the API's own refusal of a model
outside the form's choice is tested too. Runs are created Pending, so that the session's worker (if
another test started one) never picks them up: they run here through Prefect's engine with the flow
run, or, once, through ``prefect flow-run execute``, the command a process worker runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from uuid import UUID

import numpy as np
import pytest

from prefect_env import REPO, Api, Server, Worker, prefect_bin, tiny
from tasks.policy import BUILTIN_MODELS, MODELS_ENV, ROOTS_ENV

PAYLOAD = "import os\nos.system('touch {marker}')\n"


def _create(server: Server, deployment_id: UUID, config: dict[str, Any], enforce: bool | None = False, job_variables: dict[str, Any] | None = None, state: str = "PENDING") -> tuple[int, Any]:
    """POST /deployments/{id}/create_flow_run as the UI or any API client does; (HTTP status, body)."""
    body: dict[str, Any] = {"parameters": {"config": config}, "state": {"type": state, "name": state.title()}}
    if enforce is not None:
        body["enforce_parameter_schema"] = enforce
    if job_variables is not None:
        body["job_variables"] = job_variables
    for attempt in range(6):
        req = urllib.request.Request(f"{server.api}/deployments/{deployment_id}/create_flow_run", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            if exc.code in (429, 502, 503) and attempt < 5:  # a busy server (SQLite locked): retry as Prefect's client does
                time.sleep(2**attempt)
                continue
            return exc.code, json.loads(exc.read() or b"null")
    raise AssertionError("unreachable")


def _run_as_deployment(api: Api, run_id: str) -> Any:
    """Run a deployment's flow run here, as the worker's flow-run process does (the flow run carries the deployment)."""
    from prefect.flow_engine import run_flow

    from flows.pipeline import pipeline

    fr = api.client.read_flow_run(UUID(run_id))
    assert fr.deployment_id is not None
    return run_flow(pipeline, flow_run=fr, parameters=fr.parameters, return_type="state")


def test_the_form_offers_only_allowed_models_and_the_api_refuses_others(prefect_server: Server, deployed: dict[str, UUID], tmp_path: Path) -> None:
    with Api(prefect_server) as api:
        schema = api.client.read_deployment(deployed["on-demand"]).parameter_openapi_schema
    assert schema["definitions"]["TrainConfig"]["properties"]["model"]["enum"] == list(BUILTIN_MODELS)
    status, body = _create(prefect_server, deployed["on-demand"], tiny(tmp_path / "art", train={"model": "os:system"}), enforce=None)
    assert status == 409 and "config.train.model" in json.dumps(body), body


def _torch_payload(path: Path, marker: Path, legacy: bool) -> Path:
    import torch

    from test_policy import Payload

    torch.save({"weight": torch.zeros(2, 2), "evil": Payload(marker)}, path, _use_new_zipfile_serialization=not legacy)
    return path


def _object_npz(path: Path, marker: Path) -> Path:
    from test_policy import Payload

    x = np.empty(40, dtype=object)
    x[:] = [Payload(marker)] * 40
    np.savez(path, x=x, y=np.arange(40) % 2)
    return path


def _digits_npz(path: Path) -> Path:
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.random((60, 8), dtype=np.float32), y=np.arange(60) % 2)
    return path


ATTACKS = {
    # name: (what to change in the config, given (allowed, outside, marker); the error's kind; words of its one line)
    "os-system": (lambda a, o, m: {"train": {"model": "os:system", "model_kwargs": {"command": f"touch {m}"}}}, "PolicyError", MODELS_ENV),
    "subprocess": (lambda a, o, m: {"train": {"model": "subprocess:run", "model_kwargs": {"args": ["touch", str(m)]}}}, "PolicyError", MODELS_ENV),
    "builtins-exec": (lambda a, o, m: {"train": {"model": "builtins:exec", "model_kwargs": {"source": f"open({str(m)!r}, 'w')"}}}, "PolicyError", MODELS_ENV),
    # A module that runs code when imported: refused before the import.
    "import-time-code": (lambda a, o, m: {"train": {"model": "hostile_probe:Net"}}, "PolicyError", MODELS_ENV),
    "dotdot-dataset": (lambda a, o, m: {"data": {"dataset": str(a / ".." / "outside" / "d.npz")}}, "PolicyError", ROOTS_ENV),
    "symlinked-dataset": (lambda a, o, m: {"data": {"dataset": str(a / "link.npz")}}, "PolicyError", ROOTS_ENV),
    "symlinked-weights": (lambda a, o, m: {"train": {"weights": str(a / "weights-link.pt")}}, "PolicyError", ROOTS_ENV),
    "artifacts-outside": (lambda a, o, m: {"artifacts_dir": str(o / "art")}, "PolicyError", ROOTS_ENV),
    "pickled-weights": (lambda a, o, m: {"train": {"weights": str(_torch_payload(a / "evil.pt", m, legacy=False))}}, "ModelError", "weights"),
    "legacy-pickled-weights": (lambda a, o, m: {"train": {"weights": str(_torch_payload(a / "evil-legacy.pt", m, legacy=True))}}, "ModelError", "weights"),
    "object-arrays": (lambda a, o, m: {"data": {"dataset": str(_object_npz(a / "evil.npz", m))}}, "DatasetError", "holds Python objects"),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_deployment_runs_refuse_the_attack_corpus(prefect_server: Server, deployed: dict[str, UUID], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, attack: str) -> None:
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    marker = tmp_path / "MARKER"
    _digits_npz(outside / "d.npz")
    (allowed / "link.npz").symlink_to(outside / "d.npz")
    (outside / "w.pt").write_bytes(b"")
    (allowed / "weights-link.pt").symlink_to(outside / "w.pt")
    (tmp_path / "hostile_probe.py").write_text(PAYLOAD.format(marker=marker) + "Net = None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(ROOTS_ENV, str(allowed))
    monkeypatch.delenv(MODELS_ENV, raising=False)

    change, kind, words = ATTACKS[attack]
    config = tiny(allowed / "art", precisions=["fp32"], **change(allowed, outside, marker))
    status, body = _create(prefect_server, deployed["on-demand"], config)
    assert status == 201, body
    with Api(prefect_server) as api:
        state = _run_as_deployment(api, body["id"])
    assert state.is_failed(), state
    message = state.message or ""
    assert kind in message and words in message and "Traceback" not in message, message
    assert not marker.exists(), "the payload ran"
    assert not (allowed / "art" / "train").exists()  # refused before any training


@pytest.mark.slow
def test_a_worker_flow_run_process_refuses_os_system(prefect_server: Server, deployed: dict[str, UUID], tmp_path: Path) -> None:
    """`prefect flow-run execute`, what a process worker runs for each flow run, with the worker's environment."""
    marker = tmp_path / "MARKER"
    config = tiny(tmp_path / "art", precisions=["fp32"], train={"model": "os:system", "model_kwargs": {"command": f"touch {marker}"}})
    status, body = _create(prefect_server, deployed["on-demand"], config)
    assert status == 201, body
    env = {**prefect_server.env, "PREFECT__FLOW_RUN_ID": body["id"]}
    env.pop(MODELS_ENV, None)
    res = subprocess.run([prefect_bin(), "flow-run", "execute"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    with Api(prefect_server) as api:
        fr = api.client.read_flow_run(UUID(body["id"]))
    assert fr.state is not None and fr.state.type.value == "FAILED", (fr.state, res.stderr[-3000:])
    message = fr.state.message or ""
    assert "PolicyError" in message and "train.model 'os:system'" in message and MODELS_ENV in message, message
    assert not marker.exists() and os.environ.get(MODELS_ENV) is None


@pytest.mark.slow
def test_a_runs_job_variables_cannot_replace_the_workers_command_or_environment(prefect_server: Server, worker: Worker, deployed: dict[str, UUID], tmp_path: Path) -> None:
    """Prefect's Custom run also takes job variables; on the documented pool (work-pool-template.json) a run
    cannot set the process's command (`touch`) nor its environment (an allow-list of its own, PYTHONPATH)."""
    command_marker, import_marker = tmp_path / "COMMAND-RAN", tmp_path / "IMPORTED"
    (tmp_path / "hostile_probe.py").write_text(PAYLOAD.format(marker=import_marker) + "Net = None\n")
    config = tiny(tmp_path / "art", precisions=["fp32"], train={"model": "hostile_probe:Net"})
    job_variables = {"command": f"touch {command_marker}", "env": {MODELS_ENV: "hostile_probe:Net", "PYTHONPATH": str(tmp_path)}}
    status, body = _create(prefect_server, deployed["on-demand"], config, job_variables=job_variables, state="SCHEDULED")
    assert status == 201, body
    with Api(prefect_server) as api:
        deadline = time.monotonic() + 300
        while not command_marker.exists():  # a replaced command never runs the flow: stop waiting at once
            fr = api.client.read_flow_run(UUID(body["id"]))
            if (fr.state is not None and fr.state.is_final()) or time.monotonic() > deadline:
                break
            time.sleep(1)
    assert not command_marker.exists(), "the run's job variables replaced the worker's command"
    assert not import_marker.exists(), "the run's job variables changed the flow run's environment"
    assert fr.state.type.value == "FAILED" and "PolicyError" in (fr.state.message or ""), fr.state
