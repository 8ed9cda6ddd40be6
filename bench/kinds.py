"""Transcoder vs skip transcoder vs SAE on the same layer and data, at matched L0.

    python bench/kinds.py [--layer 6] [--latents 4608] [--k 32] [--epochs 2] [--out runs/kinds]
                          [--train STORE --test STORE]

Collects (or, with --train/--test, opens) layer activations for 100k training tokens of the default corpus and the
held-out split, trains the three kinds with TopK at the same k (so the same L0), and evaluates each
spliced into the model on held-out text. Prints a Markdown table (FVU, L0, dead fraction, CE with
the layer spliced in, CE recovered, KL) and writes it, with the metrics, to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import tcwidgets as tcw

KINDS = ("transcoder", "skip", "sae")


def store_for(lm: tcw.Model, layer: int, split: str, n_tokens: int | None, out: Path) -> tcw.ActivationStore:
    tokens = tcw.load_corpus("python-docs", lm, n_tokens=n_tokens, split=split)
    return tcw.collect_activations(lm, [layer], tokens, out=out / f"acts-{split}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layer", type=int, default=6)
    parser.add_argument("--latents", type=int, default=4608)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/kinds"))
    parser.add_argument("--train", type=Path, help="an activation store of the training split to use")
    parser.add_argument("--test", type=Path, help="an activation store of the held-out split to use")
    args = parser.parse_args()

    lm = tcw.load_model()
    if args.train and args.test:
        train, test = tcw.ActivationStore.open(args.train), tcw.ActivationStore.open(args.test)
    else:
        train = store_for(lm, args.layer, "train", 100_000, args.out)
        test = store_for(lm, args.layer, "test", None, args.out)
    held_out = test.tokens
    rows, results = [], {}
    for kind in KINDS:
        start = time.perf_counter()
        tc = tcw.train_transcoder(train, args.layer, kind=kind, n_latents=args.latents, k=args.k,
                                  epochs=args.epochs, progress=False)
        seconds = time.perf_counter() - start
        tc.save(args.out / kind)
        metrics = tcw.evaluate(lm, {args.layer: tc}, held_out, label=kind, progress=False)[args.layer]
        print(kind, metrics.to_dict(), f"{seconds:.0f} s", flush=True)
        results[kind] = dict(metrics.to_dict(), train_seconds=seconds)
        rows.append(f"| {kind} | {metrics.fvu:.3f} | {metrics.l0:.1f} | {metrics.dead_fraction:.1%} | "
                    f"{metrics.ce_spliced:.4f} | {metrics.ce_recovered:.1%} | {metrics.kl:.4f} | {seconds:.0f} s |")
    clean, zero = metrics.ce_clean, metrics.ce_zero_ablated
    table = "\n".join([
        f"Layer {args.layer} of smollm2-135m, {train.n_tokens:,} training tokens x {args.epochs} epochs, "
        f"{args.latents} latents, TopK k={args.k}; held-out {held_out.numel():,} tokens. "
        f"CE clean {clean:.4f}, MLP zero-ablated {zero:.4f}.",
        "",
        "| kind | FVU | L0 | dead | CE spliced | CE recovered | KL | training time |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
    ])
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kinds.md").write_text(table + "\n")
    (args.out / "kinds.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
