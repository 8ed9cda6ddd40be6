"""`CircuitGraph`: an attribution graph grown from a frozen run by path search, and its exports."""

from __future__ import annotations

from collections.abc import Mapping
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ..features import logit_effects
from ..files import FileFormatError, inside, read_json, write_json
from ..progress import delayed_bar
from .adjacency import Adjacency, build_adjacency, cumulative_ranks, node_influence
from .adjacency import prune as prune_adjacency
from .adjacency import scores as graph_scores
from .replay import CircuitError, FrozenRun, _Reader

FORMAT = "tcwidgets.circuit"
VERSION = 2  # 2: nodes' ``position``/``latent``/``source_position`` (were ``ctx_idx``/``feature``/``source_ctx_idx``), ``influence``
RENAMED = {"ctx_idx": "position", "feature": "latent", "source_ctx_idx": "source_position"}  # version 1 -> 2
GRAPH_FILE = "graph.json"
GRAPH_FORMATS = ("tcwidgets", "circuit-tracer")


class GraphFileError(FileFormatError, CircuitError):
    """A graph file is missing, unreadable, or in no format `CircuitGraph.load` knows."""


class Scores(NamedTuple):
    """circuit-tracer's graph scores (see `CircuitGraph.scores`)."""

    replacement: float
    completeness: float

#: Kinds of graph nodes. Expandable ones have predecessors: latents (shared by every consumer),
#: attention heads and skip paths (linear, one node per consumer).
KINDS = ("logit", "latent", "head", "skip", "embedding", "position", "error", "mlp", "bias")
EXPANDABLE = ("latent", "head", "skip")


@dataclass(frozen=True)
class Contribution:
    """One direct contribution to a node: ``weight = invariant × dependent``.

    ``source`` is the contributing node's description (``kind``, ``layer``, ``position`` and, as
    relevant, ``latent``, ``head``, ``source_position``, ``name``).
    """

    source: dict[str, Any]
    weight: float
    invariant: float
    dependent: float



@dataclass
class Node:
    """A node of a `CircuitGraph`.

    ``position``: the token position it sits at (a head's destination; ``source_position`` its
    source); ``latent``: a latent's index in its layer's transcoder. ``value``: a latent's
    pre-activation, a head's or skip path's contribution to its consumer, the target's value;
    ``activation``: a latent's activation. ``attribution``: the node's total effect on the target
    along the graph's edges (``value`` for the target). ``influence``: circuit-tracer's
    cumulative-influence rank in [0, 1] over the prompt's full graph (small: among the most
    influential nodes; ``None`` for heads, skip paths, biases and position embeddings, which are not
    nodes there).
    """

    node_id: str
    kind: str
    layer: int
    position: int
    latent: int | None = None
    head: int | None = None
    source_position: int | None = None
    name: str | None = None
    value: float | None = None
    activation: float | None = None
    attribution: float = 0.0
    influence: float | None = None
    expanded: bool = False
    label: str = ""

    @property
    def expandable(self) -> bool:
        return self.kind in EXPANDABLE


@dataclass
class Edge:
    """``source``'s direct contribution ``weight = invariant × dependent`` to ``target``'s value."""

    source: str
    target: str
    weight: float
    invariant: float
    dependent: float


@dataclass
class _Search:
    """Path-search settings; ``scale`` is the target's largest direct contribution (absolute);
    ``progress`` shows a bar of the nodes expanded when the search takes more than a moment."""

    depth: int
    top_k: int | None
    threshold: float
    scale: float = 1.0
    progress: bool = False


@dataclass
class CircuitGraph:
    """An attribution graph: nodes (latents, heads, embeddings, errors, biases, …) at (layer,
    position) and edges carrying direct contributions. Built by `attribute`.

    ``expand(node_id)`` adds a node's largest predecessors (needs the run it was built from, kept
    in memory; a graph read back with `load` or `from_json` cannot expand). ``scores`` and
    ``prune`` follow circuit-tracer over the prompt's full graph (`adjacency`); ``save`` writes
    tcwidgets' or circuit-tracer's files, ``load`` reads both.
    """

    model: str
    prompt: str
    tokens: list[int]
    token_strings: list[str]
    n_layers: int
    target: dict[str, Any]
    target_id: str
    nodes: dict[str, Node] = field(default_factory=dict)
    edges: dict[tuple[str, str], Edge] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    _run: FrozenRun | None = field(default=None, repr=False)
    _readers: dict[str, tuple[_Reader, float]] = field(default_factory=dict, repr=False)
    _adjacency: Adjacency | None = field(default=None, repr=False)

    # -- reading ---------------------------------------------------------------------------------------

    @property
    def target_value(self) -> float:
        return self.nodes[self.target_id].value

    def n_latents(self, layer: int) -> int | None:
        """The width of the graph's layer-``layer`` transcoder (``None`` if unknown or none)."""
        if self._run is None or layer >= len(self._run.layers) or self._run.layers[layer].tc is None:
            return None
        return self._run.layers[layer].tc.n_latents

    def predecessors(self, node_id: str) -> list[Edge]:
        """The graph's edges into ``node_id``, largest first."""
        return sorted((e for e in self.edges.values() if e.target == node_id), key=lambda e: -abs(e.weight))

    def contributions(self, node_id: str) -> list[Contribution]:
        """Every direct contribution to ``node_id`` (not only those kept in the graph), largest first.

        They sum to the node's ``value``: a latent's pre-activation, the target's value, a head's
        or skip path's contribution.
        """
        reader, constant = self._reader(node_id)
        found = [Contribution(s.describe(i), float(s.weight[i]), float(s.invariant[i]), float(s.dependent[i]))
                 for s in self._run.decompose(reader) for i in range(len(s.weight))]
        found += self._constants(node_id, constant)
        return sorted(found, key=lambda c: -abs(c.weight))

    def paths(self, limit: int = 10, min_attribution: float | None = None) -> list[tuple[float, list[str]]]:
        """The ``limit`` complete paths into the target (from a node with no predecessors in the graph)
        with the largest attributions, as ``(attribution, [node ids from source to target])``.

        A path's attribution is its first edge's weight times the gain of each later edge (a latent
        passes on ``weight / value`` of its own value, heads and skip paths pass theirs on whole).
        Partial paths whose attribution falls below ``min_attribution`` (default: the search
        threshold × the target's largest direct contribution) are not followed.
        """
        if min_attribution is None:
            min_attribution = self.settings.get("threshold", 0.0) * self.settings.get("scale", 1.0)
        found: list[tuple[float, list[str]]] = []
        incoming: dict[str, list[Edge]] = {}
        for edge in self.edges.values():
            incoming.setdefault(edge.target, []).append(edge)

        def walk(node_id: str, gain: float, path: list[str]) -> None:
            for edge in incoming.get(node_id, []):
                attribution = edge.weight * gain
                if abs(attribution) < min_attribution:
                    continue
                if edge.source in incoming:
                    walk(edge.source, gain * self._gain(edge), [edge.source, *path])
                else:
                    found.append((attribution, [edge.source, *path]))

        walk(self.target_id, 1.0, [self.target_id])
        return sorted(found, key=lambda item: -abs(item[0]))[:limit]

    def logit_effects(self, node_id: str, k: int = 5) -> dict[str, list[tuple[int, float]]]:
        """The ``k`` tokens a latent most promotes and most suppresses directly (`features.logit_effects`:
        its decoder row through the final norm's weight and the unembedding), as
        ``{"promoted": [(token id, value), ...], "suppressed": [...]}``."""
        node = self.nodes.get(node_id)
        if node is None or node.kind != "latent":
            raise CircuitError(f"{node_id!r} is not a latent of this graph: only latents have logit effects.")
        if self._run is None:
            raise CircuitError("This graph was read from a file or JSON: it has no model to compute logit effects with.")
        effects = logit_effects(self._run.lm, self._run.layers[node.layer].tc, k, latents=[node.latent])
        return {kind: list(zip(effects[f"{kind}_ids"][0].tolist(), effects[f"{kind}_values"][0].tolist()))
                for kind in ("promoted", "suppressed")}

    # -- growing ---------------------------------------------------------------------------------------

    def expand(self, node_id: str, *, top_k: int | None = None, threshold: float | None = None,
               depth: int = 1) -> list[str]:
        """Add the largest direct contributions to ``node_id`` (and recursively to theirs, ``depth``
        levels), keeping per node the ``top_k`` whose path attribution is at least ``threshold`` ×
        the target's largest direct contribution (defaults: the `attribute` settings).
        Returns the ids of the nodes added."""
        if node_id not in self.nodes:
            raise KeyError(f"No node {node_id!r} in this graph.")
        if not self.nodes[node_id].expandable:
            raise CircuitError(f"{node_id} is a {self.nodes[node_id].kind} node: it has no predecessors to expand.")
        search = _Search(depth, self.settings["top_k"] if top_k is None else top_k,
                         self.settings["threshold"] if threshold is None else threshold, self.settings["scale"])
        before = set(self.nodes)
        self._grow([node_id], search)
        return [n for n in self.nodes if n not in before]

    def _grow(self, frontier: list[str], search: _Search) -> None:
        """Breadth-first expansion, ``search.depth`` levels from ``frontier``."""
        with delayed_bar(total=0, desc="attributing", unit="node", disable=not search.progress) as bar:
            for level in range(search.depth):
                frontier = list(dict.fromkeys(frontier))
                bar.total += len(frontier)
                bar.set_postfix_str(f"level {level + 1} of {search.depth}", refresh=False)
                multipliers = self._multipliers()
                following = []
                for node_id in frontier:
                    following += self._expand_one(node_id, multipliers.get(node_id, 0.0), search)
                    bar.update()
                self._update_attributions()
                frontier = [n for n in following if not self.nodes[n].expanded]
                if not frontier:
                    break

    def _expand_one(self, node_id: str, multiplier: float, search: _Search) -> list[str]:
        node = self.nodes[node_id]
        reader, constant = self._reader(node_id)
        node.expanded = True
        candidates = []  # (|attribution|, segment, index)
        for segment in self._run.decompose(reader):
            weights = segment.weight.abs() * abs(multiplier)
            keep = torch.nonzero(weights >= search.threshold * search.scale).flatten()
            if search.top_k is not None and len(keep) > search.top_k:
                keep = keep[weights[keep].topk(search.top_k).indices]
            candidates += [(float(weights[i]), segment, int(i)) for i in keep]
        candidates.sort(key=lambda c: -c[0])
        if search.top_k is not None:
            candidates = candidates[:search.top_k]
        added = []
        for _, segment, i in candidates:
            source = self._add_node(segment.describe(i), consumer=(node_id, reader))
            self.edges[(source, node_id)] = Edge(source, node_id, float(segment.weight[i]),
                                                 float(segment.invariant[i]), float(segment.dependent[i]))
            added.append(source)
        for contribution in self._constants(node_id, constant):
            if abs(contribution.weight * multiplier) >= search.threshold * search.scale:
                source = self._add_node(contribution.source)
                self.edges[(source, node_id)] = Edge(source, node_id, contribution.weight,
                                                     contribution.invariant, contribution.dependent)
        return [a for a in added if self.nodes[a].expandable]

    def _constants(self, node_id: str, constant: float) -> list[Contribution]:
        """A node's own constant input (a latent's encoder and norm biases, the final norm's and
        unembedding's biases for a logit, a skip path's norm bias) as one bias contribution."""
        if constant == 0.0:
            return []
        node = self.nodes[node_id]
        name = {"latent": "encoder", "logit": "unembedding", "skip": "skip"}[node.kind]
        return [Contribution({"kind": "bias", "layer": node.layer, "position": node.position, "name": name},
                             constant, constant, 1.0)]

    def _reader(self, node_id: str) -> tuple[_Reader, float]:
        if self._run is None:
            raise CircuitError("This graph was read from a file or JSON: it has no forward pass to expand or "
                               "decompose nodes with. Run tcw.attribute again.")
        if node_id not in self._readers:
            node = self.nodes.get(node_id)
            if node is None:
                raise KeyError(f"No node {node_id!r} in this graph.")
            if node.kind != "latent":
                raise CircuitError(f"{node_id} is a {node.kind} node: it has no predecessors.")
            self._readers[node_id] = self._run.latent_reader(node.layer, node.latent, node.position)
        return self._readers[node_id]

    def _add_node(self, source: dict[str, Any], consumer: tuple[str, _Reader] | None = None) -> str:
        """The id of the node described by ``source`` (created if new). Heads and skip paths are
        per consumer: their reader is built from the consumer's."""
        kind, layer, p = source["kind"], source.get("layer", -1), source["position"]
        run = self._run
        if kind == "head":
            q = source["source_position"]
            node_id = f"head/{layer}.{source['head']}/{q}>{p}/{consumer[0]}"
        elif kind == "skip":
            node_id = f"skip/{layer}/{p}/{consumer[0]}"
        elif kind == "latent":
            node_id = f"latent/{layer}/{source['latent']}/{p}"
        elif kind == "bias":
            node_id = f"bias/{source['name']}/{layer}/{p}"
        else:
            node_id = f"{kind}/{layer}/{p}" if kind in ("error", "mlp") else f"{kind}/{p}"
        if node_id in self.nodes:
            return node_id
        node = Node(node_id, kind, layer, p, latent=source.get("latent"), head=source.get("head"),
                    source_position=source.get("source_position"), name=source.get("name"))
        if kind == "latent":
            frozen = run.layers[layer]
            node.value = float(frozen.pre[p, node.latent])
            node.activation = float(frozen.latents[p, node.latent])
        elif kind == "head":
            self._readers[node_id] = (run.head_reader(consumer[1], layer, node.head, node.source_position), 0.0)
        elif kind == "skip":
            self._readers[node_id] = run.skip_reader(consumer[1], layer)
        node.label = _label(node, self.token_strings)
        self.nodes[node_id] = node
        if kind in ("head", "skip"):
            reader, constant = self._readers[node_id]
            node.value = run.read(reader) + constant
        return node_id

    # -- attributions -------------------------------------------------------------------------------------

    def _gain(self, edge: Edge) -> float:
        """How much of the source's own value an edge passes on (1 for heads and skip paths)."""
        source = self.nodes[edge.source]
        if source.kind in ("head", "skip") or not source.value:
            return 1.0
        return edge.weight / source.value

    def _multipliers(self) -> dict[str, float]:
        """∂target/∂value of each node along the graph's edges (1 for the target)."""
        outgoing: dict[str, list[Edge]] = {}
        for edge in self.edges.values():
            outgoing.setdefault(edge.source, []).append(edge)
        memo = {self.target_id: 1.0}

        def multiplier(node_id: str) -> float:
            if node_id not in memo:
                memo[node_id] = sum(self._gain(e) * multiplier(e.target) for e in outgoing.get(node_id, []))
            return memo[node_id]

        for node_id in self.nodes:
            multiplier(node_id)
        return memo

    def _update_attributions(self) -> None:
        multipliers = self._multipliers()
        totals = dict.fromkeys(self.nodes, 0.0)
        for edge in self.edges.values():
            totals[edge.source] += edge.weight * multipliers[edge.target]
        totals[self.target_id] = self.nodes[self.target_id].value
        for node_id, total in totals.items():
            self.nodes[node_id].attribution = total

    # -- the full graph: influence, scores, pruning ------------------------------------------------------------

    def adjacency(self) -> Adjacency:
        """The direct effects between every node of the prompt's full graph (all active latents, error
        nodes, tokens, the target), computed once from the frozen run (see `adjacency.Adjacency`)."""
        if self._adjacency is None:
            if self._run is None:
                raise CircuitError("This graph was read from a file: it has no forward pass to build the full "
                                   "graph from. Run tcw.attribute again.")
            n_writers = self.target["layer"] if self.target["type"] == "latent" else self.n_layers
            self._adjacency = build_adjacency(self._run, self._reader(self.target_id), self.target_value, n_writers)
        return self._adjacency

    def scores(self) -> Scores:
        """circuit-tracer's replacement and completeness scores of the prompt's full graph.

        ``replacement``: the share of the target's influence that starts at tokens rather than at
        error nodes (MLP outputs a transcoder does not explain, and MLPs without a transcoder);
        ``completeness``: the share of every node's input that does not come from error nodes,
        weighted by the node's influence on the target. Both are in [0, 1]; 1 means the latents
        explain everything. A folded BOS (`attribute`'s ``fold_bos``) is a constant, in neither.
        A graph read from a file has the scores saved with it, if any.
        """
        if self._run is None:
            saved = self.settings.get("scores")
            if not saved:
                raise CircuitError("This graph was read from a file without scores: run tcw.attribute again.")
            return Scores(**saved)
        return Scores(*graph_scores(self.adjacency()))

    def prune(self, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> CircuitGraph:
        """The prompt's full graph pruned as circuit-tracer prunes: the nodes holding ``node_threshold``
        of the total influence on the target, the edges holding ``edge_threshold`` of the edge
        influence among them (tokens and the target always kept). A new graph of latents, error nodes,
        token nodes and the target, whose edges are direct effects through frozen attention, norms
        and skip paths; each node's ``influence`` is its cumulative-influence rank. It can be
        expanded like any graph (head nodes appear then) and saved for circuit-tracer."""
        adjacency = self.adjacency()
        node_mask, edge_mask, ranks = prune_adjacency(adjacency, node_threshold, edge_threshold)
        replacement, completeness = graph_scores(adjacency)
        settings = {"depth": 0, "top_k": None, "threshold": 0.0, "scale": self.settings.get("scale", 1.0),
                    "folded_positions": self.settings.get("folded_positions", []),
                    "node_threshold": node_threshold, "edge_threshold": edge_threshold,
                    "scores": {"replacement": replacement, "completeness": completeness}}
        pruned = CircuitGraph(self.model, self.prompt, self.tokens, self.token_strings, self.n_layers, self.target,
                              self.target_id, settings=settings, _run=self._run,
                              _readers={self.target_id: self._reader(self.target_id)}, _adjacency=adjacency)
        ids = self._adjacency_ids(adjacency)
        for index in torch.nonzero(node_mask).flatten().tolist():
            node_id = ids[index]
            if index == len(ids) - 1:
                pruned.nodes[node_id] = replace(self.nodes[self.target_id], expanded=True)
            else:
                pruned._add_node(self._adjacency_source(adjacency, index))
            pruned.nodes[node_id].influence = float(ranks[index])
        targets, sources = torch.nonzero(edge_mask, as_tuple=True)
        for t, s in zip(targets.tolist(), sources.tolist()):
            if node_mask[t] and node_mask[s]:
                weight = float(adjacency.matrix[t, s])
                dependent = float(adjacency.activations[s]) if s < adjacency.n_latents else 1.0
                pruned.edges[(ids[s], ids[t])] = Edge(ids[s], ids[t], weight, weight / dependent, dependent)
                pruned.nodes[ids[t]].expanded = True
        pruned._update_attributions()
        return pruned

    def fill_influence(self) -> None:
        """Set ``influence`` (circuit-tracer's cumulative-influence rank over the full graph) on the
        nodes the full graph has: latents, error nodes, MLPs without a transcoder, tokens, the target."""
        adjacency = self.adjacency()
        ranks = cumulative_ranks(node_influence(adjacency)).tolist()
        for node_id, rank in zip(self._adjacency_ids(adjacency), ranks):
            for each in (node_id, node_id.replace("embedding/", "position/")):  # a token node holds both
                if each in self.nodes:
                    self.nodes[each].influence = rank

    def _adjacency_ids(self, adjacency: Adjacency) -> list[str]:
        """The node id of each row of ``adjacency``."""
        ids = [f"latent/{layer}/{latent}/{p}" for layer, p, latent in adjacency.latents.tolist()]
        ids += [f"{'mlp' if self._run.layers[layer].tc is None else 'error'}/{layer}/{p}"
                for layer, p in adjacency.errors.tolist()]
        return ids + [f"embedding/{p}" for p in range(adjacency.n_tokens)] + [self.target_id]

    def _adjacency_source(self, adjacency: Adjacency, index: int) -> dict[str, Any]:
        if index < adjacency.n_latents:
            layer, p, latent = adjacency.latents[index].tolist()
            return {"kind": "latent", "layer": layer, "latent": latent, "position": p}
        if index < adjacency.token_slice.start:
            layer, p = adjacency.errors[index - adjacency.n_latents].tolist()
            return {"kind": "mlp" if self._run.layers[layer].tc is None else "error", "layer": layer, "position": p}
        return {"kind": "embedding", "position": index - adjacency.token_slice.start}

    # -- files ---------------------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """The whole graph as JSON-ready data in tcwidgets' own format (``format``
        ``"tcwidgets.circuit"``): metadata, settings, every node with all its fields, and ``links``
        with each edge's ``weight``, ``invariant`` and ``dependent`` factors. `from_json` reads it back.
        Not circuit-tracer's schema: ``save(folder, format="circuit-tracer")`` writes that. (Version 1
        files, whose nodes said ``ctx_idx``, ``feature`` and ``source_ctx_idx``, still read.)"""
        nodes = []
        for node in self.nodes.values():
            data = asdict(node)
            data["expandable"] = node.expandable
            nodes.append(data)
        return {"format": FORMAT, "version": VERSION, "model": self.model, "prompt": self.prompt,
                "tokens": self.tokens, "token_strings": self.token_strings, "n_layers": self.n_layers,
                "target": self.target, "target_id": self.target_id, "settings": self.settings,
                "nodes": nodes, "links": [asdict(e) for e in self.edges.values()]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CircuitGraph:
        """A graph from `to_json` data (it can be drawn and exported, not expanded)."""
        if data.get("format") != FORMAT:
            raise CircuitError(f"Not a tcwidgets circuit graph (format {data.get('format')!r}, expected {FORMAT!r}).")
        if data.get("version", 0) > VERSION:
            raise CircuitError(f"This graph was written by a newer tcwidgets (version {data['version']}); upgrade.")
        graph = cls(data["model"], data["prompt"], list(data["tokens"]), list(data["token_strings"]),
                    data["n_layers"], dict(data["target"]), data["target_id"], settings=dict(data["settings"]))
        for item in data["nodes"]:
            item = {RENAMED.get(k, k): v for k, v in item.items() if k != "expandable"}  # version 1's names
            node = Node(**item)
            graph.nodes[node.node_id] = node
        for item in data["links"]:
            graph.edges[(item["source"], item["target"])] = Edge(**item)
        return graph

    def save(self, folder: str | os.PathLike, *, format: str = "tcwidgets", slug: str = "tcwidgets-graph") -> Path:
        """Write the graph into ``folder`` (created if needed) and return the file written.

        ``format="tcwidgets"``: ``graph.json`` (`to_json`). ``format="circuit-tracer"``: ``{slug}.json``
        and ``graph-metadata.json``, which circuit-tracer's ``start-server`` frontend and Neuronpedia
        read (see `export.save_circuit_tracer`; ``graph.prune().save(...)`` writes the graph
        circuit-tracer itself would). `CircuitGraph.load` reads both. For a graph from `attribute`,
        the nodes' influence ranks need the full graph (`adjacency`): a minute or more on a real
        model on a laptop CPU, once per graph.
        """
        from .export import save_circuit_tracer

        if format not in GRAPH_FORMATS:
            raise CircuitError(f"format={format!r} is not a graph format: use one of {', '.join(GRAPH_FORMATS)}.")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if format == "circuit-tracer":
            return save_circuit_tracer(self, folder, slug)
        write_json(folder / GRAPH_FILE, self.to_json())
        return folder / GRAPH_FILE

    @classmethod
    def load(cls, path: str | os.PathLike, *, slug: str | None = None) -> CircuitGraph:
        """A graph from a folder (or a file) written by `save`, in tcwidgets' format or circuit-tracer's
        (by tcwidgets or by circuit-tracer itself: ``{slug}.json`` next to ``graph-metadata.json``;
        ``slug`` picks one when the folder holds several). It can be drawn, pruned graphs' scores
        read, not expanded."""
        from .export import load_circuit_tracer

        path = Path(path)
        fix = "pass a folder written by graph.save(...) or by circuit-tracer's create_graph_files."
        if path.is_dir():
            if (path / GRAPH_FILE).exists():
                path = path / GRAPH_FILE
            else:
                metadata = read_json(path / "graph-metadata.json", fix=fix, error=GraphFileError)
                slugs = [g.get("slug") for g in metadata.get("graphs", [])] if isinstance(metadata, dict) else []
                if slug is None and len(slugs) != 1:
                    raise GraphFileError(f"{path} holds {len(slugs)} circuit-tracer graphs ({slugs}): pass slug=... "
                                         "to choose one.")
                chosen = slug if slug is not None else slugs[0]
                if chosen not in slugs:
                    raise GraphFileError(f"{path} has no graph {chosen!r}; it has {slugs}.")
                path = inside(path, f"{chosen}.json", error=GraphFileError)
        data = read_json(path, fix=fix, error=GraphFileError)
        if isinstance(data, dict) and data.get("format") == FORMAT:
            return cls.from_json(data)
        if isinstance(data, dict) and {"metadata", "nodes", "links"} <= set(data):
            return load_circuit_tracer(data)
        raise GraphFileError(f"{path} is neither a tcwidgets graph nor a circuit-tracer graph: {fix}")


def _label(node: Node, tokens: list[str]) -> str:
    token = tokens[node.position] if 0 <= node.position < len(tokens) else ""
    return {
        "latent": lambda: f"L{node.layer}/{node.latent}",
        "head": lambda: f"L{node.layer}.H{node.head} {node.source_position}→{node.position}",
        "skip": lambda: f"skip L{node.layer}",
        "embedding": lambda: f"token {token!r}",
        "position": lambda: f"position {node.position}",
        "error": lambda: f"error L{node.layer}",
        "mlp": lambda: f"MLP L{node.layer}",
        "bias": lambda: f"MLP L{node.layer} at BOS (constant)" if node.name == "bos" else
        f"{node.name} bias" + ("" if node.name == "unembedding" else f" L{node.layer}"),
        "logit": lambda: "logit",
    }[node.kind]()
