"""Benchmark: streaming training against collect-then-train, on the same tokens.

Trains a TopK transcoder on one layer of the default model twice, each in its own process:
once by `collect_activations` to a store on disk then `train_transcoder` on it, once by
`train_streaming` (the model runs as training reads, through a shuffle buffer; nothing on disk).
Prints, for each, the end-to-end throughput (tokens per wall-clock second and per CPU second,
collection included), the peak resident memory of the process (``ru_maxrss``: the model's weights
are most of it), the disk used and the held-out FVU.

Usage: ``python bench/streaming.py [--tokens 32768 --layer 6 --buffer 65536]``; ``--quick`` for
a smoke run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("collect-then-train", "streaming")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=32768, help="training tokens")
    p.add_argument("--layer", type=int, default=6)
    p.add_argument("--n-latents", type=int, default=4608)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--buffer", type=int, default=65536, help="streaming shuffle buffer, tokens")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="smoke run: 8192 tokens, 1152 latents")
    p.add_argument("--json", metavar="PATH", help="also write the results here")
    p.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.n_latents, args.buffer = 8192, 1152, 16384
    return args


def worker(args) -> None:
    import torch

    import tcwidgets as tcw

    torch.set_num_threads(args.threads)
    lm = tcw.load_model()
    tokens = tcw.load_corpus("python-docs", lm, n_tokens=args.tokens)
    test = tcw.collect_activations(lm, [args.layer], tcw.load_corpus("python-docs", lm, n_tokens=8192, split="test"),
                                   progress=False)
    options = dict(n_latents=args.n_latents, k=args.k, batch_size=args.batch_size, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        start, cpu = time.perf_counter(), time.process_time()
        if args.worker == "streaming":
            tc = tcw.train_streaming(lm, args.layer, tokens, buffer_tokens=args.buffer, **options)
        else:
            store = tcw.collect_activations(lm, [args.layer], tokens, out=tmp, progress=False)
            tc = tcw.train_transcoder(store, args.layer, **options)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
        disk = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())
    metrics = tcw.training.reconstruction_metrics(tc, test)
    n = tokens.numel()
    Path(args.out).write_text(json.dumps({
        "tokens": n, "seconds": seconds, "cpu_seconds": cpu_seconds, "tokens_per_s": n / seconds,
        "tokens_per_cpu_s": n / cpu_seconds, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "disk_mib": disk / 2**20, "fvu": metrics["fvu"], "dead_fraction": metrics["dead_fraction"],
    }))


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    from tcwidgets.calibration import device_name

    import torch

    print(f"layer {args.layer}, {args.tokens} tokens, {args.n_latents} latents, TopK k={args.k}, "
          f"{args.batch_size}-token batches, buffer {args.buffer} tokens, {args.threads} thread(s); "
          f"CPU: {device_name(torch.device('cpu'))}", flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in MODES:
            out = Path(tmp) / f"{mode}.json"
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            subprocess.run([sys.executable, __file__, *argv, "--worker", mode, "--out", str(out)], check=True, env=env)
            r = results[mode] = json.loads(out.read_text())
            print(f"{mode:>19}: {r['tokens_per_s']:6.0f} tokens/s wall ({r['seconds']:.0f} s), "
                  f"{r['tokens_per_cpu_s']:6.0f} tokens/CPU s; peak memory {r['peak_rss_mib']:.0f} MiB; "
                  f"disk {r['disk_mib']:.0f} MiB; held-out FVU {r['fvu']:.4f}, dead {r['dead_fraction']:.2%}",
                  flush=True)
    a, b = results["streaming"], results["collect-then-train"]
    print(f"streaming / collect-then-train: {a['tokens_per_s'] / b['tokens_per_s']:.2f}x wall-clock throughput, "
          f"{a['peak_rss_mib'] / b['peak_rss_mib']:.2f}x peak memory, FVU {a['fvu'] / b['fvu']:.3f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
