"""The stage graph as data: which stage function runs, on which upstream artifacts and config values.

One declaration (``flows.pipeline.GRAPH``) serves the Prefect flow, ``--refresh`` (a stage and its
true descendants), the plain runner used by tests and benchmarks (``run_plain``) and the docs
(``Graph.describe``). Stage functions stay plain and typed; a node only names where each argument
comes from:

- a string names an upstream node: its artifact is passed (a per-precision node gets the one of its
  own precision, a shared node's otherwise);
- ``Config("train")`` reads a field of the run's ``PipelineConfig`` (``{precision}`` is replaced by
  the branch's precision, e.g. ``Config("tolerances.{precision}")``); ``Config("")`` is the whole config;
- ``PRECISION`` is the branch's precision;
- ``Derived(fn, sources)`` is ``fn`` applied to other sources (config values, shared upstream
  artifacts), e.g. the batch profile fitted to the memory the trained model needs.

A ``gather`` node is shared and runs once every branch is done: an argument naming a per-precision node
gets ``{precision: artifact}`` over the branches that passed (in the flow: verified, repaired or not;
``run_plain`` stops at the first failure, so there every branch), e.g. the ``package`` stage choosing
which verified engine to ship.

    from flows.pipeline import GRAPH
    from tasks.graph import run_plain
    refs = run_plain(GRAPH, PipelineConfig(precisions=["fp32"]))   # no Prefect involved
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.artifacts import ArtifactRef
from tasks.config import Backend, PipelineConfig, Precision
from tasks.stage import stage_instance


@dataclass(frozen=True)
class Config:
    """An argument read from the run's config, by attribute path."""

    path: str

    def read(self, config: PipelineConfig, precision: Precision | None) -> Any:
        value: Any = config
        if not self.path:
            return config
        for part in self.path.format(precision=precision.value if precision else "").split("."):
            value = value[part] if isinstance(value, Mapping) else getattr(value, part)
        return value


class _Precision:
    def __repr__(self) -> str:
        return "PRECISION"


#: an argument that is the branch's precision
PRECISION = _Precision()



@dataclass(frozen=True)
class Derived:
    """An argument computed by a plain function from other sources.

    Attributes:
        fn: called with the resolved sources, positionally.
        sources: upstream node names (shared nodes only: their artifacts exist before any branch
            starts), ``Config`` values or ``PRECISION``.
    """

    fn: Callable[..., Any]
    sources: tuple[Any, ...]


Source = str | Config | _Precision | Derived


def _names(source: Source) -> list[str]:
    """Upstream node names a source reads (a ``Derived`` reads those of its sources)."""
    if isinstance(source, str):
        return [source]
    if isinstance(source, Derived):
        return [n for s in source.sources for n in _names(s)]
    return []


@dataclass(frozen=True)
class Node:
    """One stage of the graph.

    Attributes:
        name: the stage name (``--refresh`` name, task name, artifact folder).
        fn: the plain stage function; it also takes ``artifacts_dir`` and ``refresh``.
        inputs: argument name -> where it comes from (upstream node name, ``Config``, ``PRECISION``).
        per_precision: one instance per precision (a branch) instead of one shared instance.
        after: nodes that must finish first without passing anything (no refresh follows them).
        last: runs once every other node has finished, for the branches that succeeded (timings
            must not share the CPU with builds).
        when: a config flag; the node is skipped when it is false.
        recovers: the node of its branch whose ``VerificationError`` this node repairs: it runs only
            when that node failed so, and its artifact then stands in for the branch's engine and
            verification (the flow does that; ``run_plain`` never runs it and raises the failure).
        gather: a shared node that runs after every other node (``last`` ones included) and takes the
            branches' artifacts: an input naming a per-precision node gets ``{precision: artifact}``
            of the branches that passed.
    """

    name: str
    fn: Callable[..., ArtifactRef]
    inputs: Mapping[str, Source] = field(default_factory=dict)
    per_precision: bool = False
    after: tuple[str, ...] = ()
    last: bool = False
    when: Config | None = None
    recovers: str | None = None
    gather: bool = False

    @property
    def upstream(self) -> list[str]:
        """Names of the nodes whose artifacts this node takes."""
        return list(dict.fromkeys(n for s in self.inputs.values() for n in _names(s)))


@dataclass(frozen=True)
class Instance:
    """A node in one run: shared, or in the branch of one precision."""

    node: Node
    precision: Precision | None = None

    @property
    def id(self) -> str:
        """``train`` for a shared node, ``verify-fp16`` for a branch node (also the task run name)."""
        return self.node.name if self.precision is None else f"{self.node.name}-{self.precision.value}"


class Graph:
    """Nodes in a valid execution order; upstream names resolve as described in the module doc.

    Raises:
        ValueError: a node refers to one that is not declared before it, a name repeats in a scope, a
            ``Derived`` reads a branch node (a branch's artifact may still be a future in the flow), or
            a gather node is declared per precision or before a node that is not a gather node.
    """

    def __init__(self, *nodes: Node) -> None:
        self.nodes = nodes
        seen: set[tuple[str, bool]] = set()
        for i, n in enumerate(nodes):
            if (n.name, n.per_precision) in seen:
                raise ValueError(f"node '{n.name}' declared twice")
            if n.gather and (n.per_precision or n.recovers or not all(m.gather for m in nodes[i:])):
                raise ValueError(f"gather node '{n.name}' must be shared, recover nothing and come after every other node")
            for up in [*n.upstream, *n.after, *([n.recovers] if n.recovers else [])]:
                if (up, False) not in seen and not ((n.per_precision or n.gather) and (up, True) in seen):
                    raise ValueError(f"node '{n.name}' needs '{up}', which is not declared before it")
            for s in n.inputs.values():
                if isinstance(s, Derived) and any((up, False) not in seen for up in _names(s)):
                    raise ValueError(f"node '{n.name}': {s.fn.__name__} may read shared nodes only, got {_names(s)}")
            seen.add((n.name, n.per_precision))

    def stages(self) -> list[str]:
        """Stage names in declaration order, without repeats."""
        return list(dict.fromkeys(n.name for n in self.nodes))

    def instances(self, precisions: Iterable[Precision]) -> list[Instance]:
        """Every node instance of a run, shared ones once and branch ones per precision, in order."""
        out: list[Instance] = []
        for n in self.nodes:
            out += [Instance(n, Precision(p)) for p in precisions] if n.per_precision else [Instance(n)]
        return out

    def resolve(self, inst: Instance, name: str) -> Instance:
        """The instance that ``name`` means for ``inst``: its own branch's node first, else the shared one."""
        if inst.precision is not None and any(n.name == name and n.per_precision for n in self.nodes):
            return Instance(next(n for n in self.nodes if n.name == name and n.per_precision), inst.precision)
        return Instance(next(n for n in self.nodes if n.name == name and not n.per_precision))

    def _gathered(self, inst: Instance, name: str) -> bool:
        """Whether ``name`` means every branch's instance for ``inst`` (a gather node naming a branch node)."""
        return inst.node.gather and any(n.name == name and n.per_precision for n in self.nodes)

    def upstream_ids(self, inst: Instance, precisions: Iterable[Precision]) -> list[str]:
        """Ids of the instances whose artifacts ``inst`` takes (every branch's, for a gather node)."""
        out: list[str] = []
        for up in inst.node.upstream:
            if self._gathered(inst, up):
                out += [f"{up}-{Precision(p).value}" for p in precisions]
            else:
                out.append(self.resolve(inst, up).id)
        return out

    def refreshed(self, stages: Iterable[str], precisions: Iterable[Precision]) -> set[str]:
        """Instance ids to recompute for ``--refresh``: the named stages and their true descendants.

        Descendants follow data edges only: ``after`` edges order work but pass nothing, so refreshing
        validation never rebuilds an engine.
        """
        wanted = {str(getattr(s, "value", s)) for s in stages}
        precisions = list(precisions)
        out: set[str] = set()
        for inst in self.instances(precisions):
            if inst.node.name in wanted or any(up in out for up in self.upstream_ids(inst, precisions)):
                out.add(inst.id)
        return out

    def arguments(self, inst: Instance, config: PipelineConfig, done: Mapping[str, Any]) -> dict[str, Any]:
        """The keyword arguments of an instance's stage function (without artifacts_dir and refresh).

        Args:
            inst: the instance.
            config: the run's config (backend already resolved).
            done: instance id -> its result (an ArtifactRef, or a future of one); for a gather node,
                the branch instances present in ``done`` are the ones it gets.
        """
        return {arg: self._value(inst, source, config, done) for arg, source in inst.node.inputs.items()}

    def _value(self, inst: Instance, source: Source, config: PipelineConfig, done: Mapping[str, Any]) -> Any:
        if isinstance(source, str) and self._gathered(inst, source):
            return {p.value: done[i] for p in config.precisions if (i := f"{source}-{p.value}") in done}
        if isinstance(source, str):
            return done[self.resolve(inst, source).id]
        if isinstance(source, Config):
            return source.read(config, inst.precision)
        if isinstance(source, Derived):
            return source.fn(*(self._value(inst, s, config, done) for s in source.sources))
        return inst.precision

    def describe(self) -> str:
        """The graph as text, one line per node (for docs and ``trtflow graph``)."""

        def text(s: Source) -> str:
            if isinstance(s, str):
                return s
            if isinstance(s, Config):
                return f"config.{s.path}" if s.path else "config"
            if isinstance(s, Derived):
                return f"{s.fn.__name__}({', '.join(text(x) for x in s.sources)})"
            return "precision"

        lines = []
        for n in self.nodes:
            ins = ", ".join(f"{a}←{text(s)}" for a, s in n.inputs.items())
            extra = [" per precision" if n.per_precision else ""]
            extra += [f" after {', '.join(n.after)}"] if n.after else []
            extra += [" last"] if n.last else []
            extra += [f" when config.{n.when.path}"] if n.when else []
            extra += [f" if {n.recovers} fails"] if n.recovers else []
            extra += [" over the passed precisions"] if n.gather else []
            lines.append(f"{n.name:<10} {n.fn.__name__}({ins}){''.join(extra)}")
        return "\n".join(lines)


def resolved(config: PipelineConfig) -> tuple[PipelineConfig, str]:
    """The config with ``backend: auto`` replaced by the backend that runs here, and why.

    Raises:
        BackendUnavailableError: an explicitly requested backend cannot run here.
    """
    from tasks.backends.registry import choose_backend

    builder, reason = choose_backend(config.backend)
    return config.model_copy(update={"backend": Backend(builder.name)}), reason


def run_plain(graph: Graph, config: PipelineConfig, refresh: Iterable[str] = ()) -> dict[str, ArtifactRef]:
    """Run every enabled node in order as plain function calls (no Prefect); stop at the first error.

    Recovery nodes (``Node.recovers``) are not run: the failure they would repair is raised.

    Args:
        graph: the stage graph.
        config: the run's config.
        refresh: stage names to recompute with their descendants (besides ``config.refresh``).

    Returns:
        Instance id -> artifact (``data``, ``train``, ..., ``verify-fp16``, ``profile-fp16``).
    """
    config, _ = resolved(config)
    root = Path(config.artifacts_dir)
    forced = graph.refreshed([*config.refresh, *refresh], config.precisions)
    out: dict[str, ArtifactRef] = {}
    for inst in graph.instances(config.precisions):
        if inst.node.recovers or (inst.node.when is not None and not inst.node.when.read(config, inst.precision)):
            continue
        args = graph.arguments(inst, config, out)
        with stage_instance(inst.id):
            out[inst.id] = inst.node.fn(**args, artifacts_dir=root, refresh=inst.id in forced)
    return out
