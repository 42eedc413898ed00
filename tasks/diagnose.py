"""Diagnoses that need an experiment: a batch size written into ``forward``, a batch axis frozen by export,
and (``shape_log``) torch.export's record of the shape guards a model adds, which names the line behind them.

The pre-flight tries every model on a trial batch of 2 samples and exports it untrained. When that
fails, the raw error ("mat1 and mat2 shapes cannot be multiplied (32x12 and 192x10)") reads like a
mismatch of layers and data; these functions find the real cause by running the model once more:

    from tasks.diagnose import hard_coded_batch, batch_frozen_at
    hard_coded_batch(model, binding, feed, str(exc))   # 32: forward works on a batch of 32 only
    batch_frozen_at(bound_model, examples)             # "net.py:9 (n = int(x.shape[0]))"
"""

from __future__ import annotations

import contextlib
import linecache
import logging
import os
import re
import sys
import sysconfig
import threading
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from torch import nn

#: the largest trial batch tried (bytes of inputs) when looking for a hard-coded batch size
PROBE_BYTES = 256 << 20
#: the most batch sizes tried
PROBE_SIZES = 6


def hard_coded_batch(model: nn.Module, binding: Mapping[str, str | None], feed: Mapping[str, np.ndarray], error: str, extra: Iterable[int] = ()) -> int | None:
    """The batch size ``forward`` works with, when it failed on ``feed``: proof that it hard-codes one.

    Candidates are the numbers in the error message (``view(32, -1)`` fails with "... (32x12 and ...)",
    ``zeros(1, 32, H)`` with "Expected hidden size (1, 2, 16), got [1, 32, 16]") and ``extra`` (the
    training batch size). The feed's rows are repeated to make each candidate batch.

    Args:
        model: the user's module (unbound).
        binding: dataset input -> forward parameter.
        feed: the trial batch that failed.
        error: the failure's message.
        extra: more sizes to try.

    Returns:
        The first size forward runs on, or None (the failure does not depend on the batch size).
    """
    from tasks.models import output_names

    rows = len(next(iter(feed.values())))
    row_bytes = sum(int(a.nbytes) // max(len(a), 1) for a in feed.values())
    sizes: list[int] = []
    for v in [*(int(m) for m in re.findall(r"(?<![\d.])(\d+)(?![\d.])", error)), *extra]:
        if 3 <= v <= 65536 and v != rows and v not in sizes and v * row_bytes <= PROBE_BYTES:
            sizes.append(v)
    for size in sizes[:PROBE_SIZES]:
        grown = {k: np.resize(np.asarray(a), (size, *a.shape[1:])) for k, a in feed.items()}
        try:
            output_names(model, binding, grown)
        except Exception:  # noqa: BLE001 - this size does not fit either
            continue
        return size
    return None


def static_batch_inputs(onnx_path: Path) -> list[str]:
    """The inputs of an ONNX file whose first (batch) axis is a fixed number instead of a named dimension."""
    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)
    out = []
    for inp in proto.graph.input:
        dims = inp.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value"):
            out.append(inp.name)
    return out


def batch_frozen_at(model: nn.Module, examples: tuple[Any, ...]) -> str | None:
    """Where ``forward`` turns the batch size into a constant, as torch.export's guard log tells it.

    An ``int(x.shape[0])`` (or ``.item()``, or the size in Python arithmetic) adds a guard
    ``Eq(batch, 2)`` during export; torch.export records the line that added it.

    Args:
        model: the module as exported (inputs positionally).
        examples: the example inputs (batch first).

    Returns:
        "file.py:LINE (source line)", or None when the log names no such line.
    """
    import torch

    from tasks.models import takes_varargs

    frames: list[Any] = []
    events: list[ShapeEvent] = []
    try:
        with shape_log() as recorded:
            events = recorded
            batch = torch.export.Dim("batch", min=1, max=1 << 20)
            shapes = tuple({0: batch} for _ in examples)
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.export.export(model.eval(), examples, dynamic_shapes=(shapes,) if takes_varargs(model) else shapes, strict=False)
    except Exception:  # noqa: BLE001 - the refusal is expected; the guard log is what we want
        pass
    for event in events:
        args = event.args
        if "[guard added]" in event.template and len(args) >= 3 and re.fullmatch(r"Eq\(s\d+, \d+\)", str(args[1])):
            loc = args[2]
            frame = getattr(loc, "maybe_user_loc", None) or getattr(loc, "framework_loc", None)
            if frame is not None:
                frames.append(frame)
    torch_dir = str(Path(torch.__file__).parent)
    for frame in frames:
        filename, lineno = getattr(frame, "filename", None), getattr(frame, "lineno", None)
        if not filename or not lineno or str(filename).startswith(torch_dir):
            continue  # torch's own frames say nothing about the user's forward
        line = (getattr(frame, "line", None) or linecache.getline(filename, lineno)).strip()
        return f"{Path(filename).name}:{lineno}" + (f" ({line})" if line else "")
    return None


@dataclass(frozen=True)
class ShapeEvent:
    """One record of torch.export's shape log (``torch.fx.experimental.symbolic_shapes``).

    Attributes:
        message: the record as text ("create_symbol s70 = 12 for L['args'][0].size()[1] ...",
            "eval Eq(4*s70, 48) [guard added] (... in meta_mm)", "set_replacement s70 = 12 ...").
        template: the record's format string; args: its arguments (a guard's location object among them).
        module: (name in the model, class) of the innermost module of the model running when it was logged.
        where: (file, line, source) of the innermost frame outside torch, trtflow and the standard library.
    """

    message: str
    template: str
    args: tuple[Any, ...]
    module: tuple[str, str] | None
    where: tuple[str, int, str] | None


#: frames of trtflow itself and of the standard library are not where a model adds a guard
_OWN_DIR = os.path.dirname(os.path.abspath(__file__))
_STDLIB = sysconfig.get_paths()["stdlib"]
_SHAPE_LOG_LOCK = threading.Lock()


class _ShapeLog(logging.Handler):
    def __init__(self, model: Any) -> None:
        super().__init__(logging.INFO)
        self.modules = {id(m): (n, type(m).__name__) for n, m in model.named_modules()} if model is not None else {}
        self.events: list[ShapeEvent] = []

    def emit(self, record: logging.LogRecord) -> None:
        import torch

        message = record.getMessage()
        if not message.startswith(("create_symbol", "set_replacement")) and "[guard added]" not in message:
            return
        torch_dir = os.path.dirname(torch.__file__)
        module, where = None, None
        frame: Any = sys._getframe()
        while frame is not None:
            owner = frame.f_locals.get("self")
            if module is None and id(owner) in self.modules:
                module = self.modules[id(owner)]
            file = frame.f_code.co_filename
            outside = not file.startswith((torch_dir, _OWN_DIR, "<")) and not (file.startswith(_STDLIB) and "site-packages" not in file)
            if where is None and outside:
                where = (file, frame.f_lineno, linecache.getline(file, frame.f_lineno).strip())
            frame = frame.f_back
        self.events.append(ShapeEvent(message, str(record.msg), record.args if isinstance(record.args, tuple) else (), module, where))


@contextlib.contextmanager
def shape_log(model: Any = None) -> Iterator[list[ShapeEvent]]:
    """Record torch.export's shape log while the block runs (and keep torch's own handler from printing it).

    Args:
        model: the module being exported: each event then names the innermost of its modules running.

    Yields:
        The events, in order (filled as the block runs).
    """
    logger = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    handler = _ShapeLog(model)
    with _SHAPE_LOG_LOCK:
        saved = (logger.handlers[:], logger.level, logger.propagate)
        logger.handlers, logger.propagate = [handler], False
        logger.setLevel(logging.INFO)
        try:
            yield handler.events
        finally:
            logger.handlers, logger.level, logger.propagate = saved
