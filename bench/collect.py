"""Collection speed against a plain forward truncated after the same layer, and peak memory.

    python bench/collect.py [--layer 6] [--tokens 100000] [--batch-size 32] [--rounds 6]

Prints, from one run:
  * tokens/s of `collect_activations` (nnsight trace saving the layer's MLP input and output,
    stopped right after it) and of a plain PyTorch forward of the un-wrapped model truncated after
    the same MLP by a forward hook, on the same batches, interleaved round by round so that load
    from other processes hits both alike; and their ratio (target >= 0.9);
  * the peak RSS of a fresh process that loads the default model and collects ``--tokens`` tokens
    of the layer into a store on disk (target under 2 GB, Binder's limit).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import tcwidgets as tcw


class _Stop(Exception):
    pass


def plain_truncated_forward(lm: tcw.Model, batch: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What collection computes, with a forward hook instead of nnsight: stop after the MLP."""
    kept = {}

    def hook(module, args, output):
        kept["io"] = (args[0].detach().cpu(), output.detach().cpu())
        raise _Stop

    handle = tcw.models.resolve(lm._module, lm.sites.mlp_path(layer)).register_forward_hook(hook)
    try:
        with torch.no_grad():
            lm._module(batch)
    except _Stop:
        pass
    finally:
        handle.remove()
    return kept["io"]


def speed(lm: tcw.Model, tokens: torch.Tensor, layer: int, batch_size: int, rounds: int) -> None:
    batches = [tokens[i:i + batch_size] for i in range(0, len(tokens), batch_size)][:rounds]
    plain, traced = [], []
    plain_truncated_forward(lm, batches[0], layer)  # warm-up
    tcw.collect_activations(lm, [layer], batches[0], batch_size=batch_size, progress=False)
    for batch in batches:
        start = time.perf_counter()
        plain_truncated_forward(lm, batch, layer)
        plain.append(batch.numel() / (time.perf_counter() - start))
        start = time.perf_counter()
        tcw.collect_activations(lm, [layer], batch, batch_size=batch_size, progress=False)
        traced.append(batch.numel() / (time.perf_counter() - start))
    p, t = statistics.median(plain), statistics.median(traced)
    print(f"plain forward truncated after layer {layer}: {p:8.0f} tok/s (median of {len(batches)} batches "
          f"of {batch_size}x{tokens.shape[1]})")
    print(f"collect_activations (nnsight, stop after it):  {t:8.0f} tok/s")
    print(f"ratio collect / plain: {t / p:.3f}   (target >= 0.9)")


def peak_rss(layer: int, n_tokens: int, batch_size: int) -> None:
    with tempfile.TemporaryDirectory() as out:
        code = (
            "import resource, tcwidgets as tcw\n"
            "lm = tcw.load_model()\n"
            f"tokens = tcw.load_corpus('python-docs', lm, n_tokens={n_tokens})\n"
            f"tcw.collect_activations(lm, [{layer}], tokens, out={out!r}, batch_size={batch_size}, progress=False)\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
        )
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        seconds = time.perf_counter() - start
    peak_gb = int(done.stdout.split()[-1]) * 1024 / 1e9
    print(f"peak RSS of a process collecting {n_tokens:,} tokens of layer {layer} to disk: {peak_gb:.2f} GB "
          f"(target < 2 GB; took {seconds:.0f} s including model load)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layer", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    lm = tcw.load_model()
    tokens = tcw.load_corpus("python-docs", lm, n_tokens=args.tokens)
    speed(lm, tokens, args.layer, args.batch_size, args.rounds)
    peak_rss(args.layer, args.tokens, args.batch_size)


if __name__ == "__main__":
    main()
