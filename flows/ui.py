"""What a run shows in the Prefect UI besides the summary: progress, file links, training curve, confusion matrix,
and a failed run's message in the UI's terms (``failed_in_ui_terms``).

The UI cannot read files of the machine that ran the flow, so the figures are written as PNG files under
``<artifacts>/reports/`` and also embedded in markdown artifacts as base64 data URIs. Links name files
relative to the artifacts folder, never by absolute (home-directory) paths.

Used by ``flows.pipeline``; every function is a no-op outside a flow run except the plain ones
(``confusion_matrix``, ``training_curve_png``, ``confusion_matrix_png``, ``image_markdown``)::

    from flows.ui import confusion_matrix
    confusion_matrix([0, 1, 1], [0, 1, 0], num_classes=2)   # [[1, 0], [1, 1]]
"""

from __future__ import annotations

import base64
import contextvars
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast
from uuid import UUID

import numpy as np

from tasks.metrics import confusion_matrix  # noqa: F401 - re-exported for the figure code and tests
from tasks.progress import set_sink

log = logging.getLogger("trtflow.ui")

REPORTS = "reports"
CURVE_PNG = "training-curve.png"
CONFUSION_PNG = "confusion-matrix.png"


def _in_flow_run() -> bool:
    from prefect.context import FlowRunContext

    return FlowRunContext.get() is not None


# --- errors in the UI's terms ----------------------------------------------------------------------


def for_ui(text: str, root: str | None = None) -> str:
    """Say ``text`` in the Prefect UI's terms: parameter paths instead of options, relative artifact paths.

    ``--lr`` becomes ``config.train.lr``, ``--balance class_weight`` becomes
    ``config.train.balance=class_weight``, ``--tolerance fp16.atol=0.02`` becomes
    ``config.tolerances.fp16.atol=0.02``; the artifacts folder ``root`` is dropped from paths.
    """
    from tasks.options import parameter_path

    def option(m: re.Match[str]) -> str:
        flag, value = m.group(1), m.group(2)
        if flag == "--tolerance" and value:
            name, _, v = value.partition("=")
            return f"config.tolerances.{name}" + (f"={v}" if v else "")
        path = parameter_path(flag, value)
        return path if path else m.group(0)

    text = re.sub(r"(--[a-z][a-z0-9-]*)(?:[ =](?![-(])([^\s,;()]+))?", option, text)
    if root:
        for prefix in {root, os.path.realpath(root)}:
            text = text.replace(prefix.rstrip("/") + "/", "")
    return text


def _flow_artifacts_dir() -> str | None:
    """The artifacts folder of the current flow run's ``config`` parameter, absolute; None outside a run."""
    try:
        from prefect.context import FlowRunContext

        ctx = FlowRunContext.get()
        config = (ctx.parameters or {}).get("config") if ctx else None
        folder = config.get("artifacts_dir") if isinstance(config, dict) else getattr(config, "artifacts_dir", None)
        return os.path.abspath(os.path.expanduser(str(folder))) if folder else None
    except Exception:  # noqa: BLE001 - a message must always render
        return None


def in_ui_terms(text: str) -> str:
    """``text`` (an error's) as the current flow run's UI says it (``for_ui``); unchanged outside a flow run."""
    return for_ui(text, _flow_artifacts_dir()) if _in_flow_run() else text


def error_text(exc: BaseException) -> str:
    """What the run report says of an error: a trtflow error in the UI's terms inside a flow run, else ``str(exc)``."""
    from tasks.errors import TrtflowError

    return in_ui_terms(str(exc)) if isinstance(exc, TrtflowError) else str(exc)


def failed_in_ui_terms(exc: BaseException) -> Any:
    """The flow's Failed state for ``exc``, its message in the UI's terms (``for_ui``).

    Returned by the flow instead of raising: Prefect then keeps this message, and a caller of the flow
    still gets ``exc`` itself raised, its text unchanged (the CLI renders it with the flags).
    """
    from prefect import get_run_logger
    from prefect.states import Failed

    message = f"{type(exc).__name__}: {in_ui_terms(str(exc))}"
    get_run_logger().error(message)
    return Failed(data=exc, message=f"Flow run encountered an exception: {message}")


# --- progress -----------------------------------------------------------------------------------


#: least seconds between two updates of the progress artifact (the final update is never skipped)
PROGRESS_INTERVAL_S = 0.5
#: seconds the end of a run waits for the last progress update to reach the API
PROGRESS_FLUSH_S = 5.0
#: seconds an idle sender thread lives on (it starts again with the next update)
SENDER_IDLE_S = 30.0


class LatestOnlySender:
    """Sends UI updates from a background thread, so that no stage ever waits on the Prefect API.

    One update is in flight at a time; a newer one replaces the one still waiting (a progress bar
    needs only its latest value). A server that is slow or gone delays the bar, never the training
    loop: Prefect's client retries a dead server for minutes, on this thread only. Failures are logged
    at debug level and dropped. The thread runs in a copy of the caller's context (Prefect's settings,
    e.g. the temporary server's URL, live in context variables) and ends after ``SENDER_IDLE_S`` idle.
    """

    def __init__(self, name: str = "trtflow-ui-sender") -> None:
        self.name = name
        self._ctx = contextvars.copy_context()
        self._cv = threading.Condition()
        self._pending: Callable[[], Any] | None = None
        self._busy = False
        self._thread: threading.Thread | None = None

    def submit(self, send: Callable[[], Any]) -> None:
        """Queue ``send`` (a call to the API); an earlier one that has not started yet is dropped."""
        with self._cv:
            self._pending = send
            self._cv.notify_all()
            if self._thread is None or not self._thread.is_alive():
                # A copy per thread: a context cannot be entered by two threads at once.
                self._thread = threading.Thread(target=self._ctx.copy().run, args=(self._loop,), name=self.name, daemon=True)
                self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._cv:
                if self._pending is None:
                    self._cv.wait(SENDER_IDLE_S)
                if self._pending is None:  # idle: end; the next submit starts a new thread
                    if self._thread is threading.current_thread():
                        self._thread = None
                    return
                send, self._pending = self._pending, None
                self._busy = True
            try:
                send()
            except Exception as exc:  # noqa: BLE001 - the UI must never fail a run
                log.debug("UI update dropped: %s", exc)
            finally:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()

    def flush(self, timeout: float = PROGRESS_FLUSH_S) -> bool:
        """Wait up to ``timeout`` seconds until nothing is waiting or in flight; True when all was sent."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self._pending is not None or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(left)
        return True


class Progress:
    """A progress artifact of the run: stages finished / stages planned, updated as stages finish.

    Outside a flow run every method does nothing, so the flow stays callable as a plain function.
    """

    def __init__(self, total: int = 0) -> None:
        """Create the artifact at 0 %.

        Args:
            total: the number of stages the run will finish (shared stages + branch stages); 0 until
                ``expect`` says (the scheduler does, from the run's plan).
        """
        self.total = max(total, 1)
        self.done = 0
        self._within = 0.0  # the furthest point shown inside running stages
        self.id: UUID | None = None
        self._last_update = 0.0
        self._sender = LatestOnlySender("trtflow-progress")
        self._installed = False
        if _in_flow_run():
            from prefect.artifacts import create_progress_artifact

            drop_earlier_attempts()
            # Called from the (sync) flow, so it returns the id, not a coroutine.
            self.id = cast(UUID, create_progress_artifact(progress=0.0, key="trtflow-progress", description=f"0/{self.total} stages"))
            # Long stages (training) report through tasks.progress while they run, not only when done.
            self._previous = set_sink(self.within_stage)
            self._installed = True

    def within_stage(self, stage: str, fraction: float, text: str) -> None:
        """Move the bar inside a running stage (``tasks.progress`` sink): done + fraction of one stage."""
        if self.id is None or not _in_flow_run():
            return
        from prefect.artifacts import update_progress_artifact

        # Branches report concurrently, each its own fraction: the bar shows the furthest, never moving back.
        share = max(self._within, min(self.done + max(0.0, min(fraction, 1.0)), self.total))
        self._within = share
        artifact, value, description = self.id, 100.0 * share / self.total, f"{self.done}/{self.total} stages; now {text}"
        # Called from the training loop: never wait for the API here.
        self._sender.submit(lambda: update_progress_artifact(artifact, progress=value, description=description))

    def expect(self, total: int) -> None:
        """Correct the number of planned stages once the branches are known (never below those done).

        Before the first stage ends, the artifact shows the new total at once ("0/19 stages").
        """
        before, self.total = self.total, max(total, self.done, 1)
        if self.id is not None and self.done == 0 and self.total != before:
            from prefect.artifacts import update_progress_artifact

            artifact, description = self.id, f"0/{self.total} stages"
            self._sender.submit(lambda: update_progress_artifact(artifact, progress=0.0, description=description))

    def step(self, what: str) -> None:
        """Count one stage as finished and update the artifact.

        Args:
            what: the stage that finished, e.g. "train" or "verify fp16 (failed)".
        """
        self.done = min(self.done + 1, self.total)
        if self.id is None:
            return
        # Each update is an API call (~40 ms); a cached run finishes ~20 stages in well under a
        # second. So at most one update per PROGRESS_INTERVAL_S, and always the last one (the bar may
        # lag one quick stage behind); sent in the background, never waited for.
        now = time.monotonic()
        if self.done < self.total and now - self._last_update < PROGRESS_INTERVAL_S:
            return
        self._last_update = now
        from prefect.artifacts import update_progress_artifact

        artifact, value, description = self.id, 100.0 * self.done / self.total, f"{self.done}/{self.total} stages; last: {what}"
        self._sender.submit(lambda: update_progress_artifact(artifact, progress=value, description=description))

    def flush(self, timeout: float = PROGRESS_FLUSH_S) -> bool:
        """Give the last update up to ``timeout`` seconds to reach the API (the end of a run); True when sent."""
        return self._sender.flush(timeout)

    def close(self) -> None:
        """Stop mirroring stage progress (the run is over): later stages in this process report elsewhere."""
        if self._installed:
            set_sink(self._previous)
            self._installed = False


def drop_earlier_attempts() -> int:
    """On a retried flow run, delete the artifacts its earlier attempts made: one set per run in the UI.

    Returns:
        How many were deleted (0 on a first attempt, outside a flow run, or when the API refuses).
    """
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None or (ctx.flow_run.run_count or 0) <= 1:
        return 0
    try:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

        n = 0
        with get_client(sync_client=True) as client:
            old = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[ctx.flow_run.id])))
            for artifact in old:
                client.delete_artifact(artifact.id)
                n += 1
        log.info("retry %d of this flow run: replaced the %d artifacts of earlier attempts", ctx.flow_run.run_count, n)
        return n
    except Exception as exc:  # noqa: BLE001 - a stale card must never fail a run
        log.warning("artifacts of earlier attempts not removed: %s", exc)
        return 0


# --- plain figure helpers -------------------------------------------------------------------------


def _pyplot() -> Any:
    import matplotlib

    # Agg: no display on servers and workers; must be chosen before pyplot is imported.
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def training_curve_png(history: Sequence[Mapping[str, float]], path: Path) -> Path:
    """Plot loss and accuracy per epoch (train and validation) into a PNG.

    Args:
        history: the train artifact's ``history.json`` rows (epoch, train_loss, train_acc, val_loss, val_acc).
        path: the PNG to write (parent folders are created).

    Returns:
        ``path``.
    """
    plt = _pyplot()
    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=100)
    # A regression's history has R² where a classifier's has accuracy.
    second = ("acc", "accuracy") if any("val_acc" in r for r in history) else ("r2", "R²")
    for ax, metric, title in ((ax_loss, "loss", "loss"), (ax_acc, *second)):
        for split, style in (("train", "o-"), ("val", "s--")):
            values = [r.get(f"{split}_{metric}") for r in history]
            ax.plot(epochs, values, style, label=split)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_xticks(epochs if len(epochs) <= 20 else epochs[:: max(1, len(epochs) // 10)])
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def confusion_matrix_png(matrices: Mapping[str, np.ndarray], path: Path) -> Path:
    """Draw one confusion matrix per engine side by side into a PNG.

    Args:
        matrices: title (e.g. "fp32 (accuracy 0.97)") -> matrix from ``confusion_matrix``.
        path: the PNG to write.

    Returns:
        ``path``.
    """
    plt = _pyplot()
    n = max(len(matrices), 1)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 4), dpi=100, squeeze=False)
    for ax, (title, m) in zip(axes[0], matrices.items()):
        ax.imshow(m, cmap="Blues")
        k = m.shape[0]
        for i in range(k):
            for j in range(k):
                if m[i, j]:
                    ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=7, color="white" if m[i, j] > m.max() / 2 else "black")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_xticks(range(k))
        ax.set_yticks(range(k))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def image_markdown(path: Path, title: str, note: str = "") -> str:
    """Markdown that shows a PNG inline as a base64 data URI (the UI cannot read local files)."""
    data = base64.b64encode(path.read_bytes()).decode()
    return f"## {title}\n\n![{title}](data:image/png;base64,{data})\n\n{note}".rstrip() + "\n"


# --- what the flow publishes ------------------------------------------------------------------------


def _rel(path: Path, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return Path(path).name


def saved_confusion(verification: Any) -> tuple[np.ndarray, float] | None:
    """The confusion matrix and accuracy that verify saved for one engine (no inference here).

    Args:
        verification: a ``verify`` ArtifactRef.

    Returns:
        (matrix, accuracy) on the test split, or None when the verification holds none (no labels).
    """
    saved = json.loads(verification.path("verification.json").read_text()).get("confusion")
    if not saved:
        return None
    return np.asarray(saved["matrix"], dtype=np.int64), float(saved["accuracy"])


FIGURES_MEMO = ".figures.json"


def _source_digest() -> str:
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


def _memo_figures(path: Path, key: str) -> list[tuple[str, str, Path, str]] | None:
    """The figures an earlier run drew from the same inputs, if all its PNGs are still there; else None."""
    try:
        memo = json.loads(path.read_text())
        if memo.get("key") != key:
            return None
        figures = [(k, title, path.parent / name, note) for k, title, name, note in memo["figures"]]
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return figures if all(png.is_file() for _, _, png, _ in figures) else None


def _save_memo(path: Path, key: str, figures: list[tuple[str, str, Path, str]]) -> None:
    try:
        path.write_text(json.dumps({"key": key, "figures": [(k, title, png.name, note) for k, title, png, note in figures]}))
    except OSError as exc:
        log.warning("figure memo not written: %s", exc)


class _Skip(Exception):
    """A figure that does not apply to this run (no training, no labels)."""


def publish_figures(root: Path, shared: Mapping[str, Any], verifications: Mapping[str, Any]) -> dict[str, str]:
    """Write the training curve and the confusion matrices as PNGs and show them in the UI.

    Everything is drawn from saved results (``history.json``, each ``verification.json``): the UI
    layer runs no model. A figure that cannot be made is logged and skipped: pictures never fail a run.

    Args:
        root: the artifacts folder.
        shared: the shared stages' artifacts by name (``train``'s ``history.json``).
        verifications: precision name -> ``verify`` ArtifactRef of the engines that verified.

    Returns:
        Figure name -> PNG path relative to ``root``.
    """
    out: dict[str, str] = {}
    reports = root / REPORTS
    # A cached re-run draws nothing: the figures of the same artifacts (and drawing code) are reused
    # (importing matplotlib and drawing costs about a second on 2 cores).
    checkpoint = shared["train"]
    memo_key = json.dumps([checkpoint.digest, sorted((p, v.digest) for p, v in verifications.items()), _source_digest()])
    figures = _memo_figures(reports / FIGURES_MEMO, memo_key)
    if figures is None:
        figures = []
        # A model loaded from weights has no history, and one without labels no confusion matrix.
        history_expected = bool(checkpoint.meta.get("epoch_seconds", [None]))
        labelled = checkpoint.meta.get("num_classes", 0) is not None and checkpoint.meta.get("logits_output", "logits") is not None
        try:
            if not history_expected:
                raise _Skip
            history = json.loads(checkpoint.path("history.json").read_text())
            png = training_curve_png(history, reports / CURVE_PNG)
            last = history[-1]
            score = f"accuracy {last['val_acc']:.4f}" if "val_acc" in last else f"R² {last.get('val_r2', float('nan')):.4f}"
            figures.append(("trtflow-training-curve", "Training curve", png, f"{len(history)} epochs; final validation {score}, loss {last['val_loss']:.4f}."))
        except _Skip:
            pass
        except Exception as exc:  # noqa: BLE001
            log.warning("training curve not drawn: %s", exc)
        try:
            matrices: dict[str, np.ndarray] = {}
            for precision, verification in verifications.items():
                if (saved := saved_confusion(verification)) is not None:
                    m, acc = saved
                    matrices[f"{precision} engine (accuracy {acc:.3f})"] = m
            if matrices:
                png = confusion_matrix_png(matrices, reports / CONFUSION_PNG)
                figures.append(("trtflow-confusion-matrix", "Confusion matrix (test split)", png, "Rows: true class; columns: the engine's prediction."))
        except Exception as exc:  # noqa: BLE001
            log.warning("confusion matrix not drawn: %s", exc)
        if len(figures) == int(history_expected) + int(bool(verifications) and labelled):  # a figure that failed is tried again next run
            _save_memo(reports / FIGURES_MEMO, memo_key, figures)
    for key, title, png, note in figures:
        out[png.stem] = _rel(png, root)
        if _in_flow_run():
            from prefect.artifacts import create_markdown_artifact

            create_markdown_artifact(key=key, markdown=image_markdown(png, title, f"{note} File: `{_rel(png, root)}` in the artifacts folder."), description=title)
    return out


def publish_links(report: Mapping[str, Any]) -> None:
    """Create one link artifact per produced file (engines, ONNX model, checkpoint, report).

    Links are paths relative to the artifacts folder: the UI runs in a browser that cannot open the
    worker's files anyway, and absolute paths would leak the machine's layout (home directories).
    """
    if not _in_flow_run():
        return
    from prefect.artifacts import create_link_artifact

    files: list[tuple[str, str, str]] = [
        ("trtflow-report", report.get("report", "report.json"), "The run report (JSON)"),
        ("trtflow-onnx", report["model"]["onnx"], f"ONNX model, opset {report['model']['opset']}"),
        ("trtflow-checkpoint", report["model"]["checkpoint"], "PyTorch checkpoint"),
    ]
    # A run over several targets: each engine lies on its target's machines, linked by that target's own run.
    for p, r in ({} if report.get("targets") else report["precisions"]).items():
        if "engine" in r:
            files.append((f"trtflow-engine-{p}", r["engine"], f"{p} engine ({r.get('backend')}), sha256 {r['engine_sha256'][:12]}…"))
    if (b := report.get("bundle")) and "error" not in b:
        files.append(("trtflow-bundle", f"{b['path']}/bundle.json", f"Deployment bundle: {b['precision']} shipped as Triton model '{b['name']}' ({b['reason']})"))
    for key, rel, what in files:
        # The browser cannot open the worker's disk: the card says what the file is and where it lies.
        create_link_artifact(key=key, link=rel, link_text=f"{what}: {rel} (in the artifacts folder)", description=f"{what}; path relative to the artifacts folder")
