"""Stage ``build``: one engine per precision, from that precision's ONNX file."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from tasks.artifacts import ArtifactRef, write_bytes_atomic
from tasks.backends.base import BaseRunner, EngineInfo
from tasks.backends.registry import backend_spec, builder_for
from tasks.config import Backend, BatchProfile, EngineOptions, ShapeProfile
from tasks.stage import StageSpec, run_stage
from tasks.store import Store, as_store

log = logging.getLogger("trtflow.build")

INFO = "engine.json"


def _backend_name(backend: Backend | str) -> str:
    return str(getattr(backend, "value", backend))


def _environment(inputs: Mapping[str, Any]) -> dict[str, str]:
    # Engines are not portable across backend versions or devices: they are part of the key.
    builder = builder_for(inputs["backend"])
    env = builder.environment()
    module = sys.modules.get(type(builder).__module__)
    if not type(builder).__module__.startswith("tasks.") and module is not None and getattr(module, "__file__", None):
        # A registered backend's module is outside the project files the key hashes (``code``): its source is hashed here.
        env = {**env, "backend_code": hashlib.sha256(Path(module.__file__ or "").read_bytes()).hexdigest()}
    return env


def _shapes_in_key(inputs: Mapping[str, Any]) -> Mapping[str, Any]:
    # The profile's shapes make the engine; the values that pad inputs when verifying do not.
    batch = inputs.get("batch")
    if isinstance(batch, BatchProfile) and getattr(batch, "pad_values", None):
        return {**inputs, "batch": batch.model_dump(exclude={"pad_values"})}
    return inputs


SPEC = StageSpec(
    "build",
    __name__,
    environment=_environment,
    key_inputs=_shapes_in_key,
)


#: the store's folder of a builder's timing caches (one file per TensorRT version and GPU, the builder names them)
TIMING_CACHES = ".cache/{builder}"


@contextlib.contextmanager
def timing_caches(store: Store, builder: str) -> Iterator[Path]:
    """A local folder holding the store's timing caches of a builder; what the build changes goes back to the store.

    The local store's own folder is used as it is. A remote store's caches are copied into the local
    folder (``--artifacts-dir``) first, and the files a build wrote are put back after it, so the next
    build on any machine with the same TensorRT and GPU starts from them.

    Args:
        store: the artifact store.
        builder: the builder's name (``tensorrt``).

    Yields:
        The folder to pass the builder as ``timing_cache_dir``.
    """
    folder = TIMING_CACHES.format(builder=builder)
    local = store.local.joinpath(*folder.split("/"))
    if Path(store.where(folder)) == local:
        yield local  # the store is this folder: the builder reads and writes it in place
        return
    before: dict[str, bytes] = {}
    for name in store.entries(folder):
        data = store.get(f"{folder}/{name}")
        if data is None:
            continue
        before[name] = data
        path = local / name
        with contextlib.suppress(OSError):
            if path.read_bytes() == data:
                continue
        write_bytes_atomic(path, data)
    yield local
    for path in sorted(local.glob("*")) if local.is_dir() else []:
        data = path.read_bytes() if path.is_file() and not path.name.startswith(".") else None
        if data is not None and before.get(path.name) != data:
            store.put(f"{folder}/{path.name}", data)


def engine_from_variant(
    variant: ArtifactRef,
    backend: Backend | str,
    batch: BatchProfile,
    options: EngineOptions,
    store: Store,
    refresh: bool = False,
) -> ArtifactRef:
    """Build the engine of one precision variant.

    Args:
        variant: the ``precision`` artifact to build from.
        backend: a registered backend's name, already resolved from ``auto``.
        batch: min / opt / max batch of the optimization profile (an ``EngineProfile``: with the dynamic
            axes beyond the batch, which every input's min / opt / max shape then holds).
        options: backend options (threads, workspace, tf32, ONNX Runtime's providers).
        store: the artifact store.
        refresh: rebuild even if an intact engine exists.

    Returns:
        The ``build`` artifact: the engine file and ``engine.json``; its metadata is an ``EngineInfo``.

    Raises:
        EngineBuildError: the backend rejected the model.
    """
    options = EngineOptions.model_validate(options)
    store = as_store(store)

    def make(out: Path) -> dict[str, Any]:
        from tasks.shapes import dynamic, full_shapes

        spec, builder = backend_spec(backend), builder_for(backend)
        specs = variant.meta.get("input_specs") or []
        shapes = full_shapes(batch, specs) if dynamic(batch) and specs else None
        caches = timing_caches(store, builder.name) if spec.timing_cache else contextlib.nullcontext(None)
        with caches as cache_dir:
            # The precision too: a backend without kernels for it builds its emulation instead (tasks.precisions).
            build_options: dict[str, Any] = {**options.model_dump(), "precision": variant.meta.get("precision")}
            if cache_dir is not None:
                build_options["timing_cache_dir"] = str(cache_dir)
            result = builder.engine_from_onnx(variant.path("model.onnx"), out, (batch.min, batch.opt, batch.max), build_options, shapes=shapes)
        if result.engine_file != spec.engine_file:
            # The spec says where every engine of the backend lives (the registry's listing, the docs);
            # a builder writing elsewhere is that backend's bug, caught on its first build.
            raise ValueError(f"backend '{spec.name}' wrote {result.engine_file}, its spec says {spec.engine_file}")
        info = EngineInfo.model_validate(
            {
                **result.info,
                "backend": builder.name,
                "engine_file": result.engine_file,
                "batch": {k: getattr(batch, k) for k in ("min", "opt", "max")},
                "shapes": shapes or {},
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

    inputs = {"variant": variant, "backend": _backend_name(backend), "batch": batch, "options": options}
    return run_stage(SPEC, inputs, store, refresh, make)


#: (checkpoint digest, fitted max) pairs already told in the log: every branch's stages ask
_TOLD: set[tuple[str, int]] = set()


def profile_for(batch: BatchProfile, shapes: ShapeProfile, backend: Backend | str, checkpoint: ArtifactRef) -> BatchProfile:
    """The profile every engine is built, verified and timed at: the batch sizes fitted to memory
    (``batch_for_memory``, with one sample's activations scaled to the longest shape) and the shape
    profile's dynamic axes resolved against the model's inputs (``tasks.shapes.engine_profile``).

    Returns:
        The fitted ``BatchProfile`` when only the batch varies (so batch-only runs keep their keys),
        else an ``EngineProfile``.

    Raises:
        ConfigError: the shapes do not fit the dataset's inputs.
    """
    from tasks.shapes import activation_scale, engine_profile

    if not shapes.max and not shapes.pad_values:
        return batch_for_memory(batch, backend, checkpoint)
    specs = checkpoint.meta.get("inputs") or [{"name": "x", "dtype": "float32", "shape": list(checkpoint.meta["sample_shape"])}]
    scale = activation_scale(engine_profile(batch, shapes, specs))
    return engine_profile(batch_for_memory(batch, backend, checkpoint, scale), shapes, specs)


def batch_for_memory(batch: BatchProfile, backend: Backend | str, checkpoint: ArtifactRef, scale: float = 1.0) -> BatchProfile:
    """The profile engines are built, verified and timed at: ``batch``, with opt and max lowered when
    the engine runs on the CPU and one batch of the trained model's activations would take more than
    ``batch.cpu_memory_mib``.

    A batch of 256 images of 3×256×256 takes about 3 GiB in ONNX Runtime on the CPU (and as much in
    PyTorch, timed beside it); three precision branches verifying at once would need three times that.
    On a GPU backend the activations live in device memory and the profile is kept as given.

    Args:
        batch: the configured profile.
        backend: the resolved backend.
        checkpoint: the ``train`` artifact; its memory plan holds the activation bytes per sample,
            measured on a real batch (every layer's output summed: an upper bound of what an
            engine keeps alive at once).
        scale: how much larger one sample's activations are at the longest shape than in the dataset.

    Returns:
        ``batch`` itself, or a copy with max the largest power of two that fits (never below min)
        and opt at most that.
    """
    per_sample = int(scale * (checkpoint.meta.get("memory_plan") or {}).get("activation_per_sample", 0))
    if not batch.cpu_memory_mib or per_sample <= 0 or not backend_spec(backend).host_memory:
        return batch
    fits = (batch.cpu_memory_mib << 20) // per_sample
    if fits >= batch.max:
        return batch
    top = max(batch.min, 1 << (int(fits).bit_length() - 1)) if fits >= 1 else batch.min
    fitted = batch.model_copy(update={"max": top, "opt": min(batch.opt, top)})
    if (checkpoint.digest, top) not in _TOLD:
        _TOLD.add((checkpoint.digest, top))
        log.warning(
            "batch profile %d/%d/%d lowered to %d/%d/%d for %s on the CPU: one sample's activations take %.1f MiB, "
            "so a batch of %d would take %.0f MiB (--cpu-batch-memory-mib is %d; raise it, or pass 0, to keep the profile)",
            batch.min, batch.opt, batch.max, fitted.min, fitted.opt, fitted.max, _backend_name(backend),
            per_sample / (1 << 20), batch.max, batch.max * per_sample / (1 << 20), batch.cpu_memory_mib,
        )
    return fitted


def engine_info(engine: ArtifactRef) -> EngineInfo:
    """The typed description of a ``build`` artifact's engine."""
    return EngineInfo.of(engine.meta)


def runner_from_build(engine: ArtifactRef) -> BaseRunner:
    """Return an inactive Runner for a ``build`` artifact (digest checked first)."""
    engine.verify()
    info = engine_info(engine)
    return builder_for(info.backend).runner_from_engine(engine.path(info.engine_file), info)
