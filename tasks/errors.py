"""One exception class per failure kind.

Every message follows the shape "got X, expected Y, because Z; do W" so that a user reading a failed
flow run in the terminal or the Prefect UI knows what broke and how to fix it. Each error also has a
``summary``: one line of at most ``SUMMARY_CHARS`` characters saying what happened and the fix, which
the terminal shows first, followed by a few indented ``details`` lines (``render``).

An error is data: ``str(error)`` is the same wherever it is read, and this module knows neither Prefect
nor the command line. Whoever shows it renders it: the CLI from the fields, with the flags
(``flows.cli``); the flow for the Prefect UI, with the form's parameter paths (``flows.ui.for_ui``).
"""

from __future__ import annotations

import re
import textwrap
from typing import Any

#: longest first line of an error in the terminal (with the CLI's 'trtflow: ' prefix: 159)
SUMMARY_CHARS = 150
#: longest indented detail line (wrapped, never cut)
DETAIL_CHARS = 110
#: most indented lines under the summary (without --debug)
MAX_DETAIL_LINES = 6
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def plain(text: str) -> str:
    """Remove ANSI colour codes (the exporter's messages carry them) and collapse blank runs."""
    return re.sub(r"[ \t]+", " ", _ANSI.sub("", text)).strip()


def one_line(text: str, limit: int = SUMMARY_CHARS) -> str:
    """``text`` on one line, shortened at a word boundary to ``limit`` characters ('…' marks a cut)."""
    text = " ".join(plain(text).split())
    if len(text) <= limit:
        return text
    cut = text[: limit - 1]
    if " " in cut[limit // 2 :]:
        cut = cut[: cut.rfind(" ")]
    return cut.rstrip(" ,;:") + "…"


class TrtflowError(Exception):
    """Base class of every error trtflow raises on purpose.

    ``retryable`` tells the Prefect wrappers whether a retry can help: deterministic failures (bad
    input, invalid model, failed verification) must fail at once.

    Args:
        got, expected, because, fix: the four parts of the message.
        summary: the first terminal line (what happened and the fix); default: made from ``got`` and
            ``fix``, shortened to ``SUMMARY_CHARS``.
    """

    retryable: bool = False
    #: the summary's first words (default: the class name)
    label: str | None = None
    #: the committed artifact that records this failure (a failing verification is a result too), or None
    artifact: Any = None
    #: whether a recovery stage (repair) can turn this failure into a pass
    recoverable: bool = False

    def __init__(self, got: str, expected: str, because: str, fix: str, summary: str | None = None) -> None:
        self.got, self.expected, self.because, self.fix = plain(got), plain(expected), plain(because), plain(fix)
        self._summary = summary
        super().__init__(f"got {self.got}, expected {self.expected}, because {self.because}; {self.fix}")

    @property
    def summary(self) -> str:
        """One line of at most ``SUMMARY_CHARS`` characters: the kind, what happened, then the fix."""
        label = self.label or type(self).__name__
        limit = SUMMARY_CHARS - len(label) - 2
        if self._summary:
            return f"{label}: {one_line(self._summary, limit)}"
        full = one_line(f"got {self.got}, expected {self.expected}; {self.fix}", 10**9)
        if len(full) > limit:
            fix = one_line(self.fix, limit // 2)
            full = f"{one_line('got ' + self.got, limit - len(fix) - 2)}; {fix}"
        return f"{label}: {full}"

    def details(self) -> list[str]:
        """The full message as short lines: got, expected, because, fix (wrapped, never cut)."""
        out: list[str] = []
        for label, text in (("got", self.got), ("expected", self.expected), ("because", self.because), ("fix", self.fix)):
            out += textwrap.wrap(f"{label}: {text}", DETAIL_CHARS, subsequent_indent="  ", break_long_words=False, break_on_hyphens=False)
        return out

    def render(self, debug: bool = False) -> str:
        """The terminal's text: the summary, then the parts it does not already say, indented.

        At most ``MAX_DETAIL_LINES`` detail lines unless ``debug``; the full message stays in
        ``str(error)``, Prefect's logs and the UI.
        """
        lines: list[str] = []
        # Why and what to do first: the summary already says what happened.
        for label, text in (("because", self.because), ("fix", self.fix), ("got", self.got), ("expected", self.expected)):
            if text in self.summary:
                continue
            lines += textwrap.wrap(f"{label}: {text}", DETAIL_CHARS, subsequent_indent="  ", break_long_words=False, break_on_hyphens=False)
        if not debug and len(lines) > MAX_DETAIL_LINES:
            lines = lines[: MAX_DETAIL_LINES - 1] + ["… (--debug shows the whole message)"]
        return "\n".join([self.summary, *("  " + line for line in lines)])


class ConfigError(TrtflowError):
    """A parameter of the run is invalid (unknown precision, min > max batch, negative tolerance)."""

    label = "invalid options"


class PolicyError(TrtflowError):
    """A deployment run asked for a model factory or a path that the worker's operator does not allow."""

    label = "not allowed"


class DatasetError(TrtflowError):
    """The dataset file is missing, garbled, or its arrays are unusable."""


class ModelError(TrtflowError):
    """The model factory cannot be imported, called, or does not fit the data."""


class ExportError(TrtflowError):
    """The PyTorch model could not be exported to ONNX."""


class OnnxValidationError(TrtflowError):
    """An ONNX file failed one of the validation checks."""


class BackendUnavailableError(TrtflowError):
    """The requested backend (TensorRT, pycuda, a GPU) is not installed or not present."""


class EngineBuildError(TrtflowError):
    """An engine could not be built from an ONNX file."""


class InferenceError(TrtflowError):
    """A runner was called with inputs it cannot run (wrong name, shape outside the profile)."""


class VerificationError(TrtflowError):
    """Engine outputs disagree with PyTorch beyond the tolerances of their precision.

    Carries every failing check, not only the first, so that one run shows the whole picture.
    """

    recoverable = True

    def __init__(self, failures: list[str], report_path: str, artifact: Any = None) -> None:
        self.failures = failures
        self.report_path = report_path
        self.artifact = artifact
        got = f"{len(failures)} failing check(s): " + "; ".join(failures)
        first = failures[0] if failures else "a failing check"
        more = f" (+{len(failures) - 1} more)" if len(failures) > 1 else ""
        super().__init__(
            summary=f"verification failed: {one_line(first, 80)}{more}; see report.json, loosen --tolerance only if acceptable",
            got=got,
            expected="every metric within its precision's threshold",
            because="the engine's outputs drift from the PyTorch reference on held-out data",
            fix=f"read {report_path}, then loosen that precision's tolerance "
            "(--tolerance PRECISION.METRIC=VALUE) only if the drift is acceptable, or drop the precision",
        )


class PrecisionShareError(VerificationError):
    """An fp16 or int8 engine in which (almost) no compute operator runs in that precision.

    Not recoverable: a repair keeps more nodes in fp32, it can never add reduced-precision operators.
    """

    recoverable = False

    def __init__(self, precision: str, finding: str, failures: list[str], report_path: str, artifact: Any = None) -> None:
        self.failures = failures
        self.report_path = report_path
        self.artifact = artifact
        self.finding = finding
        fix = (f"drop {precision} (--precisions without it): it runs like fp32 here; or accept the engine as it is "
               f"with --tolerance {precision}.min_compute_share=0 (the report still shows the share)")
        TrtflowError.__init__(
            self,
            got=f"{finding}: " + "; ".join(failures),
            expected=f"at least the --tolerance {precision}.min_compute_share of compute operators in {precision}",
            because=f"an engine that computes in fp32 is no {precision} engine: it has neither {precision}'s speed nor its numerics",
            fix=f"read {report_path}; {fix}",
            summary=share_summary(precision, finding),
        )


def share_summary(precision: str, finding: str) -> str:
    """The first line for an engine that is not its precision (``finding`` says how few operators are)."""
    return f"{finding}; drop {precision}"


class PrecisionRepairError(VerificationError):
    """A variant still fails verification after the automatic repair kept nodes in fp32 up to its budget.

    A VerificationError (the same failing checks), with the repair's findings and its own fix;
    ``finding`` says when the repair stopped because too few compute operators were left in the precision.
    """

    recoverable = False

    def __init__(self, precision: str, failures: list[str], tried: list[str], stopped: str, report_path: str, finding: str | None = None) -> None:
        self.failures = failures
        self.report_path = report_path
        kept = ", ".join(tried) if tried else "no node"
        TrtflowError.__init__(
            self,
            got=f"{precision} still failing after repair kept {kept} in fp32: " + "; ".join(failures),
            expected="every metric within its precision's threshold",
            because=f"the repair stopped: {stopped}",
            fix=f"read {report_path}; "
            + (f"drop {precision}, or accept the engine as it is with --tolerance {precision}.min_compute_share=0 (a larger "
               "repair budget would keep even more nodes in fp32)" if finding else
               "raise --repair-budget if more nodes may stay fp32, loosen that precision's tolerance "
               "(--tolerance PRECISION.METRIC=VALUE) only if the drift is acceptable, or drop the precision"),
            # A repair that left too few operators in the precision: that is the news, not the checks.
            summary=share_summary(precision, finding) if finding else None,
        )


class ModelCollapseError(TrtflowError):
    """The trained model predicts (almost) only one class: it collapsed onto the majority class.

    Deterministic (same data, config and seed give the same model), so never retried. Carries the
    gate's findings and the path of the metrics report written before raising.
    """

    def __init__(self, findings: list[str], report_path: str, because: str, fix: str, summary: str | None = None) -> None:
        self.findings = findings
        self.report_path = report_path
        super().__init__(
            got="a collapsed model: " + "; ".join(findings),
            expected="predictions spread over the classes about like the true labels, and balanced accuracy well above chance",
            because=because,
            fix=f"{fix}; the validation metrics are in {report_path}",
            summary=summary,
        )


class LearntNothingError(ModelCollapseError):
    """A trained regressor predicts no better than the mean of y (validation R² at or below the gate's
    minimum): it learnt nothing about its inputs. A ModelCollapseError: the same gate, for regression."""

    def __init__(self, findings: list[str], report_path: str, because: str, fix: str, summary: str | None = None) -> None:
        self.findings = findings
        self.report_path = report_path
        TrtflowError.__init__(
            self,
            got="a regressor that learnt nothing: " + "; ".join(findings),
            expected="a validation R² above the gate's min_r2 (0 is what predicting the mean of y scores)",
            because=because,
            fix=f"{fix}; the validation metrics are in {report_path}",
            summary=summary,
        )


class BundleError(TrtflowError):
    """A deployment bundle cannot be made (no variant passed, none meets the ship policy, a config
    Triton would refuse), or a bundle on disk does not match its ``bundle.json``."""

    label = "bundle"


class TargetError(TrtflowError):
    """A run over several targets in which a target's run did not pass (failed, crashed, or left no report)."""


class ArtifactError(TrtflowError):
    """An artifact on disk is missing, or its content no longer matches its recorded digest."""


class StorageError(TrtflowError):
    """The artifacts folder ran out of space (or failed otherwise) while a stage wrote; not retried."""


class TransientError(TrtflowError):
    """A failure that may go away on its own (I/O hiccup, timeout); the wrappers retry it."""

    retryable = True


def is_retryable(exc: BaseException) -> bool:
    """Tell transient failures (retry) from deterministic ones (fail fast).

    Args:
        exc: the exception a stage raised.

    Returns:
        True for I/O errors, timeouts and ``TransientError``; False for every other trtflow error
        and for programming errors.
    """
    if isinstance(exc, TrtflowError):
        return exc.retryable
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return True
    if isinstance(exc, OSError):
        import errno

        # A full disk or a permission problem will not fix itself between retries.
        return exc.errno not in (errno.ENOSPC, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT)
    return False
