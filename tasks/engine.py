"""Stage ``build``: one engine per precision, from that precision's ONNX file."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tasks.artifacts import ArtifactRef, load_ref, staging
from tasks.backends.registry import builder_for
from tasks.config import Backend, BatchProfile
from tasks.caching import stage_task
from tasks.stage import StageSpec, stage_key
from tasks.locking import exclusive

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


@exclusive(SPEC)
def engine_from_variant(
    variant: ArtifactRef,
    backend: Backend,
    batch: BatchProfile,
    options: dict[str, Any],
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
        The ``build`` artifact: the engine file and ``engine.json`` (backend, tensors, profile, precision).

    Raises:
        EngineBuildError: the backend rejected the model.
    """
    key = stage_key(SPEC, {"variant": variant, "backend": backend, "batch": batch, "options": options})
    if not refresh and (ref := load_ref(artifacts_dir, SPEC.name, key)) and not ref.problems():
        return ref
    builder = builder_for(backend)
    variant.verify()
    build_options = {**options, "timing_cache_dir": str(Path(artifacts_dir) / ".cache" / builder.name)}
    with staging(artifacts_dir, SPEC.name, key) as st:
        result = builder.engine_from_onnx(variant.path("model.onnx"), st.dir, (batch.min, batch.opt, batch.max), build_options)
        info = {
            **result.info,
            "backend": builder.name,
            "engine_file": result.engine_file,
            "precision": variant.meta.get("precision"),
            "environment": builder.environment(),
            "options": options,
            "threads": options.get("threads"),
            "batch": batch.model_dump(),
            "variant_digest": variant.digest,
        }
        (st.dir / INFO).write_text(json.dumps(info, indent=2, default=str))
        ref = st.commit(info)
    log.info("build: %s %s engine (%s)", builder.name, info["precision"], result.engine_file)
    return ref


def runner_from_build(engine: ArtifactRef) -> Any:
    """Return an inactive Runner for a ``build`` artifact (digest checked first)."""
    engine.verify()
    builder = builder_for(engine.meta["backend"])
    return builder.runner_from_engine(engine.path(engine.meta["engine_file"]), engine.meta)


build_task = stage_task(engine_from_variant, SPEC)
"""Prefect task of ``engine_from_variant``: content-cached, transient failures retried."""
