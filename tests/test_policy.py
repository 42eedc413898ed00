"""The attack corpus against `trtflow run` and the allow-list of deployments (tasks/policy.py).

Every payload would write a marker file if it ran. Through the command (the user's own machine, free
paths), factories that are builtins or standard-library callables, pickled weights (zip and legacy
.pt) and object arrays are refused with one line and the marker is never written. The deployment side
(the flow as a worker runs it) is in tests/flows/test_deployment_policy.py.

    pytest tests/test_policy.py -q
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from flows.cli import EXIT_FAILED, main
from tasks.config import PipelineConfig
from tasks.errors import PolicyError
from tasks.policy import BUILTIN_MODELS, MODELS_ENV, ROOTS_ENV, allowed_models, allowed_roots, check_model, check_paths, check_run


class Payload:
    """Unpickling this runs a shell command that writes ``marker``: any code a forged file could run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def assert_one_line(err: str, *words: str) -> str:
    """The terminal shows one summary line (<= 160 chars) naming the cause, indented details, no traceback."""
    lines = err.rstrip("\n").splitlines()
    assert "Traceback" not in err, err
    first = lines[0]
    assert first.startswith("trtflow: ") and len(first) <= 160, first
    for w in words:
        assert w in first, f"{w!r} not in {first!r}"
    assert all(line.startswith("  ") for line in lines[1:]), err
    return first


def test_the_payload_is_live(tmp_path: Path) -> None:
    marker = tmp_path / "live"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()


# --- the command: refused before any work, nothing executes ------------------------------------------------


@pytest.mark.parametrize(
    ("model", "kwargs", "why"),
    [
        ("os:system", lambda m: {"command": f"touch {m}"}, "standard library"),
        ("subprocess:run", lambda m: {"args": ["touch", str(m)]}, "standard library"),
        ("builtins:exec", lambda m: {"source": f"open({str(m)!r}, 'w')"}, "standard library"),
        # Reached through a module of trtflow's own: a builtin is never a factory, wherever it is found.
        ("tasks.models:np.save", lambda m: {"file": str(m), "arr": [1]}, "not a class or a Python function"),
    ],
)
def test_command_refuses_callables_that_are_not_model_factories(tmp_path: Path, capsys: pytest.CaptureFixture[str], model: str, kwargs: Any, why: str) -> None:
    marker = tmp_path / "MARKER"
    code = main(["run", "--artifacts-dir", str(tmp_path / "art"), "--model", model, "--model-kwargs", json.dumps(kwargs(marker))])
    assert code == EXIT_FAILED
    assert_one_line(capsys.readouterr().err, "is not a model factory", why)
    assert not marker.exists()
    assert not (tmp_path / "art" / "train").exists()


def _torch_payload(path: Path, marker: Path, legacy: bool) -> Path:
    import torch

    state = {"weight": torch.zeros(2, 2), "evil": Payload(marker)}
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    return path


@pytest.mark.parametrize("legacy", [False, True], ids=["zip-pt", "legacy-multi-pickle-pt"])
def test_command_refuses_pickled_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str], legacy: bool) -> None:
    import torch

    live = _torch_payload(tmp_path / "live.pt", tmp_path / "LIVE", legacy)
    torch.load(live, weights_only=False)  # the file is a real attack: a plain load runs it
    assert (tmp_path / "LIVE").exists()

    marker = tmp_path / "MARKER"
    weights = _torch_payload(tmp_path / "evil.pt", marker, legacy)
    code = main(["run", "--artifacts-dir", str(tmp_path / "art"), "--weights", str(weights)])
    assert code == EXIT_FAILED
    assert_one_line(capsys.readouterr().err, "ModelError")
    assert not marker.exists()


def _object_npz(path: Path, marker: Path) -> Path:
    x = np.empty(40, dtype=object)
    x[:] = [Payload(marker)] * 40
    np.savez(path, x=x, y=np.arange(40) % 2)
    return path


def test_command_refuses_object_arrays(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    live = _object_npz(tmp_path / "live.npz", tmp_path / "LIVE")
    with np.load(live, allow_pickle=True) as z:
        z["x"]
    assert (tmp_path / "LIVE").exists()  # the archive is a real attack when unpickled

    marker = tmp_path / "MARKER"
    code = main(["run", "--artifacts-dir", str(tmp_path / "art"), "--dataset", str(_object_npz(tmp_path / "evil.npz", marker))])
    assert code == EXIT_FAILED
    assert_one_line(capsys.readouterr().err, "object array")
    assert not marker.exists()


def test_command_keeps_free_paths(tmp_path: Path) -> None:
    """The command is the user's own: no allow-list applies to it (only deployment runs are checked)."""
    from flows.runtime import started_by_deployment

    assert not started_by_deployment()  # outside any flow run


# --- the allow-list itself ------------------------------------------------------------------------------------


def test_allowed_models_are_trtflows_own_plus_the_declared_ones() -> None:
    assert allowed_models({}) == list(BUILTIN_MODELS)
    assert allowed_models({MODELS_ENV: "mypkg.nets:Net, other:make  mypkg.nets:Net"}) == [*BUILTIN_MODELS, "mypkg.nets:Net", "other:make"]


def test_the_form_offers_the_allowed_models_as_a_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.utilities.callables import parameter_schema

    from flows.pipeline import pipeline

    monkeypatch.setenv(MODELS_ENV, "mypkg.nets:Net")
    # What `prefect deploy` and `trtflow serve` store as the deployment's parameter_openapi_schema.
    schema = parameter_schema(pipeline.fn).model_dump_for_openapi()
    model = schema["definitions"]["TrainConfig"]["properties"]["model"]
    assert model["enum"] == [*BUILTIN_MODELS, "mypkg.nets:Net"] and model["default"] in model["enum"]


@pytest.mark.parametrize("model", ["os:system", "subprocess:run", "builtins:exec", "mypkg.nets:Net.__init__.__globals__", "tasks.models:np.save"])
def test_a_model_outside_the_list_is_refused(model: str) -> None:
    with pytest.raises(PolicyError) as info:
        check_model(model, {MODELS_ENV: "mypkg.nets:Net"})
    assert info.value.summary.startswith(f"not allowed: train.model '{model}' is not in this worker's {MODELS_ENV}")
    assert MODELS_ENV in info.value.summary and len(info.value.summary) <= 150


def _roots(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    allowed = tmp_path / "allowed"
    (allowed / "data").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    return allowed, {ROOTS_ENV: str(allowed)}


def test_paths_must_resolve_under_the_allowed_roots(tmp_path: Path) -> None:
    allowed, env = _roots(tmp_path)
    inside = allowed / "data" / "d.npz"
    inside.write_bytes(b"")
    secret = tmp_path / "outside" / "secret.npz"
    secret.write_bytes(b"")
    (allowed / "data" / "link.npz").symlink_to(secret)
    (allowed / "data" / "folder").symlink_to(tmp_path / "outside")
    npy_dir = allowed / "data" / "npy"
    npy_dir.mkdir()
    (npy_dir / "x.npy").symlink_to(secret)  # a folder dataset inside, one of its arrays outside

    check_paths({"config.data.dataset": inside, "config.artifacts_dir": allowed / "art"}, env)
    for bad in (allowed / ".." / "outside" / "secret.npz", allowed / "data" / "link.npz", allowed / "data" / "folder" / "secret.npz", npy_dir):
        with pytest.raises(PolicyError) as info:
            check_paths({"config.data.dataset": bad}, env)
        assert f"lies outside this worker's {ROOTS_ENV}" in info.value.summary
        assert "really" in info.value.got


def test_the_working_directory_is_always_an_allowed_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert allowed_roots({}) == [tmp_path.resolve()]
    assert allowed_roots({ROOTS_ENV: f"/data{os.pathsep}/models"})[0] == tmp_path.resolve()


def test_check_run_checks_the_model_first_then_every_path(tmp_path: Path) -> None:
    allowed, env = _roots(tmp_path)
    ok = PipelineConfig(artifacts_dir=allowed / "art")
    check_run(ok, env)
    with pytest.raises(PolicyError, match="train.model"):
        check_run(ok.model_copy(update={"train": ok.train.model_copy(update={"model": "os:system"})}), env)
    with pytest.raises(PolicyError, match="config.train.weights"):
        check_run(ok.model_copy(update={"train": ok.train.model_copy(update={"weights": tmp_path / "outside" / "w.pt"})}), env)
    with pytest.raises(PolicyError, match="config.artifacts_dir"):
        check_run(PipelineConfig(artifacts_dir=tmp_path / "outside" / "art"), env)


def test_check_run_checks_a_folder_store_as_a_path_and_leaves_a_bucket_alone(tmp_path: Path) -> None:
    allowed, env = _roots(tmp_path)
    ok = PipelineConfig(artifacts_dir=allowed / "art")
    check_run(ok.model_copy(update={"store": str(allowed / "shared")}), env)
    check_run(ok.model_copy(update={"store": "s3://bucket/prefix"}), env)
    for outside in (str(tmp_path / "outside"), f"file://{tmp_path}/outside"):
        with pytest.raises(PolicyError, match="config.store"):
            check_run(ok.model_copy(update={"store": outside}), env)
