"""Safe loading: no artifact can run code when loaded, nothing is loaded before its digest matches, the
documented servers listen on 127.0.0.1 only, and no machine paths or secrets leak into reports.

    pytest tests/test_safe_loading.py -q
"""

from __future__ import annotations

import json
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import _pipeline_kit as kit
from tasks.artifacts import MANIFEST, ArtifactRef, load_ref, sha256_file
from tasks.errors import ArtifactError


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> kit.Good:
    return kit.good_run(tmp_path_factory)


class Payload:
    """Unpickling this writes a marker file: it stands for any code a forged file could run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.write_text, (self.marker, "code ran"))


def _forge_checkpoint(root: Path, good: kit.Good, marker: Path, fix_manifest: bool) -> ArtifactRef:
    import torch

    ref = load_ref(root, "train", good.refs["train"].key)
    assert ref is not None
    ckpt = torch.load(ref.path("model.pt"), weights_only=True)
    ckpt["extra"] = Payload(marker)
    torch.save(ckpt, ref.path("model.pt"))
    if fix_manifest:
        doc = json.loads((ref.dir / MANIFEST).read_text())
        doc["files"]["model.pt"] = sha256_file(ref.path("model.pt"))
        (ref.dir / MANIFEST).write_text(json.dumps(doc))
        ref = load_ref(root, "train", ref.key)
        assert ref is not None and ref.problems() == []
    return ref


def test_the_payload_is_live_under_plain_pickle(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.read_text() == "code ran"


def test_checkpoint_with_a_pickled_object_is_refused_even_with_a_forged_manifest(good: kit.Good, tmp_path: Path) -> None:
    from tasks.inference import module_from_checkpoint

    root = kit.clone(good.root, tmp_path / "artifacts")
    marker = tmp_path / "marker"
    ref = _forge_checkpoint(root, good, marker, fix_manifest=True)
    with pytest.raises(ArtifactError, match="weights_only=True") as info:
        module_from_checkpoint(ref)
    assert "run the same command again" in str(info.value) or "retrains" in str(info.value)
    assert not marker.exists()


def test_checkpoint_with_a_pickled_object_fails_its_digest_check_first(good: kit.Good, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from tasks.inference import module_from_checkpoint

    root = kit.clone(good.root, tmp_path / "artifacts")
    marker = tmp_path / "marker"
    ref = load_ref(root, "train", good.refs["train"].key)
    assert ref is not None
    _forge_checkpoint(root, good, marker, fix_manifest=False)
    loads: list[Any] = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a))
    with pytest.raises(ArtifactError, match="digest mismatch"):
        module_from_checkpoint(ref)
    assert loads == [] and not marker.exists()


def test_split_file_with_pickled_objects_is_refused(good: kit.Good, tmp_path: Path) -> None:
    from tasks.data import load_splits

    root = kit.clone(good.root, tmp_path / "artifacts")
    ref = load_ref(root, "data", good.refs["data"].key)
    assert ref is not None
    marker = tmp_path / "marker"
    with open(ref.path("splits.npz"), "wb") as f:
        np.savez(f, x_train=np.array([Payload(marker)], dtype=object))
    doc = json.loads((ref.dir / MANIFEST).read_text())
    doc["files"]["splits.npz"] = sha256_file(ref.path("splits.npz"))
    (ref.dir / MANIFEST).write_text(json.dumps(doc))
    forged = load_ref(root, "data", ref.key)
    assert forged is not None
    with pytest.raises(ValueError, match="allow_pickle=False"):
        load_splits(forged)
    assert not marker.exists()


def test_engine_is_never_opened_before_its_digest_matches(good: kit.Good, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime

    from tasks.engine import runner_from_build

    root = kit.clone(good.root, tmp_path / "artifacts")
    ref = load_ref(root, "build", good.refs["build-fp32"].key)
    assert ref is not None
    engine = ref.path(ref.meta["engine_file"])
    engine.write_bytes(engine.read_bytes()[:-10])
    sessions: list[Any] = []
    monkeypatch.setattr(onnxruntime, "InferenceSession", lambda *a, **k: sessions.append(a))
    with pytest.raises(ArtifactError):
        with runner_from_build(ref):
            pass
    assert sessions == []


# --- servers ----------------------------------------------------------------------------------------

DOCUMENTED = ["README.md", "docs", "prefect.yaml", ".ci", "benchmarks", "flows", "tasks"]


def _documented_files() -> list[Path]:
    out: list[Path] = []
    for name in DOCUMENTED:
        p = kit.REPO / name
        if p.is_file():
            out.append(p)
        elif p.is_dir():
            out += [f for f in p.rglob("*") if f.is_file() and f.suffix in ("", ".md", ".py", ".yaml", ".yml", ".sh", ".toml")]
    return out


def test_documented_server_commands_bind_to_localhost() -> None:
    from prefect.settings import PREFECT_SERVER_API_HOST

    assert PREFECT_SERVER_API_HOST.value() == "127.0.0.1"
    offenders = []
    for f in _documented_files():
        for n, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
            starts_server = "server start" in line or re.search(r'"server",\s*"start"', line)
            if "0.0.0.0" in line or "--host ::" in line or (starts_server and "--host" in line and "127.0.0.1" not in line and "localhost" not in line):
                offenders.append(f"{f.relative_to(kit.REPO)}:{n}: {line.strip()}")
    assert offenders == []


# --- no machine paths or secrets in what is shared --------------------------------------------------


def _forbidden() -> list[str]:
    """Strings that must not appear: home, temp and repo folders, and this process's secret-looking values."""
    words = [str(Path.home()) + "/", str(Path(tempfile.gettempdir()).resolve()) + "/", str(kit.REPO) + "/", "site-packages"]
    secrets = [v for k, v in os.environ.items() if re.search(r"TOKEN|SECRET|PASSWORD|API_KEY", k) and len(v) >= 8]
    return words + secrets


def test_reports_and_shipped_files_hold_no_machine_paths_or_secrets(good: kit.Good, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.report import run_report, summary_markdown
    from tasks.config import Precision
    from tasks.store import store_for

    monkeypatch.setenv("TRTFLOW_TEST_SECRET_TOKEN", "s3cr3t-value-never-written")
    root = kit.clone(good.root, tmp_path / "artifacts")
    cfg = kit.with_root(good.config, root)
    refs = kit.run_plain(cfg, refresh=("verify",))
    outcomes = {p: {"engine": refs[f"build-{p.value}"], "verify": refs[f"verify-{p.value}"]} for p in cfg.precisions}
    report = run_report(cfg, store_for(None, root), "onnxruntime: requested explicitly", refs, outcomes)
    assert Precision.fp32.value in report["precisions"]

    shared = [root / "report.json", *root.glob("reports/*.json")]
    shared += [f for r in refs.values() for f in (r.dir / n for n in r.files)]  # every artifact file (ONNX, engines, checkpoints)
    texts = {str(f.relative_to(root)): f.read_bytes().decode("latin-1") for f in shared}
    texts["summary.md"] = summary_markdown(report)
    bad = {name: w for name, text in texts.items() for w in [*_forbidden(), "s3cr3t-value-never-written"] if w in text}
    assert bad == {}


def test_only_manifests_hold_absolute_paths(good: kit.Good) -> None:
    """Manifests record the folder they were written in (local state, never shown or shipped)."""
    prefix = str(good.root.resolve())
    holders = {f.name for f in good.root.rglob("*") if f.is_file() and prefix.encode() in f.read_bytes()}
    assert holders <= {MANIFEST}
