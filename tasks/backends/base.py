"""The interface every backend implements: a Builder and a Runner.

Runners follow Polygraphy's ``BaseRunner``: ``activate`` acquires resources (sessions, GPU buffers),
``infer`` maps input name -> array to output name -> array, ``deactivate`` frees them; a runner is a
context manager so the resources are always released, even when inference raises.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from tasks.errors import InferenceError


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype and shape of an engine input or output; -1 marks a dynamic dimension."""

    name: str
    dtype: str
    shape: tuple[int, ...]


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
        expected = {s.name for s in self.input_specs()}
        if set(feed) != expected:
            raise InferenceError(
                got=f"inputs {sorted(feed)}",
                expected=f"inputs {sorted(expected)}",
                because=f"the engine of {self.name} was built with those input names",
                fix="feed arrays keyed by the engine's input names",
            )
        return self.infer_impl(feed)

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
    """Turns an ONNX file of one precision into an engine of one backend."""

    #: backend name as in ``tasks.config.Backend``
    name: str

    @abc.abstractmethod
    def availability(self) -> str | None:
        """Return None when the backend can run here, else the reason it cannot (with install hint)."""

    @abc.abstractmethod
    def environment(self) -> dict[str, str]:
        """Everything outside the ONNX file that changes the engine (versions, device): part of its cache key."""

    @abc.abstractmethod
    def engine_from_onnx(
        self, onnx_path: Path, out_dir: Path, batch: tuple[int, int, int], options: Mapping[str, Any]
    ) -> BuildResult:
        """Build an engine.

        Args:
            onnx_path: the precision variant to build from.
            out_dir: folder to write the engine (and any report) into.
            batch: (min, opt, max) batch of the optimization profile.
            options: backend-specific options (e.g. workspace size, tf32).

        Returns:
            The engine file name (relative to out_dir) and its description.

        Raises:
            EngineBuildError: the backend rejected the model.
        """

    @abc.abstractmethod
    def runner_from_engine(self, engine_path: Path, info: Mapping[str, Any]) -> BaseRunner:
        """Return an inactive Runner for a built engine."""
