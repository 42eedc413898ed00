"""The repo's prefect.yaml on a real server and process worker: deploy, run, fail, Retry, bad input, crash.

These start ``prefect server start``, ``prefect deploy`` and ``prefect worker start`` themselves (see
conftest.py); run them with ``pytest tests/flows/test_deployments.py``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from prefect_env import REPO, Api, Server, Worker, tiny

UPSTREAM = ("data", "train", "export", "validate", "precision", "build")


def _finished(api: Api, run_id: UUID, stage: str, timeout: float = 180) -> None:
    """Wait until a stage of a running flow run has finished (Completed or Cached)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(s in ("Completed", "Cached") for s in api.task_states(run_id).get(stage, [])):
            return
        time.sleep(0.5)
    raise AssertionError(f"stage {stage} of {run_id} did not finish in {timeout} s: {api.task_states(run_id)}")


def test_deployments_have_schedule_pool_and_typed_form(prefect_server: Server, deployed: dict[str, UUID]) -> None:
    assert {"nightly", "on-demand"} <= set(deployed)
    with Api(prefect_server) as api:
        nightly = api.client.read_deployment(deployed["nightly"])
        on_demand = api.client.read_deployment(deployed["on-demand"])
    for d in (nightly, on_demand):
        assert d.work_pool_name == "trtflow-local"
        assert d.entrypoint == "flows/pipeline.py:pipeline"
        # The pull step makes every run start in the project root, whoever starts the worker where.
        assert d.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
    assert [s.schedule.cron for s in nightly.schedules] == ["0 2 * * *"]  # type: ignore[union-attr]
    assert nightly.parameters["config"] == {"precisions": ["fp16", "int8"], "refresh": ["build"]}
    assert not on_demand.schedules

    # The UI's Run form is rendered from this schema: nested, typed, described fields with defaults.
    schema = on_demand.parameter_openapi_schema
    assert schema is not None
    config = schema["properties"]["config"]
    assert config["$ref"] == "#/definitions/PipelineConfig" and config["description"]
    assert config["default"]["train"]["epochs"] == 5
    defs = schema["definitions"]
    epochs = defs["TrainConfig"]["properties"]["epochs"]
    assert epochs["type"] == "integer" and epochs["minimum"] == 1 and epochs["description"] == "Training epochs."
    assert defs["PipelineConfig"]["properties"]["precisions"]["items"]["$ref"] == "#/definitions/Precision"
    assert defs["Precision"]["enum"] == ["fp32", "fp16", "int8", "bf16"]
    # Form sections are titled by what they hold, not by class name, and say what they are for.
    assert [defs[m]["title"] for m in ("DataConfig", "TrainConfig", "BatchProfile", "EngineOptions")] == ["Data", "Training", "Batch sizes", "Engine options"]
    assert all(defs["PipelineConfig"]["properties"][f].get("description") for f in ("data", "train", "batch", "engine", "profile"))
    for model in ("PipelineConfig", "DataConfig", "TrainConfig", "BatchProfile", "EngineOptions", "Tolerance"):
        props = defs[model]["properties"]
        undocumented = [name for name, p in props.items() if not p.get("description") and "$ref" not in p and "allOf" not in p]
        assert not undocumented, f"{model} fields without a description in the UI form: {undocumented}"


@pytest.mark.slow
def test_deployed_run_end_to_end_shows_results_in_the_ui(prefect_server: Server, worker: Worker, shared_root: Path) -> None:
    root = shared_root
    with Api(prefect_server) as api:
        run_id = api.run("on-demand", tiny(root))
        fr = api.wait(run_id)
        assert fr.state.type.value == "COMPLETED", fr.state.message
        states = api.task_states(run_id)
        arts = api.artifacts(run_id)
    assert len(states["verify"]) == 2 and set(states["verify"]) <= {"Completed", "Cached"}
    assert set(states) >= {*UPSTREAM, "verify"}
    # What the UI shows: summary, verification table, progress at 100 %, figures, file links.
    assert {"trtflow-summary", "trtflow-verification", "trtflow-training-curve", "trtflow-confusion-matrix"} <= set(arts)
    assert arts["trtflow-verification"].type == "table"
    assert "all precisions verified" in arts["trtflow-summary"].data
    assert arts["trtflow-training-curve"].data.count("data:image/png;base64,") == 1
    assert arts["trtflow-progress"].type == "progress" and arts["trtflow-progress"].data == 100.0
    links = {k: a for k, a in arts.items() if a.type == "markdown" and k.startswith(("trtflow-engine", "trtflow-report", "trtflow-onnx", "trtflow-checkpoint", "trtflow-bundle"))}
    assert {"trtflow-report", "trtflow-onnx", "trtflow-engine-fp32", "trtflow-engine-int8", "trtflow-bundle"} <= set(links)
    # The bundle's card says what was shipped and why; the summary has its section.
    assert "shipped as Triton model 'default_model'" in links["trtflow-bundle"].data and "fastest: " in links["trtflow-bundle"].data
    assert "## Bundle" in arts["trtflow-summary"].data
    for a in links.values():
        target = a.data.split("](", 1)[1].rstrip(")") if a.data.startswith("[") else a.data
        assert not target.startswith("/") and (root / target).is_file(), a.data
    assert (root / "reports" / "training-curve.png").stat().st_size > 1000
    assert (root / "reports" / "confusion-matrix.png").stat().st_size > 1000


@pytest.mark.slow
def test_retry_after_failure_reruns_only_the_failed_stage(prefect_server: Server, worker: Worker, shared_root: Path) -> None:
    root = shared_root
    # atol = rtol = 0: no engine matches PyTorch bit for bit, so verify fails deterministically.
    impossible = tiny(root, precisions=["fp32"], tolerances={"fp32": {"atol": 0.0, "rtol": 0.0}})
    with Api(prefect_server) as api:
        run_id = api.run("on-demand", impossible)
        fr = api.wait(run_id)
        assert fr.state.type.value == "FAILED"
        assert "fp32" in (fr.state.message or "") or "verif" in (fr.state.message or "").lower()
        first = api.task_states(run_id)
        assert first["verify"] == ["Failed"] and first["train"][0] in ("Completed", "Cached")

        # What the UI's Retry button does for a deployed run: the same run is scheduled again.
        prefect_server.cli("flow-run", "retry", str(run_id))
        fr = api.wait(run_id, attempt=2)
        assert fr.run_count == 2
        assert fr.state.type.value == "FAILED"
        again = api.task_states(run_id)
        # Finished stages come back Cached; only the failed stage ran again (and failed again).
        for stage in UPSTREAM:
            assert again[stage] == ["Cached"] * len(again[stage]), (stage, again)
        assert again["verify"] == ["Failed"]
        # The attempts stay apart in the run's history: the first one's task runs are kept.
        assert api.task_states(run_id, attempt=1)["verify"] == ["Failed"]
    # The fix is a new run with a tolerance that can be met (or the same run after fixing the data or
    # code); test_pipeline.py shows that only the failed stage and its dependents run then.


def test_invalid_parameters_are_rejected_before_the_run_starts(prefect_server: Server, worker: Worker) -> None:
    from prefect.exceptions import PrefectHTTPStatusError

    with Api(prefect_server) as api:
        # A value the form's schema forbids: the server refuses to create the run, naming the field.
        with pytest.raises(PrefectHTTPStatusError) as err:
            api.run("on-demand", {"train": {"epochs": 0}})
        text = str(err.value.response.text)
        assert err.value.response.status_code == 409
        assert "epochs" in text and "minimum of 1" in text, text

        with pytest.raises(PrefectHTTPStatusError) as err:
            api.run("on-demand", {"precisions": ["fp64"]})
        assert "fp64" in err.value.response.text and "is not one of" in err.value.response.text

        # A rule across fields the schema cannot express: pydantic validates the flow's parameters and
        # the run fails before any stage runs, with the config's own message.
        run_id = api.run("on-demand", {"batch": {"min": 64, "opt": 8, "max": 16}})
        fr = api.wait(run_id, timeout=120)
        assert fr.state.type.value == "FAILED"
        assert "min <= opt <= max" in (fr.state.message or ""), fr.state.message
        assert api.task_states(run_id) == {}


@pytest.mark.slow
def test_run_of_a_killed_worker_completes_on_retry_reusing_finished_stages(prefect_server: Server, worker: Worker, tmp_path: Path) -> None:
    from prefect.states import Crashed

    root = tmp_path / "artifacts"
    # Three branches left after training, so the run is still busy when the worker dies.
    config = tiny(root, precisions=["fp32", "fp16", "int8"], train={"epochs": 1, "seed": 1})
    with Api(prefect_server) as api:
        run_id = api.run("on-demand", config)
        _finished(api, run_id, "train")
        worker.kill()  # SIGKILL to the worker and its flow-run process at once: the machine is lost
        time.sleep(2)  # anything in flight to the API has landed
        try:
            fr = api.client.read_flow_run(run_id)
            if fr.state is not None and fr.state.type.value == "COMPLETED":  # pragma: no cover
                pytest.skip("the run finished before the worker could be killed")
            # Nobody is left to report the run: it stays Running until someone marks it Crashed (in the
            # UI: the run's menu -> Change state -> Crashed), which is what makes Retry available.
            assert fr.state is not None and fr.state.type.value == "RUNNING", fr.state
            api.client.set_flow_run_state(run_id, Crashed(message="worker lost"), force=True)
        finally:
            worker.start()
        prefect_server.cli("flow-run", "retry", str(run_id))
        fr = api.wait(run_id, attempt=2)
        assert fr.state.type.value == "COMPLETED", fr.state.message
        first, retried = api.task_states(run_id, attempt=1), api.task_states(run_id, attempt=2)
    assert first["train"] == ["Completed"]
    # The stages the lost worker finished come back Cached; the rest ran.
    assert retried["data"] == ["Cached"] and retried["train"] == ["Cached"], retried
    assert len(retried["verify"]) == 3, retried
