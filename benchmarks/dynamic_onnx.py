"""Write ONNX files with a dynamic sequence axis, for the GPU build check (docs/gpu-build-check.md).

Runs the pipeline's own stages (data -> train one epoch -> export with the shape profile -> fp32, fp16
and int8 variants) on small synthetic data for sequence models strangers ship, and copies every
variant to OUT_DIR as ``<case>_<precision>.onnx`` with a sidecar ``<case>_<precision>.shapes.json``:
the declared min/opt/max shape of each input, which ``benchmarks/gpu_build_check.py`` builds the
TensorRT profile from. Runs on a CPU in a few minutes::

    python benchmarks/dynamic_onnx.py OUT_DIR          # then, on the GPU machine:
    python benchmarks/gpu_build_check.py OUT_DIR --rtx --out gpu-build-check-dynamic

Cases: a tiny Hugging Face BertForSequenceClassification from a config (when ``transformers`` is
installed), a masked-mean text model with two outputs, a TransformerEncoder with a bool padding mask,
a GRU over N×T×D features and a Conv1d over N×1×T audio. Each is exported with its sequence axis
dynamic: batch 1/32/256 and the length from a quarter to twice the dataset's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

T = 32  # the dataset's (padded) sequence length


def bert(num_classes: int) -> Any:
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                    intermediate_size=64, max_position_embeddings=2 * T, num_labels=num_classes))


def masked_mean(num_classes: int) -> Any:
    from torch import nn

    class MaskedMean(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.head, self.proj = nn.Embedding(64, 16), nn.Linear(16, num_classes), nn.Linear(16, 4)

        def forward(self, input_ids: Any, attention_mask: Any) -> dict[str, Any]:
            m = attention_mask.unsqueeze(-1).float()
            h = (self.emb(input_ids) * m).sum(1) / m.sum(1).clamp(min=1.0)
            return {"logits": self.head(h), "embedding": self.proj(h)}

    return MaskedMean()


def encoder(num_classes: int) -> Any:
    from torch import nn

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(64, 16)
            self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0), 1, enable_nested_tensor=False)
            self.head = nn.Linear(16, num_classes)

        def forward(self, input_ids: Any, padding_mask: Any) -> Any:
            return self.head(self.enc(self.emb(input_ids), src_key_padding_mask=padding_mask).mean(1))

    return Encoder()


def gru(in_features: int, num_classes: int) -> Any:
    from torch import nn

    class GRUNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn, self.head = nn.GRU(in_features, 16, batch_first=True), nn.Linear(16, num_classes)

        def forward(self, x: Any) -> Any:
            return self.head(self.rnn(x)[0].mean(1))

    return GRUNet()


def audio(num_classes: int) -> Any:
    from torch import nn

    class Audio(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.head = nn.Conv1d(1, 8, 9, stride=4), nn.Linear(8, num_classes)

        def forward(self, x: Any) -> Any:
            return self.head(self.conv(x).relu().mean(-1))

    return Audio()


def datasets(folder: Path) -> dict[str, tuple[Path, str, dict[str, int]]]:
    """case -> (dataset, model factory, input -> its dynamic axis)."""
    rng = np.random.default_rng(0)
    n = 240
    y = np.arange(n) % 3
    lengths = rng.integers(4, T + 1, n)
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.int64)
    ids = ((rng.integers(1, 20, (n, T)) + 20 * y[:, None]) * mask).astype(np.int64)
    feats = (rng.normal(size=(n, T, 5)) + y[:, None, None]).astype(np.float32)
    wave = (np.sin(np.arange(4 * T)[None, :] * (y[:, None] + 1) / 8) + 0.1 * rng.normal(size=(n, 4 * T)))[:, None].astype(np.float32)
    out: dict[str, tuple[Path, str, dict[str, int]]] = {}
    for case, arrays, factory, axes in (
        ("hf_bert_seq", {"input_ids": ids, "attention_mask": mask}, "dynamic_onnx:bert", {"input_ids": 1, "attention_mask": 1}),
        ("masked_mean_2out_seq", {"input_ids": ids, "attention_mask": mask}, "dynamic_onnx:masked_mean", {"input_ids": 1, "attention_mask": 1}),
        ("transformer_boolmask_seq", {"input_ids": ids, "padding_mask": mask == 0}, "dynamic_onnx:encoder", {"input_ids": 1, "padding_mask": 1}),
        ("gru_NxTxD_seq", {"x": feats}, "dynamic_onnx:gru", {"x": 1}),
        ("conv1d_audio_Nx1xT", {"x": wave}, "dynamic_onnx:audio", {"x": 2}),
    ):
        path = folder / f"{case}.npz"
        np.savez(path, **arrays, y=y)
        out[case] = (path, factory, axes)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", type=Path)
    args = ap.parse_args()
    from tasks.config import BatchProfile, CollapseGate, DataConfig, Precision, ShapeProfile, TrainConfig
    from tasks.data import splits_from_dataset
    from tasks.errors import TrtflowError
    from tasks.export import onnx_from_checkpoint
    from tasks.precision import variant_from_onnx
    from tasks.shapes import engine_profile, full_shapes
    from tasks.train import checkpoint_from_splits

    args.out_dir.mkdir(parents=True, exist_ok=True)
    failed = 0
    with tempfile.TemporaryDirectory(prefix="trtflow-dynamic-onnx-") as tmp:
        for case, (dataset, factory, axes) in datasets(Path(tmp)).items():
            if case.startswith("hf_") and not _has("transformers"):
                print(f"{case}: skipped (pip install transformers)")
                continue
            root = Path(tmp) / case
            try:
                data = splits_from_dataset(DataConfig(dataset=dataset), root)
                specs = data.meta["inputs"]
                levels = {"min": (1, 0.25), "opt": (32, 1.0), "max": (256, 2.0)}
                shapes = ShapeProfile(**{
                    lvl: {s["name"]: [b, *[max(2, int(d * f)) if i + 1 == axes.get(s["name"]) else d for i, d in enumerate(s["shape"])]] for s in specs}
                    for lvl, (b, f) in levels.items()
                })
                train = checkpoint_from_splits(data, TrainConfig(model=factory, epochs=1, collapse_gate=CollapseGate(enabled=False)), root)
                onnx = onnx_from_checkpoint(train, root, shapes=shapes)
                profile = full_shapes(engine_profile(BatchProfile(min=1, opt=32, max=256), shapes, specs), specs)
                dynamic = {n: p for n, p in profile.items() if n in shapes.axes()}
                for precision in Precision:
                    variant = variant_from_onnx(onnx, data, precision, 64, root)
                    name = f"{case}_{precision.value}"
                    shutil.copyfile(variant.path("model.onnx"), args.out_dir / f"{name}.onnx")
                    (args.out_dir / f"{name}.shapes.json").write_text(json.dumps(dynamic, indent=1))
                print(f"{case}: dynamic axes {onnx.meta['dynamic_axes']}; profile {json.dumps(dynamic)}")
            except TrtflowError as exc:
                failed += 1
                print(f"{case}: FAILED {exc.summary}")
    return 1 if failed else 0


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


if __name__ == "__main__":
    sys.exit(main())
