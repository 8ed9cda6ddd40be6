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


def train(args: argparse.Namespace) -> None:
    """Train transcoders on an activation store and save them.

    Under torchrun (``torchrun --nproc_per_node=N -m tcwidgets.cli train ...``) the layers are
    shared out: rank r trains ``layers[r::N]`` on ``cuda:LOCAL_RANK`` (or the CPU), and no gradients
    are exchanged, since each layer's transcoder is trained on its own. With ``--data-parallel``
    every rank trains every layer on its share of each batch (DistributedDataParallel; rank 0
    saves)."""
    import os
    from pathlib import Path

    from .activations import ActivationStore
    from .training import train_transcoder

    store = ActivationStore.open(args.acts)
    layers = args.layers or store.layers
    out = Path(args.out)
    folders = {layer: out if len(layers) == 1 else out / f"layer-{layer}" for layer in layers}
    device = args.device
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not args.data_parallel:
        import torch

        layers = layers[rank::world]
        if device is None and torch.cuda.is_available():
            device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
        print(f"rank {rank} of {world}: layers {layers or 'none (more ranks than layers)'}")
        if not layers:
            return
    eval_store = ActivationStore.open(args.eval_acts) if args.eval_acts else None
    trained = train_transcoder(store, layers, n_latents=args.latents, activation=args.activation, k=args.k,
                               kind=args.kind, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                               checkpoint_dir=args.checkpoint_dir, seed=args.seed, eval_store=eval_store,
                               device=device, data_parallel=args.data_parallel)
    if not args.data_parallel or rank == 0:
        for layer, tc in trained.items():
            tc.save(folders[layer])
            print(f"layer {layer}: {tc.n_latents} latents ({tc.config.kind}, {tc.config.activation}) saved to "
                  f"{folders[layer]}")
    if args.data_parallel:
        import torch.distributed as dist

        dist.barrier()  # every process leaves together, after rank 0 has saved
        dist.destroy_process_group()


def evaluate(args: argparse.Namespace) -> None:
    """Evaluate saved transcoders spliced into the model, on held-out tokens."""
    import json

    from .evaluation import evaluate as evaluate_transcoders
    from .models import load_model
    from .transcoder import Transcoder

    lm = load_model(args.model, remote=args.remote)
    loaded = [Transcoder.load(path) for path in args.transcoders]
    transcoders = {tc.config.site["layer"]: tc for tc in loaded}
    metrics = evaluate_transcoders(lm, transcoders, _corpus(args, lm), batch_size=args.batch_size)
    print(metrics)
    if args.json:
        with open(args.json, "w") as file:
            json.dump(metrics.to_dict(), file, indent=1)


def tutorials(args: argparse.Namespace) -> int:
    """Copy the teaching notebooks into a folder (keeping any already there) and open JupyterLab."""
    from .tutorials.launch import open_tutorials

    return open_tutorials(args.folder, args.lab_args, open_lab=not args.copy_only)


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

    p = commands.add_parser("train", help="train transcoders on an activation store")
    p.add_argument("--acts", required=True, help="activation store folder (from tcwidgets collect)")
    p.add_argument("--layers", type=_layers, default=None, help="layers to train (default: all in the store)")
    p.add_argument("--out", required=True, help="folder for the transcoder (one sub-folder per layer if several)")
    p.add_argument("--latents", type=int, default=None, help="number of latents (default: 8 x d_model)")
    p.add_argument("--activation", default="topk", choices=["topk", "batchtopk", "relu", "jumprelu"])
    p.add_argument("--k", type=int, default=32, help="active latents per token (TopK, BatchTopK)")
    p.add_argument("--kind", default="transcoder", choices=["transcoder", "skip", "sae"])
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=None, help="tokens per step (default: by run length)")
    p.add_argument("--lr", type=float, default=None, help="default: scaled with the width")
    p.add_argument("--checkpoint-dir", default=None, help="checkpoint here and resume from here")
    p.add_argument("--eval-acts", default=None, help="held-out store for FVU during training")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1... (default: CUDA when present)")
    p.add_argument("--data-parallel", action="store_true",
                   help="under torchrun: all ranks train each layer together, each on its share of every batch "
                        "(default: rank r trains layers[r::N])")
    p.set_defaults(run=train)

    p = commands.add_parser("evaluate", help="splice transcoders into the model and measure them")
    _add_model_and_corpus(p, split="test")
    p.add_argument("transcoders", nargs="+", help="folders of saved transcoders")
    p.add_argument("--batch-size", type=int, default=8, help="contexts per forward pass")
    p.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    p.set_defaults(run=evaluate)

    p = commands.add_parser(
        "tutorials", help="copy the teaching notebooks into a folder and open JupyterLab on them",
        description="Copy the teaching notebooks into FOLDER (a notebook already there is never overwritten) "
                    "and open JupyterLab on them. Other options go to JupyterLab, e.g. --no-browser --port=8889.")
    p.add_argument("folder", nargs="?", default="tcwidgets-tutorials", help="working folder (default: %(default)s)")
    p.add_argument("--copy-only", action="store_true", help="copy the notebooks, do not start JupyterLab")
    p.set_defaults(run=tutorials)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tcwidgets`` command."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.command != "tutorials":
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.lab_args = unknown
    try:
        status = args.run(args)
    except (ValueError, KeyError, IndexError, FileNotFoundError) as error:
        print(f"tcwidgets {args.command}: {error}", file=sys.stderr)
        return 2
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
