"""A cross-layer transcoder against per-layer transcoders at matched L0, on the default model.

Layers 3-6 of SmolLM2-135M-Instruct, the default corpus (``--tokens`` training tokens, a held-out
split for the metrics): per-layer TopK transcoders (``k`` per layer) trained in one pass, and one TopK
cross-layer transcoder (``k`` per layer, the same width per layer). Prints the held-out FVU per layer,
the all-layers CE loss recovered and KL (`evaluate`), and the training times side by side.

    python bench/crosslayer.py [--tokens 8192] [--n-latents 1536] [--k 16] [--work FOLDER]

Made to finish on a loaded 2-core CPU: every stage shows progress, and the store and both trainings'
checkpoints live in ``--work`` (default ``/tmp/tcw-bench-crosslayer``), so a run that is stopped
resumes where it was when started again with the same arguments (the training times printed are
then those of the last run only). The row of docs/circuits.md's table, a CLT on every layer, is
``bench/circuit_scores.py --sets clt-k4`` (`tutorials.circuit_clt`).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import tcwidgets as tcw

LAYERS = [3, 4, 5, 6]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--n-latents", type=int, default=1536)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--eval-contexts", type=int, default=16)
    parser.add_argument("--work", type=Path, default=Path("/tmp/tcw-bench-crosslayer"),
                        help="the store and checkpoints (a rerun with the same arguments resumes)")
    args = parser.parse_args()
    lm = tcw.load_model()
    tokens = tcw.load_corpus("python-docs", lm, context=128, n_tokens=args.tokens)
    held_out = tcw.load_corpus("python-docs", lm, context=128, n_tokens=args.eval_contexts * 128, split="test")
    work = args.work / f"{args.tokens}-tokens-{args.n_latents}-latents-k{args.k}"
    store = tcw.collect_activations(lm, LAYERS, tokens, out=work / "store")
    test_store = tcw.collect_activations(lm, LAYERS, held_out, out=work / "test-store")
    start = time.perf_counter()
    per_layer = tcw.train_transcoder(store, LAYERS, n_latents=args.n_latents, k=args.k, eval_store=test_store,
                                     checkpoint_dir=work / "per-layer-checkpoints")
    per_layer_seconds = time.perf_counter() - start
    start = time.perf_counter()
    clt = tcw.train_clt(store, LAYERS, n_latents=args.n_latents, k=args.k, checkpoint_dir=work / "clt-checkpoints")
    clt_seconds = time.perf_counter() - start
    per_layer_metrics = tcw.evaluate(lm, per_layer, held_out, label="per-layer")
    clt_metrics = tcw.evaluate(lm, clt, held_out, label="cross-layer")
    print(f"\n{args.tokens} training tokens, {args.n_latents} latents and k={args.k} per layer, layers {LAYERS}\n")
    print("| | " + " | ".join(f"FVU L{layer}" for layer in LAYERS) + " | L0 per layer | CE recovered (all) | KL (all) "
          "| training |")
    print("|---" * (len(LAYERS) + 5) + "|")
    for name, metrics, seconds in [("per-layer", per_layer_metrics, per_layer_seconds),
                                   ("cross-layer", clt_metrics, clt_seconds)]:
        fvus = " | ".join(f"{metrics[layer].fvu:.3f}" for layer in LAYERS)
        l0 = sum(metrics[layer].l0 for layer in LAYERS) / len(LAYERS)
        print(f"| {name} | {fvus} | {l0:.1f} | {metrics.ce_recovered_all:.1%} | {metrics.kl_all:.4f} | "
              f"{seconds:.0f} s |")


if __name__ == "__main__":
    main()
