"""Notebook 07's every-layer skip transcoders: trained with or without each context's BOS position,
with the skip path started at its least-squares fit or at zero; the graphs' scores and makeup.

    OMP_NUM_THREADS=1 python bench/bos_circuits.py --init lsq --bos drop --epochs 4 [--tokens 24576] \
        [--root FOLDER]

Trains skip transcoders on all 30 layers (2 × d_model latents, k=8, batch 256, as
`tutorials.circuit_transcoders`) on the circuits' store (`tutorials.cache._circuit_store`, which
leaves BOS out; ``--bos keep`` trains on every position instead), with ``--init zero`` for the
skip path started at zero (no least-squares fit). The store and the transcoders are kept under
``--root`` (default ``$TCWIDGETS_CACHE/bench-bos-circuits``), so a second run only measures. Then,
on the greater-than prompts (start years 1732, 1745, 1761, the case study's target): replacement
and completeness scores, the node kinds of ``prune(0.6, 0.9)``, and on 1732 the direct
contributions by kind, the search graph's makeup (depth 3, top 12, as notebook 07) and two more
prunings; and the causal check (`greater_than.causal_check`, 3 controls) on 1732 and 1745.
"""

from __future__ import annotations

import argparse
import collections
import time
from pathlib import Path

import torch

import tcwidgets as tcw
from tcwidgets import training
from tcwidgets.models import cache_dir
from tcwidgets.tutorials.cache import _circuit_store
from tcwidgets.tutorials.greater_than import TEMPLATE, causal_check, greater_target

YEARS = [32, 45, 61]


def zero_skip_init() -> None:
    """The skip path started at zero and the latents on the whole target (before the least-squares start)."""
    training.least_squares_skip = lambda xs, ys, ridge=0.0: (torch.zeros(xs.shape[1], xs.shape[1], dtype=torch.float64),
                                                               torch.zeros(ys.shape[1], dtype=torch.float64))
    training._fit_latent_scale = lambda tc, x, residual: None


def kinds(graph: tcw.CircuitGraph) -> dict[str, int]:
    return dict(collections.Counter(node.kind for node in graph.nodes.values()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", choices=["zero", "lsq"], default="lsq")
    parser.add_argument("--bos", choices=["keep", "drop"], default="drop")
    parser.add_argument("--tokens", type=int, default=24_576)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--root", type=Path, help="where the store and the transcoders are kept")
    args = parser.parse_args()
    if args.init == "zero":
        zero_skip_init()
    lm = tcw.load_model()
    layers = list(range(lm.n_layers))
    root = (args.root or cache_dir() / "bench-bos-circuits") / f"{args.tokens}-tokens"
    store = _circuit_store(lm, layers, args.tokens, root / "store")
    if args.bos == "keep":
        store = tcw.ActivationStore.open(root / "store")
    print(store, flush=True)
    folder = root / f"{args.init}-{args.bos}-bos-{args.epochs}-epochs"
    if not (folder / f"layer-{layers[-1]}" / "config.json").is_file():
        start = time.perf_counter()
        trained = tcw.train_transcoder(store, layers, n_latents=2 * lm.d_model, k=8, kind="skip",
                                       epochs=args.epochs, batch_size=256)
        print(f"trained in {time.perf_counter() - start:.0f} s", flush=True)
        for layer, tc in trained.items():
            tc.save(folder / f"layer-{layer}")
    transcoders = {layer: tcw.Transcoder.load(folder / f"layer-{layer}") for layer in layers}
    for year in YEARS:
        graph = tcw.attribute(lm, transcoders, TEMPLATE.format(year), greater_target(year // 10), depth=0)
        scores = graph.scores()
        pruned = graph.prune(0.6, 0.9)
        print(f"17{year}: replacement {scores.replacement:.3f}, completeness {scores.completeness:.3f}; "
              f"prune(0.6, 0.9): {len(pruned.nodes)} nodes {kinds(pruned)}", flush=True)
    graph = tcw.attribute(lm, transcoders, TEMPLATE.format(YEARS[0]), greater_target(YEARS[0] // 10),
                          depth=3, top_k=12, threshold=0.01)
    by_kind: dict[str, float] = collections.defaultdict(float)
    for c in graph.contributions(graph.target_id):
        by_kind[c.source["kind"]] += c.weight
    print(f"17{YEARS[0]}: direct contributions " + ", ".join(
        f"{kind} {value:+.2f}" for kind, value in sorted(by_kind.items(), key=lambda kv: -abs(kv[1]))))
    print(f"  search graph (depth 3, top 12): {len(graph.nodes)} nodes {kinds(graph)}")
    for thresholds in ((0.7, 0.95), (0.8, 0.98)):
        pruned = graph.prune(*thresholds)
        print(f"  prune{thresholds}: {len(pruned.nodes)} nodes {kinds(pruned)}", flush=True)
    del graph, pruned
    for year in YEARS[:2]:
        check = causal_check(lm, transcoders, year, n_random=3, progress=False)
        print(f"17{year} causal check: zero the top {len(check.ablated)}: {check.top_logit_change:+.2f} "
              f"(attribution predicts {check.predicted_logit_change:+.2f}); matched random "
              f"{check.random_logit_change:+.2f}", flush=True)


if __name__ == "__main__":
    main()
