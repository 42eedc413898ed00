"""Stage ``build``: one engine per precision, from that precision's ONNX file."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tasks.artifacts import ArtifactRef
from tasks.backends.base import BaseRunner, EngineInfo
from tasks.backends.registry import builder_for
from tasks.config import Backend, BatchProfile, EngineOptions
from tasks.stage import StageSpec, run_stage

log = logging.getLogger("trtflow.build")

INFO = "engine.json"


def _environment(inputs: Mapping[str, Any]) -> dict[str, str]:
    # Engines are not portable across backend versions or devices: they are part of the key.
    return builder_for(inputs["backend"]).environment()


SPEC = StageSpec(
    "build",
    modules=("engine.py", "backends/base.py", "backends/onnxruntime.py", "backends/tensorrt.py", "backends/_trt_build.py"),
    environment=_environment,
)


def engine_from_variant(
    variant: ArtifactRef,
    backend: Backend,
    batch: BatchProfile,
    options: EngineOptions,
    artifacts_dir: Path,
    refresh: bool = False,
) -> ArtifactRef:
    """Build the engine of one precision variant.

    Args:
        variant: the ``precision`` artifact to build from.
        backend: a concrete backend (``onnxruntime`` or ``tensorrt``), already resolved from ``auto``.
        batch: min / opt / max batch of the optimization profile.
        options: backend options (threads, workspace, tf32).
        artifacts_dir: root of the artifact store.
        refresh: rebuild even if an intact engine exists.

    Returns:
        The ``build`` artifact: the engine file and ``engine.json``; its metadata is an ``EngineInfo``.

    Raises:
        EngineBuildError: the backend rejected the model.
    """
    options = EngineOptions.model_validate(options)

    def make(out: Path) -> dict[str, Any]:
        builder = builder_for(backend)
        build_options = {**options.model_dump(), "timing_cache_dir": str(Path(artifacts_dir) / ".cache" / builder.name)}
        result = builder.engine_from_onnx(variant.path("model.onnx"), out, (batch.min, batch.opt, batch.max), build_options)
        info = EngineInfo.model_validate(
            {
                **result.info,
                "backend": builder.name,
                "engine_file": result.engine_file,
                "batch": batch.model_dump(),
                "precision": variant.meta.get("precision"),
                "environment": builder.environment(),
                "options": options.model_dump(),
                "threads": options.threads,
                "variant_digest": variant.digest,
            }
        )
        meta = info.model_dump(mode="json")
        (out / INFO).write_text(json.dumps(meta, indent=2, default=str))
        log.info("build: %s %s engine (%s)", builder.name, info.precision, result.engine_file)
        return meta

    inputs = {"variant": variant, "backend": Backend(backend), "batch": batch, "options": options}
    return run_stage(SPEC, inputs, artifacts_dir, refresh, make)


def engine_info(engine: ArtifactRef) -> EngineInfo:
    """The typed description of a ``build`` artifact's engine."""
    return EngineInfo.of(engine.meta)


def runner_from_build(engine: ArtifactRef) -> BaseRunner:
    """Return an inactive Runner for a ``build`` artifact (digest checked first)."""
    engine.verify()
    info = engine_info(engine)
    return builder_for(info.backend).runner_from_engine(engine.path(info.engine_file), info)
