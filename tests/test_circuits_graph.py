"""Tests for the full graph (adjacency), circuit-tracer's scores and pruning, graph files, and the
Gemma family in the exact replay.

The adjacency is checked against the existing exact decomposition (contributions through heads and
skip paths, summed), against finite differences through a float64 copy of the model frozen by
hooks written in test_circuits.py, and by its rows summing exactly to each node's value. Scores
are checked against a hand computation; circuit-tracer's JSON against a schema written from its
source (circuit_tracer/frontend/graph_models.py, 0.5.0), since circuit-tracer is not installed in CI.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import tcwidgets as tcw
from tcwidgets.circuits import CircuitError, CircuitGraph, GraphFileError, LatentTarget, LogitTarget, attribute
from tcwidgets.circuits.adjacency import Adjacency, find_threshold, node_influence, prune, scores
from tcwidgets.circuits.export import cantor

from test_circuits import PROMPTS, FrozenModel, model_value, random_transcoder
from test_circuits import _one_thread, tiny  # noqa: F401 (fixtures: one torch thread here too; the tiny GPT-2)


# -- scores and pruning on a hand-made graph --------------------------------------------------------------


def hand_graph() -> Adjacency:
    """Nodes [latent, error, token, target]: latent <- token 3, error -1; target <- latent 2, error 1, token 1."""
    matrix = torch.zeros(4, 4, dtype=torch.float64)
    matrix[0, 2], matrix[0, 1] = 3.0, -1.0
    matrix[3, 0], matrix[3, 1], matrix[3, 2] = 2.0, 1.0, 1.0
    return Adjacency(matrix, torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64),
                     torch.tensor([[0, 0, 5]]), torch.tensor([1.0], dtype=torch.float64), torch.tensor([[0, 0]]), 1)


def test_scores_equal_a_hand_computation():
    # normalised |rows|: latent <- token .75, error .25; target <- latent .5, error .25, token .25
    # influence on the target: latent .5, error .25 + .5 × .25 = .375, token .25 + .5 × .75 = .625
    assert node_influence(hand_graph()).tolist() == pytest.approx([0.5, 0.375, 0.625, 0.0])
    replacement, completeness = scores(hand_graph())
    assert replacement == pytest.approx(0.625 / (0.625 + 0.375))
    # non-error share of each row's input: latent .75, error 1, token 1, target .75; weights .5, .375, .625, 1
    assert completeness == pytest.approx((0.5 * 0.75 + 0.375 + 0.625 + 0.75) / 2.5)


def test_pruning_keeps_the_stated_share_of_influence():
    torch.manual_seed(0)
    values = torch.rand(50, dtype=torch.float64) ** 4
    for share in (0.5, 0.8, 0.95):
        kept = values >= find_threshold(values, share)
        assert values[kept].sum() >= share * values.sum()
        smallest = values[kept].min()
        assert values[kept].sum() - smallest < share * values.sum()  # no smaller set of the largest does
    with pytest.raises(CircuitError, match="between 0 and 1"):
        prune(hand_graph(), node_threshold=1.5)


def random_graph(n_latents: int = 60, n_errors: int = 20, n_tokens: int = 6, seed: int = 0) -> Adjacency:
    """A random acyclic full graph: latent i reads earlier latents, errors and tokens; the target reads all."""
    generator = torch.Generator().manual_seed(seed)
    n = n_latents + n_errors + n_tokens + 1
    matrix = torch.randn(n, n, generator=generator, dtype=torch.float64) ** 3
    matrix[torch.rand(n, n, generator=generator) < 0.6] = 0
    matrix[:n_latents, :n_latents] = matrix[:n_latents, :n_latents].tril(-1)
    matrix[n_latents:-1] = 0  # errors and tokens have no inputs
    matrix[:, -1] = 0
    latents = torch.stack([torch.arange(n_latents) // 10, torch.zeros(n_latents).long(), torch.arange(n_latents)], 1)
    return Adjacency(matrix, torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64), latents,
                     torch.ones(n_latents, dtype=torch.float64), torch.zeros(n_errors, 2).long(), n_tokens)


def test_influence_and_pruning_equal_circuit_tracers_dense_definitions():
    """Influence is w @ ((I - A)^-1 - I) for the row-normalised |matrix| A; pruning scores the edges of the
    matrix with the pruned nodes' rows and columns zeroed, and keeps the largest of all of them."""
    for seed, (node_share, edge_share) in enumerate([(0.8, 0.98), (0.6, 0.9), (0.5, 1.0), (1.0, 0.5)]):
        adjacency = random_graph(seed=seed)
        a = adjacency.matrix.abs()
        a = a / a.sum(1, keepdim=True).clamp(min=1e-10)
        eye, w = torch.eye(len(a), dtype=torch.float64), adjacency.output_weights
        expected = w @ (torch.linalg.inv(eye - a) - eye)
        assert torch.allclose(node_influence(adjacency), expected, rtol=1e-12, atol=1e-15)

        node_mask, edge_mask, _ = prune(adjacency, node_share, edge_share)
        kept = expected >= find_threshold(expected, node_share)
        kept[adjacency.token_slice.start:] = True
        zeroed = adjacency.matrix * kept[:, None] * kept[None]
        a = zeroed.abs() / zeroed.abs().sum(1, keepdim=True).clamp(min=1e-10)
        edge_scores = a * (w @ torch.linalg.inv(eye - a))[:, None]  # (influence + w), through (I - A)^-1
        edges = edge_scores >= find_threshold(edge_scores.flatten(), edge_share)
        inner, n_latents = adjacency.token_slice.start, adjacency.n_latents
        while True:  # circuit-tracer's clean-up: nodes without kept edges go, with their edges
            before = kept.clone()
            edges &= kept[:, None] & kept[None]
            kept[:inner] &= edges[:, :inner].any(0)
            kept[:n_latents] &= edges[:n_latents].any(1)
            if torch.equal(kept, before):
                break
        assert torch.equal(node_mask, kept), seed
        assert torch.equal(edge_mask, edges), seed
        assert 0 < int(kept.sum()) < len(kept) or node_share == 1.0


# -- the adjacency of a real run ----------------------------------------------------------------------------------


def folded(graph: CircuitGraph, node_id: str) -> dict[tuple, float]:
    """The direct effects on ``node_id`` from latents, errors, MLPs and tokens, with heads and skip
    paths expanded recursively through `contributions` (the existing exact decomposition)."""
    found: dict[tuple, float] = {}

    def walk(node: str, gain: float) -> None:
        for c in graph.contributions(node):
            kind = c.source["kind"]
            if kind in ("head", "skip"):
                source = graph._add_node(c.source, consumer=(node, graph._reader(node)[0]))
                walk(source, gain)
            elif kind != "bias":
                key = ("embedding", c.source["position"]) if kind in ("embedding", "position") else \
                    (kind, c.source["layer"], c.source["position"], c.source.get("latent"))
                found[key] = found.get(key, 0.0) + c.weight * gain

    walk(node_id, 1.0)
    return found


def adjacency_row(graph: CircuitGraph, node_id: str) -> dict[tuple, float]:
    adjacency = graph.adjacency()
    row = graph._adjacency_ids(adjacency).index(node_id)
    found = {}
    for column, node in enumerate(graph._adjacency_ids(adjacency)):
        weight = float(adjacency.matrix[row, column])
        if weight:
            kind, *rest = node.split("/")
            if kind == "latent":
                found[("latent", int(rest[0]), int(rest[2]), int(rest[1]))] = weight
            elif kind == "embedding":
                found[("embedding", int(rest[0]))] = weight
            else:
                found[(kind, int(rest[0]), int(rest[1]), None)] = weight
    return found


@pytest.mark.parametrize("prompt, target", [(PROMPTS[2], LatentTarget(1, 7, -1)),
                                            ("a b c", LogitTarget("3", minus="1"))])  # short: the check recurses
def test_adjacency_matches_the_exact_decomposition(tiny, prompt, target):
    lm, transcoders = tiny
    graph = attribute(lm, transcoders, prompt, target, depth=0)
    adjacency = graph.adjacency()
    # every row sums to its value: direct effects plus the biases
    rows = torch.isfinite(adjacency.values)
    assert torch.allclose((adjacency.matrix.sum(1) + adjacency.bias)[rows], adjacency.values[rows], atol=1e-9)
    assert float(adjacency.values[-1]) == pytest.approx(graph.target_value, abs=1e-12)
    expected = folded(graph, graph.target_id)
    got = adjacency_row(graph, graph.target_id)
    assert set(got) <= set(expected)
    for key, weight in expected.items():
        assert got.get(key, 0.0) == pytest.approx(weight, abs=1e-10), key
    # a latent's row too
    layer, p, latent = adjacency.latents[-1].tolist()
    node = graph._add_node({"kind": "latent", "layer": layer, "latent": latent, "position": p})
    expected, got = folded(graph, node), adjacency_row(graph, node)
    for key, weight in expected.items():
        assert got.get(key, 0.0) == pytest.approx(weight, abs=1e-10), key


def test_a_folded_bos_is_a_constant_and_every_other_edge_is_unchanged(tiny):
    """With ``fold_bos`` (the default) BOS's latents and MLP outputs are constants: each row's direct
    effects from them (in the graph without folding) move into its bias, and every other edge stays."""
    lm, transcoders = tiny
    target = LogitTarget("3", minus="1")
    graph = attribute(lm, transcoders, PROMPTS[0], target, depth=2, top_k=50)
    whole = attribute(lm, transcoders, PROMPTS[0], target, depth=0, fold_bos=False)
    assert graph.settings["folded_positions"] == [0] and whole.settings["folded_positions"] == []
    a, b = graph.adjacency(), whole.adjacency()
    assert (b.latents[:, 1] == 0).any() and not (a.latents[:, 1] == 0).any()
    ids_b = whole._adjacency_ids(b)
    index = {node: i for i, node in enumerate(ids_b)}
    rows = torch.tensor([index[node] for node in graph._adjacency_ids(a)])  # every folded-graph node is in the other
    at_bos = torch.tensor([node.split("/")[0] in ("latent", "error", "mlp") and node.endswith("/0") for node in ids_b])
    assert not at_bos[rows[:a.n_latents]].any() and at_bos[rows].sum() == len(a.errors) // len(graph.tokens)
    torch.testing.assert_close(a.matrix, b.matrix[rows][:, rows] * ~at_bos[rows], rtol=0, atol=1e-10)
    torch.testing.assert_close(a.bias, b.bias[rows] + (b.matrix[rows] * at_bos).sum(1), rtol=0, atol=1e-9)
    torch.testing.assert_close(a.values, b.values[rows], equal_nan=True, rtol=0, atol=0)
    # a head reading BOS: what the MLPs below it wrote there comes as one constant ("bos" bias) per layer
    last = lm.n_layers - 1
    head = graph.nodes[graph._add_node({"kind": "head", "layer": last, "head": 0, "source_position": 0,
                                        "position": graph.target["position"]},
                                       consumer=(graph.target_id, graph._reader(graph.target_id)[0]))]
    sources = [c.source for c in graph.contributions(head.node_id)]
    assert not [s for s in sources if s["kind"] in ("latent", "error", "mlp")]
    assert sorted(s["layer"] for s in sources if s["kind"] == "bias" and s.get("name") == "bos") == \
        list(range(head.layer))
    first = next(s for s in sources if s.get("name") == "bos")
    assert graph.nodes[graph._add_node(first)].label == f"MLP L{first['layer']} at BOS (constant)"
    assert not [n for n in graph.nodes.values() if n.kind in ("latent", "error", "mlp") and n.position == 0]


def test_adjacency_edges_match_finite_differences(tiny):
    """A latent's edge to the target: activation × the target's change per unit of the latent's
    activation, every MLP output frozen except through the skip transcoder's skip path (layer 1),
    every attention head open (values flow, patterns frozen): circuit-tracer's replacement model.
    A layer-0 latent's effect also flows through layer 1's skip path, a linear route, not an error."""
    lm, transcoders = tiny
    graph = attribute(lm, transcoders, PROMPTS[0], LogitTarget("3", minus="1"), depth=0)
    adjacency = graph.adjacency()
    frozen = FrozenModel(lm)
    tokens = torch.tensor(graph.tokens)
    p = graph.target["position"]
    skips = {layer: tc for layer, tc in transcoders.items() if tc.config.kind == "skip"}
    assert skips, "the tiny fixture needs a skip transcoder"
    row = adjacency.matrix[-1, :adjacency.n_latents]
    earlier = torch.nonzero((adjacency.latents[:, 1] < p) & (row != 0)).flatten()
    below = torch.nonzero((adjacency.latents[:, 0] < min(skips)) & (row != 0)).flatten()  # through a skip path
    chosen = row.abs().topk(2).indices.tolist() + [int(earlier[row[earlier].abs().argmax()]),
                                                    int(below[row[below].abs().argmax()])]
    for index in chosen:
        layer, position, latent = adjacency.latents[index].tolist()
        tc = transcoders[layer].double()
        step = tc.W_dec[latent].detach() / tc.config.output_scale * 0.5

        def read(logits, mlp_inputs):
            return float(logits[p, graph.target["token"]].mean() - logits[p, graph.target["minus"]].mean())

        frozen.record(tokens)
        base = frozen.run(tokens, layer=layer, position=position, delta=0 * step, open_layer="all", read=read,
                          skips=skips)
        moved = frozen.run(tokens, layer=layer, position=position, delta=step, open_layer="all", read=read,
                           skips=skips)
        measured = (moved - base) / 0.5 * float(adjacency.activations[index])
        assert float(row[index]) == pytest.approx(measured, rel=1e-6, abs=1e-9), (layer, position, latent)
    # and without the skip path the layer-0 latent's edge would be different: the path is in the edge
    layer, position, latent = adjacency.latents[chosen[-1]].tolist()
    step = transcoders[layer].W_dec[latent].detach() / transcoders[layer].config.output_scale * 0.5
    closed = [frozen.run(tokens, layer=layer, position=position, delta=d, open_layer="all", read=read)
              for d in (0 * step, step)]
    without = (closed[1] - closed[0]) / 0.5 * float(adjacency.activations[chosen[-1]])
    assert abs(float(row[chosen[-1]]) - without) > 1e-6 * abs(float(row[chosen[-1]]))


def dense_scores(adjacency: Adjacency) -> tuple[float, float]:
    """circuit-tracer 0.5.0's ``compute_graph_scores`` written densely (one output, weight 1)."""
    a = adjacency.matrix.abs()
    a = a / a.sum(1, keepdim=True).clamp(min=1e-10)
    eye, w = torch.eye(len(a), dtype=torch.float64), adjacency.output_weights
    influence = w @ (torch.linalg.inv(eye - a) - eye)
    errors, tokens = adjacency.error_slice, adjacency.token_slice
    replacement = influence[tokens].sum() / (influence[tokens].sum() + influence[errors].sum())
    outputs = influence + w
    completeness = ((1 - a[:, errors].sum(1)) * outputs).sum() / outputs.sum()
    return float(replacement), float(completeness)


def test_scores_and_pruning_of_a_real_graph(tiny):
    lm, transcoders = tiny
    graph = attribute(lm, transcoders, PROMPTS[0], LogitTarget("3", minus="1"), depth=2, top_k=4, threshold=0)
    replacement, completeness = graph.scores()
    assert 0 < replacement < 1 and 0 < completeness < 1
    # with a skip transcoder among them (layer 1): its skip path is folded into the edges, not an error
    assert (replacement, completeness) == pytest.approx(dense_scores(graph.adjacency()), rel=1e-9)
    pruned = graph.prune(node_threshold=0.6, edge_threshold=0.9)
    assert pruned.scores() == graph.scores()
    kinds = {n.kind for n in pruned.nodes.values()}
    assert kinds <= {"latent", "error", "embedding", "logit"} and "embedding" in kinds
    assert all(0 <= n.influence <= 1 for n in pruned.nodes.values())
    ids = graph._adjacency_ids(graph.adjacency())
    assert len(pruned.nodes) < len(ids)
    # every kept latent and error sends an edge, every kept latent receives one
    for node in pruned.nodes.values():
        if node.kind in ("latent", "error"):
            assert any(e.source == node.node_id for e in pruned.edges.values())
        if node.kind == "latent":
            assert any(e.target == node.node_id for e in pruned.edges.values())
    # the largest influences survive node pruning
    ranks = {node_id: float(r) for node_id, r in zip(ids, prune(graph.adjacency(), 0.6, 0.9)[2])}
    best = min((i for i in ids if i.startswith("latent")), key=ranks.get)
    assert best in pruned.nodes


def test_graphs_of_the_same_transcoders_share_their_frozen_copies_until_one_is_edited(tiny):
    lm, transcoders = tiny
    first = attribute(lm, transcoders, PROMPTS[0], LogitTarget("3"), depth=0)
    second = attribute(lm, transcoders, PROMPTS[1], LatentTarget(2, 5), depth=0)
    assert first._run.layers[1].tc is second._run.layers[1].tc  # one copy, not one per graph
    assert first._run.layers[1].tc.W_dec.dtype == transcoders[1].W_dec.dtype  # in its own precision
    assert first._run.layers[0].ov is second._run.layers[0].ov
    with torch.no_grad():
        transcoders[1].W_dec.data[3] *= 2  # an edit no tensor version counts
    try:
        edited = attribute(lm, transcoders, PROMPTS[0], LogitTarget("3"), depth=0)
        assert edited._run.layers[1].tc is not first._run.layers[1].tc
        assert torch.equal(edited._run.layers[1].tc.W_dec, transcoders[1].W_dec)
        assert not torch.equal(first._run.layers[1].tc.W_dec, edited._run.layers[1].tc.W_dec)
    finally:
        with torch.no_grad():
            transcoders[1].W_dec.data[3] /= 2


# -- graph files -------------------------------------------------------------------------------------------------

#: circuit-tracer 0.5.0's pydantic models (frontend/graph_models.py), as {field: (types, required)}
CT_METADATA = {"slug": ((str,), True), "scan": ((str,), True), "transcoder_list": ((list,), True),
               "prompt_tokens": ((list,), True), "prompt": ((str,), True),
               "node_threshold": ((float, int, type(None)), False), "schema_version": ((int, type(None)), False)}
CT_QPARAMS = {"pinnedIds": ((list,), True), "supernodes": ((list,), True), "linkType": ((str,), True),
              "clickedId": ((str,), True), "sg_pos": ((str,), True)}
CT_NODE = {"node_id": ((str,), True), "feature": ((int,), True), "layer": ((str,), True), "ctx_idx": ((int,), True),
           "feature_type": ((str,), True), "token_prob": ((float, int), False), "is_target_logit": ((bool,), False),
           "run_idx": ((int,), False), "reverse_ctx_idx": ((int,), False), "jsNodeId": ((str,), True),
           "clerp": ((str,), False), "influence": ((float, int, type(None)), False),
           "activation": ((float, int, type(None)), False)}
CT_LINK = {"source": ((str,), True), "target": ((str,), True), "weight": ((float, int), True)}


def check_schema(item: dict, schema: dict, what: str) -> None:
    for name, (types, required) in schema.items():
        assert name in item or not required, f"{what} lacks {name}"
        if name in item:
            assert isinstance(item[name], types) and not (int in types and isinstance(item[name], bool)
                                                          and bool not in types), (what, name, item[name])


def test_circuit_tracer_files_follow_its_schema_and_round_trip(tiny, tmp_path):
    lm, transcoders = tiny
    graph = attribute(lm, transcoders, PROMPTS[0], LogitTarget("3", minus="1"), depth=2, top_k=5, threshold=0)
    for head in [n for n in graph.nodes.values() if n.kind == "head"][:2]:
        graph.expand(head.node_id, top_k=3, threshold=0)
    path = graph.save(tmp_path / "ct", format="circuit-tracer", slug="war")
    data = json.loads(path.read_text())
    check_schema(data["metadata"], CT_METADATA, "metadata")
    check_schema(data["qParams"], CT_QPARAMS, "qParams")
    for node in data["nodes"]:
        check_schema(node, CT_NODE, node["node_id"])
    for link in data["links"]:
        check_schema(link, CT_LINK, "link")
    listed = json.loads((tmp_path / "ct" / "graph-metadata.json").read_text())
    assert [g["slug"] for g in listed["graphs"]] == ["war"] and listed["graphs"][0] == data["metadata"]

    ids = [n["node_id"] for n in data["nodes"]]
    assert len(ids) == len(set(ids)) and all(l["source"] in ids and l["target"] in ids for l in data["links"])
    # what the frontend needs to draw every node: the logit's "(p=…)", influences within the threshold
    logit = next(n for n in data["nodes"] if n["feature_type"] == "logit")
    assert logit["is_target_logit"] and f"(p={graph.target['probability']:.3f})" in logit["clerp"]
    assert graph.target["probability"] == pytest.approx(float(torch.softmax(
        graph._run.logits[graph.target["position"]], -1)[graph.target["token"]].sum()))
    threshold = data["metadata"]["node_threshold"]
    assert all(n["influence"] <= threshold for n in data["nodes"] if n["feature_type"] not in ("embedding", "logit"))
    latent = next(n for n in graph.nodes.values() if n.kind == "latent")
    exported = next(n for n in data["nodes"] if n["node_id"] == f"{latent.layer}_{latent.latent}_{latent.position}")
    assert exported["feature"] == cantor(latent.layer, latent.latent) and exported["layer"] == str(latent.layer)
    # influence ranks are those of the full graph
    ranks = dict(zip(graph._adjacency_ids(graph.adjacency()), prune(graph.adjacency())[2].tolist()))
    assert exported["influence"] == pytest.approx(ranks[latent.node_id])

    back = CircuitGraph.load(tmp_path / "ct")
    assert back.target_id == f"logit/{graph.target['token'][0]}/{graph.target['position']}"
    kept = {n.node_id for n in graph.nodes.values() if n.kind in ("latent", "error", "mlp")}
    assert kept <= set(back.nodes)
    folded = sum(l["weight"] for l in data["links"] if l["target"] == logit["node_id"])
    assert back.target_value == pytest.approx(folded)
    assert len(back.edges) == len(data["links"])

    # our own format round-trips whole
    graph.save(tmp_path / "ours")
    again = CircuitGraph.load(tmp_path / "ours")
    assert again.to_json() == json.loads(json.dumps(graph.to_json()))
    # and a pruned graph carries its scores and thresholds
    pruned = graph.prune(0.7, 0.95)
    pruned.save(tmp_path / "pruned")
    assert CircuitGraph.load(tmp_path / "pruned").scores() == pruned.scores()


def test_loading_bad_graph_files_says_why(tmp_path, tiny):
    with pytest.raises(GraphFileError, match="missing"):
        CircuitGraph.load(tmp_path)
    (tmp_path / "x.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(GraphFileError, match="neither a tcwidgets graph nor a circuit-tracer graph"):
        CircuitGraph.load(tmp_path / "x.json")
    lm, transcoders = tiny
    graph = attribute(lm, transcoders, PROMPTS[0], LogitTarget("3"), depth=1, top_k=3)
    graph.save(tmp_path / "two", format="circuit-tracer", slug="a")
    graph.save(tmp_path / "two", format="circuit-tracer", slug="b")
    with pytest.raises(GraphFileError, match="pass slug"):
        CircuitGraph.load(tmp_path / "two")
    assert CircuitGraph.load(tmp_path / "two", slug="b").prompt == graph.prompt
    with pytest.raises(CircuitError, match="not a graph format"):
        graph.save(tmp_path / "x", format="neuronpedia")


# -- Gemma 2 and Gemma 3 in the exact replay -------------------------------------------------------------------------

GEMMA = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16)


def gemma_sites(post_mlp_norm: str = "post_feedforward_layernorm") -> tcw.Sites:
    return tcw.Sites(layers="model.layers", mlp="mlp", pre_mlp_norm="pre_feedforward_layernorm", attention="self_attn",
                     pre_attention_norm="input_layernorm", embed="model.embed_tokens", final_norm="model.norm",
                     unembed="lm_head", post_mlp_norm=post_mlp_norm)


def tiny_gemma(lm, config):
    torch.manual_seed(2)
    module = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # random norm weights, so that (1 + weight) is visibly not the identity
        for name, parameter in module.named_parameters():
            if "norm" in name:
                parameter.normal_(0, 0.3)
    model = tcw.load_model(module, tokenizer=lm.tokenizer, sites=gemma_sites())
    return model, {0: random_transcoder(model, 0), 1: random_transcoder(model, 1, kind="skip", activation="relu")}


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_gemma_contributions_sum_exactly(lm, family):
    if family == "gemma2":
        config = transformers.Gemma2Config(**GEMMA, final_logit_softcapping=5.0, attn_logit_softcapping=20.0)
    else:
        config = transformers.Gemma3TextConfig(**GEMMA, sliding_window=4, layer_types=[
            "sliding_attention", "full_attention", "sliding_attention"])
    model, transcoders = tiny_gemma(lm, config)
    prompt = "The cat 17 sat"  # short: the decomposition check recurses through every head
    for target in (LogitTarget("3", minus="1"), LatentTarget(1, 5, -1), LogitTarget(" the", position=3)):
        graph = attribute(model, transcoders, prompt, target, depth=1, top_k=None, threshold=0)
        direct = graph.predecessors(graph.target_id)
        assert sum(e.weight for e in direct) == pytest.approx(graph.target_value, abs=1e-10)
        adjacency = graph.adjacency()
        rows = torch.isfinite(adjacency.values)
        assert torch.allclose((adjacency.matrix.sum(1) + adjacency.bias)[rows], adjacency.values[rows], atol=1e-9)
        if isinstance(target, LatentTarget):
            assert graph.target_value == pytest.approx(model_value(model, transcoders, graph), abs=1e-4)
        else:  # the pre-cap logit: the model's logit is cap · tanh(it / cap)
            cap = getattr(config, "final_logit_softcapping", None)
            p = graph.target["position"]
            logits = graph._run.logits[p]
            if cap:
                logits = cap * torch.atanh(logits / cap)
            expected = float(logits[graph.target["token"]].mean() - (logits[graph.target["minus"]].mean()
                                                                     if graph.target["minus"] else 0))
            assert graph.target_value == pytest.approx(expected, abs=1e-4)
        expected, got = folded(graph, graph.target_id), adjacency_row(graph, graph.target_id)
        for key, weight in expected.items():
            assert got.get(key, 0.0) == pytest.approx(weight, abs=1e-9), key


@pytest.mark.slow
def test_gemma3_270m_attribution_is_exact():
    """The real Gemma 3 270M (`load_model("gemma3-270m")`): the replay reproduces the model, the
    contributions into the target sum to its value, the full graph's rows to theirs (about 1 min)."""
    lm = tcw.load_model("gemma3-270m")
    transcoders = {3: random_transcoder(lm, 3, n_latents=512), 9: random_transcoder(lm, 9, kind="skip", n_latents=512)}
    digits = [str(d) for d in range(10)]
    for target in (LogitTarget(digits[5:], minus=digits[:5]), LatentTarget(9, 11, -1)):
        graph = attribute(lm, transcoders, PROMPTS[0], target, depth=1, top_k=None, threshold=0)
        assert sum(e.weight for e in graph.predecessors(graph.target_id)) == pytest.approx(graph.target_value, abs=1e-9)
        assert graph.target_value == pytest.approx(model_value(lm, transcoders, graph), abs=1e-4)
        adjacency = graph.adjacency()
        rows = torch.isfinite(adjacency.values)
        assert torch.allclose((adjacency.matrix.sum(1) + adjacency.bias)[rows], adjacency.values[rows], atol=1e-9)
        assert 0 < graph.scores().replacement < 1
