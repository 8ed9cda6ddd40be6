"""Benchmark: tcwidgets' trainer against EleutherAI's sparsify on the same activations.

Trains the reference configuration (a TopK transcoder, 4608 latents, k=32, 2 epochs of 1024-token
batches) once with `tcwidgets.train_transcoder` and once with sparsify, with 1 and with 2 threads
(``--threads``), and prints each one's speed, the ratios, each one's held-out FVU and dead fraction,
and the hardware's ceiling: the encoder product (1024 x 576 x 4608, the one dense product both
trainers must do per step) timed alone in float32, bfloat16 and int8 (``torch._int_mm``), in tokens
per CPU second, and the fraction of the float32 and bfloat16 rates each trainer reaches. It also
prints the instruction-set limits in force (``ATEN_CPU_CAPABILITY``, ``ONEDNN_MAX_CPU_ISA``,
``MKL_ENABLE_INSTRUCTIONS``: set all three to emulate an AVX2-only CPU on an AVX-512 one).

Speed is reported as tokens per CPU second of the training process (``time.process_time``, all
its threads) and as tokens per wall-clock second. On a shared machine the CPU-time figures are the
headline: they measure the work done, which other processes on the machine do not change
(wall-clock time moves by as much as 2x with the load); wall / CPU says how well the threads were
used (CPU s per wall s). Each (trainer, threads) pair runs in its own process. ``--repeat N`` runs
each pair N times, the trainers taking turns to go first, and reports each trainer's median run
(on this project's virtual machines one trainer's CPU seconds drift by up to ±15% from run to run,
sparsify's from 31 to 42 s on the same machine). Results: bench/results/train/.

sparsify is installed into a throwaway virtual environment (made with ``venv``, no system site
packages): torch pinned to the version running this script first, then this checkout of tcwidgets
(its store reader is what replays the activations), then sparsify 1.3.3 and its small pure-Python
dependencies with ``--no-deps`` (so pip never pulls another torch). ``--venv PATH`` keeps it for
reuse.

How sparsify is fed the stored activations: through its public ``Trainer(cfg, dataset, model)``
API with ``transcode=True`` and the ``"fvu"`` loss. Its trainer hooks a module of a model and trains
on the module's (input, output) pairs; here the "model" is a stand-in whose forward pass replays
the activation store: each dataset row names a batch number, and the forward reads that batch
with ``store.batches(..., start=batch)`` (the very batches, in the same order, that tcwidgets
trains on, read from disk in the same way) and passes it through a hooked identity "MLP". Every
training computation is sparsify's own.

Usage: ``python bench/train.py [--train /tmp/tcw-acts/train --test /tmp/tcw-acts/test]``;
``--quick`` for a smoke run (a narrow transcoder, one epoch, one thread).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import venv
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
SPARSIFY = ["eai-sparsify==1.3.3", "einops", "natsort", "schedulefree", "simple-parsing", "docstring-parser"]
TRAINERS = ("tcwidgets", "sparsify")
LATENT_CHOICES = ("float32", "bfloat16", "int8")  # tcwidgets.transcoder's (not imported: sparsify's venv runs this too)
ISA_LIMITS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", default="/tmp/tcw-acts/train", help="training activation store")
    p.add_argument("--test", default="/tmp/tcw-acts/test", help="held-out activation store")
    p.add_argument("--layer", type=int, default=6)
    p.add_argument("--n-latents", type=int, default=4608)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch threads per run")
    p.add_argument("--repeat", type=int, default=1,
                   help="runs of each trainer per thread count, in alternating order (A B, B A, ...); "
                        "the figures are each trainer's median run")
    p.add_argument("--low-precision", choices=["auto", *LATENT_CHOICES], default="auto",
                   help="precision of tcwidgets' latent choice (auto: the fastest measured, the default)")
    p.add_argument("--quick", action="store_true", help="smoke run: 1152 latents, 1 epoch, 1 thread")
    p.add_argument("--venv", metavar="PATH", help="sparsify's virtual environment (made if missing; kept)")
    p.add_argument("--json", metavar="PATH", help="also write the results here")
    p.add_argument("--only", choices=TRAINERS, help="run one trainer only")
    p.add_argument("--worker", choices=TRAINERS, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.n_latents, args.epochs, args.threads = 1152, 1, [1]
    return args


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


def encoder_product_rate(args) -> dict[str, float]:
    """Tokens per CPU second of the encoder product alone (batch x d x n_latents), float32,
    bfloat16 and int8 (``torch._int_mm``, int32 sums): the ceiling of a trainer that must do it
    once per step (best of 5)."""
    d = 576
    x, w = torch.randn(args.batch_size, d), torch.randn(args.n_latents, d)
    products = {dtype: (lambda a=x.to(dtype), b=w.to(dtype): F.linear(a, b)) for dtype in (torch.float32, torch.bfloat16)}
    xq, wq = (x * 40).clamp(-127, 127).to(torch.int8), (w * 40).clamp(-127, 127).to(torch.int8)
    products[torch.int8] = lambda: torch._int_mm(xq, wq.t())
    rates = {}
    for dtype, product in products.items():
        product()
        best = min(_cpu_seconds(product) for _ in range(5))
        rates[str(dtype).removeprefix("torch.")] = args.batch_size / best
    return rates


def _cpu_seconds(f) -> float:
    start = time.process_time()
    f()
    return time.process_time() - start


def _import_before_timing() -> None:
    """Import what a torch optimizer imports on first use (torch._dynamo: seconds of CPU), so
    that neither trainer's time includes a one-off import."""
    import torch._dynamo  # noqa: F401


def _timed(train) -> tuple[object, dict[str, float]]:
    _import_before_timing()
    start, cpu = time.perf_counter(), time.process_time()
    result = train()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    return result, {"seconds": seconds, "cpu_seconds": cpu_seconds}


def run_tcwidgets(args) -> dict[str, float]:
    from tcwidgets.activations import ActivationStore
    from tcwidgets.calibration import fastest_latent_choice
    from tcwidgets.training import train_transcoder
    from tcwidgets.transcoder import Transcoder, TranscoderConfig

    train, test = ActivationStore.open(args.train), ActivationStore.open(args.test)
    low_precision = args.low_precision
    if low_precision == "auto":  # the one-off calibration (cached per machine) is not timed
        low_precision = fastest_latent_choice(
            Transcoder(TranscoderConfig(train.d_model, train.d_model, args.n_latents, k=args.k)), args.batch_size)
    tc, times = _timed(lambda: train_transcoder(
        train, args.layer, n_latents=args.n_latents, k=args.k, epochs=args.epochs,
        batch_size=args.batch_size, progress=False, low_precision=low_precision))

    def predict(x, y):
        latents, out = tc(x)
        return out, (latents != 0).any(0).nonzero().flatten()

    return {**times, "latent_choice": low_precision, **fvu_and_dead(predict, test, args.layer, args.n_latents)}


def run_sparsify(args) -> dict[str, float]:
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

        def fit():
            trainer = Trainer(cfg, dataset, Replay())
            trainer.fit()
            return trainer

        trainer, times = _timed(fit)
    coder = trainer.saes["mlp"]

    def predict(x, y):
        out = coder(x=x, y=y)
        return out.sae_out, out.latent_indices[out.latent_acts > 0]

    return {**times, **fvu_and_dead(predict, test, args.layer, args.n_latents)}


def worker(args) -> None:
    """One trainer with ``args.threads[0]`` threads, in this process; results to ``args.out``."""
    torch.set_num_threads(args.threads[0])
    from tcwidgets.activations import ActivationStore

    result = (run_tcwidgets if args.worker == "tcwidgets" else run_sparsify)(args)
    tokens = ActivationStore.open(args.train).n_batches(args.batch_size, args.epochs) * args.batch_size
    result.update(tokens_per_s=tokens / result["seconds"], tokens_per_cpu_s=tokens / result["cpu_seconds"],
                  product_tokens_per_cpu_s=encoder_product_rate(args), torch=torch.__version__)
    Path(args.out).write_text(json.dumps(result))


def sparsify_python(path: Path) -> Path:
    """A virtual environment with this torch, this tcwidgets and sparsify 1.3.3 (made if missing)."""
    python = path / "bin" / "python"
    if not python.exists():
        venv.create(path, with_pip=True)
        pip = [python, "-m", "pip", "install", "--quiet"]
        subprocess.run([*pip, f"torch=={torch.__version__.split('+')[0]}"], check=True)
        subprocess.run([*pip, str(REPO)], check=True)
        subprocess.run([*pip, "--no-deps", *SPARSIFY], check=True)
    return python


def run_worker(python: Path, name: str, threads: int, argv: list[str]) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        # passive waiting: with more threads than free cores (a shared machine), OpenMP's
        # spin-waiting threads burn CPU time that is no work (measured: 4-5x the CPU seconds)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}
        command = [str(python), __file__, *argv, "--worker", name, "--threads", str(threads), "--out", str(out)]
        subprocess.run(command, check=True, env=env, cwd=tmp)  # cwd: the worker imports the installed tcwidgets
        return json.loads(out.read_text())


def cpu_name() -> str:
    from tcwidgets.calibration import device_name

    return device_name(torch.device("cpu"))


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    shared = ["--train", args.train, "--test", args.test, "--layer", str(args.layer), "--n-latents",
              str(args.n_latents), "--k", str(args.k), "--epochs", str(args.epochs), "--batch-size",
              str(args.batch_size), "--low-precision", args.low_precision]
    print(f"layer {args.layer}: {args.n_latents} latents, TopK k={args.k}, {args.epochs} epochs of "
          f"{args.batch_size}-token batches; torch {torch.__version__}; CPU: {cpu_name()} "
          f"({os.cpu_count()} cores, {platform.machine()})", flush=True)
    print(f"instruction sets: torch's kernels {torch.backends.cpu.get_cpu_capability()}; limits in force: "
          f"{', '.join(f'{name}={os.environ[name]}' for name in ISA_LIMITS if os.environ.get(name)) or 'none'}", flush=True)
    trainers = [args.only] if args.only else list(TRAINERS)
    results: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        pythons = {"tcwidgets": Path(sys.executable)}
        if "sparsify" in trainers:
            pythons["sparsify"] = sparsify_python(Path(args.venv) if args.venv else Path(tmp) / "venv")
        for threads in args.threads:
            runs: dict[str, list[dict]] = {name: [] for name in trainers}
            for repeat in range(args.repeat):
                for name in trainers if repeat % 2 == 0 else trainers[::-1]:
                    r = run_worker(pythons[name], name, threads, shared)
                    runs[name].append(r)
                    print(report(name, threads, r), flush=True)
            results[str(threads)] = {name: median_run(rs) for name, rs in runs.items()}
            if len(trainers) == 2:
                a, b = results[str(threads)]["tcwidgets"], results[str(threads)]["sparsify"]
                pairs = "" if args.repeat == 1 else (
                    f" (medians of {args.repeat} runs each; run by run "
                    + ", ".join(f"{x['tokens_per_cpu_s'] / y['tokens_per_cpu_s']:.2f}x"
                                for x, y in zip(runs["tcwidgets"], runs["sparsify"])) + ")")
                print(f"{threads} thread(s): tcwidgets / sparsify {a['tokens_per_cpu_s'] / b['tokens_per_cpu_s']:.2f}x "
                      f"per CPU second, {a['tokens_per_s'] / b['tokens_per_s']:.2f}x wall-clock{pairs}", flush=True)
    if args.json:
        limits = {name: os.environ[name] for name in ISA_LIMITS if os.environ.get(name)}
        Path(args.json).write_text(json.dumps({"args": vars(args), "cpu": cpu_name(), "isa_limits": limits,
                                               "kernels": torch.backends.cpu.get_cpu_capability(),
                                               "results": results}, indent=1))


def median_run(runs: list[dict]) -> dict:
    """The run of median tokens per CPU second (the lower middle one of an even number), with
    every run's rate under ``"runs_tokens_per_cpu_s"``."""
    ranked = sorted(runs, key=lambda r: r["tokens_per_cpu_s"])
    return {**ranked[(len(ranked) - 1) // 2], "runs_tokens_per_cpu_s": [r["tokens_per_cpu_s"] for r in runs]}


def report(name: str, threads: int, r: dict) -> str:
    ceiling = r["product_tokens_per_cpu_s"]
    precision = "" if "latent_choice" not in r else f" ({r['latent_choice']} latent choice)"
    return (f"{threads} thread(s) {name:>9}{precision}: {r['tokens_per_cpu_s']:6.0f} tokens/CPU s "
            f"({r['cpu_seconds']:.0f} CPU s), {r['tokens_per_s']:6.0f} tokens/s wall ({r['seconds']:.0f} s), "
            f"{r['cpu_seconds'] / r['seconds']:.2f} CPU s per wall s; held-out FVU {r['fvu']:.4f}, dead {r['dead_fraction']:.2%}; "
            f"encoder product alone {ceiling['float32']:.0f} (fp32) / {ceiling['bfloat16']:.0f} (bf16) / "
            f"{ceiling['int8']:.0f} (int8) tokens/CPU s: "
            f"{r['tokens_per_cpu_s'] / ceiling['float32']:.0%} / {r['tokens_per_cpu_s'] / ceiling['bfloat16']:.0%} of it")


if __name__ == "__main__":
    main()
