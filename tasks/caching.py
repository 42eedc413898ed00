"""The only place stages meet Prefect: a content-addressed cache policy and the ``@task`` wrapper.

Prefect's own cache does not know about the files a task writes: after the file behind a cached result
was deleted, the task still came back Cached with a path to nothing. ``ArtifactCache`` computes the key
with the same ``stage_key`` the stage uses to name its output folder, and before Prefect looks the key
up it checks that folder's files against their digests; when anything is missing or changed it drops
Prefect's record, so the stage re-runs instead of handing a broken artifact downstream.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import Task, task
from prefect.cache_policies import CachePolicy

from tasks.artifacts import ArtifactRef, load_ref
from tasks.errors import is_retryable
from tasks.stage import StageSpec, stage_key

log = logging.getLogger("trtflow.cache")

#: seconds between attempts of a transient failure
RETRY_DELAYS = [1, 4]


@dataclass
class ArtifactCache(CachePolicy):
    """Cache key = ``stage_key`` of the inputs; a damaged artifact behind a key is never reused."""

    spec: StageSpec | None = field(default=None)

    def compute_key(self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any) -> str | None:
        assert self.spec is not None
        key = stage_key(self.spec, inputs)
        ref = load_ref(Path(inputs["artifacts_dir"]), self.spec.name, key)
        problems = ["no artifact on disk"] if ref is None else ref.problems()
        if problems:
            if _forget(task_ctx, key) and ref is not None:
                log.warning("%s: cached artifact unusable (%s); re-running the stage", self.spec.name, "; ".join(problems))
        return key


def _forget(task_ctx: Any, key: str) -> bool:
    """Delete Prefect's result record for ``key``; True when there was one."""
    storage = getattr(getattr(task_ctx, "result_store", None), "result_storage", None)
    base = getattr(storage, "basepath", None)
    if base is None:
        return False
    record = Path(base).expanduser() / key
    existed = record.exists()
    record.unlink(missing_ok=True)
    return existed


def _retry_transient(task: Task[..., Any], task_run: Any, state: Any) -> bool:
    """Retry I/O errors and timeouts; fail deterministic errors (bad input, invalid model) at once."""
    try:
        state.result()
    except Exception as exc:
        return is_retryable(exc)
    return False


def stage_task(fn: Callable[..., Any], spec: StageSpec, retries: int = len(RETRY_DELAYS)) -> Task[..., Any]:
    """Wrap a stage function as a Prefect task with content caching, retries and persisted results.

    Args:
        fn: the plain stage function; it must take ``artifacts_dir`` and ``refresh``.
        spec: the stage's key specification (the same one the function uses).
        retries: attempts after the first, for transient failures only.

    Returns:
        The task. Callers set ``result_storage`` (under the artifacts folder) with ``with_options``.
    """
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def rerooted(*args: Any, **kwargs: Any) -> Any:
        # A cached upstream result records the folder it was made in; if the artifacts folder was moved
        # since, its files are found under the current one (same stage and key).
        bound = signature.bind(*args, **kwargs)
        root = Path(bound.arguments["artifacts_dir"])
        for name, value in bound.arguments.items():
            if isinstance(value, ArtifactRef):
                bound.arguments[name] = value.under(root)
        return fn(*bound.args, **bound.kwargs)

    return task(
        rerooted,
        name=spec.name,
        cache_policy=ArtifactCache(spec=spec),
        persist_result=True,
        result_serializer="json",
        retries=retries,
        retry_delay_seconds=RETRY_DELAYS[:retries] or 0,
        retry_condition_fn=_retry_transient,
    )
