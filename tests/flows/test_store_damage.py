"""Damage to the artifacts folder between runs, through the command: each is healed or named with its fix.

One artifacts folder, four runs of `trtflow run` (in this process, on the session's Prefect server):

1. a run that passes;
2. ``build/`` replaced by a file and a ``.lock`` replaced by a folder (healed), ``report.json`` replaced
   by a folder (named: exit 1, one line, not "invalid options" nor "the disk");
3. a broken engine whose manifest was updated with it: one line suggesting ``--refresh build``, no raw
   ONNX Runtime error, no "unexpected error";
4. ``--refresh build``: passes again.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from flows.cli import main
from tasks.artifacts import MANIFEST, sha256_file

RUN = ["--epochs", "1", "--precisions", "fp32", "--backend", "onnxruntime", "--no-profile", "--no-package", "--min-batch", "1", "--opt-batch", "8", "--max-batch", "32"]


def _cli(art: Path, capfd: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str]:
    code = main(["run", "--artifacts-dir", str(art), *RUN, *extra])
    return code, capfd.readouterr().err


def _trtflow_line(err: str) -> str:
    assert "Traceback" not in err and "unexpected error" not in err and "\x1b[" not in err, err[-3000:]
    lines = [x for x in err.splitlines() if x.startswith("trtflow: ")]
    assert lines and len(lines[0]) <= 160, err[-3000:]
    return lines[0]


@pytest.mark.slow
def test_damage_between_runs_is_healed_or_named(prefect_harness: None, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    art = tmp_path / "art"
    code, err = _cli(art, capfd)
    assert code == 0, err[-3000:]
    first = json.loads((art / "report.json").read_text())

    shutil.rmtree(art / "build")
    (art / "build").write_bytes(b"a file where the build stage's folder was")
    lock = next((art / "export").glob(".*.lock"))
    lock.unlink()
    (lock / "stuff").mkdir(parents=True)
    (art / "report.json").unlink()
    (art / "report.json" / "notes").mkdir(parents=True)
    code, err = _cli(art, capfd)
    line = _trtflow_line(err)
    assert code == 1, err[-3000:]
    assert line.startswith(f"trtflow: StorageError: {art.resolve() / 'report.json'} is a folder; move or delete it (rm -r"), line
    assert (art / "build").is_dir() and lock.is_file()  # healed: both are trtflow's own
    assert (art / first["report"]).is_file() and len(list((art / "reports").glob("run-*.json"))) == 2  # this run's report was written

    shutil.rmtree(art / "report.json")
    engine = art / first["precisions"]["fp32"]["engine"]
    engine.write_bytes(b"\x00garbage, not an engine" * 100)
    manifest = engine.parent / MANIFEST
    doc = json.loads(manifest.read_text())
    doc["files"][engine.name] = sha256_file(engine)  # consistent: the digest check passes
    manifest.write_text(json.dumps(doc))
    code, err = _cli(art, capfd)
    line = _trtflow_line(err)
    assert code == 1, err[-3000:]
    assert "cannot be loaded" in line and line.endswith("rebuild it: run the same command with --refresh build"), line

    code, err = _cli(art, capfd, "--refresh", "build")
    assert code == 0, err[-3000:]
    assert json.loads((art / "report.json").read_text())["passed"] is True
