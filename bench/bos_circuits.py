"""Notebook 07's every-layer skip transcoders trained with or without each context's BOS position.

    TCWIDGETS_TUTORIAL_FAST=1 OMP_NUM_THREADS=1 python bench/bos_circuits.py --init lsq --bos drop \
        [--store FOLDER] [--tokens 12288] [--out FOLDER]

Trains skip transcoders on all 30 layers (k=8, 2 × d_model latents, 2 epochs, batch 256, as
`tutorials.circuit_transcoders`) on the circuits' store (`tutorials.cache._circuit_store`), with
``--bos drop`` on `ActivationStore.without_positions` (position 0 left out of the regression, the
initialisation sample and every batch), and ``--init zero`` for main's initialisation (W_skip = 0, no
least-squares fit). Then, for the greater-than prompt of notebook 07 (year 32): each layer's relative
error at the last position, the direct contributions to the target by node kind, the graph's scores
and the node kinds of two prunings.
"""

from __future__ import annotations

import argparse
import collections
import time
from pathlib import Path

import torch

import tcwidgets as tcw
from tcwidgets import training
from tcwidgets.splicing import splice
from tcwidgets.tutorials.cache import _circuit_store
from tcwidgets.tutorials.greater_than import TEMPLATE, greater_target


def zero_skip_init() -> None:
    """main's initialisation of a skip transcoder: W_skip zero, the latents on the whole target."""
    training.least_squares_skip = lambda xs, ys, ridge=0.0: (torch.zeros(xs.shape[1], xs.shape[1], dtype=torch.float64),
                                                               torch.zeros(ys.shape[1], dtype=torch.float64))
    training._fit_latent_scale = lambda tc, x, residual: None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", choices=["zero", "lsq"], default="lsq")
    parser.add_argument("--bos", choices=["keep", "drop"], default="drop")
    parser.add_argument("--tokens", type=int, default=12_288)
    parser.add_argument("--store", type=Path, default=Path("/work/cache-bos/store-12288"))
    parser.add_argument("--out", type=Path, help="save the transcoders here")
    args = parser.parse_args()
    if args.init == "zero":
        zero_skip_init()
    lm = tcw.load_model()
    layers = list(range(lm.n_layers))
    store = _circuit_store(lm, layers, args.tokens, args.store)
    if args.bos == "drop":
        store = store.without_positions([0])
    print(store, flush=True)
    start = time.perf_counter()
    transcoders = tcw.train_transcoder(store, layers, n_latents=2 * lm.d_model, k=8, kind="skip", epochs=2,
                                       batch_size=256)
    print(f"trained in {time.perf_counter() - start:.0f} s", flush=True)
    if args.out:
        for layer, tc in transcoders.items():
            tc.save(args.out / f"layer-{layer}")

    prompt, target = TEMPLATE.format(32), greater_target(3)
    tokens = tcw.interventions.encode_prompt(lm, prompt)
    with torch.no_grad():
        run = splice(lm, {}, tokens, save_mlp=layers, progress=False)
        errors = []
        for layer, tc in transcoders.items():
            x, y = (v[:, -1] for v in run.mlp[layer])
            errors.append(float(((y - tc(x).output) ** 2).sum() / (y ** 2).sum()))
    print("relative error at the last position: " + " ".join(f"L{l}:{e:.2f}" for l, e in zip(layers, errors)))
    start = time.perf_counter()
    graph = tcw.attribute(lm, transcoders, prompt, target, depth=3, top_k=12, threshold=0.01)
    by_kind: dict[str, float] = collections.defaultdict(float)
    for c in graph.contributions(graph.target_id):
        by_kind[c.source["kind"]] += c.weight
    print(f"target {graph.target_value:.3f}; direct contributions: "
          + ", ".join(f"{k} {v:+.3f}" for k, v in sorted(by_kind.items(), key=lambda kv: -abs(kv[1]))), flush=True)
    scores = graph.scores()
    print(f"scores: replacement {scores.replacement:.3f}, completeness {scores.completeness:.3f} "
          f"({time.perf_counter() - start:.0f} s)", flush=True)
    for thresholds in ((0.6, 0.9), (0.8, 0.98)):
        pruned = graph.prune(*thresholds)
        kinds = collections.Counter(node.kind for node in pruned.nodes.values())
        print(f"prune{thresholds}: {len(pruned.nodes)} nodes, {dict(kinds)}", flush=True)


if __name__ == "__main__":
    main()
