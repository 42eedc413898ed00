"""One exception class per failure kind.

Every message follows the shape "got X, expected Y, because Z; do W" so that a user reading a failed
flow run in the terminal or the Prefect UI knows what broke and how to fix it.
"""

from __future__ import annotations


class TrtflowError(Exception):
    """Base class of every error trtflow raises on purpose.

    ``retryable`` tells the Prefect wrappers whether a retry can help: deterministic failures (bad
    input, invalid model, failed verification) must fail at once.
    """

    retryable: bool = False

    def __init__(self, got: str, expected: str, because: str, fix: str) -> None:
        self.got, self.expected, self.because, self.fix = got, expected, because, fix
        super().__init__(f"got {got}, expected {expected}, because {because}; {fix}")


class ConfigError(TrtflowError):
    """A parameter of the run is invalid (unknown precision, min > max batch, negative tolerance)."""


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

    def __init__(self, failures: list[str], report_path: str) -> None:
        self.failures = failures
        self.report_path = report_path
        got = f"{len(failures)} failing check(s): " + "; ".join(failures)
        super().__init__(
            got=got,
            expected="every metric within its precision's threshold",
            because="the engine's outputs drift from the PyTorch reference on held-out data",
            fix=f"read {report_path}, then loosen that precision's tolerance "
            "(--tolerance PRECISION.METRIC=VALUE) only if the drift is acceptable, or drop the precision",
        )


class PrecisionRepairError(VerificationError):
    """A variant still fails verification after the automatic repair kept nodes in fp32 up to its budget.

    A VerificationError (the same failing checks), with the repair's findings and its own fix.
    """

    def __init__(self, precision: str, failures: list[str], tried: list[str], stopped: str, report_path: str) -> None:
        self.failures = failures
        self.report_path = report_path
        kept = ", ".join(tried) if tried else "no node"
        TrtflowError.__init__(
            self,
            got=f"{precision} still failing after repair kept {kept} in fp32: " + "; ".join(failures),
            expected="every metric within its precision's threshold",
            because=f"the repair stopped: {stopped}",
            fix=f"read {report_path}; raise --repair-budget if more nodes may stay fp32, loosen that precision's "
            "tolerance (--tolerance PRECISION.METRIC=VALUE) only if the drift is acceptable, or drop the precision",
        )


class ModelCollapseError(TrtflowError):
    """The trained model predicts (almost) only one class: it collapsed onto the majority class.

    Deterministic (same data, config and seed give the same model), so never retried. Carries the
    gate's findings and the path of the metrics report written before raising.
    """

    def __init__(self, findings: list[str], report_path: str, because: str, fix: str) -> None:
        self.findings = findings
        self.report_path = report_path
        super().__init__(
            got="a collapsed model: " + "; ".join(findings),
            expected="predictions spread over the classes about like the true labels, and balanced accuracy well above chance",
            because=because,
            fix=f"{fix}; the validation metrics are in {report_path}",
        )


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
