"""Circuits: attribution speed, CircuitView render speed, and the greater-than case study.

    python bench/circuits.py timing      [--out DIR] [--random-transcoders]
    python bench/circuits.py case-study  [--out DIR] [--prompts 20]
    python bench/circuits.py circuit-tracer [--python /tmp/ct-venv/bin/python]

``circuit-tracer``: circuit-tracer 0.5.0's own ``compute_graph_scores`` and ``prune_graph`` run on our
adjacency matrix (in its venv) against ours, and its frontend's count of our exported graphs' nodes.

``timing``:

- attribute: `tcw.attribute` on a 20-token prompt of the default model with transcoders on 6
  layers: the frozen forward pass and float64 replay alone (``depth=0``), and two 3-level searches,
  the case study's logit difference (top 12 per node) and the most active latent of the last
  transcoder (top 5 per node, no threshold, so every level is full); medians of 5 (target: 10 s);
- render: a synthetic graph of 2,000 nodes and 20,000 edges drawn by `CircuitView` in JupyterLab and
  Chromium: the page's own time to build and draw it (target: under 1 s), the time from the cell's
  start to the drawn widget, and the redraw after a threshold change and on hover.

``case-study`` (tutorials/case-study-greater-than.md): on 20 prompts "The war lasted from the year 17YY
to the year 17", measures how much probability the default model puts on tens digits larger than
YY's versus smaller ones; attributes the logit difference (mean logit of the larger digits minus
that of the smaller) through transcoders on 6 layers; then ablates (zeroes, error terms kept) the
latents with the largest positive attribution and, as a control, as many matched latents (same layer and
position, similar activation: `tcwidgets.tutorials.greater_than.causal_check`).

Transcoders for the case study (and for ``timing`` unless ``--random-transcoders``) are trained once
with `tcw.train_transcoder` on the last six layers, on 100k tokens of the default corpus plus 20k
tokens of sentences about year ranges (`year_sentences`; none uses the evaluation template), and
cached in ``/tmp/tcw-circuits/`` (``$TCW_CIRCUITS_CACHE``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import tcwidgets as tcw  # noqa: E402
from browser.harness import JupyterLab, NotebookPage, chromium, write_notebook  # noqa: E402
from tcwidgets.circuits import FORMAT, VERSION, LatentTarget, LogitTarget, attribute  # noqa: E402
from tcwidgets.interventions import encode_prompt  # noqa: E402
from tcwidgets.models import resolve  # noqa: E402
from tcwidgets.splicing import splice  # noqa: E402
from tcwidgets.tutorials.greater_than import (TEMPLATE, causal_check, digit_ids, greater_target, metrics, prompts,  # noqa: E402
                                              year_sentences)

CACHE = Path(os.environ.get("TCW_CIRCUITS_CACHE", "/tmp/tcw-circuits"))
LAYERS = [24, 25, 26, 27, 28, 29]
N_LATENTS, K, EPOCHS, BATCH = 3072, 32, 2, 256
DOCS_TOKENS, YEAR_TOKENS = 100_000, 20_000
PROMPT_20 = "The war in Europe lasted from the year 1732 to the year 17"


def transcoders(lm: tcw.Model, random_init: bool = False) -> dict[int, tcw.Transcoder]:
    """The case study's transcoders: loaded from the cache, else trained once (or random ones)."""
    if random_init:
        torch.manual_seed(0)
        return {layer: tcw.Transcoder(tcw.TranscoderConfig(d_in=lm.d_model, d_out=lm.d_model, n_latents=N_LATENTS,
                                                           k=K, site={"model": lm.name, "layer": layer}))
                for layer in LAYERS}
    folder = CACHE / "transcoders"
    missing = [layer for layer in LAYERS if not (folder / f"layer-{layer}" / "config.json").is_file()]
    if missing:
        tokens = torch.cat([tcw.load_corpus("python-docs", lm, context=128, n_tokens=DOCS_TOKENS),
                            tcw.load_corpus(year_sentences(), lm, context=128, n_tokens=YEAR_TOKENS)])
        store = tcw.collect_activations(lm, LAYERS, tokens, out=CACHE / "store", batch_size=16)
        for layer in missing:
            start = time.perf_counter()
            tc = tcw.train_transcoder(store, layer, n_latents=N_LATENTS, k=K, epochs=EPOCHS, batch_size=BATCH,
                                      progress=False)
            tc.save(folder / f"layer-{layer}")
            print(f"trained layer {layer} in {time.perf_counter() - start:.0f} s", flush=True)
    return {layer: tcw.Transcoder.load(folder / f"layer-{layer}") for layer in LAYERS}


# -- timing -------------------------------------------------------------------------------------------------------


def time_attribute(lm: tcw.Model, tcs: dict, results: dict, repeats: int = 5) -> None:
    """Median times of `attribute` on a 20-token prompt: the forward pass and replay alone, and two
    3-level searches (the case study's logit difference; a latent, every level filled to top_k)."""
    tokens = encode_prompt(lm, PROMPT_20)
    n_tokens = tokens.shape[1]
    assert n_tokens == 20, n_tokens
    last = max(tcs)  # the most active latent of the last transcoder at the last position
    strongest = int(splice(lm, {last: tcs[last]}, tokens, mode="error", save_latents=True,
                           progress=False).latents[last][0, -1].argmax())
    searches = {
        "logit_difference": (greater_target(3), {"depth": 3, "top_k": 12, "threshold": 0.01}),
        "latent": (LatentTarget(last, strongest, -1), {"depth": 3, "top_k": 5, "threshold": 0.0}),
    }
    attribute(lm, tcs, PROMPT_20, searches["logit_difference"][0], depth=0)  # warm-up
    timings: dict = {"prompt_tokens": n_tokens, "layers": sorted(tcs), "n_latents": tcs[max(tcs)].n_latents}
    replay = []
    for _ in range(repeats):
        start = time.perf_counter()
        attribute(lm, tcs, PROMPT_20, searches["logit_difference"][0], depth=0)
        replay.append(time.perf_counter() - start)
    timings["forward_and_replay_s"] = statistics.median(replay)
    for name, (target, settings) in searches.items():
        seconds, graph = [], None
        for _ in range(repeats):
            start = time.perf_counter()
            graph = attribute(lm, tcs, PROMPT_20, target, **settings)
            seconds.append(time.perf_counter() - start)
        timings[name] = {**settings, "attribute_s": statistics.median(seconds), "nodes": len(graph.nodes),
                         "edges": len(graph.edges), "expanded": sum(n.expanded for n in graph.nodes.values())}
    # expanding one node (what CircuitView's Expand does): the 30 strongest heads and latents of a
    # graph that holds every direct contribution to the logit difference
    graph = attribute(lm, tcs, PROMPT_20, searches["logit_difference"][0], depth=1, top_k=None, threshold=0)
    chosen = sorted((n for n in graph.nodes.values() if n.expandable), key=lambda n: -abs(n.attribution))[:30]
    start = time.perf_counter()
    for node in chosen:
        graph.expand(node.node_id, top_k=5, threshold=0)
    timings["expand_one_node_ms"] = 1000 * (time.perf_counter() - start) / len(chosen)
    timings["graph_after_expanding"] = {"nodes": len(graph.nodes), "edges": len(graph.edges)}
    results["attribute"] = timings


def synthetic_graph(n_nodes: int = 2000, n_edges: int = 20_000, n_tokens: int = 20, n_layers: int = 30,
                    seed: int = 0) -> dict:
    """`CircuitGraph.to_json` data of a random graph that looks like a big attribution graph."""
    rng = random.Random(seed)
    kinds = ["latent"] * 80 + ["head"] * 12 + ["error"] * 4 + ["embedding", "bias", "mlp", "position"]
    nodes = [{"node_id": "logit/19", "kind": "logit", "layer": n_layers, "position": n_tokens - 1, "value": 1.0,
              "attribution": 1.0}]
    while len(nodes) < n_nodes:
        kind = rng.choice(kinds)
        layer = -1 if kind in ("embedding", "position") else rng.randrange(n_layers)
        position = rng.randrange(n_tokens)
        nodes.append({"node_id": f"{kind}/{len(nodes)}", "kind": kind, "layer": layer, "position": position,
                      "latent": rng.randrange(4608) if kind == "latent" else None,
                      "head": rng.randrange(9) if kind == "head" else None,
                      "name": "decoder" if kind == "bias" else None,
                      "attribution": rng.lognormvariate(-3, 1.5) * rng.choice((-1, 1))})
    for node in nodes:
        node.update({key: node.get(key) for key in ("latent", "head", "source_position", "name", "value", "influence",
                                                      "activation")})
        node.update(expanded=node["kind"] in ("latent", "head"), label=node["node_id"])
    order = sorted(range(n_nodes), key=lambda i: (nodes[i]["layer"], nodes[i]["kind"] != "head"))
    rank = {i: r for r, i in enumerate(order)}
    links = {}
    while len(links) < n_edges:
        a, b = rng.sample(range(n_nodes), 2)
        source, target = (a, b) if rank[a] < rank[b] else (b, a)
        if nodes[target]["kind"] in ("latent", "head", "logit"):
            strength = 30 if target == 0 else 1  # the target's inputs are the strongest edges, as in real graphs
            links[(source, target)] = strength * rng.lognormvariate(-3, 1.5) * rng.choice((-1, 1))
    return {"format": FORMAT, "version": VERSION, "model": "synthetic", "prompt": "synthetic",
            "tokens": list(range(n_tokens)), "token_strings": [f"tok{i}" for i in range(n_tokens)],
            "n_layers": n_layers, "target": {"type": "logit", "token": [0], "minus": [], "position": n_tokens - 1},
            "target_id": "logit/19", "settings": {"depth": 3, "top_k": None, "threshold": 0.0, "scale": 1.0},
            "nodes": nodes, "links": [{"source": nodes[s]["node_id"], "target": nodes[t]["node_id"], "weight": w,
                                       "invariant": w, "dependent": 1.0} for (s, t), w in links.items()]}


def time_render(out: Path, results: dict) -> None:
    (out / "big.json").write_text(json.dumps(synthetic_graph()))
    write_notebook(out / "render.ipynb", [
        "import json, time\nfrom tcwidgets.circuits import CircuitGraph\n"
        "from tcwidgets.widgets.circuit_view import CircuitView\n"
        "graph = CircuitGraph.from_json(json.load(open('big.json')))",
        "started = time.time() * 1000\nview = CircuitView(graph)\nview",
        "print('STARTED', started)"])
    with JupyterLab(out) as lab, chromium() as browser:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        notebook = NotebookPage(lab, page, "render.ipynb").open()
        notebook.run_all(timeout=300)
        view = page.locator(".tcw-circuit[data-ready='1']")
        view.wait_for()
        started = float(notebook.output(2).split("STARTED", 1)[1])
        render = {"nodes": int(view.get_attribute("data-total-nodes")),
                  "edges": int(view.get_attribute("data-total-edges")),
                  "page_build_and_draw_ms": float(view.get_attribute("data-render-ms")),
                  "cell_to_drawn_ms": float(view.get_attribute("data-built-at")) - started}
        slider = view.locator("input.tcw-cv-threshold")
        draws = []
        for position in (100, 200, 300, 0):
            slider.evaluate(f"(el) => {{ el.value = {position}; el.dispatchEvent(new Event('input')); }}")
            draws.append(float(view.get_attribute("data-draw-ms")))
        render["threshold_redraw_ms"] = statistics.median(draws)
        slider.evaluate("(el) => { el.value = 200; el.dispatchEvent(new Event('input')); }")
        render["visible_edges_at_4pct"] = int(view.get_attribute("data-visible-edges"))
        slider.evaluate("(el) => { el.value = 0; el.dispatchEvent(new Event('input')); }")
        notebook.screenshot("circuit-view-2000-nodes", page.locator(".tcw-circuit"))
        circle = view.locator("circle.tcw-cv-node").nth(5)
        hovers = []
        for _ in range(5):
            circle.dispatch_event("mouseover")
            hovers.append(float(view.get_attribute("data-draw-ms")))
            circle.dispatch_event("mouseout")
        render["hover_redraw_ms"] = statistics.median(hovers)
        notebook.close()
    results["render"] = render


# -- the greater-than case study ---------------------------------------------------------------------------------------


def mlp_sweep(lm: tcw.Model, tokens: torch.Tensor, tens: list[int], digits: list[int]) -> list[float]:
    """The metric (mean over prompts) with each layer's MLP zero-ablated."""
    return [statistics.mean(metrics(splice(lm, {}, tokens, zero_ablate=[layer], batch_size=32, progress=False).logits,
                                    tens, digits)[0]) for layer in range(lm.n_layers)]


def quality(lm: tcw.Model, tcs: dict, tokens: torch.Tensor) -> dict[int, dict[str, float]]:
    """Per transcoder: FVU on held-out corpus text and relative error at the prompts' last position
    (BOS positions left out: their huge activations would dominate)."""
    docs = tcw.load_corpus("python-docs", lm, context=64, n_tokens=64 * 16, split="test")
    found = {}
    with torch.no_grad():
        runs = {name: splice(lm, {}, t, save_mlp=sorted(tcs), progress=False) for name, t in
                (("docs", docs), ("prompts", tokens))}
        for layer, tc in tcs.items():
            x, y = (v[:, 1:] for v in runs["docs"].mlp[layer])
            fvu = float(((y - tc(x).output) ** 2).sum() / ((y - y.mean((0, 1))) ** 2).sum())
            x, y = (v[:, -1] for v in runs["prompts"].mlp[layer])
            error = float(((y - tc(x).output) ** 2).sum() / (y ** 2).sum())
            found[layer] = {"fvu_docs": fvu, "relative_error_prompts_last": error}
    return found


def describe(lm: tcw.Model, graph, limit: int = 8) -> dict:
    """The example graph's strongest latents (with logit effects) and heads, for the write-up."""
    def token(node):
        return graph.token_strings[node.position]

    latents = sorted((n for n in graph.nodes.values() if n.kind == "latent"), key=lambda n: -abs(n.attribution))
    heads = sorted((n for n in graph.nodes.values() if n.kind == "head"), key=lambda n: -abs(n.attribution))
    by_kind: dict[str, float] = {}
    for c in graph.contributions(graph.target_id):
        by_kind[c.source["kind"]] = by_kind.get(c.source["kind"], 0.0) + c.weight
    return {
        "target_value": graph.target_value, "direct_by_kind": by_kind,
        "nodes": len(graph.nodes), "edges": len(graph.edges),
        "paths": [(a, [graph.nodes[n].label + f" @{graph.nodes[n].position}" for n in path])
                  for a, path in graph.paths(12)],
        "latents": [{"node": n.node_id, "token": token(n), "attribution": n.attribution, "activation": n.activation,
                     "promotes": [lm.tokenizer.decode([i]) for i, _ in graph.logit_effects(n.node_id, 6)["promoted"]]}
                    for n in latents[:limit]],
        "heads": [{"node": n.label, "from": graph.token_strings[n.source_position], "to": token(n),
                   "pattern": float(graph._run.layers[n.layer].pattern[n.head, n.position, n.source_position]),
                   "attribution": n.attribution} for n in heads[:limit]],
    }


def latent_profiles(lm: tcw.Model, tcs: dict, latents: list[tuple[int, int]], clean, years: list[int]) -> list[dict]:
    """For each (layer, latent): its direct effect on the ten digit logits (decoder row through the final
    norm's weight and the unembedding, centred over the digits) and its activation at the last
    position of each prompt."""
    digits = digit_ids(lm)
    unembed = resolve(lm._module, lm.sites.unembed).weight.detach().double()[digits]
    final = resolve(lm._module, lm.sites.final_norm).weight.detach().double()
    found = []
    for layer, latent in latents:
        tc = tcs[layer]
        effect = unembed @ (tc.W_dec[latent].detach().double() / tc.config.output_scale * final)
        found.append({"latent": f"L{layer}/{latent}", "digit_effects": (effect - effect.mean()).tolist(),
                      "activation_by_year": {1700 + y: float(a) for y, a in
                                             zip(years, clean.latents[layer][:, -1, latent].tolist(), strict=True)}})
    return found


def case_study(lm: tcw.Model, tcs: dict, n_prompts: int, n_ablate: int, n_random: int, results: dict) -> None:
    digits = digit_ids(lm)
    rng = random.Random(0)
    years = rng.sample([y for y in range(20, 80) if y % 10 not in (0, 9)], n_prompts)
    tens = [y // 10 for y in years]
    tokens = prompts(lm, years)
    clean = splice(lm, tcs, tokens, mode="error", save_latents=True, progress=False)
    probs, diffs = metrics(clean.logits, tens, digits)
    study: dict = {"years": [1700 + y for y in years], "template": TEMPLATE, "layers": sorted(tcs),
                   "prob_diff": probs, "logit_diff": diffs, "mlp_zero_ablation": mlp_sweep(lm, tokens, tens, digits),
                   "quality": quality(lm, tcs, tokens)}
    example = attribute(lm, tcs, TEMPLATE.format(32), greater_target(3), depth=3, top_k=12, threshold=0.01)
    study["example_1732"] = describe(lm, example)
    study["example_graph"] = example.to_json()

    per_prompt = []
    for i, year in enumerate(years):
        start = time.perf_counter()
        check = causal_check(lm, tcs, year, n_ablate=n_ablate, n_random=n_random, rng=rng)
        row = {"attribute_and_ablate_s": time.perf_counter() - start, **dataclasses.asdict(check)}
        per_prompt.append(row)
        print(f"17{year:02d}: metric {probs[i]:+.3f}, ablate {len(check.ablated)} top {check.top_prob_change:+.3f}, "
              f"matched random {check.random_prob_change:+.3f} ({row['attribute_and_ablate_s']:.1f} s)", flush=True)
    study["per_prompt"] = per_prompt
    counts: dict[tuple[int, int], int] = {}
    for row in per_prompt:
        for layer, latent, _ in row["ablated"]:
            counts[(layer, latent)] = counts.get((layer, latent), 0) + 1
    frequent = sorted(counts, key=lambda key: -counts[key])[:10]
    study["ablated_latents"] = [{"count": counts[key], **profile} for key, profile in
                                zip(frequent, latent_profiles(lm, tcs, frequent, clean, years), strict=True)]
    summary = {key: statistics.mean(r[key] for r in per_prompt) for key in
               ("top_prob_change", "random_prob_change", "top_logit_change", "random_logit_change",
                "predicted_logit_change", "attribute_and_ablate_s")}
    summary.update(metric_mean=statistics.mean(probs), metric_min=min(probs), logit_diff_mean=statistics.mean(diffs),
                   positive=sum(p > 0 for p in probs), n_prompts=len(probs), n_random=n_random,
                   n_ablated_mean=statistics.mean(len(r["ablated"]) for r in per_prompt),
                   top_beats_random=sum(r["top_prob_change"] < r["random_prob_change"] for r in per_prompt))
    study["summary"] = summary
    results["case_study"] = study


CT_SCORES = """
import json, sys, torch
from safetensors.torch import load_file
from circuit_tracer.graph import compute_graph_scores, prune_graph
saved = load_file(sys.argv[1])
class Graph:  # the fields circuit-tracer's functions read
    pass
graph = Graph()
graph.adjacency_matrix, graph.logit_probabilities = saved["matrix"].float(), torch.ones(1)
graph.logit_targets, graph.input_tokens = [0], torch.zeros(int(saved["n_tokens"]))
graph.selected_features = torch.arange(int(saved["n_latents"]))
graph.cfg = Graph()
graph.cfg.n_layers = int(saved["n_layers"])
replacement, completeness = compute_graph_scores(graph)
masks = {}
for node_threshold, edge_threshold in ((0.8, 0.98), (0.6, 0.9)):
    node_mask, edge_mask, ranks = prune_graph(graph, node_threshold, edge_threshold)
    masks[f"{node_threshold}/{edge_threshold}"] = [node_mask.tolist(), edge_mask.flatten().nonzero().flatten().tolist(),
                                                   ranks.tolist()]
print(json.dumps({"scores": [replacement, completeness], "masks": masks}))
"""


def against_circuit_tracer(python: str, out: Path, results: dict) -> None:
    """circuit-tracer's own scores and pruning on our adjacency (in ``python``'s venv, float32 there), and
    its frontend's rendering of our exported graphs (`circuit_tracer_frontend.count_rendered`); on a tiny
    random GPT-2 with random transcoders, as in the tests."""
    import subprocess

    import transformers
    from circuit_tracer_frontend import count_rendered
    from test_circuits import TINY_GPT2, random_transcoder

    from tcwidgets.circuits.adjacency import prune, scores
    from tcwidgets.files import save_tensors

    torch.manual_seed(1)
    lm = tcw.load_model(transformers.AutoModelForCausalLM.from_config(transformers.GPT2Config(**TINY_GPT2)),
                        tokenizer=tcw.load_model().tokenizer)
    tcs = {0: random_transcoder(lm, 0), 1: random_transcoder(lm, 1, kind="skip", activation="relu"),
           2: random_transcoder(lm, 2, activation="jumprelu")}
    graph = attribute(lm, tcs, "The war lasted from the year 1732 to the year 17", LogitTarget("3", minus="1"),
                      depth=3, top_k=6, threshold=0)
    adjacency = graph.adjacency()
    save_tensors(out / "adjacency.safetensors", {
        "matrix": adjacency.matrix, "n_tokens": torch.tensor(adjacency.n_tokens),
        "n_latents": torch.tensor(adjacency.n_latents), "n_layers": torch.tensor(len(adjacency.errors) // adjacency.n_tokens)})
    theirs = json.loads(subprocess.run([python, "-c", CT_SCORES, str(out / "adjacency.safetensors")], check=True,
                                       capture_output=True, text=True).stdout.splitlines()[-1])
    ours = scores(adjacency)
    compared = {"nodes": len(adjacency.matrix), "scores_ours": ours, "scores_circuit_tracer": theirs["scores"],
                "scores_max_difference": max(abs(a - b) for a, b in zip(ours, theirs["scores"]))}
    for key, (node_mask, edges, ranks) in theirs["masks"].items():
        mine = prune(adjacency, *map(float, key.split("/")))
        compared[f"prune {key}"] = {
            "same_nodes": mine[0].tolist() == node_mask,
            "same_edges": torch.nonzero(mine[1].flatten()).flatten().tolist() == edges,
            "rank_max_difference": float((mine[2] - torch.tensor(ranks, dtype=torch.float64)).abs().max())}
    folder = out / "circuit-tracer-graphs"
    graph.save(folder, format="circuit-tracer", slug="search")
    graph.prune(0.8, 0.98).save(folder, format="circuit-tracer", slug="pruned")
    compared["frontend"] = {slug: count_rendered(python, folder, slug=slug) for slug in ("search", "pruned")}
    results["circuit_tracer"] = compared


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("timing", "case-study", "circuit-tracer"), nargs="?", default="timing")
    parser.add_argument("--python", default="/tmp/ct-venv/bin/python",
                        help="circuit-tracer mode: a venv's Python with circuit-tracer 0.5.0 (see circuit_tracer_frontend.py)")
    parser.add_argument("--out", type=Path, default=CACHE / "bench")
    parser.add_argument("--random-transcoders", action="store_true", help="timing with untrained transcoders")
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--ablate", type=int, default=10, help="latents ablated per prompt")
    parser.add_argument("--random-sets", type=int, default=5, help="random control sets per prompt")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"torch_threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    if args.mode == "circuit-tracer":
        sys.path.insert(0, str(ROOT / "bench"))
        against_circuit_tracer(args.python, args.out, results)
        print(json.dumps(results, indent=1))
        return
    lm = tcw.load_model()
    if args.mode == "timing":
        time_attribute(lm, transcoders(lm, args.random_transcoders), results)
        time_render(args.out, results)
    else:
        case_study(lm, transcoders(lm), args.prompts, args.ablate, args.random_sets, results)
    path = args.out / f"{args.mode}.json"
    path.write_text(json.dumps(results, indent=1))
    shown = {k: v for k, v in results.items() if k != "case_study"}
    if "case_study" in results:
        shown["case_study"] = {k: v for k, v in results["case_study"].items() if k != "example_graph"}
    print(json.dumps(shown, indent=1))
    print(f"full results: {path}")


if __name__ == "__main__":
    main()
