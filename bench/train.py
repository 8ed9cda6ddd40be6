"""Benchmark: tcwidgets' trainer against EleutherAI's sparsify on the same activations.

Trains the reference configuration (a TopK transcoder, 4608 latents, k=32, 2 epochs of 1024-token
batches) once with `tcwidgets.train_transcoder` and once with sparsify, and prints each one's
speed, the ratio, and each one's held-out FVU and dead fraction.

Speed is reported as tokens per CPU second of the training process (``time.process_time``) and
as tokens per wall-clock second. Run with ``OMP_NUM_THREADS=1`` on a shared machine: one thread
per trainer makes CPU time a measure of the work done that other processes on the machine do not
disturb (wall-clock time does, by as much as 2x on a busy 2-core machine); the ratio per CPU
second is the headline. Results: bench/results/train/.

sparsify is installed into a throwaway virtual environment (``python -m venv
--system-site-packages`` in a temporary folder, so it reuses the installed torch; every package is
installed with ``--no-deps`` so pip never pulls another torch) and run there in a subprocess.

How sparsify is fed the stored activations: through its public ``Trainer(cfg, dataset, model)``
API with ``transcode=True`` and the ``"fvu"`` loss. Its trainer hooks a module of a model and trains
on the module's (input, output) pairs; here the "model" is a stand-in whose forward pass replays
the activation store: each dataset row names a batch number, and the forward reads that batch
with ``store.batches(..., start=batch)`` (the very batches, in the same order, that tcwidgets
trains on, read from disk in the same way) and passes it through a hooked identity "MLP". Every
training computation is sparsify's own.

Usage: ``python bench/train.py [--train /tmp/tcw-acts/train --test /tmp/tcw-acts/test]``
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
import venv
from pathlib import Path

import torch

SPARSIFY = ["eai-sparsify==1.3.3", "einops", "natsort", "schedulefree", "simple-parsing", "docstring-parser"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", default="/tmp/tcw-acts/train", help="training activation store")
    p.add_argument("--test", default="/tmp/tcw-acts/test", help="held-out activation store")
    p.add_argument("--layer", type=int, default=6)
    p.add_argument("--n-latents", type=int, default=4608)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--json", metavar="PATH", help="also write the results here")
    p.add_argument("--only", choices=["tcwidgets", "sparsify"], help="run one trainer only")
    p.add_argument("--sparsify-worker", metavar="JSON", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def fvu_and_dead(predict, store, layer: int, n_latents: int) -> dict[str, float]:
    """Held-out FVU (model units, float64 sums) and the share of latents never active, for
    ``predict(x, y) -> (reconstruction, active latent ids)``."""
    x, y = store.layer(layer)
    fired = torch.zeros(n_latents, dtype=torch.bool)
    squared_error = 0.0
    with torch.no_grad():
        for xb, yb in zip(x.split(4096), y.split(4096)):
            out, active = predict(xb, yb)
            squared_error += float((yb.double() - out.double()).square().sum())
            fired[active] = True
    y = y.double()
    return {"fvu": squared_error / float((y - y.mean(0)).square().sum()),
            "dead_fraction": 1 - float(fired.float().mean())}


def _import_before_timing() -> None:
    """Import what a torch optimizer imports on first use (torch._dynamo: seconds of CPU), so
    that neither trainer's time includes a one-off import."""
    import torch._dynamo  # noqa: F401


def run_tcwidgets(args) -> dict[str, float]:
    from tcwidgets.activations import ActivationStore
    from tcwidgets.training import train_transcoder

    train, test = ActivationStore.open(args.train), ActivationStore.open(args.test)
    _import_before_timing()
    start, cpu = time.perf_counter(), time.process_time()
    tc = train_transcoder(train, args.layer, n_latents=args.n_latents, k=args.k, epochs=args.epochs,
                          batch_size=args.batch_size, progress=False)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu

    def predict(x, y):
        latents, out = tc(x)
        return out, (latents != 0).any(0).nonzero().flatten()

    tokens = train.n_batches(args.batch_size, args.epochs) * args.batch_size
    return {"seconds": seconds, "tokens_per_s": tokens / seconds, "cpu_seconds": cpu_seconds,
            "tokens_per_cpu_s": tokens / cpu_seconds,
            **fvu_and_dead(predict, test, args.layer, args.n_latents)}


def sparsify_worker(args) -> None:
    """Runs inside the virtual environment that has sparsify."""
    from types import SimpleNamespace

    from sparsify import SparseCoderConfig, TrainConfig, Trainer
    from torch import nn

    from tcwidgets.activations import ActivationStore

    train, test = ActivationStore.open(args.train), ActivationStore.open(args.test)
    n_batches = train.n_batches(args.batch_size, args.epochs)

    class Identity(nn.Module):
        def forward(self, x, y):
            return y

    class Replay(nn.Module):
        """Stands in for the language model: input ids name a batch of the activation store; the
        forward pass runs that batch's (MLP input, MLP output) through the hooked ``mlp``."""

        def __init__(self):
            super().__init__()
            self.mlp = Identity()
            self.config = SimpleNamespace(num_hidden_layers=1)
            self.dummy_inputs = {"input_ids": torch.zeros(1, args.batch_size, dtype=torch.long)}
            self.device = torch.device("cpu")

        @property
        def base_model(self):
            return self

        def forward(self, input_ids):
            batch = int(input_ids[0, 0])
            x, y = next(train.batches(args.layer, args.batch_size, seed=0, epochs=args.epochs, start=batch))
            return self.mlp(x[None], y[None])

    dataset = [{"input_ids": torch.full((args.batch_size,), i)} for i in range(n_batches)]
    with tempfile.TemporaryDirectory() as save_dir:
        cfg = TrainConfig(
            SparseCoderConfig(num_latents=args.n_latents, k=args.k, transcode=True),
            batch_size=1, hookpoints=["mlp"], loss_fn="fvu", log_to_wandb=False, save_dir=save_dir,
        )
        _import_before_timing()
        start, cpu = time.perf_counter(), time.process_time()
        trainer = Trainer(cfg, dataset, Replay())
        trainer.fit()
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    coder = trainer.saes["mlp"]

    def predict(x, y):
        out = coder(x=x, y=y)
        return out.sae_out, out.latent_indices[out.latent_acts > 0]

    tokens = n_batches * args.batch_size
    result = {"seconds": seconds, "tokens_per_s": tokens / seconds, "cpu_seconds": cpu_seconds,
              "tokens_per_cpu_s": tokens / cpu_seconds,
              **fvu_and_dead(predict, test, args.layer, args.n_latents)}
    Path(args.sparsify_worker).write_text(json.dumps(result))


def run_sparsify(args) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        env = Path(tmp) / "venv"
        venv.create(env, system_site_packages=True, with_pip=True)
        python = env / "bin" / "python"
        subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-deps", *SPARSIFY], check=True)
        out = Path(tmp) / "result.json"
        command = [python, __file__, "--sparsify-worker", str(out)]
        for name in ("train", "test", "layer", "n_latents", "k", "epochs", "batch_size"):
            command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
        subprocess.run(command, check=True)
        return json.loads(out.read_text())


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.sparsify_worker:
        return sparsify_worker(args)
    print(f"layer {args.layer}: {args.n_latents} latents, TopK k={args.k}, {args.epochs} epochs of "
          f"{args.batch_size}-token batches, torch {torch.__version__}, {torch.get_num_threads()} threads")
    results = {}
    if args.only in (None, "tcwidgets"):
        results["tcwidgets"] = run_tcwidgets(args)
    if args.only in (None, "sparsify"):
        results["sparsify"] = run_sparsify(args)
    for name, r in results.items():
        print(f"{name:>10}: {r['tokens_per_cpu_s']:6.0f} tokens per CPU second ({r['cpu_seconds']:.0f} CPU s), "
              f"{r['tokens_per_s']:6.0f} tokens/s wall-clock ({r['seconds']:.0f} s), "
              f"held-out FVU {r['fvu']:.4f}, dead {r['dead_fraction']:.2%}")
    if len(results) == 2:
        cpu = results["tcwidgets"]["tokens_per_cpu_s"] / results["sparsify"]["tokens_per_cpu_s"]
        wall = results["tcwidgets"]["tokens_per_s"] / results["sparsify"]["tokens_per_s"]
        print(f"speed ratio tcwidgets / sparsify: {cpu:.2f}x per CPU second, {wall:.2f}x wall-clock")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
