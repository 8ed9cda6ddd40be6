"""circuit-tracer's graph files: write a `CircuitGraph` for its ``start-server`` frontend (and
Neuronpedia), and read the files circuit-tracer writes.

The schema is circuit-tracer 0.5.0's (``circuit_tracer/frontend/graph_models.py`` and
``utils/create_graph_files.py``): ``{slug}.json`` with ``metadata``, ``qParams``, ``nodes`` and
``links``, listed in the folder's ``graph-metadata.json``. Only there do nodes use circuit-tracer's
names: ``ctx_idx`` for the position, ``feature`` for the Cantor pairing of (layer, latent) that
identifies a latent, ``layer`` as a string (``"E"`` for token embeddings, ``n_layers + 1`` for logits).

Its schema has no attention heads, skip paths, biases or position embeddings: with frozen attention
and norms, heads and skip paths are linear, so the edges through expanded ones are folded into
direct edges from their predecessors to their consumer (as in circuit-tracer's own graphs); position
embeddings join their position's token node (as in `adjacency`); unexpanded heads and biases are
left out. A node's ``influence`` is circuit-tracer's cumulative-influence rank, which its frontend
compares with ``node_threshold``; the threshold written is the largest rank exported, so the
frontend draws every node. A logit target's ``clerp`` reads ``Output "token" (p=…)`` with the
model's probability (the sum over the target's tokens; a logit difference's ``minus`` tokens are
named but not counted). Error nodes' ids are ``err_{layer}_{position}`` (circuit-tracer's
``0_{layer}_{position}`` can collide with a layer-0 latent's id).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..files import read_json, write_json
from .adjacency import cumulative_ranks, influence

if TYPE_CHECKING:
    from .graph import CircuitGraph

SCHEMA_VERSION = 1
LATENT, ERROR, EMBEDDING, LOGIT = "cross layer transcoder", "mlp reconstruction error", "embedding", "logit"


def cantor(layer: int, latent: int) -> int:
    """circuit-tracer's feature id of a latent: the Cantor pairing of its layer and index."""
    return (layer + latent) * (layer + latent + 1) // 2 + latent


def save_circuit_tracer(graph: CircuitGraph, folder: Path, slug: str) -> Path:
    """Write ``{slug}.json`` into ``folder`` and list it in ``graph-metadata.json`` (other graphs
    listed there are kept); returns the graph file."""
    if graph._run is not None and any(n.influence is None for n in graph.nodes.values() if n.kind in _KINDS):
        graph.fill_influence()
    ids, nodes = {}, {}
    for node in graph.nodes.values():
        converted = _node(graph, node)
        if converted is not None:
            ids[node.node_id] = converted["node_id"]
            nodes.setdefault(converted["node_id"], converted)
    links = _folded_links(graph, ids)
    if any(n["influence"] is None for n in nodes.values() if n["feature_type"] != LOGIT):
        _rank(nodes, links, ids[graph.target_id])
    ranked = [n["influence"] for n in nodes.values() if n["feature_type"] not in (EMBEDDING, LOGIT)]
    threshold = max([graph.settings.get("node_threshold") or 0.0, *ranked])
    metadata = {"slug": slug, "scan": graph.model, "transcoder_list": [],
                "prompt_tokens": graph.token_strings, "prompt": graph.prompt,
                "node_threshold": math.nextafter(threshold, math.inf) if threshold else None,
                "schema_version": SCHEMA_VERSION}
    data = {"metadata": metadata,
            "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
            "nodes": list(nodes.values()),
            "links": [{"source": s, "target": t, "weight": w} for (s, t), w in links.items()]}
    path = folder / f"{slug}.json"
    write_json(path, data)
    index = folder / "graph-metadata.json"
    listed = read_json(index, fix="delete it to start a new list.") if index.exists() else {"graphs": []}
    listed["graphs"] = [g for g in listed.get("graphs", []) if g.get("slug") != slug] + [metadata]
    write_json(index, listed)
    return path


_KINDS = ("latent", "error", "mlp", "embedding", "logit")


def _node(graph: CircuitGraph, node: Any) -> dict[str, Any] | None:
    """A node in circuit-tracer's schema (``None`` for kinds it has not)."""
    p = node.position
    common = {"ctx_idx": p, "influence": node.influence, "clerp": node.label, "token_prob": 0.0,
              "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0, "activation": None}
    if node.kind == "latent":
        return {**common, "node_id": f"{node.layer}_{node.latent}_{p}", "jsNodeId": f"{node.layer}_{node.latent}-0",
                "feature": cantor(node.layer, node.latent), "layer": str(node.layer), "feature_type": LATENT,
                "activation": node.activation}
    if node.kind in ("error", "mlp"):
        return {**common, "node_id": f"err_{node.layer}_{p}", "jsNodeId": f"{node.layer}_{p}-0", "feature": -1,
                "layer": str(node.layer), "feature_type": ERROR}
    if node.kind in ("embedding", "position"):
        token = graph.tokens[p]
        return {**common, "node_id": f"E_{token}_{p}", "jsNodeId": f"E_{token}-{p}", "feature": p, "layer": "E",
                "feature_type": EMBEDDING, "clerp": ""}
    if node.kind == "logit":
        token = graph.target.get("token", [-1])[0]
        layer = str(graph.n_layers + 1)
        probability = float(graph.target.get("probability", 0.0))
        shown = node.label.removeprefix("logit ").replace("'", "")
        return {**common, "node_id": f"{layer}_{token}_{p}", "jsNodeId": f"L_{token}-{p}", "feature": token,
                "layer": layer, "feature_type": LOGIT, "is_target_logit": True, "token_prob": probability,
                "influence": None,  # as circuit-tracer's logit nodes: the frontend always keeps them
                "clerp": f'Output "{shown}" (p={probability:.3f})'}
    return None


def _folded_links(graph: CircuitGraph, ids: dict[str, str]) -> dict[tuple[str, str], float]:
    """The graph's edges between exported nodes, edges through heads and skip paths folded into
    their consumer's (a head or skip path passes its inputs on whole)."""
    consumer = {e.source: e.target for e in graph.edges.values() if graph.nodes[e.source].kind in ("head", "skip")}
    links: dict[tuple[str, str], float] = {}
    for edge in graph.edges.values():
        if edge.source not in ids:
            continue
        target = edge.target
        while target in consumer:
            target = consumer[target]
        if target in ids:
            key = (ids[edge.source], ids[target])
            links[key] = links.get(key, 0.0) + edge.weight
    return links


def _rank(nodes: dict[str, dict[str, Any]], links: dict[tuple[str, str], float], target: str) -> None:
    """Influence ranks over the exported graph itself (for graphs read from files without them)."""
    order = {node_id: i for i, node_id in enumerate(nodes)}
    matrix = torch.zeros(len(order), len(order), dtype=torch.float64)
    for (s, t), w in links.items():
        matrix[order[t], order[s]] = w
    weights = torch.zeros(len(order), dtype=torch.float64)
    weights[order[target]] = 1.0
    ranks = cumulative_ranks(influence(matrix, weights))
    for node_id, i in order.items():
        if nodes[node_id]["feature_type"] != LOGIT:
            nodes[node_id]["influence"] = float(ranks[i])


def load_circuit_tracer(data: dict[str, Any]) -> CircuitGraph:
    """A `CircuitGraph` from circuit-tracer graph JSON (written by circuit-tracer or by `save_circuit_tracer`).

    Latents, error nodes, token nodes and logits become nodes of those kinds (every logit a
    ``logit`` node; the target is the one marked ``is_target_logit``, else the most probable). A
    latent's value is its activation; the target's value is the sum of its incoming links.
    """
    from .graph import CircuitGraph, Edge, Node, _label

    metadata = data["metadata"]
    tokens_text = list(metadata["prompt_tokens"])
    logits = [n for n in data["nodes"] if n["feature_type"] == LOGIT]
    n_layers = int(logits[0]["layer"]) - 1 if logits else 1 + max(
        (int(n["layer"]) for n in data["nodes"] if n["layer"] != "E"), default=0)
    tokens = [-1] * len(tokens_text)
    for n in data["nodes"]:
        if n["feature_type"] == EMBEDDING:
            tokens[n["ctx_idx"]] = int(n["node_id"].split("_")[1])
    target = max(logits, key=lambda n: (n.get("is_target_logit", False), n.get("token_prob", 0.0)), default=None)
    if target is None:  # a latent target (tcwidgets' export): the latent no link leaves, highest layer
        sources = {link["source"] for link in data["links"]}
        target = max((n for n in data["nodes"] if n["feature_type"] == LATENT and n["node_id"] not in sources),
                     key=lambda n: int(n["layer"]), default=None)
    graph = CircuitGraph(metadata.get("scan", ""), metadata.get("prompt", ""), tokens, tokens_text, n_layers,
                         {"type": "logit", "token": [target["feature"]] if target and target["feature_type"] == LOGIT else [], "minus": [],
                          "position": target["ctx_idx"] if target else len(tokens) - 1,
                          "probability": target.get("token_prob", 0.0) if target else 0.0},
                         "", settings={"depth": 0, "top_k": None, "threshold": 0.0,
                                       "node_threshold": metadata.get("node_threshold")})
    ids = {}
    for item in data["nodes"]:
        kind, p = item["feature_type"], item["ctx_idx"]
        if kind == LATENT:
            layer, latent = int(item["layer"]), int(item["node_id"].split("_")[1])
            node = Node(f"latent/{layer}/{latent}/{p}", "latent", layer, p, latent=latent,
                        value=item.get("activation"), activation=item.get("activation"))
        elif kind == ERROR:
            node = Node(f"error/{item['layer']}/{p}", "error", int(item["layer"]), p)
        elif kind == EMBEDDING:
            node = Node(f"embedding/{p}", "embedding", -1, p)
        elif kind == LOGIT:
            node = Node(f"logit/{item['feature']}/{p}", "logit", n_layers, p, label=item.get("clerp", ""))
        else:
            continue
        node.influence = item.get("influence")
        node.label = node.label or _label(node, tokens_text)
        ids[item["node_id"]] = node.node_id
        graph.nodes[node.node_id] = node
    for link in data["links"]:
        if link["source"] in ids and link["target"] in ids:
            source, target_id = ids[link["source"]], ids[link["target"]]
            graph.edges[(source, target_id)] = Edge(source, target_id, link["weight"], link["weight"], 1.0)
            graph.nodes[target_id].expanded = True
    if target is not None:
        graph.target_id = ids[target["node_id"]]
        incoming = [e.weight for e in graph.edges.values() if e.target == graph.target_id]
        graph.nodes[graph.target_id].value = sum(incoming)
        graph.settings["scale"] = max((abs(w) for w in incoming), default=1.0) or 1.0
        graph._update_attributions()
    return graph
