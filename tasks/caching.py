"""The only place stages meet Prefect: the ``@task`` wrapper of a plain stage function.

There is one cache, the content-addressed artifact store (``tasks.stage.run_stage``); Prefect keeps no
result records of its own (``NO_CACHE``, nothing persisted), so nothing has to be kept in sync with the
files, and a swapped or damaged artifact can never be handed on from a stale record. The wrapper only
adds what Prefect is good at: retries of transient failures, the run's logs, and a task state named
``Cached`` when the store already held the stage's artifact (what the UI shows as a cache hit).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from prefect import Task, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed

from tasks.artifacts import ArtifactRef
from tasks.errors import TrtflowError, is_retryable
from tasks.stage import stage_instance, was_cached
from tasks.store import as_store
from tasks.stores.local import LocalStore

#: seconds between attempts of a transient failure
RETRY_DELAYS = [1, 4]


def _retry_transient(task: Task[..., Any], task_run: Any, state: Any) -> bool:
    """Retry I/O errors and timeouts; fail deterministic errors (bad input, invalid model) at once."""
    try:
        state.result()
    except Exception as exc:
        return is_retryable(exc)
    return False


def _run_name() -> str | None:
    """The task run's name when the flow set it (``verify-fp32``: the graph instance), else None."""
    from prefect.context import TaskRunContext

    ctx = TaskRunContext.get()
    # Only a name the flow gave (with_options(task_run_name=...)); Prefect's default has a random suffix.
    if ctx is None or not isinstance(getattr(ctx.task, "task_run_name", None), str):
        return None
    return ctx.task_run.name


def stage_task(fn: Callable[..., Any], name: str, retries: int = len(RETRY_DELAYS), recovered: bool = False) -> Task[..., Any]:
    """Wrap a stage function as a Prefect task with retries and a ``Cached`` state on a store hit.

    Args:
        fn: the plain stage function; it takes ``store`` and ``refresh`` and returns an
            ``ArtifactRef`` made through ``run_stage``.
        name: the task's name (the stage name).
        retries: attempts after the first, for transient failures only.
        recovered: a recovery stage stands behind this one (verify, repaired by repair). A recoverable
            failure that the store already holds as a result (``TrtflowError.artifact``: a failing
            verdict found again) is then a cache hit like any other: the task ends ``Cached`` with the
            error as its result, for the flow to hand to the recovery, instead of failing again on
            every re-run. A fresh failure still fails the task, so the UI shows it once.

    Returns:
        The task.
    """
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def stage(*args: Any, **kwargs: Any) -> Any:
        # An upstream result may name the folder it was made in; if the local store's folder was
        # moved since, its files are found under the current one (same stage and key). A remote
        # store's artifacts name their store, not a folder (``ArtifactRef.under`` leaves them).
        bound = signature.bind(*args, **kwargs)
        store = bound.arguments["store"] = as_store(bound.arguments["store"])
        root = store.root if isinstance(store, LocalStore) else None
        for arg, value in bound.arguments.items() if root is not None else ():
            if isinstance(value, ArtifactRef):
                bound.arguments[arg] = value.under(root)
            elif isinstance(value, dict) and any(isinstance(v, ArtifactRef) for v in value.values()):
                # a gather stage's {precision: artifact}
                bound.arguments[arg] = {k: v.under(root) if isinstance(v, ArtifactRef) else v for k, v in value.items()}
        try:
            with stage_instance(_run_name()):
                ref = fn(*bound.args, **bound.kwargs)
        except TrtflowError as exc:
            if recovered and exc.recoverable and exc.artifact is not None and was_cached():
                return Completed(data=exc, name="Cached", message=f"found in the artifact store: a recorded failure, recovered next ({exc.summary})")
            raise
        if was_cached():
            return Completed(data=ref, name="Cached", message="found intact in the artifact store")
        return ref

    return task(
        stage,
        name=name,
        cache_policy=NO_CACHE,
        persist_result=False,
        retries=retries,
        retry_delay_seconds=RETRY_DELAYS[:retries] or 0,
        retry_condition_fn=_retry_transient,
    )
