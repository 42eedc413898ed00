"""ONNX graph helpers the precision conversions share: node order, node names, the kept-node check."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def topologically_sorted(graph: Any) -> None:
    """Sort a GraphProto's nodes in place so every node follows its producers.

    ``convert_float_to_float16`` appends its input/output Casts at the end of the node list, which
    ``onnx.checker`` rejects ("Nodes in a graph must be topologically sorted").
    """
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            names = [n.name for n in pending[:5]]
            raise ValueError(f"graph has a cycle or dangling inputs at nodes {names}")
        for n in ready:
            ordered.append(n)
            available.update(n.output)
        ready_ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ready_ids]
    del graph.node[:]
    graph.node.extend(ordered)


def named_nodes(model: Any) -> Any:
    """Give every unnamed node of a model's main graph a stable, unique name (in place); returns the model.

    Repair keeps nodes in fp32 by name (``node_block_list``, ``nodes_to_exclude``), and the fp32
    graph it measures against must use the same names, so both sides call this.
    """
    seen = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in seen:
                name += "_"
            node.name = name
            seen.add(name)
    return model


def check_kept(model: Any, keep_fp32: Sequence[str]) -> None:
    """Refuse node names to keep in fp32 that the (named) model does not have.

    Raises:
        ValueError: naming the unknown nodes.
    """
    if unknown := sorted(set(keep_fp32) - {n.name for n in model.graph.node}):
        raise ValueError(f"got nodes {unknown} to keep in fp32, expected node names of the model; re-run the repair from a fresh ranking")
