"""What is wrong with a dataset or weights path, said precisely, and never by opening it (a FIFO would hang).

    pytest tests/test_paths.py -q
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import EXIT_FAILED, main
from tasks.paths import file_problem

REPO = Path(__file__).resolve().parents[1]


def test_each_kind_of_unusable_path_is_named(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.npz"
    os.mkfifo(fifo)
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    (tmp_path / "dangling.npz").symlink_to(tmp_path / "gone.npz")
    (tmp_path / "file").write_bytes(b"")
    assert "named pipe (FIFO)" in (file_problem(fifo) or "")
    assert "symbolic link loop" in (file_problem(tmp_path / "a") or "")
    assert file_problem(tmp_path / "dangling.npz") == f"is a symbolic link to {tmp_path / 'gone.npz'}, which does not exist"
    assert file_problem(tmp_path / "missing") == "does not exist"
    assert file_problem(tmp_path / "file" / "x") == "does not exist (a part of the path is a file, not a folder)"
    assert file_problem(Path(os.devnull)) == "is a device, not a regular file"
    assert file_problem(tmp_path) == "is a folder, not a file" and file_problem(tmp_path, folder_ok=True) is None
    assert file_problem(tmp_path / "file") is None


def test_a_symlink_loop_as_dataset_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a.npz").symlink_to(tmp_path / "b.npz")
    (tmp_path / "b.npz").symlink_to(tmp_path / "a.npz")
    assert main(["run", "--artifacts-dir", str(tmp_path / "art"), "--dataset", str(tmp_path / "a.npz")]) == EXIT_FAILED
    err = capsys.readouterr().err
    first = err.splitlines()[0]
    assert "Traceback" not in err and len(first) <= 160, err
    assert first.startswith("trtflow: DatasetError: dataset path") and "is a symbolic link loop" in first and "does not exist" not in err, first


def test_a_fifo_as_dataset_is_one_line_and_never_hangs(tmp_path: Path) -> None:
    """In a child process with a deadline: a check that opened the FIFO would block there forever."""
    fifo = tmp_path / "data.npz"
    os.mkfifo(fifo)
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_HOME": str(tmp_path / "home")}
    res = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--artifacts-dir", str(tmp_path / "art"), "--dataset", str(fifo)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == EXIT_FAILED, res.stderr[-2000:]
    first = res.stderr.splitlines()[0]
    assert "Traceback" not in res.stderr and len(first) <= 160, res.stderr
    assert "is a named pipe (FIFO)" in first and "write the data to a file first" in res.stderr and "does not exist" not in res.stderr, first


def test_a_fifo_as_weights_is_named(tmp_path: Path) -> None:
    from tasks.errors import ModelError
    from tasks.models import state_dict_from_file

    fifo = tmp_path / "w.pt"
    os.mkfifo(fifo)
    with pytest.raises(ModelError, match=r"is a named pipe \(FIFO\)"):
        state_dict_from_file(fifo)
