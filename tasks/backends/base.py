"""The interface every backend implements: a Builder and a Runner.

Runners follow Polygraphy's ``BaseRunner``: ``activate`` acquires resources (sessions, GPU buffers),
``infer`` maps input name -> array to output name -> array, ``deactivate`` frees them; a runner is a
context manager so the resources are always released, even when inference raises.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from tasks.errors import InferenceError, one_line, plain


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype and shape of an engine input or output; -1 marks a dynamic dimension.

    ``dtype`` is numpy's name (``float32``) or the backend's own (TensorRT's ``HALF``, ``INT64``).
    """

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def kind(self) -> str:
        """'f' for floating point, 'i' for integers, 'b' for bool, '?' when unknown."""
        return _KINDS.get(self.dtype.lower(), "?")


_KINDS = {
    **{n: "f" for n in ("float32", "float16", "float64", "bfloat16", "float", "half", "bf16", "double")},
    **{n: "i" for n in ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")},
    "bool": "b",
}


class EngineBatch(BaseModel):
    """The batch range an engine was built for (its optimization profile)."""

    min: int
    opt: int
    max: int


class EngineInfo(BaseModel):
    """What a ``build`` artifact records about its engine: the contract between build and its users.

    Stored as ``engine.json`` and as the artifact's manifest metadata; backend-specific details
    (TensorRT's layer summary, ONNX Runtime's providers) ride along as extra fields.
    """

    model_config = ConfigDict(extra="allow")

    backend: str
    engine_file: str
    batch: EngineBatch
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    precision: str | None = None
    threads: int | None = None
    options: dict[str, Any] = {}
    environment: dict[str, str] = {}
    variant_digest: str | None = None
    #: input -> {"min", "opt", "max"} full shapes, when axes beyond the batch are dynamic (empty: batch only)
    shapes: dict[str, dict[str, list[int]]] = {}

    @classmethod
    def of(cls, meta: Mapping[str, Any]) -> EngineInfo:
        """Read the engine info from a ``build`` artifact's metadata."""
        return cls.model_validate(dict(meta))


def engine_unloadable(name: str, exc: BaseException) -> InferenceError:
    """The error of an engine file the backend refuses to load (damaged, or written by something else).

    The backend's own error (ONNX Runtime's InvalidProtobuf) says nothing about what to do: an engine
    file that does not load must be rebuilt.
    """
    first = plain(str(exc)).splitlines()[0] if str(exc).strip() else type(exc).__name__
    return InferenceError(
        got=f"an engine the backend cannot load ({name}): {type(exc).__name__}: {one_line(first, 200)}",
        expected="an engine file as the build stage wrote it",
        because="the file is damaged or was replaced (its manifest may have been updated with it, so its digest still matches)",
        fix="rebuild it: run the same command with --refresh build",
        summary=f"the engine {name} cannot be loaded ({type(exc).__name__}); rebuild it: run the same command with --refresh build",
    )


class BaseRunner(abc.ABC):
    """Runs one engine. Subclasses implement the ``*_impl`` methods."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.is_active = False

    def activate(self) -> None:
        """Acquire what inference needs (idempotent)."""
        if not self.is_active:
            self.activate_impl()
            self.is_active = True

    def infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch.

        Args:
            feed: input name -> array.

        Returns:
            Output name -> array (owned by the caller: later calls never overwrite it).

        Raises:
            InferenceError: the runner is not active, or an input is missing or of the wrong shape.
        """
        if not self.is_active:
            raise InferenceError(
                got=f"infer() on inactive runner {self.name}",
                expected="an active runner",
                because="its session or buffers are not allocated",
                fix="use it as a context manager ('with runner:') or call activate() first",
            )
        self.check_feed(feed)
        return self.infer_impl(feed)

    def batch_limits(self) -> tuple[int, int] | None:
        """(min, max) batch the engine accepts, or None when it does not say (valid once active)."""
        return None

    def shape_limits(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
        """Input -> (smallest, largest) shape the engine's profile accepts, for inputs with dynamic axes
        beyond the batch (empty when it does not say)."""
        return {}

    def check_feed(self, feed: Mapping[str, np.ndarray]) -> None:
        """Check a batch against the engine's inputs, the same way for every backend.

        Raises:
            InferenceError: missing or unknown input names, a wrong rank or fixed dimension, an
                integer array for a float input (or the reverse), inputs of different batch sizes, or
                a batch outside the engine's range.
        """
        specs = {s.name: s for s in self.input_specs()}
        if set(feed) != set(specs):
            raise InferenceError(
                got=f"inputs {sorted(feed)}",
                expected=f"inputs {sorted(specs)}",
                because=f"the engine of {self.name} was built with those input names",
                fix="feed arrays keyed by the engine's input names",
            )
        batches = set()
        for name, arr in feed.items():
            spec, shape = specs[name], tuple(np.shape(arr))
            fixed_ok = all(want < 0 or want == got for want, got in zip(spec.shape[1:], shape[1:]))
            if len(shape) != len(spec.shape) or not fixed_ok:
                expected = ", ".join("N" if i == 0 else ("?" if d < 0 else str(d)) for i, d in enumerate(spec.shape))
                raise InferenceError(
                    got=f"input '{name}' of shape {shape}",
                    expected=f"shape ({expected})",
                    because=f"the engine of {self.name} was built for that shape",
                    fix="feed arrays of the shape the model was exported with",
                )
            kind = np.asarray(arr).dtype.kind
            if spec.kind in ("f", "i") and {"f": "f", "i": "i", "u": "i", "b": "b"}.get(kind, kind) != spec.kind:
                raise InferenceError(
                    got=f"input '{name}' of dtype {np.asarray(arr).dtype}",
                    expected=f"{'floating point' if spec.kind == 'f' else 'integer'} values ({spec.dtype})",
                    because=f"the engine's input '{name}' has that type",
                    fix=f"feed '{name}' as {spec.dtype}",
                )
            if shape:
                batches.add(shape[0])
            if (limits_of := self.shape_limits().get(name)) is not None:
                lo, hi = limits_of
                outside = [i for i in range(1, len(shape)) if i < len(lo) and not lo[i] <= shape[i] <= hi[i]]
                if outside:
                    i = outside[0]
                    raise InferenceError(
                        got=f"input '{name}' of shape {shape} (axis {i}: {shape[i]})",
                        expected=f"axis {i} from {lo[i]} to {hi[i]}",
                        because=f"the engine of {self.name} was built for that range (its shape profile)",
                        fix="cut or pad the input to a length in the range, or rebuild with wider --min-shapes/--max-shapes",
                    )
        if len(batches) > 1:
            raise InferenceError(
                got=f"inputs with batch sizes {sorted(batches)}",
                expected="one batch size for every input",
                because="all inputs of a batch describe the same samples",
                fix="slice every input to the same rows",
            )
        limits = self.batch_limits()
        if batches and limits is not None and not limits[0] <= (n := batches.pop()) <= limits[1]:
            raise InferenceError(
                got=f"batch {n}",
                expected=f"a batch in [{limits[0]}, {limits[1]}]",
                because="the engine was built for that batch range",
                fix="split the input into smaller batches or rebuild with a larger --max-batch",
            )

    #: what ``time_infer`` measures with; a runner that overrides it names its own clock
    timer = "perf_counter_ns"

    def time_infer(self, feed: Mapping[str, np.ndarray], iterations: int) -> list[float]:
        """Run the same batch ``iterations`` times and return each run's time in milliseconds.

        The default times each ``infer`` call with the wall clock (``time.perf_counter_ns``), which is
        right for synchronous (CPU) backends. A backend whose ``infer`` returns before the device is done
        overrides this (e.g. CUDA events around each launch) and sets ``timer`` to say so.

        Args:
            feed: input name -> array, as for ``infer``.
            iterations: how many timed runs (>= 1); the caller does its own warm-up.

        Returns:
            One duration per run, in ms, in run order.

        Raises:
            InferenceError: as ``infer``.
        """
        times: list[float] = []
        clock = time.perf_counter_ns
        for _ in range(iterations):
            t0 = clock()
            self.infer(feed)
            times.append((clock() - t0) / 1e6)
        return times

    def deactivate(self) -> None:
        """Release everything ``activate`` acquired (idempotent)."""
        if self.is_active:
            try:
                self.deactivate_impl()
            finally:
                self.is_active = False

    def __enter__(self) -> BaseRunner:
        self.activate()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.deactivate()

    @abc.abstractmethod
    def activate_impl(self) -> None: ...

    @abc.abstractmethod
    def infer_impl(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    @abc.abstractmethod
    def deactivate_impl(self) -> None: ...

    @abc.abstractmethod
    def input_specs(self) -> list[TensorSpec]:
        """Inputs of the engine (valid once active)."""

    @abc.abstractmethod
    def output_specs(self) -> list[TensorSpec]:
        """Outputs of the engine (valid once active)."""


@dataclass
class BuildResult:
    """What a builder wrote: the engine file and a JSON-able description of it."""

    engine_file: str
    info: dict[str, Any] = field(default_factory=dict)


class EngineBuilder(abc.ABC):
    """Turns an ONNX file of one precision into an engine of one backend.

    What the rest of the pipeline needs to know about a backend (its device, the precisions it
    computes natively, its engine file) is its ``BackendSpec``, not the builder.
    """

    #: the backend's name, as its ``BackendSpec`` registers it
    name: str

    @abc.abstractmethod
    def availability(self) -> str | None:
        """Return None when the backend can run here, else the reason it cannot (with install hint)."""

    @abc.abstractmethod
    def environment(self) -> dict[str, str]:
        """Everything outside the ONNX file that changes the engine (versions, device): part of its cache key."""

    @abc.abstractmethod
    def engine_from_onnx(
        self, onnx_path: Path, out_dir: Path, batch: tuple[int, int, int], options: Mapping[str, Any],
        shapes: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> BuildResult:
        """Build an engine.

        Args:
            onnx_path: the precision variant to build from.
            out_dir: folder to write the engine (and any report) into.
            batch: (min, opt, max) batch of the optimization profile.
            options: backend-specific options (e.g. workspace size, tf32).
            shapes: input -> {"min", "opt", "max"} full shapes (batch first), for inputs with dynamic
                axes beyond the batch; None: only the batch is dynamic.

        Returns:
            The engine file name (relative to out_dir) and its description.

        Raises:
            EngineBuildError: the backend rejected the model.
        """

    @abc.abstractmethod
    def runner_from_engine(self, engine_path: Path, info: EngineInfo) -> BaseRunner:
        """Return an inactive Runner for a built engine."""


@dataclass(frozen=True)
class BackendSpec:
    """One backend as the pipeline sees it: what it is capable of, and how to get its builder.

    Stages ask these capabilities, never the backend's name: a new backend is one module declaring
    its spec and ``tasks.backends.registry.register_backend(spec)``.

    Attributes:
        name: the ``--backend`` name, recorded in every engine's ``EngineInfo.backend``.
        builder: makes the backend's ``EngineBuilder`` (called when one is needed: no heavy import before).
        device: where its engines compute. ``gpu``: PyTorch is timed on CUDA beside them, the batch
            profile is kept as configured, the bundle records the GPU. ``cpu``: PyTorch on the CPU, the
            profile's batches are fitted to ``batch.cpu_memory_mib``.
        native_precisions: the precisions whose engines compute in that precision; any other is also
            verified through its emulation on the CPU (an fp16 engine ONNX Runtime computes in fp32).
        engine_file: the file name of the engine in its ``build`` artifact.
        engine_format: what that file is (for people: the report, the docs).
        timing_cache: whether its builder keeps a timing cache (in the store, ``.cache/<name>``).
        label: its name in sentences ("ONNX Runtime").
        auto: its rank among the backends ``--backend auto`` tries, lowest first (None: never chosen
            by ``auto``); the last one that is available everywhere is the fallback.
        present: why ``auto`` chose it when it is the first it tried ("TensorRT, pycuda and a GPU are present").
        version_key: the key of its ``environment()`` that holds its version.
        portable_keys: keys of its ``environment()`` that must be the same where a built engine runs
            (a TensorRT plan runs only with its TensorRT version on its GPU model; an ONNX file anywhere).
        triton_platform: the Triton Inference Server platform that serves its engine file as it is
            (``onnxruntime_onnx``, ``tensorrt_plan``); None: it cannot be shipped as a Triton model.
    """

    name: str
    builder: Callable[[], EngineBuilder]
    device: Literal["cpu", "gpu"]
    native_precisions: frozenset[str]
    engine_file: str
    engine_format: str
    timing_cache: bool = False
    label: str = ""
    auto: int | None = None
    present: str = ""
    version_key: str = ""
    portable_keys: tuple[str, ...] = ()
    triton_platform: str | None = None

    @property
    def host_memory(self) -> bool:
        """Whether its engines hold their activations in this process's memory (a CPU backend)."""
        return self.device == "cpu"

    @property
    def torch_device(self) -> str:
        """The PyTorch device its engines are compared and timed against (the same kind of device)."""
        return "cuda" if self.device == "gpu" else "cpu"

    def runs_natively(self, precision: str) -> bool:
        """Whether its engines compute ``precision`` (a ``Precision`` value) in that precision."""
        return str(getattr(precision, "value", precision)) in self.native_precisions
