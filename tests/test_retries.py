"""Retries: a stage that fails transiently (I/O hiccup, timeout) is retried and recovers; a
deterministic failure (bad input, full disk) fails at the first attempt.

    pytest tests/test_retries.py -q
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import _pipeline_kit as kit
import tasks.data
from tasks.caching import RETRY_DELAYS
from tasks.errors import (
    ArtifactError,
    DatasetError,
    ModelError,
    OnnxValidationError,
    StorageError,
    TransientError,
    VerificationError,
    is_retryable,
)


@pytest.fixture
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return kit.tiny_dataset(tmp_path_factory.getbasetemp() / "robust-tiny.npz")


def _flaky(monkeypatch: pytest.MonkeyPatch, errors: list[BaseException]) -> list[int]:
    """Make the data stage raise ``errors`` one per call, then work; return the list of attempts."""
    attempts: list[int] = []
    real = tasks.data.check_dataset

    def check(*args: Any, **kwargs: Any) -> Any:
        attempts.append(len(attempts) + 1)
        if len(attempts) <= len(errors):
            raise errors[len(attempts) - 1]
        return real(*args, **kwargs)

    monkeypatch.setattr(tasks.data, "check_dataset", check)
    return attempts


def _run(root: Path, dataset: Path) -> Any:
    from tasks.config import DataConfig
    from flows.pipeline import TASKS

    task = TASKS["data"].with_options(retry_delay_seconds=0)
    return task(DataConfig(dataset=dataset), root, return_state=True)


@pytest.mark.parametrize(
    "error",
    [OSError(errno.EIO, "Input/output error"), TransientError("a timeout", "an answer", "the NFS server hiccupped", "retry"), TimeoutError("slow")],
    ids=["EIO", "TransientError", "TimeoutError"],
)
def test_transient_failure_is_retried_until_it_succeeds(
    prefect_harness: None, tmp_path: Path, dataset: Path, monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> None:
    attempts = _flaky(monkeypatch, [error, error])
    state = _run(tmp_path / "artifacts", dataset)
    assert state.is_completed(), state
    assert attempts == [1, 2, 3]
    assert state.result().problems() == []


def test_transient_failure_that_persists_gives_up_after_the_retries(
    prefect_harness: None, tmp_path: Path, dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    attempts = _flaky(monkeypatch, [OSError(errno.EIO, "Input/output error")] * 10)
    state = _run(tmp_path / "artifacts", dataset)
    assert state.is_failed()
    assert len(attempts) == 1 + len(RETRY_DELAYS)
    with pytest.raises(OSError, match="Input/output"):
        state.result()


@pytest.mark.parametrize(
    "error",
    [
        DatasetError("labels", "ints", "they index logits", "fix y"),
        ValueError("a programming error"),
        OSError(errno.ENOENT, "No such file or directory"),
        OSError(errno.ENOSPC, "No space left on device"),
    ],
    ids=["DatasetError", "ValueError", "ENOENT", "ENOSPC"],
)
def test_deterministic_failure_is_not_retried(
    prefect_harness: None, tmp_path: Path, dataset: Path, monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> None:
    attempts = _flaky(monkeypatch, [error] * 10)
    state = _run(tmp_path / "artifacts", dataset)
    assert state.is_failed()
    assert attempts == [1]


def test_full_disk_inside_a_stage_fails_once_with_a_storage_error(
    prefect_harness: None, tmp_path: Path, dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes: list[int] = []

    def full(*args: Any, **kwargs: Any) -> None:
        writes.append(1)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", full)
    state = _run(tmp_path / "artifacts", dataset)
    assert state.is_failed() and writes == [1]
    with pytest.raises(StorageError, match="No space left on device"):
        state.result()
    assert kit.leftovers(tmp_path / "artifacts") == []


@pytest.mark.parametrize(
    ("error", "retry"),
    [
        (TransientError("a", "b", "c", "d"), True),
        (TimeoutError(), True),
        (ConnectionResetError(), True),
        (OSError(errno.EIO, "io"), True),
        (OSError(errno.ENOSPC, "full"), False),
        (OSError(errno.EACCES, "denied"), False),
        (OSError(errno.EROFS, "read-only"), False),
        (DatasetError("a", "b", "c", "d"), False),
        (ModelError("a", "b", "c", "d"), False),
        (OnnxValidationError("a", "b", "c", "d"), False),
        (ArtifactError("a", "b", "c", "d"), False),
        (StorageError("a", "b", "c", "d"), False),
        (VerificationError(["fp16 batch 1: max_abs"], "report.json"), False),
        (KeyError("x"), False),
    ],
)
def test_is_retryable(error: BaseException, retry: bool) -> None:
    assert is_retryable(error) is retry
