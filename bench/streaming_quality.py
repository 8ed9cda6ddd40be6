"""Benchmark: held-out quality of streaming training against store-based training on the very same
activations, over several seeds, without running the model.

The streamed run uses `ActivationStream` as `train_streaming` does (its shuffle buffer, its
initialisation sample of random rows of the first buffer, its statistics from that sample), but its forward passes
replay the rows of each context from the training store instead of running the model: the same
activations, so only what streaming changes (the sample, the statistics, the batch order) differs.
Variants swap one of them back to the store's, to find which one costs quality:

    stream              streaming as shipped
    stream-storesample  the store's initialisation sample (random rows) and statistics of it
    stream-storestats   the store's statistics (over all its tokens), the stream's sample
    stream=N            a shuffle buffer of N tokens

Usage: ``python bench/streaming_quality.py --modes store,stream --seeds 0,1,2`` (the reference
stores: layer 6, 4608 latents, TopK k=32, 1024-token batches, one epoch by default).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from tcwidgets.activations import ActivationStore
from tcwidgets.streaming import ActivationStream
from tcwidgets.training import reconstruction_metrics, train_transcoder


def replay_stream(train: ActivationStore, layer: int, context: int):
    """`ActivationStream` classes over ``train``'s rows: context ``c`` is rows ``c·context ...``."""
    x_all, y_all = train.layer(layer)

    class Replay(ActivationStream):
        def __init__(self, buffer_tokens: int = 65536, sample_tokens: int = 18432, seed: int = 0):
            self.layers = [layer]
            self.tokens = torch.zeros(train.n_tokens // context, context, dtype=torch.long)
            self.buffer_tokens, self.forward_batch = buffer_tokens, 32
            self.sample_tokens, self.seed, self._samples, self._first_forwards = sample_tokens, seed, {}, []

        model = property(lambda self: train.model)
        d_model = property(lambda self: train.d_model)

        def sites(self, layer):
            return train.sites(layer)

        def _forward(self, contexts):
            for begin in range(0, len(contexts), self.forward_batch):
                rows = (contexts[begin:begin + self.forward_batch, None] * context + torch.arange(context)).flatten()
                yield [(x_all[rows], y_all[rows])]

    class StoreStats(Replay):
        def stats(self, layer):
            return train.stats(layer)

    class StoreSample(Replay):
        def sample(self, layer, n=None, seed=None):
            return train.sample(layer, n or self.sample_tokens, seed=self.seed + 1 if seed is None else seed)

    return {"stream": Replay, "stream-storestats": StoreStats, "stream-storesample": StoreSample}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", default="/tmp/tcw-acts/train")
    p.add_argument("--test", default="/tmp/tcw-acts/test")
    p.add_argument("--layer", type=int, default=6)
    p.add_argument("--context", type=int, default=128, help="tokens per context of the stores")
    p.add_argument("--modes", default="store,stream")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    train, test = ActivationStore.open(args.train), ActivationStore.open(args.test)
    kinds = replay_stream(train, args.layer, args.context)
    results: dict[str, list[dict[str, float]]] = {}
    for seed in map(int, args.seeds.split(",")):
        for mode in args.modes.split(","):
            name, _, buffer = mode.partition("=")
            source = train if name == "store" else kinds[name](
                seed=seed, **({"buffer_tokens": int(buffer)} if buffer else {}))
            tc = train_transcoder(source, args.layer, n_latents=4608, k=32, batch_size=1024, epochs=args.epochs,
                                  seed=seed, progress=False)
            m = reconstruction_metrics(tc, test)
            results.setdefault(mode, []).append({"seed": seed, "fvu": m["fvu"], "dead_fraction": m["dead_fraction"]})
            print(f"{mode:>20} seed {seed}: held-out FVU {m['fvu']:.4f}, dead {m['dead_fraction']:.2%}", flush=True)
    for mode, runs in results.items():
        fvus = [r["fvu"] for r in runs]
        spread = f" ± {statistics.stdev(fvus):.4f}" if len(fvus) > 1 else ""
        print(f"{mode:>20}: mean held-out FVU {statistics.mean(fvus):.4f}{spread} over {len(fvus)} seeds", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
