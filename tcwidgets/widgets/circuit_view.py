"""`CircuitView`: draw a `CircuitGraph` — tokens along the bottom, layers going up.

Python holds the graph; the synced trait ``_graph`` carries a compact drawing payload (columns of
node fields, edges as index arrays). Public synced state: ``threshold`` (edges weaker than this
fraction of the strongest are hidden, with whatever no longer reaches the target), ``selected``
(a node id), ``selected_latent`` (``(layer, latent)`` of the selected latent, ``(-1, -1)``
otherwise: the type of `AblationSliders`' ``selected``), ``pinned`` and ``error``. The page never
sets a trait; it sends messages that Python validates and applies (failures go to ``error``):

    {type: "select", id}                     select a node ("" clears)
    {type: "pin", id, pinned}                pin or unpin a node (pinned nodes are always drawn)
    {type: "threshold", value}               the slider moved
    {type: "expand", request, id}            add the node's largest predecessors to the graph
    {type: "summary", request, id}           -> {type: "summary", request, id, summary}

A summary (shown on hover) holds the node's facts, its strongest edges, and for a latent its top
logit effects (from the feature statistics when given, else from the weights) and its top example.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import anywidget
import traitlets

from ..circuits import CircuitError, CircuitGraph
from ..features import FeatureStats
from .assets import css, esm

N_EDGES = 6  # strongest incoming and outgoing edges listed in a summary
N_LOGITS = 5  # tokens per logit-effect list


def _round(value: float | None) -> float | None:
    """Four significant digits: enough to read, a third of the bytes."""
    return None if value is None else float(f"{value:.4g}")


def _level(node: Any, n_layers: int) -> int:
    """The node's row, from the bottom: embeddings 0, layer l's attention 2l + 1 and its MLP 2l + 2,
    the logit (and the biases read with it) at the top."""
    if node.kind in ("embedding", "position"):
        return 0
    if node.kind == "logit" or node.name == "unembedding":
        return 2 * n_layers + 1
    if node.kind == "head" or node.name == "attention":
        return 2 * node.layer + 1
    return 2 * node.layer + 2


def _drawn_at(node: Any) -> int:
    """The token column a node is drawn in: its position, a head's source position (what it reads
    sits there; its edge to its consumer shows the move)."""
    return node.source_position if node.kind == "head" and node.source_position is not None else node.position


def _scores(graph: CircuitGraph) -> dict[str, float] | None:
    """The graph's scores if already known (a pruned graph, or after ``graph.scores()``): the full
    graph they need takes minutes on a real model, which drawing should not start by itself."""
    if graph._adjacency is None and not graph.settings.get("scores"):
        return None
    return {name: _round(value) for name, value in graph.scores()._asdict().items()}


def graph_payload(graph: CircuitGraph) -> dict[str, Any]:
    """What the page needs to draw ``graph``: node fields as columns, edges as index arrays, and
    circuit-tracer's scores and pruning thresholds when known."""
    nodes = list(graph.nodes.values())
    index = {node.node_id: i for i, node in enumerate(nodes)}
    edges = list(graph.edges.values())
    return {
        "tokens": graph.token_strings, "n_layers": graph.n_layers, "target": index[graph.target_id],
        "can_expand": graph._run is not None, "value": _round(graph.target_value), "scores": _scores(graph),
        "pruning": {key: graph.settings[key] for key in ("node_threshold", "edge_threshold")}
        if graph.settings.get("edge_threshold") is not None else None,
        "nodes": {
            "id": [n.node_id for n in nodes], "kind": [n.kind for n in nodes], "layer": [n.layer for n in nodes],
            "position": [_drawn_at(n) for n in nodes], "level": [_level(n, graph.n_layers) for n in nodes],
            "label": [n.label for n in nodes],
            "attribution": [_round(n.attribution) for n in nodes],
            "expanded": [n.expanded for n in nodes], "expandable": [n.expandable for n in nodes],
        },
        "edges": {"source": [index[e.source] for e in edges], "target": [index[e.target] for e in edges],
                  "weight": [_round(e.weight) for e in edges]},
    }


class CircuitView(anywidget.AnyWidget):
    """Explore an attribution graph: nodes sized by their attribution to the target, edges by their
    weight (colour for sign); a threshold slider prunes; hover for a node's summary; click selects,
    Expand adds the selected node's predecessors, Pin keeps a node drawn. Nodes sit in their token's
    column (a head in its source token's); a busy column widens. circuit-tracer's replacement and
    completeness scores show once known (a graph from ``graph.prune(...)``, with its pruning
    thresholds, or after ``graph.scores()``; call ``view.refresh()`` then).

    Args:
        graph: a `CircuitGraph` from `attribute` (or `CircuitGraph.from_json`, which cannot expand).
        stats: `FeatureStats` of one transcoder, or ``{layer: FeatureStats}``; latents of those
            layers show their top example and logit effects from the statistics.
        threshold: the initial threshold (fraction of the strongest edge's weight).

    Follow the selection from other widgets: ``traitlets.dlink((view, "selected_latent"),
    (sliders, "selected"))`` for `AblationSliders`, ``view.link_dashboard(dashboard, layer)`` for a
    `FeatureDashboard` of one layer's transcoder.
    """

    _esm = esm("circuit_view")
    _css = css("circuit_view")

    threshold = traitlets.Float(0.0).tag(sync=True)
    selected = traitlets.Unicode("").tag(sync=True)
    selected_latent = traitlets.Tuple(traitlets.Int(), traitlets.Int(), default_value=(-1, -1)).tag(sync=True)
    pinned = traitlets.List(traitlets.Unicode()).tag(sync=True)
    error = traitlets.Unicode("").tag(sync=True)
    _graph = traitlets.Dict().tag(sync=True)

    def __init__(self, graph: CircuitGraph, stats: FeatureStats | Mapping[int, FeatureStats] | None = None, *,
                 threshold: float = 0.0, **kwargs: Any) -> None:
        if not isinstance(graph, CircuitGraph):
            raise TypeError(f"CircuitView draws a CircuitGraph (from tcw.attribute), not {type(graph).__name__}.")
        self.graph = graph
        self.stats = _stats_by_layer(stats)
        for layer, layer_stats in self.stats.items():
            width = graph.n_latents(layer)
            if width is not None and width != layer_stats.n_latents:
                raise ValueError(f"The layer-{layer} FeatureStats describe {layer_stats.n_latents} latents but the "
                                 f"graph's layer-{layer} transcoder has {width}: pass the stats of that transcoder.")
        self._summaries: dict[str, dict[str, Any]] = {}
        super().__init__(**kwargs)
        self.threshold = threshold
        self.on_msg(self._on_message)
        self.refresh()

    # -- public ------------------------------------------------------------------------------------------------

    def refresh(self) -> None:
        """Redraw from ``self.graph`` (after changing it from Python, e.g. ``view.graph.expand(...)``)."""
        self._summaries.clear()
        self._graph = graph_payload(self.graph)

    def expand(self, node_id: str, **options: Any) -> list[str]:
        """Expand a node of the graph (`CircuitGraph.expand` options) and redraw; returns the added ids."""
        added = self.graph.expand(node_id, **options)
        self.refresh()
        return added

    def link_dashboard(self, dashboard: Any, layer: int) -> None:
        """Show in ``dashboard`` (a `FeatureDashboard` of the layer-``layer`` transcoder) every latent of
        that layer selected here."""
        def follow(change: dict) -> None:
            selected_layer, latent = change["new"]
            if selected_layer == layer:
                dashboard.feature = latent

        self.observe(follow, "selected_latent")

    def summary(self, node_id: str) -> dict[str, Any]:
        """A node's hover summary (JSON values only; token strings decoded)."""
        if node_id not in self._summaries:
            self._summaries[node_id] = self._summary(node_id)
        return self._summaries[node_id]

    # -- validation --------------------------------------------------------------------------------------------

    @traitlets.validate("threshold")
    def _check_threshold(self, proposal: dict) -> float:
        value = proposal["value"]
        if not 0 <= value <= 1:
            self.error = f"threshold={value!r}: give a fraction of the strongest edge's weight, from 0 to 1."
            raise traitlets.TraitError(self.error)
        return value

    @traitlets.validate("selected")
    def _check_selected(self, proposal: dict) -> str:
        value = proposal["value"]
        if value and value not in self.graph.nodes:
            self.error = f"No node {value!r} in this graph."
            raise traitlets.TraitError(self.error)
        return value

    @traitlets.validate("pinned")
    def _check_pinned(self, proposal: dict) -> list[str]:
        unknown = [node for node in proposal["value"] if node not in self.graph.nodes]
        if unknown:
            self.error = f"Cannot pin {unknown}: no such nodes in this graph."
            raise traitlets.TraitError(self.error)
        return list(dict.fromkeys(proposal["value"]))

    @traitlets.observe("selected")
    def _on_selected(self, change: dict) -> None:
        node = self.graph.nodes.get(change["new"])
        self.selected_latent = (node.layer, node.latent) if node is not None and node.kind == "latent" else (-1, -1)

    # -- messages from the page ----------------------------------------------------------------------------------

    def _on_message(self, _: Any, content: dict, buffers: list) -> None:
        kind = content.get("type")
        try:
            if kind == "select":
                self.selected = str(content.get("id") or "")
            elif kind == "pin":
                node, pinned = str(content.get("id")), bool(content.get("pinned"))
                self.pinned = [n for n in self.pinned if n != node] + ([node] if pinned else [])
            elif kind == "threshold":
                self.threshold = float(content.get("value"))
            elif kind == "expand":
                added = self.expand(str(content.get("id")))
                self.send({"type": "expanded", "request": content.get("request"), "added": len(added)})
            elif kind == "summary":
                node = str(content.get("id"))
                self.send({"type": "summary", "request": content.get("request"), "id": node,
                           "summary": self.summary(node)})
            else:
                return
            self.error = ""
        except (traitlets.TraitError, CircuitError, KeyError, TypeError, ValueError) as error:
            self.error = str(error.args[0]) if error.args else str(error)
            if kind == "expand":
                self.send({"type": "expanded", "request": content.get("request"), "added": 0})

    def _summary(self, node_id: str) -> dict[str, Any]:
        graph = self.graph
        node = graph.nodes.get(node_id)
        if node is None:
            raise KeyError(f"No node {node_id!r} in this graph.")

        def edges(items: list, other: str) -> list[list]:
            items = sorted(items, key=lambda e: -abs(e.weight))[:N_EDGES]
            return [[graph.nodes[getattr(e, other)].label, _round(e.weight), _round(e.invariant), _round(e.dependent)]
                    for e in items]

        summary = {
            "id": node_id, "label": node.label, "kind": node.kind, "layer": node.layer, "position": node.position,
            "token": graph.token_strings[node.position], "value": _round(node.value),
            "activation": _round(node.activation), "attribution": _round(node.attribution),
            "incoming": edges([e for e in graph.edges.values() if e.target == node_id], "source"),
            "outgoing": edges([e for e in graph.edges.values() if e.source == node_id], "target"),
            "promoted": None, "suppressed": None, "example": None,
        }
        if node.kind == "latent":
            stats = self.stats.get(node.layer)
            if stats is not None:
                latent = stats.latent(node.latent)
                summary["promoted"] = [[stats.vocab[i], _round(v)] for i, v in latent.promoted[:N_LOGITS]]
                summary["suppressed"] = [[stats.vocab[i], _round(v)] for i, v in latent.suppressed[:N_LOGITS]]
                if latent.top:
                    top = latent.top[0]
                    summary["example"] = {"tokens": [stats.vocab[i] for i in top.tokens.tolist()],
                                          "acts": [_round(a) for a in top.acts.tolist()], "center": top.center}
            elif graph._run is not None:
                tokenizer = graph._run.lm.tokenizer
                for key, pairs in graph.logit_effects(node_id, N_LOGITS).items():
                    summary[key] = [[tokenizer.decode([i]), _round(v)] for i, v in pairs]
        return summary


def _stats_by_layer(stats: FeatureStats | Mapping[int, FeatureStats] | None) -> dict[int, FeatureStats]:
    if stats is None:
        return {}
    if isinstance(stats, FeatureStats):
        layer = stats.transcoder.get("site", {}).get("layer")
        if layer is None:
            raise ValueError("These FeatureStats do not say which layer their transcoder reads: pass "
                             "stats={layer: stats}.")
        return {layer: stats}
    if not isinstance(stats, Mapping) or not all(isinstance(s, FeatureStats) for s in stats.values()):
        raise TypeError("stats must be FeatureStats (from tcw.analyze_features) or {layer: FeatureStats}.")
    return dict(stats)
