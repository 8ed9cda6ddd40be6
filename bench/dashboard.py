"""Benchmark FeatureDashboard on a full-size transcoder: how fast a new latent reaches the screen.

Measures, for a 4608-latent transcoder analysed over the 100k-token layer-6 store:

- open: `FeatureStats.load` plus the first latent's payload (lazy loading);
- payload: bytes of JSON sent per latent, and the time Python takes to build it;
- python→page: from ``dash.feature = n`` in a kernel (a cell run through JupyterLab's UI) to the new
  latent drawn in Chromium (the frame after the DOM update), over ``--changes`` random latents;
- key→page: from a ``j`` key press in the page to the next latent drawn (a round trip through the
  kernel).

Both clocks are this machine's wall clock (kernel ``time.time()``, page ``Date.now()``).

    python bench/dashboard.py [--store /tmp/tcw-acts/train] [--rounds 4] [--changes 15] [--random-init] [--baseline REV]

With ``--baseline REV`` the python→page and key→page measurements are also made with the package as
it was at git revision REV (exported to a temporary folder that that side's kernel imports first).
Both sides run in one JupyterLab, each in its own kernel and page, in ``--rounds`` rounds
interleaved A B, B A, ... (load on a shared machine comes and goes: both sides see it alike); the
table prints the median over rounds of each round's p50 and p90, and the median over rounds of the
ratio after/before of the paired rounds' p50s.

The transcoder (trained with `train_transcoder`, one epoch, unless ``--random-init``) and its stats
are cached in ``bench/results/dashboard/`` and reused while the store and settings are unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import tcwidgets as tcw  # noqa: E402
from baseline import (SETUP_TIMEOUT, Samples, cpu_name, export, interleaved, open_side, paired_ratio,  # noqa: E402
                      side_by_side, summary)
from browser.harness import JupyterLab, NotebookPage, chromium  # noqa: E402
from tcwidgets.features import FeatureStats, analyze_features, transcoder_fingerprint  # noqa: E402
from tcwidgets.widgets.dashboard import latent_payload  # noqa: E402

LAYER, N_LATENTS, K = 6, 4608, 32

OBSERVE = """() => {
  window.__drawn = [];
  const root = document.querySelector('.tcw-dashboard');
  new MutationObserver(() => {
    const latent = Number(root.dataset.latent), changed = Date.now();
    requestAnimationFrame(() => window.__drawn.push([latent, changed, Date.now()]));
  }).observe(root, { attributes: true, attributeFilter: ['data-latent'] });
}"""

PRESS = """() => { const t = Date.now();
  document.querySelector('.tcw-dashboard').dispatchEvent(new KeyboardEvent('keydown', { key: 'j', bubbles: true }));
  return t; }"""


def percentiles(values: list[float]) -> dict[str, float]:
    return {"p50": float(np.percentile(values, 50)), "p90": float(np.percentile(values, 90)),
            "max": float(np.max(values)), "n": len(values)}


def transcoder(store: tcw.ActivationStore, folder: Path, random_init: bool) -> tuple[tcw.Transcoder, dict]:
    if (folder / "config.json").is_file():
        return tcw.Transcoder.load(folder), json.loads((folder / "bench.json").read_text())
    start = time.perf_counter()
    if random_init:
        torch.manual_seed(0)
        scale = store.d_model ** 0.5 / store.stats(LAYER).in_norm
        tc = tcw.Transcoder(tcw.TranscoderConfig(d_in=store.d_model, d_out=store.d_model, n_latents=N_LATENTS,
                                                 k=K, input_scale=scale, output_scale=scale,
                                                 site={"model": store.model, "layer": LAYER}))
    else:
        tc = tcw.train_transcoder(store, layer=LAYER, n_latents=N_LATENTS, activation="topk", k=K, epochs=1)
    info = {"transcoder": "random init" if random_init else "train_transcoder, 1 epoch",
            "train_s": time.perf_counter() - start}
    tc.save(folder)
    (folder / "bench.json").write_text(json.dumps(info))
    return tc, info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", default="/tmp/tcw-acts/train")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "dashboard"))
    parser.add_argument("--changes", type=int, default=15, help="latent changes per side per round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--random-init", action="store_true", help="skip training (timings only)")
    parser.add_argument("--baseline", help="a git revision to measure the page against (before)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"device": "cpu", "torch_threads": torch.get_num_threads()}

    lm = tcw.load_model()
    store = tcw.ActivationStore.open(args.store, model=lm.name, layers=[LAYER])
    tc, info = transcoder(store, out / ("tc-random" if args.random_init else "tc"), args.random_init)
    results.update(info, n_latents=tc.n_latents, n_tokens_store=store.n_tokens)

    stats_dir = out / ("stats-random" if args.random_init else "stats")
    fingerprint = transcoder_fingerprint(tc)
    if not (stats_dir / "stats.json").is_file() or FeatureStats.load(stats_dir).fingerprint != fingerprint:
        start = time.perf_counter()
        analyze_features(lm, tc, store).save(stats_dir)
        results["analyze_s"] = time.perf_counter() - start
    results["stats_bytes"] = sum(f.stat().st_size for f in stats_dir.iterdir())

    start = time.perf_counter()
    stats = FeatureStats.load(stats_dir)
    latent_payload(stats, 0)
    results["open_ms"] = 1000 * (time.perf_counter() - start)
    results["live_latents"] = int((stats.count > 0).sum())

    rng = np.random.default_rng(0)
    live = np.flatnonzero(stats.count)
    sizes, build = [], []
    for latent in rng.choice(live, size=min(200, live.size), replace=False):
        start = time.perf_counter()
        payload = latent_payload(stats, int(latent))
        build.append(1000 * (time.perf_counter() - start))
        sizes.append(len(json.dumps(payload).encode()))
    results["payload_bytes"] = percentiles(sizes)
    results["payload_build_ms"] = percentiles(build)

    targets = [int(t) for t in rng.choice(live[live > 0], size=args.changes, replace=False)]
    results["cpu"], results["load_average_before"] = cpu_name(), os.getloadavg()
    results["rounds"] = args.rounds
    env = {"TCWIDGETS_CACHE": os.environ.get("TCWIDGETS_CACHE", "")}
    with tempfile.TemporaryDirectory(prefix="tcw-baseline-") as folder:
        code = {"before": export(args.baseline, Path(folder)), "after": None} if args.baseline else {"after": None}
        if args.baseline:
            save_as_version_1(stats_dir, out / f"{stats_dir.name}-v1")
        rounds = measure_pages(out, stats_dir, targets, env, code, args.rounds)
    results["load_average_after"] = os.getloadavg()
    metrics = ("python_to_dom_ms", "python_to_page_ms", "key_to_page_ms")
    for side in code:
        results[side] = {metric: summary(rounds[side], metric) for metric in metrics}
    if args.baseline:
        results["baseline"] = args.baseline
        results["after_over_before"] = {metric: paired_ratio(rounds["before"], rounds["after"], metric)
                                        for metric in metrics}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    if args.baseline:
        load = " ".join(f"{v:.1f}" for v in results["load_average_before"])
        print(f"\nFeatureDashboard before ({args.baseline}) and after: medians of {args.rounds} interleaved rounds, "
              f"{results['cpu']}, load average {load} at the start:")
        print(side_by_side([(f"{metric} (ms)", rounds["before"], rounds["after"], metric)
                            for metric in ("python_to_page_ms", "key_to_page_ms")]))


def save_as_version_1(folder: Path, copy: Path) -> None:
    """The feature statistics in ``folder`` as version 1 in ``copy``: the same arrays and vocabulary,
    a ``stats.json`` without the checksums version 2 added (so a baseline revision can load them)."""
    copy.mkdir(exist_ok=True)
    meta = json.loads((folder / "stats.json").read_text())
    meta = {name: value for name, value in meta.items() if not (isinstance(value, dict) and "sha256" in value)
            and name != "sha256"}
    (copy / "stats.json").write_text(json.dumps({**meta, "version": 1}))
    for name in ("stats.safetensors", "vocab.json"):
        shutil.copyfile(folder / name, copy / name)


def page_round(notebook: NotebookPage, side: str, targets: list[int]) -> Samples:
    """One round on one side: ``dash.feature = n`` for each target, then as many ``j`` key presses."""
    page = notebook.page
    page.bring_to_front()  # a page in the background gets its frames throttled
    page.evaluate("window.__drawn = []")
    loop = (f"import json, time\nsent = []\nfor latent in {targets}:\n    time.sleep(0.4)\n"
            "    sent.append((latent, time.time() * 1000))\n    dash.feature = latent\n"
            f"time.sleep(0.4)\njson.dump(sent, open('sent-{side}.json', 'w'))\nprint('sent', len(sent))")
    assert "sent" in notebook.run(loop, timeout=120 + len(targets))
    sent = json.loads((notebook.lab.root / f"sent-{side}.json").read_text())
    drawn = {latent: (changed, painted) for latent, changed, painted in page.evaluate("window.__drawn")}
    results = {"python_to_dom_ms": [drawn[latent][0] - t for latent, t in sent],
               "python_to_page_ms": [drawn[latent][1] - t for latent, t in sent]}

    page.evaluate("window.__drawn = []")
    page.locator(".tcw-dashboard .tcw-summary").click()
    pressed = []
    for _ in range(len(targets)):
        current = int(page.locator(".tcw-dashboard").get_attribute("data-latent"))
        pressed.append(page.evaluate(PRESS))
        page.locator(f".tcw-dashboard[data-latent='{current + 1}']").wait_for()
        page.wait_for_function(f"() => window.__drawn.length >= {len(pressed)}")
        page.wait_for_timeout(100)
    painted = [entry[2] for entry in page.evaluate("window.__drawn")]
    results["key_to_page_ms"] = [p - t for p, t in zip(painted, pressed, strict=True)]
    return results


def measure_pages(out: Path, stats_dir: Path, targets: list[int], env: dict[str, str], code: dict[str, Path | None],
                  rounds: int) -> dict[str, list[Samples]]:
    """Python→page and key→page for each side (its kernel imports the package from ``code[side]``, or
    the installed one for None), all in one JupyterLab, rounds interleaved between the sides."""
    with JupyterLab(out, env=env) as lab, chromium() as browser:
        notebooks = {}
        for side, folder in code.items():
            stats = stats_dir.name if folder is None else f"{stats_dir.name}-v1"  # what a baseline reads
            cell = (f"from tcwidgets.features import FeatureStats\nfrom tcwidgets.widgets import FeatureDashboard\n"
                    f"dash = FeatureDashboard(FeatureStats.load({stats!r}), feature=0)\ndash")
            notebooks[side] = open_side(lab, browser, side, folder, cell, lambda page: page.locator(
                ".tcw-dashboard[data-latent='0']").wait_for(timeout=SETUP_TIMEOUT * 1000))
            notebooks[side].page.evaluate(OBSERVE)
        results = interleaved({side: partial(page_round, notebook, side, targets)
                               for side, notebook in notebooks.items()}, rounds)
        for notebook in notebooks.values():
            notebook.close()
    return results


if __name__ == "__main__":
    main()
