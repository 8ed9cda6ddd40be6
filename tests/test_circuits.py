"""Tests for circuits: exact attribution through transcoders, path search, exports, bad input.

Exactness is checked three ways: contributions into every node sum to its value (float64), the
target's value is the model's own (float32 forward pass), and single edges match finite
differences through a float64 copy of the model run with its own modules, attention patterns,
norm scales and every other component frozen by hooks written here (not by circuits.py).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers

import tcwidgets as tcw
from tcwidgets.circuits import CircuitError, CircuitGraph, LatentTarget, LogitTarget, attribute
from tcwidgets.models import resolve
from tcwidgets.splicing import splice
from tcwidgets.transcoder import Transcoder, TranscoderConfig

PROMPTS = ["The war lasted from the year 1732 to the year 17", "def add(a, b):\n    return a + b",
           "Paris is the capital of France, and Berlin is the capital of"]
TINY_GPT2 = dict(vocab_size=49152, n_embd=64, n_layer=3, n_head=4, n_positions=64)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These tests run many small (float64) operations, which extra threads only slow down on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_transcoder(lm, layer: int, *, kind: str = "transcoder", activation: str = "topk",
                      n_latents: int = 128, seed: int = 0) -> Transcoder:
    """A random transcoder with non-trivial scales and biases (and skip weights)."""
    torch.manual_seed(seed)
    tc = Transcoder(TranscoderConfig(d_in=lm.d_model, d_out=lm.d_model, n_latents=n_latents, k=8, kind=kind,
                                     activation=activation, input_scale=0.7, output_scale=1.6,
                                     threshold_init=0.05, site={"model": lm.name, "layer": layer}))
    with torch.no_grad():
        tc.b_enc.normal_(0, 0.3)
        tc.b_dec.normal_(0, 0.3)
        if kind == "skip":
            tc.W_skip.normal_(0, 0.05)
    return tc.eval()


@pytest.fixture(scope="module")
def tiny(lm):
    """A tiny randomly initialised GPT-2 with the default tokenizer, and random transcoders."""
    torch.manual_seed(1)
    model = tcw.load_model(transformers.AutoModelForCausalLM.from_config(transformers.GPT2Config(**TINY_GPT2)),
                           tokenizer=lm.tokenizer)
    transcoders = {0: random_transcoder(model, 0), 1: random_transcoder(model, 1, kind="skip", activation="relu"),
                   2: random_transcoder(model, 2, activation="jumprelu")}
    return model, transcoders


@pytest.fixture(scope="module")
def default_transcoders(lm):
    return {2: random_transcoder(lm, 2, n_latents=256), 4: random_transcoder(lm, 4, kind="skip", n_latents=256),
            6: random_transcoder(lm, 6, activation="relu", n_latents=256)}


def assert_exact(graph: CircuitGraph) -> None:
    """Every expanded node's contributions sum to its value; expanding a node keeps the total."""
    scale = graph.settings["scale"]
    for node in graph.nodes.values():
        if node.expanded:
            contributions = graph.contributions(node.node_id)
            assert sum(c.weight for c in contributions) == pytest.approx(node.value, abs=1e-9 * scale)
            for c in contributions:
                assert c.weight == pytest.approx(c.invariant * c.dependent, abs=1e-12 * scale)


@torch.no_grad()
def model_value(lm, transcoders, graph: CircuitGraph) -> float:
    """The target's value from the model's own (float32) forward pass."""
    target, tokens = graph.target, torch.tensor([graph.tokens])
    p = target["position"]
    if target["type"] == "latent":
        x = splice(lm, {}, tokens, save_mlp=[target["layer"]], progress=False).mlp[target["layer"]][0]
        return float(transcoders[target["layer"]].pre_activations(x)[0, p, target["latent"]])
    logits = splice(lm, {}, tokens, progress=False).logits[0, p].double()
    return float(logits[target["token"]].mean() - (logits[target["minus"]].mean() if target["minus"] else 0))


def random_targets(lm, transcoders, n_tokens: int, seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    layer = max(transcoders)
    latent = int(torch.randint(transcoders[layer].n_latents, (1,), generator=g))
    position = int(torch.randint(n_tokens, (1,), generator=g))
    digits = [str(d) for d in range(10)]
    return [LatentTarget(layer, latent, position), LatentTarget(min(transcoders), 3, -1),
            LogitTarget(digits[5:], -1, minus=digits[:5]), LogitTarget(int(torch.randint(1000, (1,), generator=g)))]


# -- exactness ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", PROMPTS)
def test_contributions_sum_to_the_target_on_a_tiny_gpt2(tiny, prompt):
    lm, transcoders = tiny
    n = len(lm.tokenizer(prompt)["input_ids"])
    for target in random_targets(lm, transcoders, n, seed=len(prompt)):
        everything = attribute(lm, transcoders, prompt, target, depth=1, top_k=None, threshold=0)
        direct = everything.predecessors(everything.target_id)
        assert sum(e.weight for e in direct) == pytest.approx(everything.target_value, abs=1e-10)
        assert everything.target_value == pytest.approx(model_value(lm, transcoders, everything), abs=1e-4)
        kinds = {everything.nodes[e.source].kind for e in direct}
        assert {"head", "embedding", "position", "bias"} <= kinds
        assert_exact(attribute(lm, transcoders, prompt, target, depth=3, top_k=4, threshold=0))


def test_contributions_sum_to_the_target_on_the_default_model(lm, default_transcoders):
    for prompt in PROMPTS[:2]:
        n = len(lm.tokenizer(prompt)["input_ids"])
        for target in random_targets(lm, default_transcoders, n, seed=n)[:3]:
            graph = attribute(lm, default_transcoders, prompt, target, depth=2, top_k=3, threshold=0)
            assert_exact(graph)
            total = sum(c.weight for c in graph.contributions(graph.target_id))
            assert total == pytest.approx(graph.target_value, abs=1e-9 * graph.settings["scale"])
            assert graph.target_value == pytest.approx(model_value(lm, default_transcoders, graph),
                                                       abs=2e-3 * max(1.0, abs(graph.target_value)))


def test_expanding_a_node_preserves_the_total(tiny):
    lm, transcoders = tiny
    graph = attribute(lm, transcoders, PROMPTS[0], LogitTarget("3", minus="1"), depth=2, top_k=30, threshold=0)
    checked = 0
    for edge in graph.predecessors(graph.target_id):
        node = graph.nodes[edge.source]
        if not node.expanded:
            continue
        inner = graph.contributions(node.node_id)
        gain = 1.0 if node.kind in ("head", "skip") else edge.weight / node.value
        assert sum(c.weight * gain for c in inner) == pytest.approx(edge.weight, abs=1e-10)
        checked += 1
    assert checked >= 2


# -- an independent check of single edges: finite differences through frozen float64 models ----------


class FrozenModel:
    """A float64 copy of a model whose attention patterns, norm scales, MLP outputs and attention
    outputs can be frozen at their values on a prompt (hooks and an attention function written
    here, on the model's own modules), so one upstream change reaches the target along chosen
    paths only."""

    def __init__(self, lm) -> None:
        self.lm, self.sites = lm, lm.sites
        self.model = copy.deepcopy(lm._module).double().eval()
        self.model.set_attn_implementation("eager")
        self.norms = [m for m in self.model.modules()
                      if isinstance(m, torch.nn.LayerNorm) or type(m).__name__.endswith("RMSNorm")]
        self.state: dict = {}
        transformers.AttentionInterface.register("tcw_test_frozen", self._attention)

    def block(self, layer: int, part: str) -> torch.nn.Module:
        return resolve(self.model, f"{self.sites.block(layer)}.{part}")

    def record(self, tokens: torch.Tensor) -> None:
        """A plain (eager) pass: patterns, attention and MLP outputs, norm scales."""
        self.state = {"scale": {}, "pattern": {}, "attn": {}, "mlp": {}, "mlp_in": {}, "values": {}}
        hooks = [norm.register_forward_hook(self._record_scale) for norm in self.norms]
        for layer in range(self.lm.n_layers):
            hooks.append(self.block(layer, self.sites.attention).register_forward_hook(
                lambda m, i, o, layer=layer: self.state["pattern"].__setitem__(layer, o[1]) or
                self.state["attn"].__setitem__(layer, o[0])))
            hooks.append(self.block(layer, self.sites.mlp).register_forward_hook(
                lambda m, i, o, layer=layer: self.state["mlp"].__setitem__(layer, o) or
                self.state["mlp_in"].__setitem__(layer, i[0])))
        try:
            with torch.no_grad():
                self.model(tokens[None])
        finally:
            for hook in hooks:
                hook.remove()

    def _skip_change(self, tc, x: torch.Tensor, layer: int) -> torch.Tensor | float:
        """How far a skip transcoder's skip path moves from its recorded value (0 without one)."""
        if tc is None:
            return 0.0
        w = tc.W_skip.detach().double()
        return (x - self.state["mlp_in"][layer]) * tc.config.input_scale @ w.T / tc.config.output_scale

    def _record_scale(self, norm, inputs, output) -> None:
        x = inputs[0]
        centred = x - x.mean(-1, keepdim=True) if isinstance(norm, torch.nn.LayerNorm) else x
        eps = norm.eps if isinstance(norm, torch.nn.LayerNorm) else norm.variance_epsilon
        self.state["scale"][norm] = (centred.pow(2).mean(-1, keepdim=True) + eps).sqrt()

    def _frozen_norm(self, norm, inputs, output) -> torch.Tensor:
        x = inputs[0]
        if isinstance(norm, torch.nn.LayerNorm):
            return (x - x.mean(-1, keepdim=True)) / self.state["scale"][norm] * norm.weight + norm.bias
        return x / self.state["scale"][norm] * norm.weight

    def _attention(self, module, query, key, value, attention_mask, **kwargs):
        """Attention with the recorded pattern; at the open layer, heads other than the open one
        use their recorded values (only the open head's values may change)."""
        layer = module.layer_idx
        value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
        if self.state.get("record_values"):
            self.state["values"][layer] = value
        elif self.state.get("open_head") is not None:
            keep = torch.zeros(value.shape[1], dtype=torch.bool)
            keep[self.state["open_head"]] = True
            value = torch.where(keep[None, :, None, None], value, self.state["values"][layer])
        pattern = self.state["pattern"][layer]
        return (pattern @ value).transpose(1, 2).contiguous(), pattern

    def run(self, tokens: torch.Tensor, *, layer: int, position: int, delta: torch.Tensor,
            open_layer: int | None = None, open_head: int | None = None, read, skips: dict | None = None) -> float:
        """The target (``read(logits, mlp_inputs)``) with ``delta`` added to layer ``layer``'s MLP
        output at ``position``; every MLP output and every attention output is frozen except the
        attention of ``open_layer`` (every layer's with ``"all"``), where only ``open_head``'s
        values may change (every head's when ``None``). ``skips`` (``{layer: skip transcoder}``)
        opens those MLPs' skip paths, as circuit-tracer's replacement model does (its MLP output is
        ``skip + (acts - skip).detach()``): the recorded output plus the skip path's change."""
        self.state["open_head"] = open_head
        mlp_inputs = {}
        hooks = [norm.register_forward_hook(self._frozen_norm) for norm in self.norms]
        for each in range(self.lm.n_layers):
            added = torch.zeros_like(self.state["mlp"][each])
            if each == layer:
                added[0, position] = delta
            mlp = self.block(each, self.sites.mlp)
            hooks.append(mlp.register_forward_pre_hook(lambda m, i, each=each: mlp_inputs.__setitem__(each, i[0])))
            hooks.append(mlp.register_forward_hook(
                lambda m, i, o, each=each, added=added: self.state["mlp"][each] + added + self._skip_change(
                    (skips or {}).get(each), i[0], each)))
            if open_layer != "all" and each != open_layer:
                hooks.append(self.block(each, self.sites.attention).register_forward_hook(
                    lambda m, i, o, each=each: (self.state["attn"][each], o[1])))
        self.model.set_attn_implementation("tcw_test_frozen")
        try:
            with torch.no_grad():
                logits = self.model(tokens[None]).logits[0]
        finally:
            self.model.set_attn_implementation("eager")
            for hook in hooks:
                hook.remove()
        return read(logits, mlp_inputs)


def finite_difference(frozen: FrozenModel, graph: CircuitGraph, transcoders, source: dict, *,
                      open_layer=None, open_head=None, delta: float = 0.5) -> float:
    """d target / d activation of the ``source`` latent along the open paths, measured."""
    tokens = torch.tensor(graph.tokens)
    tc = copy.deepcopy(transcoders[source["layer"]]).double()
    change = torch.zeros(tc.n_latents, dtype=torch.float64)
    change[source["latent"]] = delta
    zero = torch.zeros(tc.d_in, dtype=torch.float64)
    with torch.no_grad():
        step = tc.decode(change, zero) - tc.decode(torch.zeros_like(change), zero)
    target = graph.target

    @torch.no_grad()
    def read(logits, mlp_inputs):
        p = target["position"]
        if target["type"] == "logit":
            row = logits[p]
            return float(row[target["token"]].mean() - (row[target["minus"]].mean() if target["minus"] else 0))
        reader = copy.deepcopy(transcoders[target["layer"]]).double()
        return float(reader.pre_activations(mlp_inputs[target["layer"]])[0, p, target["latent"]])

    frozen.record(tokens)
    frozen.state["record_values"] = True
    base = frozen.run(tokens, layer=source["layer"], position=source["position"], delta=0 * step,
                      open_layer=open_layer, read=read)
    frozen.state["record_values"] = False
    moved = frozen.run(tokens, layer=source["layer"], position=source["position"], delta=step,
                       open_layer=open_layer, open_head=open_head, read=read)
    return (moved - base) / delta


def check_edges(lm, transcoders, prompt: str, target, source_layer: int, head_layer: int) -> None:
    """A direct edge latent -> target and a path latent -> head -> target against finite differences."""
    frozen = FrozenModel(lm)
    graph = attribute(lm, transcoders, prompt, target, depth=1, top_k=None, threshold=0)
    p = graph.target["position"]
    direct = [c for c in graph.contributions(graph.target_id)
              if c.source["kind"] == "latent" and c.source["layer"] == source_layer]
    assert direct
    c = max(direct, key=lambda c: abs(c.weight))
    activation = graph.nodes[f"latent/{source_layer}/{c.source['latent']}/{p}"].activation
    measured = finite_difference(frozen, graph, transcoders, c.source)
    assert measured == pytest.approx(c.invariant * c.dependent / activation, rel=1e-4, abs=1e-7)

    heads = [e for e in graph.predecessors(graph.target_id) if graph.nodes[e.source].kind == "head"
             and graph.nodes[e.source].layer == head_layer and 0 < graph.nodes[e.source].source_position < p]
    # (not from BOS, whose latents are folded into constants)
    head = graph.nodes[max(heads, key=lambda e: abs(e.weight)).source]
    through = [c for c in graph.contributions(head.node_id)
               if c.source["kind"] == "latent" and c.source["layer"] == source_layer]
    assert through
    c = max(through, key=lambda c: abs(c.weight))
    activation = float(graph._run.layers[source_layer].latents[head.source_position, c.source["latent"]])
    measured = finite_difference(frozen, graph, transcoders, c.source, open_layer=head.layer, open_head=head.head)
    assert measured == pytest.approx(c.invariant * c.dependent / activation, rel=1e-4, abs=1e-7)


def test_single_edges_match_finite_differences_on_a_tiny_gpt2(tiny):
    lm, transcoders = tiny
    check_edges(lm, transcoders, PROMPTS[0], LatentTarget(2, 7, -1), source_layer=0, head_layer=1)
    check_edges(lm, transcoders, PROMPTS[2], LogitTarget("3", minus="1"), source_layer=1, head_layer=2)


def test_single_edges_match_finite_differences_on_the_default_model(lm, default_transcoders):
    check_edges(lm, default_transcoders, PROMPTS[0], LatentTarget(6, 11, -1), source_layer=2, head_layer=5)


# -- path search, paths, exports ------------------------------------------------------------------------------


def test_path_search_respects_its_limits(tiny):
    lm, transcoders = tiny
    graph = attribute(lm, transcoders, PROMPTS[0], LogitTarget("3", minus="1"), depth=2, top_k=3, threshold=0.02)
    assert graph.settings["depth"] == 2
    scale = graph.settings["scale"]
    for node in graph.nodes.values():
        if node.expanded:
            kept = [e for e in graph.predecessors(node.node_id) if graph.nodes[e.source].kind != "bias"]
            assert len(kept) <= 3
    assert graph.nodes[graph.target_id].expanded
    assert all(abs(n.attribution) >= 0.02 * scale * 0.999 or n.kind == "bias" for n in graph.nodes.values()
               if n.node_id != graph.target_id and n.kind != "head")
    paths = graph.paths(5)
    assert paths and paths[0][1][-1] == graph.target_id
    assert [abs(a) for a, _ in paths] == sorted((abs(a) for a, _ in paths), reverse=True)
    # fully expanded (a layer-0 latent: heads of layer 0 read only embeddings), the paths sum to the target
    full = attribute(lm, transcoders, PROMPTS[0], LatentTarget(0, 5, -1), depth=2, top_k=None, threshold=0)
    assert all(n.expanded for n in full.nodes.values() if n.expandable)
    every = full.paths(limit=10**6, min_attribution=0)
    assert sum(a for a, _ in every) == pytest.approx(full.target_value, abs=1e-9)
    graph = attribute(lm, transcoders, PROMPTS[0], LatentTarget(2, 7, -1), depth=1, top_k=10, threshold=0)
    frontier = [n.node_id for n in graph.nodes.values() if n.expandable and not n.expanded]
    assert frontier and not any(graph.nodes[n].expanded for n in frontier)
    added = graph.expand(frontier[0], top_k=2, threshold=0)
    assert graph.nodes[frontier[0]].expanded and 0 < len(added) <= 2 + 1  # plus possibly a bias
    assert_exact(graph)


def test_json_round_trip(tiny):
    lm, transcoders = tiny
    graph = attribute(lm, transcoders, PROMPTS[0], LogitTarget("3", minus="1"), depth=1, top_k=None, threshold=0)
    heads = [e.source for e in graph.predecessors(graph.target_id) if graph.nodes[e.source].kind == "head"]
    for head in heads[:3]:
        graph.expand(head, top_k=5, threshold=0)
    data = json.loads(json.dumps(graph.to_json()))
    back = CircuitGraph.from_json(data)
    assert back.to_json() == data
    old_names = {**data, "version": 1, "nodes": [  # version 1 wrote ctx_idx, feature, source_ctx_idx
        {{"position": "ctx_idx", "latent": "feature", "source_position": "source_ctx_idx"}.get(k, k): v
         for k, v in node.items() if k != "influence"} for node in data["nodes"]]}
    assert CircuitGraph.from_json(old_names).to_json() == {**data, "nodes": [
        {**node, "influence": None} for node in data["nodes"]]}
    with pytest.raises(CircuitError, match="read from a file or JSON"):
        back.expand(next(n for n in back.nodes if back.nodes[n].expandable))

# -- bad input -----------------------------------------------------------------------------------------------------


def test_bad_input_gives_clear_errors(lm, tiny, default_transcoders):
    small, transcoders = tiny
    with pytest.raises(CircuitError, match="needs that layer's transcoder"):
        attribute(small, {0: transcoders[0]}, PROMPTS[0], LatentTarget(2, 0, 0))
    with pytest.raises(CircuitError, match="outside the prompt"):
        attribute(small, transcoders, PROMPTS[0], LatentTarget(2, 0, 40))
    with pytest.raises(CircuitError, match="outside the prompt"):
        attribute(small, transcoders, PROMPTS[0], LogitTarget("3", position=-40))
    with pytest.raises(ValueError, match="trained on another model"):
        attribute(lm, {0: transcoders[0]}, PROMPTS[0], LogitTarget("3"))
    with pytest.raises(CircuitError, match="does not exist"):
        attribute(small, transcoders, PROMPTS[0], LatentTarget(2, 10_000, 0))
    with pytest.raises(CircuitError, match="not one"):
        attribute(small, transcoders, PROMPTS[0], LogitTarget(" 1732"))
    sae = random_transcoder(small, 1, kind="sae")
    with pytest.raises(CircuitError, match="SAEs"):
        attribute(small, {1: sae}, PROMPTS[0], LogitTarget("3"))
    phi = tcw.load_model(transformers.AutoModelForCausalLM.from_config(transformers.Phi3Config(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0)), tokenizer=lm.tokenizer, sites=tcw.Sites(
        layers="model.layers", mlp="mlp", pre_mlp_norm="post_attention_layernorm", attention="self_attn",
        pre_attention_norm="input_layernorm", embed="model.embed_tokens", final_norm="model.norm", unembed="lm_head"))
    with pytest.raises(CircuitError, match="does not support 'phi3'"):
        attribute(phi, {}, PROMPTS[0], LogitTarget("3"))


# -- CircuitView, Python side (the browser tests are in test_circuit_view_browser.py) -----------------------


def test_circuit_view_payload_and_messages(tiny):
    from tcwidgets.widgets.circuit_view import CircuitView

    lm, transcoders = tiny
    graph = attribute(lm, transcoders, PROMPTS[0], LatentTarget(2, 7, -1), depth=1, top_k=8, threshold=0)
    view = CircuitView(graph, threshold=0.05)
    payload = view._graph
    assert payload["nodes"]["id"][payload["target"]] == graph.target_id
    assert len(payload["edges"]["source"]) == len(graph.edges) and payload["tokens"] == graph.token_strings
    assert json.loads(json.dumps(payload)) == payload

    latent = next(n for n in graph.nodes.values() if n.kind == "latent" and n.node_id != graph.target_id)
    view._on_message(None, {"type": "select", "id": latent.node_id}, [])
    assert view.selected == latent.node_id and view.selected_latent == (latent.layer, latent.latent)
    view._on_message(None, {"type": "select", "id": "nope"}, [])
    assert view.selected == latent.node_id and "No node 'nope'" in view.error
    view._on_message(None, {"type": "pin", "id": latent.node_id, "pinned": True}, [])
    assert view.pinned == [latent.node_id] and view.error == ""
    view._on_message(None, {"type": "threshold", "value": 2.0}, [])
    assert view.threshold == 0.05 and "from 0 to 1" in view.error

    sent = []
    view.send = sent.append
    view._on_message(None, {"type": "summary", "request": "r1", "id": latent.node_id}, [])
    summary = sent[-1]["summary"]
    assert sent[-1]["request"] == "r1" and summary["kind"] == "latent" and len(summary["promoted"]) == 5
    assert summary["outgoing"] and summary["outgoing"][0][0] == graph.nodes[graph.target_id].label
    before = len(graph.nodes)
    view._on_message(None, {"type": "expand", "request": "r2", "id": latent.node_id}, [])
    assert sent[-1] == {"type": "expanded", "request": "r2", "added": len(graph.nodes) - before}
    assert graph.nodes[latent.node_id].expanded and len(view._graph["nodes"]["id"]) == len(graph.nodes)
    leaf = next(n.node_id for n in graph.nodes.values() if not n.expandable and n.kind != "logit")
    view._on_message(None, {"type": "expand", "request": "r3", "id": leaf}, [])
    assert sent[-1]["added"] == 0 and "no predecessors" in view.error

    class Dashboard:
        feature = -1

    dashboard = Dashboard()
    view.link_dashboard(dashboard, latent.layer)
    view.selected = ""
    view.selected = latent.node_id
    assert dashboard.feature == latent.latent
    with pytest.raises(TypeError, match="CircuitGraph"):
        CircuitView(graph.to_json())
