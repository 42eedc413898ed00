"""Through the command: a Hugging Face text model with a dynamic sequence axis, and a regressor.

Both run the whole flow (``trtflow run`` in this process, on the session's Prefect test server) in
fp32, fp16 and int8 on ONNX Runtime. The BERT is tiny and built from a config (no download); its
factory module is written here, as a user's would be.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from flows.cli import main

pytest.importorskip("transformers")

BERT_FACTORY = '''
from transformers import BertConfig, BertForSequenceClassification


def make(num_classes):
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=num_classes)
    return BertForSequenceClassification(config)
'''


def _sentences(path: Path, n: int = 240, t: int = 16) -> Path:
    """Token ids of varying length (3..16) padded to 16 with a mask; the class picks the token range."""
    rng = np.random.default_rng(0)
    y = np.arange(n) % 3
    mask = (np.arange(t)[None, :] < rng.integers(3, t + 1, n)[:, None]).astype(np.int64)
    ids = ((rng.integers(1, 20, (n, t)) + 20 * y[:, None]) * mask).astype(np.int64)
    np.savez(path, input_ids=ids, attention_mask=mask, y=y)
    return path


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_a_hugging_face_model_with_a_dynamic_sequence_axis_verifies_at_three_lengths(tmp_path, monkeypatch, capsys):
    import onnx

    (tmp_path / "hf_bert.py").write_text(BERT_FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    art = tmp_path / "art"
    code = main([
        "run", "--artifacts-dir", str(art), "--dataset", str(_sentences(tmp_path / "text.npz")), "--model", "hf_bert:make",
        "--epochs", "1", "--lr", "0.003", "--calibration-samples", "128", "--no-profile", "--no-package",
        # Shorter than the data (cut), the data's length, longer (padded with 0, mask 0).
        "--min-shapes", "input_ids:1x4,attention_mask:1x4", "--opt-shapes", "input_ids:8x16,attention_mask:8x16",
        "--max-shapes", "input_ids:16x32,attention_mask:16x32",
    ])
    out = capsys.readouterr().out
    assert code == 0, out
    report = json.loads((art / "report.json").read_text())
    onnx_file = onnx.load(str(art / report["model"]["onnx"]))
    for i in onnx_file.graph.input:
        assert [d.dim_param for d in i.type.tensor_type.shape.dim] == ["batch", "input_ids_axis1"]  # the sequence axis is symbolic
    shapes = ["input_ids:1x4,attention_mask:1x4", "input_ids:8x16,attention_mask:8x16", "input_ids:16x32,attention_mask:16x32"]
    for p in ("fp32", "fp16", "int8"):
        r = report["precisions"][p]
        assert r["passed"], r
        assert r["shapes_verified"] == [f"{p} {s}" for s in shapes]
        assert r["shapes"]["input_ids"] == {"min": [1, 4], "opt": [8, 16], "max": [16, 32]}  # the engine's profile
        verification = json.loads((art / r["verification"]).read_text())
        verified = [b["label"] for b in verification["batches"] if not b["label"].endswith("repeated rows")]
        assert verified[:3] == [f"{p} {s}" for s in shapes]
    assert "verified at: " + "; ".join(shapes) in out


def _values(path: Path, n: int = 400) -> Path:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 8)).astype(np.float32)
    y = (np.tanh(x @ rng.normal(size=8)) + 0.05 * rng.normal(size=n)).astype(np.float32)
    np.savez(path, x=x, y=y)
    return path


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_a_regressor_trains_and_verifies_with_regression_metrics(tmp_path, capsys):
    art = tmp_path / "art"
    code = main([
        "run", "--artifacts-dir", str(art), "--dataset", str(_values(tmp_path / "values.npz")), "--epochs", "10", "--lr", "0.01",
        "--batch-size", "32", "--min-batch", "1", "--opt-batch", "4", "--max-batch", "16", "--no-profile", "--no-package",
    ])
    out = capsys.readouterr().out
    assert code == 0, out
    report = json.loads((art / "report.json").read_text())
    assert report["model"]["task"] == "regression" and report["model"]["validation"]["r2"] > 0.5
    for p in ("fp32", "fp16", "int8"):
        r = report["precisions"][p]
        assert r["passed"] and r["task"] == "regression" and r["r2"] > 0.5 and r["r2_drop"] <= 0.02 and r["max_relative_rmse"] <= 0.1
    header = next(line for line in out.splitlines() if line.startswith("precision"))
    assert "R²" in header and "rel. RMSE" in header and "accuracy" not in header
