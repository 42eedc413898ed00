"""Shared fixtures: a Prefect test server, a fast config, and one tiny trained pipeline per session."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "trtflow")
# Dataset digests are remembered in a user cache file (tasks/datasource.py): keep tests out of the home folder.
os.environ.setdefault("TRTFLOW_CACHE_DIR", __import__("tempfile").mkdtemp(prefix="trtflow-test-cache-"))

from tasks.artifacts import ArtifactRef  # noqa: E402
from tasks.config import BatchProfile, DataConfig, PipelineConfig, ProfileConfig, TrainConfig  # noqa: E402


#: fixtures that take seconds to build (engines, a trained model): their tests run last under mutmut
_COSTLY_FIXTURES = frozenset({"branch", "regression_branch", "sequence_model", "trained"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under mutmut (docs/development.md), cheap tests first and each file's tests in their order.

    mutmut hands a mutant's tests over in no particular order and stops at the first failure (``-x``):
    a mutant the cheap tests kill is then killed before any engine is built, and a file's module
    fixtures are built once instead of once per switch between files. Plain runs keep pytest's order.
    """
    if "__mutmut_" not in os.environ.get("MUTANT_UNDER_TEST", ""):
        return
    items.sort(key=lambda item: (bool(_COSTLY_FIXTURES & set(getattr(item, "fixturenames", ()))), str(item.path), item.location[1] or 0))


@pytest.fixture(scope="session")
def prefect_harness():
    """One isolated Prefect database and API for the whole session (its start costs ~10 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def tiny_config_for(root: Path, **overrides: object) -> PipelineConfig:
    """A config that runs the whole pipeline in seconds: one epoch, small batches."""
    base: dict[str, object] = {
        "artifacts_dir": root,
        "data": DataConfig(),
        "train": TrainConfig(epochs=1, batch_size=64),
        "batch": BatchProfile(min=1, opt=8, max=64),
        "calibration_samples": 64,
        # The profile stage's numbers are not asserted on in flow tests: time a few runs only.
        "profile": ProfileConfig(min_seconds=0, min_iterations=3, max_seconds=0.1, warmup=1),
    }
    base.update(overrides)
    return PipelineConfig(**base)  # type: ignore[arg-type]


@pytest.fixture
def tiny_config(tmp_path: Path) -> PipelineConfig:
    return tiny_config_for(tmp_path / "artifacts")


@dataclass
class Trained:
    """The shared upstream artifacts of one tiny pipeline (plain functions, no Prefect)."""

    root: Path
    config: PipelineConfig
    data: ArtifactRef
    checkpoint: ArtifactRef
    onnx: ArtifactRef


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """data -> train -> export once per session; tests must not modify these artifacts."""
    from tasks.data import splits_from_dataset
    from tasks.export import onnx_from_checkpoint
    from tasks.train import checkpoint_from_splits

    root = tmp_path_factory.mktemp("trained")
    cfg = tiny_config_for(root)
    data = splits_from_dataset(cfg.data, root)
    ckpt = checkpoint_from_splits(data, cfg.train, root)
    onnx = onnx_from_checkpoint(ckpt, root)
    return Trained(root, cfg, data, ckpt, onnx)


@pytest.fixture(scope="session")
def image_bundle(tmp_path_factory: pytest.TempPathFactory):
    """The plain pipeline on tiny digits (fp32) through the package stage; tests must not modify it."""
    from _bundle_kit import make_bundle

    return make_bundle("image", tmp_path_factory.mktemp("image-bundle") / "art")


@pytest.fixture(scope="session")
def text_bundle(tmp_path_factory: pytest.TempPathFactory):
    """The plain pipeline on a held-out two-input int64 text model (fp32, fp16; ships the smallest)."""
    from _bundle_kit import make_bundle

    return make_bundle("text", tmp_path_factory.mktemp("text-bundle") / "art")


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on 127.0.0.1 (the real S3 HTTP API, not a mocked client) for the session.

    Skips with the reason when obstore (the S3 store's client) or moto is not installed.
    """
    pytest.importorskip("obstore")
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint, monkeypatch):
    """A fresh bucket, with the AWS variables of this process pointing at the server: (boto3 client, bucket name)."""
    from _s3_kit import S3_CREDENTIALS, new_bucket

    for name, value in {**S3_CREDENTIALS, "AWS_ENDPOINT_URL": s3_endpoint}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    return new_bucket(s3_endpoint)
