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
  artifacts), e.g. the batch profile fitted to the memory the trained model needs;
- ``Rerun(vary, give)``, for a recovery node only: a callable that runs the node's branch again, as
  this graph wires it, from ``vary`` with changed arguments (``BranchRerun``). The recovery decides
  what to change (repair: which nodes stay in fp32); the graph re-runs the branch, each stage through
  its own cache.

A ``gather`` node is shared and runs once every branch is done: an argument naming a per-precision node
gets ``{precision: artifact}`` over the branches that passed (verified, repaired or not), e.g. the
``package`` stage choosing which verified engine to ship.

``schedule`` is the one scheduler: it derives the phases from these declarations (shared nodes, the
branches, recovery, ``last``, gather) and runs them through an ``Executor``: Prefect tasks in the flow,
plain calls in ``run_plain`` (which then raises the run's first error).

    from flows.pipeline import GRAPH
    from tasks.graph import run_plain
    refs = run_plain(GRAPH, PipelineConfig(precisions=["fp32"]))   # no Prefect involved
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tasks.artifacts import ArtifactRef
from tasks.code_digests import project_code
from tasks.config import PipelineConfig, Precision
from tasks.errors import TrtflowError
from tasks.stage import stage_instance
from tasks.store import Store, store_for


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


@dataclass(frozen=True)
class Rerun:
    """A recovery node's argument: its branch, run again from ``vary`` with changed arguments.

    Attributes:
        vary: the branch node whose arguments a rerun changes.
        give: what a rerun returns, in the recovery's own words: name -> branch node (its artifact).
    """

    vary: str
    give: Mapping[str, str]


Source = str | Config | _Precision | Derived | Rerun


def _names(source: Source) -> list[str]:
    """Upstream node names a source reads (a ``Derived`` reads those of its sources).

    A ``Rerun`` reads none: it makes its branch's artifacts again, and ``--refresh`` reaches its
    recovery node through the node's other inputs, as before the rerun existed.
    """
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
        fn: the plain stage function; it also takes ``store`` and ``refresh``.
        inputs: argument name -> where it comes from (upstream node name, ``Config``, ``PRECISION``).
        per_precision: one instance per precision (a branch) instead of one shared instance.
        after: nodes that must finish first without passing anything (no refresh follows them).
        last: runs once every other node has finished, for the branches that succeeded (timings
            must not share the CPU with builds).
        when: a config flag; the node is skipped when it is false.
        recovers: the node of its branch whose recoverable failure (``TrtflowError.recoverable``) this
            node repairs: it runs only when that node failed so.
        stands_in: for a recovery node, ``stands_in(artifact, store)`` returns the artifacts that
            replace the branch's own from then on (``{"build": engine, "verify": verdict}``), or raises
            the error of a recovery that did not succeed.
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
    stands_in: Callable[[ArtifactRef, Store], dict[str, ArtifactRef]] | None = None

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
            if n.recovers and (n.stands_in is None or not n.per_precision):
                raise ValueError(f"recovery node '{n.name}' must be per precision and say what it stands in for (stands_in)")
            if n.gather and (n.per_precision or n.recovers or not all(m.gather for m in nodes[i:])):
                raise ValueError(f"gather node '{n.name}' must be shared, recover nothing and come after every other node")
            for up in [*n.upstream, *n.after, *([n.recovers] if n.recovers else [])]:
                if (up, False) not in seen and not ((n.per_precision or n.gather) and (up, True) in seen):
                    raise ValueError(f"node '{n.name}' needs '{up}', which is not declared before it")
            for s in n.inputs.values():
                if isinstance(s, Derived) and any((up, False) not in seen for up in _names(s)):
                    raise ValueError(f"node '{n.name}': {s.fn.__name__} may read shared nodes only, got {_names(s)}")
                if isinstance(s, Rerun) and (not n.recovers or any((up, True) not in seen for up in [s.vary, *s.give.values()])):
                    raise ValueError(f"node '{n.name}': a Rerun belongs to a recovery node and names its branch's nodes, got {[s.vary, *s.give.values()]}")
            seen.add((n.name, n.per_precision))

    def device_bound(self) -> set[tuple[str, bool]]:
        """The nodes whose artifact depends on the machine that runs them, as (name, per_precision).

        Derived from the declarations: a node that reads ``config.backend`` (directly or through a
        ``Derived``), or that takes, waits for or recovers a device-bound node. A parent run over
        several targets makes every other node once; each target makes these where it runs.
        """

        def reads_backend(source: Source) -> bool:
            if isinstance(source, Config):
                return source.path.split(".")[0] == "backend"
            if isinstance(source, Derived):
                return any(reads_backend(x) for x in source.sources)
            return False

        bound: set[tuple[str, bool]] = set()
        for n in self.nodes:
            ups = [*n.upstream, *n.after, *([n.recovers] if n.recovers else [])]
            if any(reads_backend(s) for s in n.inputs.values()) or any((u, True) in bound or (u, False) in bound for u in ups):
                bound.add((n.name, n.per_precision))
        return bound

    def portable(self) -> Graph:
        """The graph without its device-bound nodes: what a parent run over several targets runs once."""
        bound = self.device_bound()
        return Graph(*(n for n in self.nodes if (n.name, n.per_precision) not in bound))

    def stages(self) -> list[str]:
        """Stage names in declaration order, without repeats."""
        return list(dict.fromkeys(n.name for n in self.nodes))

    def instances(self, precisions: Iterable[Precision]) -> list[Instance]:
        """Every node instance of a run, shared ones once and branch ones per precision, in order."""
        out: list[Instance] = []
        for n in self.nodes:
            out += [Instance(n, Precision(p)) for p in precisions] if n.per_precision else [Instance(n)]
        return out

    def plan(self, config: PipelineConfig) -> list[Instance]:
        """The instances a run with ``config`` may run: every instance whose node's ``when`` holds."""
        return [i for i in self.instances(config.precisions) if i.node.when is None or i.node.when.read(config, i.precision)]

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

    def decided(self, config: PipelineConfig, refresh: Iterable[str] = ()) -> tuple[frozenset[str], frozenset[str]]:
        """What a run of ``config`` decides up front: the instances ``--refresh`` recomputes (``config.refresh``
        and ``refresh``), and those a planned recovery node stands behind (``verify-int8`` for ``repair-int8``)."""
        forced = self.refreshed([*config.refresh, *refresh], config.precisions)
        recoverable = {self.resolve(i, i.node.recovers).id for i in self.plan(config) if i.node.recovers}
        return frozenset(forced), frozenset(recoverable)

    def arguments(
        self, inst: Instance, config: PipelineConfig, done: Mapping[str, Any], extra: Callable[[Instance], dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """The keyword arguments of an instance's stage function (without store and refresh).

        Args:
            inst: the instance.
            config: the run's config (backend already resolved).
            done: instance id -> its result (an ArtifactRef, or a future of one); for a gather node,
                the branch instances present in ``done`` are the ones it gets; for a ``Rerun``, the
                artifacts themselves (no futures: a rerun runs inside the recovery's own task).
            extra: store and refresh of each instance (for a ``Rerun``'s nodes).
        """
        return {arg: self._value(inst, source, config, done, extra) for arg, source in inst.node.inputs.items()}

    def _value(
        self, inst: Instance, source: Source, config: PipelineConfig, done: Mapping[str, Any], extra: Callable[[Instance], dict[str, Any]] | None = None,
    ) -> Any:
        if isinstance(source, str) and self._gathered(inst, source):
            return {p.value: done[i] for p in config.precisions if (i := f"{source}-{p.value}") in done}
        if isinstance(source, str):
            return done[self.resolve(inst, source).id]
        if isinstance(source, Config):
            return source.read(config, inst.precision)
        if isinstance(source, Derived):
            return source.fn(*(self._value(inst, s, config, done) for s in source.sources))
        if isinstance(source, Rerun):
            if extra is None:
                raise ValueError(f"node '{inst.node.name}': a Rerun needs each instance's store and refresh")
            return BranchRerun(self, inst, source, config, done, extra)
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
            if isinstance(s, Rerun):
                return f"the branch again from {s.vary}"
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
    return config.model_copy(update={"backend": builder.name}), reason


@dataclass(frozen=True)
class RunPlan:
    """One run, decided before any stage runs: what the graph executes, with which config, on which store.

    Made by ``tasks.plan.plan_of`` (after every check that needs no Prefect: the flow, ``trtflow run``)
    or by ``RunPlan.of`` (no checks: ``run_plain``); ``schedule`` runs it and the report reads it.

    Attributes:
        graph: the graph the run executes (``Graph.portable`` for a parent over several targets).
        config: the run's config: the backend resolved; for a parent, every target's precisions.
        given: the config as the user gave it (the report's).
        store: where the stages' artifacts and the run's side files live.
        backend: which backend runs the engines and why ("" for a parent: each target names its own).
        forced: instance ids that ``--refresh`` recomputes (the named stages and their true descendants).
        recoverable: instance ids a planned recovery node stands behind (``verify-int8`` when
            ``repair-int8`` may run): their failure is the recovery's to mend.
    """

    graph: Graph
    config: PipelineConfig
    given: PipelineConfig
    store: Store
    backend: str
    forced: frozenset[str]
    recoverable: frozenset[str]

    @classmethod
    def of(cls, graph: Graph, config: PipelineConfig, store: Store, backend: str = "", refresh: Iterable[str] = ()) -> RunPlan:
        """The plan of ``config`` on ``graph`` (no checks; ``refresh``: stages to recompute besides ``config.refresh``)."""
        forced, recoverable = graph.decided(config, refresh)
        return cls(graph, config, config, store, backend, forced, recoverable)

    @property
    def over_targets(self) -> bool:
        """Whether this is the parent of a run over several targets (``tasks.config.Target``)."""
        return bool(self.given.targets)

    def arguments(self, inst: Instance) -> dict[str, Any]:
        """What every stage function takes besides its inputs: the store, and whether to recompute."""
        return {"store": self.store, "refresh": inst.id in self.forced}


class Executor(Protocol):
    """How ``schedule`` runs instances: plain calls (``run_plain``) or Prefect tasks (the flow)."""

    def shared(self, inst: Instance, args: dict[str, Any], recovered: bool = False) -> ArtifactRef:
        """Run a shared instance to its end and return its artifact; its error ends the run.

        ``recovered``: a planned recovery node mends this instance's failure (``RunPlan.recoverable``).
        """
        ...

    def submit(self, inst: Instance, args: dict[str, Any], after: list[Any], recovered: bool = False) -> Any:
        """Start a branch or gather instance once the handles in ``after`` are done; return its handle.

        ``args`` may hold handles of upstream instances (futures), which the executor resolves;
        ``recovered`` as for ``shared``.
        """
        ...

    def settle(self, handles: Mapping[str, Any]) -> None:
        """Wait until every handle (instance id -> handle) is finished."""
        ...

    def outcome(self, handle: Any) -> tuple[ArtifactRef | None, BaseException | None]:
        """A finished handle's artifact, or its error (a failed upstream's counts as its own)."""
        ...

    def expect(self, total: int) -> None:
        """The number of instances the run now expects to run (for progress)."""
        ...


@dataclass
class Branch:
    """What one precision's branch came to.

    Attributes:
        refs: node name -> the artifact the branch ends with (a recovery's stand-ins replace the originals).
        failed: the node that failed (None: the branch passed), with its ``error``.
        verdict: a failure's recorded artifact (``TrtflowError.artifact``: the failing verdict).
        recovery: the recovery node's artifact, when one ran; ``recovered_by`` that node's name.
        replaced: the artifacts the recovery stood in for (the failing engine).
        late: ``last`` nodes' artifacts; ``late_errors`` their errors; ``replaced_late`` the ``last``
            nodes run again on the replaced artifacts (the failing engine's timing).
    """

    precision: Precision
    refs: dict[str, ArtifactRef] = field(default_factory=dict)
    failed: str | None = None
    error: BaseException | None = None
    verdict: ArtifactRef | None = None
    recovery: ArtifactRef | None = None
    recovered_by: str | None = None
    replaced: dict[str, ArtifactRef] = field(default_factory=dict)
    late: dict[str, ArtifactRef] = field(default_factory=dict)
    late_errors: dict[str, BaseException] = field(default_factory=dict)
    replaced_late: dict[str, ArtifactRef] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.failed is None


@dataclass
class Outcome:
    """A whole run: shared artifacts, each branch, the gather nodes' artifacts.

    Attributes:
        not_gathered: gather node -> why it has no artifact (its error, or that no branch passed).
        errors: what fails the run, in order: the branches' errors, then the ``last`` nodes', then the
            gather nodes' (only when nothing else failed: their cause comes first).
        refs: instance id -> artifact of every instance that succeeded.
    """

    shared: dict[str, ArtifactRef]
    branches: dict[Precision, Branch]
    gathered: dict[str, ArtifactRef]
    not_gathered: dict[str, str]
    errors: list[BaseException]
    refs: dict[str, ArtifactRef]


def schedule(run: RunPlan, executor: Executor) -> Outcome:
    """Run a plan in the phases its graph's declarations give; the one scheduler of the flow and ``run_plain``.

    Phases: shared nodes in order (each to its end); every branch's nodes submitted at once; recovery
    nodes for the branches whose node they recover failed recoverably; ``last`` nodes for the branches
    that passed (and once more on what a recovery replaced); gather nodes over the passed branches.

    Args:
        run: the run's plan (its graph, config, store and ``--refresh``).
        executor: runs the instances.

    Returns:
        The run's outcome.
    """
    graph, config, extra = run.graph, run.config, run.arguments
    plan = graph.plan(config)
    executor.expect(sum(1 for i in plan if not i.node.recovers))
    done: dict[str, Any] = {}
    for inst in (i for i in plan if not (i.node.last or i.node.recovers or i.node.gather)):
        args = {**graph.arguments(inst, config, done), **extra(inst)}
        recovered = inst.id in run.recoverable
        if inst.precision is None:
            done[inst.id] = executor.shared(inst, args, recovered)
        else:
            done[inst.id] = executor.submit(inst, args, [done[graph.resolve(inst, a).id] for a in inst.node.after], recovered)
    branch_ids = [i.id for i in plan if i.id in done and i.precision is not None]
    executor.settle({i: done[i] for i in branch_ids})
    outcomes = {i: executor.outcome(done[i]) for i in branch_ids}

    # Recovery: only where the node it recovers failed in a way it can mend.
    recovering = {
        i.precision: i for i in plan
        if i.node.recovers and getattr(outcomes[graph.resolve(i, i.node.recovers).id][1], "recoverable", False)
    }
    executor.expect(sum(1 for i in plan if not i.node.recovers) + len(recovering))
    # A recovery gets the artifacts themselves: its branch has settled, and a ``Rerun`` holds no futures.
    settled = {**{i: v for i, v in done.items() if i not in outcomes}, **{i: r for i, (r, _) in outcomes.items() if r is not None}}
    recovered = {p: executor.submit(i, {**graph.arguments(i, config, settled, extra), **extra(i)}, []) for p, i in recovering.items()}
    executor.settle({i.id: recovered[p] for p, i in recovering.items()})

    branches = {p: _branch(graph, plan, p, outcomes, recovering.get(p), recovered.get(p), executor, extra) for p in config.precisions}
    shared = {i: v for i, v in done.items() if i not in outcomes}

    # ``last`` nodes for the branches that passed, and again on what a recovery replaced.
    late: dict[str, tuple[Instance, Branch, bool]] = {}
    for inst in plan:
        if not inst.node.last or inst.precision is None or not branches[inst.precision].passed:
            continue
        b = branches[inst.precision]
        late[inst.id] = (inst, b, False)
        if b.replaced:
            late[f"{inst.id}-before-{b.recovered_by}"] = (inst, b, True)
    gathers = sum(1 for i in plan if i.node.gather) if any(b.passed for b in branches.values()) else 0
    executor.expect(sum(1 for i in plan if not (i.node.recovers or i.node.last or i.node.gather)) + len(recovering) + len(late) + gathers)
    handles = {}
    for lid, (inst, b, before) in late.items():
        view = {**shared, **_ids(b.refs, inst.precision), **(_ids(b.replaced, inst.precision) if before else {})}
        handles[lid] = executor.submit(inst, {**graph.arguments(inst, config, view), **extra(inst)}, [])
    executor.settle(handles)
    errors: list[BaseException] = [b.error for b in branches.values() if b.error is not None]
    for lid, (inst, b, before) in late.items():
        ref, err = executor.outcome(handles[lid])
        if err is not None:
            b.late_errors[inst.node.name + (f"_before_{b.recovered_by}" if before else "")] = err
            errors.append(err)
        elif before:
            b.replaced_late[inst.node.name] = ref  # type: ignore[assignment]
        else:
            b.late[inst.node.name] = ref  # type: ignore[assignment]

    # Gather nodes over the branches that passed.
    view = {**shared, **{k: v for b in branches.values() if b.passed for k, v in _ids({**b.refs, **b.late}, b.precision).items()}}
    gathered: dict[str, ArtifactRef] = {}
    not_gathered: dict[str, str] = {}
    gather_errors: list[BaseException] = []
    for inst in (i for i in plan if i.node.gather):
        if not any(b.passed for b in branches.values()):
            # The branches' own errors end the run; a gather over nothing would only fail again.
            not_gathered[inst.node.name] = "no variant passed its gates"
            continue
        handle = executor.submit(inst, {**graph.arguments(inst, config, view), **extra(inst)}, [])
        executor.settle({inst.id: handle})
        ref, err = executor.outcome(handle)
        if err is None:
            gathered[inst.node.name] = view[inst.id] = ref  # type: ignore[assignment]
        else:
            not_gathered[inst.node.name] = str(err)
            gather_errors.append(err)
    refs = {**shared, **{k: v for b in branches.values() for k, v in _ids({**b.refs, **b.late}, b.precision).items()}}
    refs.update(gathered)
    return Outcome(shared, branches, gathered, not_gathered, errors + (gather_errors if not errors else []), refs)


class BranchRerun:
    """A branch run again in this process, from one node with changed arguments: a ``Rerun``'s value.

    ``rerun(**changes)`` passes ``changes`` to the ``vary`` node and runs it and every node after it
    in the branch, through the node the recovery recovers, as the graph wires them, each through its
    own stage cache; with no changes only the recovered node runs again (its verdict, cached). A plain
    object holding artifacts, never futures: Prefect passes it to the recovery's task untouched, and
    it pickles for a distributed task runner.

    Attributes:
        key: what a rerun depends on besides the recovery's own artifacts (the recovery puts it in its
            cache key): ``arguments``, the config values and derived arguments of those nodes, and
            ``code``, their stage modules' import closures (file -> SHA-256).
    """

    def __init__(
        self, graph: Graph, inst: Instance, source: Rerun, config: PipelineConfig, done: Mapping[str, Any], extra: Callable[[Instance], dict[str, Any]],
    ) -> None:
        assert inst.node.recovers is not None and inst.precision is not None
        branch = [i for i in graph.plan(config) if i.precision == inst.precision and not (i.node.last or i.node.recovers or i.node.gather)]
        names = [i.node.name for i in branch]
        self._chain = branch[names.index(source.vary):names.index(inst.node.recovers) + 1]
        self._graph, self._inst, self._source, self._config = graph, inst, source, config
        self._done = dict(done)
        self._extra = {i.id: extra(i) for i in self._chain}
        code: dict[str, str] = {}
        for i in self._chain:
            code.update(project_code(i.node.fn.__module__))
        self.key = {
            "arguments": {
                i.node.name: {a: graph._value(i, s, config, self._done) for a, s in i.node.inputs.items() if not isinstance(s, str)}
                for i in self._chain
            },
            "code": dict(sorted(code.items())),
        }

    def __call__(self, **changes: Any) -> tuple[dict[str, ArtifactRef | None], TrtflowError | None]:
        """Run the branch again with ``changes`` to the ``vary`` node's arguments.

        Returns:
            The ``give`` artifacts (None for a node that failed), and the recovered node's error (None: it passed).

        Raises:
            TrtflowError: another node of the branch failed.
        """
        view = dict(self._done)
        error: TrtflowError | None = None
        for inst in self._chain if changes else self._chain[-1:]:
            args = {**self._graph.arguments(inst, self._config, view), **self._extra[inst.id]}
            if inst.node.name == self._source.vary:
                args.update(changes)
            view.pop(inst.id, None)
            try:
                view[inst.id] = inst.node.fn(**args)
            except TrtflowError as exc:
                if inst != self._chain[-1]:
                    raise
                error = exc
        return {role: view.get(self._graph.resolve(self._inst, name).id) for role, name in self._source.give.items()}, error


def _ids(refs: Mapping[str, ArtifactRef], precision: Precision | None) -> dict[str, ArtifactRef]:
    """Node name -> artifact, as instance ids of one branch."""
    return {f"{n}-{precision.value}" if precision else n: r for n, r in refs.items()}


def _branch(graph: Graph, plan: list[Instance], precision: Precision, outcomes: Mapping[str, tuple[Any, BaseException | None]],
            recovery: Instance | None, handle: Any, executor: Executor, extra: Callable[[Instance], dict[str, Any]]) -> Branch:
    """One branch's result: its chain's artifacts, the first failure, and what a recovery replaced."""
    b = Branch(precision)
    chain = [i for i in plan if i.precision is precision and i.id in outcomes]
    for inst in chain:
        ref, err = outcomes[inst.id]
        if err is None:
            b.refs[inst.node.name] = ref
        elif b.failed is None:
            b.failed, b.error = inst.node.name, err
            b.verdict = getattr(err, "artifact", None)
    if recovery is None:
        return b
    ref, err = executor.outcome(handle)
    failed, verdict = b.failed, b.verdict
    b.recovered_by = recovery.node.name
    if err is None:
        b.recovery = ref
        assert recovery.node.stands_in is not None
        try:
            stand_ins = recovery.node.stands_in(ref, extra(recovery)["store"])  # type: ignore[arg-type]
        except Exception as exc:  # noqa: BLE001 - the recovery's own error, recorded like a failure
            err = exc
        else:
            b.replaced = {n: b.refs[n] for n in stand_ins if n in b.refs}
            b.refs.update(stand_ins)
            b.failed = b.error = b.verdict = None
            return b
    b.failed, b.error = recovery.node.name, err
    b.verdict = verdict if failed is not None else None
    return b


class _Plain:
    """The plain executor: each instance is a function call, in order, in this thread."""

    def shared(self, inst: Instance, args: dict[str, Any], recovered: bool = False) -> ArtifactRef:
        with stage_instance(inst.id):
            return inst.node.fn(**args)

    def submit(self, inst: Instance, args: dict[str, Any], after: list[Any], recovered: bool = False) -> Any:
        upstream = [v for v in [*args.values(), *after] if isinstance(v, _Result) and v.error is not None]
        if upstream:
            # Not run: like a Prefect task whose upstream failed. Its own error is not the upstream's,
            # so a recovery never mistakes it for a failure of the node it recovers.
            return _Result(None, NotRun(f"{inst.id} did not run: an upstream stage failed ({upstream[0].error})"))
        plain = {k: v.ref if isinstance(v, _Result) else v for k, v in args.items()}
        try:
            with stage_instance(inst.id):
                return _Result(inst.node.fn(**plain), None)
        except Exception as exc:  # noqa: BLE001 - recorded: the scheduler decides what fails the run
            return _Result(None, exc)

    def settle(self, handles: Mapping[str, Any]) -> None:
        return None

    def outcome(self, handle: Any) -> tuple[ArtifactRef | None, BaseException | None]:
        return handle.ref, handle.error

    def expect(self, total: int) -> None:
        return None


class NotRun(Exception):
    """A branch instance skipped because an instance it needs failed (the plain executor's)."""


@dataclass(frozen=True)
class _Result:
    ref: Any
    error: BaseException | None


def run_plain(graph: Graph, config: PipelineConfig, refresh: Iterable[str] = ()) -> dict[str, ArtifactRef]:
    """Run the graph as plain function calls (no Prefect), through the flow's scheduler; raise its first error.

    Args:
        graph: the stage graph.
        config: the run's config.
        refresh: stage names to recompute with their descendants (besides ``config.refresh``).

    Returns:
        Instance id -> artifact (``data``, ``train``, ..., ``verify-fp16``, ``profile-fp16``).

    Raises:
        TrtflowError: the run's first error (a shared stage's, else a branch's).
    """
    config, reason = resolved(config)
    run = RunPlan.of(graph, config, store_for(config.store, Path(config.artifacts_dir)), reason, refresh=refresh)
    outcome = schedule(run, _Plain())
    if outcome.errors:
        raise outcome.errors[0]
    return outcome.refs
