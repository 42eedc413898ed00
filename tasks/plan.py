"""The plan of a run: every check that needs no Prefect, in milliseconds, then what the graph will run.

``plan_of`` turns the config as given (the CLI's flags, the UI's form) into a ``tasks.graph.RunPlan``:
which instances run and which ``--refresh`` recomputes, the store, the backend and why. A bad input
fails here, before any training, with the error a stage would raise later.

    from flows.pipeline import GRAPH
    from tasks.plan import plan_of
    run = plan_of(config, GRAPH)        # raises ConfigError, DatasetError, ModelError, ...
    outcome = schedule(run, executor)   # tasks.graph.schedule
"""

from __future__ import annotations

from pathlib import Path

from tasks.backends.registry import choose_backend
from tasks.config import PipelineConfig
from tasks.datasource import labels_in, open_source
from tasks.errors import DatasetError
from tasks.graph import Graph, RunPlan
from tasks.models import factory_from_path, state_dict_from_file
from tasks.policy import check_run
from tasks.store import store_for


def plan_of(config: PipelineConfig, graph: Graph, untrusted: bool = False) -> RunPlan:
    """Check what can be checked up front, and plan the run.

    A parent over several targets (``config.targets``) plans the portable part of the graph
    (``Graph.portable``) over every target's precisions and asks for no backend: each target names its own.

    Args:
        config: the run's config as given.
        graph: the stage graph (``flows.pipeline.GRAPH``).
        untrusted: the parameters came from the API (a deployment run, the UI's form): only the worker's
            allowed factories and folders (``tasks.policy``), checked before anything they name is read.

    Returns:
        The run's plan: backend resolved, store ready.

    Raises:
        PolicyError: an untrusted run names a factory or a path the worker does not allow.
        ConfigError: an unknown store URL, an unwritable artifacts folder. StorageError: a store that
            cannot be reached. BackendUnavailableError: the
            requested backend cannot run here. DatasetError: a missing dataset file, or one without labels
            and no weights. ModelError: an unknown model factory, unreadable weights.
    """
    # Nothing before the policy check creates, reads or imports a file or module the config names.
    run = config.model_copy(update={"precisions": config.target_precisions}) if config.targets else config
    graph = graph.portable() if config.targets else graph
    forced, recoverable = graph.decided(run)
    store = store_for(config.store, Path(config.artifacts_dir).expanduser().resolve())
    reason = ""
    if not config.targets:
        builder, reason = choose_backend(config.backend)
        run = run.model_copy(update={"backend": builder.name})
    if untrusted:
        check_run(config)
    store.ready()
    # The dataset file, the model factory and the weights: present, readable, and enough to run on.
    dataset = None if config.data.dataset is None else Path(config.data.dataset)
    if dataset is not None and not dataset.expanduser().is_file():
        open_source(dataset)  # raises the dataset error with its fix
    # Whether it has labels (its table of contents only), read with the dataset; refused after the model's checks.
    labelled = dataset is None or config.train.weights is not None or labels_in(dataset)
    factory_from_path(config.train.model)
    if config.train.weights is not None:
        state_dict_from_file(Path(config.train.weights))  # readable, and a state_dict
    elif dataset is not None and not labelled:
        raise DatasetError(
            got=f"dataset {dataset.name} without labels y, and no --weights",
            expected="labels y to train on, or trained weights to convert",
            because="training needs labels; without them trtflow can only convert a model that is already trained",
            fix="add y to the dataset (numpy.savez(path, ..., y=labels)), or pass --weights FILE with your --model",
        )
    return RunPlan(graph, run, config, store, reason, forced, recoverable)
