"""The ``tcwidgets`` command line: it mirrors the Python API, one subcommand per stage."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _layers(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"layers must be comma-separated integers, e.g. 6 or 4,6,8; got {text!r}")


def _add_model_and_corpus(parser: argparse.ArgumentParser, *, split: str) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="embedded name, Hugging Face id or local folder")
    parser.add_argument("--remote", action="store_true", help="run the model on NDIF")
    parser.add_argument("--corpus", default="python-docs", help="python-docs, a dataset name, or .txt/.jsonl files")
    parser.add_argument("--context", type=int, default=128, help="tokens per context")
    parser.add_argument("--tokens", type=int, default=None, help="how many tokens (default: the whole split)")
    parser.add_argument("--split", default=split, choices=["train", "test", "all"])
    parser.add_argument("--seed", type=int, default=0)


def _corpus(args: argparse.Namespace, lm):
    from .corpus import load_corpus

    return load_corpus(args.corpus, lm, context=args.context, n_tokens=args.tokens, seed=args.seed, split=args.split)


def collect(args: argparse.Namespace) -> None:
    """Collect MLP inputs and outputs into an activation store."""
    from .activations import collect_activations
    from .models import load_model

    lm = load_model(args.model, remote=args.remote)
    store = collect_activations(lm, args.layers, _corpus(args, lm), out=args.out, batch_size=args.batch_size,
                                dtype=args.dtype)
    print(f"{store.n_tokens:,} tokens of layers {store.layers} of {store.model} in {args.out}")
    for layer in store.layers:
        stats = store.stats(layer)
        print(f"  layer {layer}: average norm of MLP input {stats.in_norm:.3g}, output {stats.out_norm:.3g}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tcwidgets", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("collect", help="collect MLP inputs and outputs with nnsight")
    _add_model_and_corpus(p, split="train")
    p.add_argument("--layers", type=_layers, required=True, help="e.g. 6 or 4,6,8")
    p.add_argument("--out", required=True, help="folder for the activation store (resumed if interrupted)")
    p.add_argument("--batch-size", type=int, default=32, help="contexts per forward pass")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.set_defaults(run=collect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tcwidgets`` command."""
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, KeyError, IndexError, FileNotFoundError) as error:
        print(f"tcwidgets {args.command}: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
