"""What checksums and identity checks cost: this checkout against another (e.g. the commit before them).

    git worktree add /tmp/tcw-base 6568d80        # the code before checksums
    python bench/files.py --baseline /tmp/tcw-base [--tokens 100000] [--rounds 3]

Each side runs in its own processes (``PYTHONPATH`` = its checkout), rounds interleaved (A B, B A, ...)
so that load from other processes hits both alike. Once per side: collect a ``--tokens`` store of
layer 6, and feature statistics of a random 4608-latent transcoder over its first 10k tokens. Per
round and side:

- collect: `collect_activations` of 10k tokens into a new folder (tok/s; shards are hashed when written);
- open+read: `ActivationStore.open` of the big store plus ``store.layer(6)`` (the first read verifies
  every shard's checksum);
- train: one epoch of `Trainer` (4608 latents, k=32, batches of 2048) on the big store (steps/s; the
  first batch touches, so verifies, every shard: a short epoch makes that cost look large);
- dashboard: `FeatureStats.load` plus the first latent's payload (verifies the arrays' checksum), then
  the median of 50 latent switches.

Prints medians and the ratio this/baseline for each (times: lower is better, rates: higher).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SETUP = """
import json, sys, time, torch, tcwidgets as tcw
from tcwidgets.features import analyze_features
lm = tcw.load_model()
store_dir, stats_dir, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
tokens = tcw.load_corpus("python-docs", lm, context=128, n_tokens=n)
store = tcw.collect_activations(lm, [6], tokens, out=store_dir, progress=False)
torch.manual_seed(0)
scale = store.d_model ** 0.5 / store.stats(6).in_norm
tc = tcw.Transcoder(tcw.TranscoderConfig(d_in=576, d_out=576, n_latents=4608, k=32, input_scale=scale,
                                         output_scale=scale, site={"model": store.model, "layer": 6}))
analyze_features(lm, tc, tokens[:80], progress=False).save(stats_dir)
"""

ROUND = """
import json, shutil, statistics, sys, tempfile, time, numpy as np, torch, tcwidgets as tcw
from tcwidgets.features import FeatureStats
from tcwidgets.widgets.dashboard import latent_payload
lm = tcw.load_model()
store_dir, stats_dir = sys.argv[1], sys.argv[2]
result = {}
tokens = tcw.load_corpus("python-docs", lm, context=128, n_tokens=10_000, seed=1)
with tempfile.TemporaryDirectory() as out:
    start = time.perf_counter()
    tcw.collect_activations(lm, [6], tokens, out=out, progress=False)
    result["collect tok/s"] = tokens.numel() / (time.perf_counter() - start)
start = time.perf_counter()
store = tcw.ActivationStore.open(store_dir)
store.layer(6)
result["open+read s"] = time.perf_counter() - start
store = tcw.ActivationStore.open(store_dir)
trainer = tcw.Trainer(store, 6, tcw.TrainingConfig(n_latents=4608, k=32, batch_size=2048), progress=False)
start = time.perf_counter()
trainer.fit()
result["train steps/s"] = trainer.total_steps / (time.perf_counter() - start)
start = time.perf_counter()
stats = FeatureStats.load(stats_dir)
latent_payload(stats, 0)
result["dashboard open ms"] = 1000 * (time.perf_counter() - start)
switches = []
for latent in np.random.default_rng(0).choice(stats.n_latents, 50, replace=False):
    start = time.perf_counter()
    latent_payload(stats, int(latent))
    switches.append(1000 * (time.perf_counter() - start))
result["dashboard switch ms"] = statistics.median(switches)
result["tcwidgets"] = tcw.__file__
print(json.dumps(result))
"""


def run(code: str, checkout: Path, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(checkout), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    # run outside any checkout: `python -c` puts the working directory first on sys.path
    done = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True,
                          cwd=tempfile.gettempdir())
    if done.returncode:
        raise RuntimeError(f"{checkout}: {done.stderr[-3000:]}")
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True, type=Path, help="another checkout of tcwidgets")
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    sides = {"baseline": args.baseline.resolve(), "this": ROOT}
    with tempfile.TemporaryDirectory() as work:
        folders = {name: (f"{work}/{name}-store", f"{work}/{name}-stats") for name in sides}
        for name, checkout in sides.items():
            run(SETUP, checkout, *folders[name], str(args.tokens))
        results: dict[str, list[dict]] = {name: [] for name in sides}
        for round_ in range(args.rounds):
            for name in (list(sides) if round_ % 2 == 0 else list(sides)[::-1]):
                results[name].append(json.loads(run(ROUND, sides[name], *folders[name]).splitlines()[-1]))
                print(name, results[name][-1], flush=True)
    print(f"\nmedians of {args.rounds} interleaved rounds ({args.tokens:,}-token store of layer 6)")
    print(f"{'':22}{'baseline':>12}{'this':>12}{'this/baseline':>15}")
    for key in [key for key in results["this"][0] if key != "tcwidgets"]:
        base, this = (statistics.median(r[key] for r in results[name]) for name in ("baseline", "this"))
        print(f"{key:22}{base:12.3f}{this:12.3f}{this / base:15.3f}")


if __name__ == "__main__":
    main()
