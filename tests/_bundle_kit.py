"""Bundles for the package and Triton tests: a tiny image model and a held-out two-input text model.

``make_bundle`` runs the plain pipeline (no Prefect) through the ``package`` stage; the conftest's
session fixtures ``image_bundle`` and ``text_bundle`` call it once each.

The text model is not one the pipeline was written against: int64 ``input_ids`` and an int64
``attention_mask`` (padding at the end), an embedding, a masked mean and max pool, and two outputs in a
tuple (logits and a normalised embedding), imported by path as ``_bundle_kit:pooled_text``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

import _pipeline_kit as kit
from tasks.artifacts import ArtifactRef
from tasks.config import BatchProfile, PipelineConfig, Precision, ShipConfig

VOCAB, SEQ, CLASSES = 40, 10, 3


class PooledText(nn.Module):
    """Token ids and a mask -> (logits, unit-length embedding)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 12)
        self.mix = nn.Linear(24, 12)
        self.head = nn.Linear(12, CLASSES)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = attention_mask.unsqueeze(-1).to(torch.float32)
        e = self.emb(input_ids)
        mean = (e * m).sum(1) / m.sum(1).clamp(min=1.0)
        top = (e * m - (1 - m) * 1e4).amax(1)
        h = torch.tanh(self.mix(torch.cat([mean, top], dim=1)))
        return self.head(h), h / h.norm(dim=1, keepdim=True).clamp(min=1e-6)


def pooled_text() -> nn.Module:
    return PooledText()


def text_dataset(path: Path, n: int = 240) -> Path:
    """Class c draws its tokens mostly from its own third of the vocabulary; random lengths, padded with 0."""
    if not path.is_file():
        rng = np.random.default_rng(1)
        y = np.arange(n) % CLASSES
        ids = rng.integers(1, VOCAB // CLASSES, (n, SEQ)) + (VOCAB // CLASSES) * y[:, None]
        lengths = rng.integers(3, SEQ + 1, n)
        mask = (np.arange(SEQ)[None, :] < lengths[:, None]).astype(np.int64)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, input_ids=(ids * mask).astype(np.int64), attention_mask=mask, y=y)
    return path


@dataclass
class Bundle:
    """A run of the plain pipeline that wrote a bundle."""

    root: Path
    config: PipelineConfig
    refs: dict[str, ArtifactRef]

    @property
    def dir(self) -> Path:
        return self.root / "bundle"


def make_bundle(kind: str, root: Path) -> Bundle:
    """The plain pipeline through ``package``: ``image`` (digits, fp32) or ``text`` (fp32 + fp16, smallest)."""
    from flows.pipeline import GRAPH
    from tasks.graph import run_plain

    if kind == "image":
        cfg = kit.tiny_config(root, kit.tiny_dataset(root.parent / "digits.npz"), precisions=[Precision.fp32], ship=ShipConfig(policy="fp32"))
    else:
        cfg = kit.tiny_config(
            root, text_dataset(root.parent / "text.npz"), precisions=[Precision.fp32, Precision.fp16], ship=ShipConfig(policy="smallest"),
            batch=BatchProfile(min=1, opt=4, max=16),
        )
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"model": "_bundle_kit:pooled_text", "epochs": 3, "lr": 1e-2})})
    return Bundle(root, cfg, run_plain(GRAPH, cfg))
