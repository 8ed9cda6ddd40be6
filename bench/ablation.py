"""Benchmark AblationSliders: latency from a slider change to updated bars, on the default model (CPU).

For a 16-token prompt (``--lengths`` for more) and a 4608-latent TopK transcoder on layer 6 (random
init: timing does not depend on training), measures

- model: `run_with_edits` with one edit (a latent zeroed at the last token) on the prompt's
  `PromptSession`, which reruns only the last token from the kept key/value cache; next to the same
  edit rerunning every position (`splice` on the whole prompt) and a plain forward pass of the
  un-wrapped module;
- key→bars: in JupyterLab + Chromium, from a key press on a slider (ArrowLeft/ArrowRight, between
  two edits that both change something) to the new bars painted (the frame after the DOM update),
  with the model time of that very run as the widget reports it (``data-model-ms``), and a bare
  `run_with_edits` of the same edit timed in the same kernel; the widget overhead is the difference
  (debounce, comm messages, JSON, the worker thread, drawing).

With ``--baseline REV`` the key→bars and bare-run measurements are also made with the package as it
was at git revision REV (its files exported to a temporary folder that that side's kernel imports
first). Both sides run in one JupyterLab, each in its own kernel and page, in ``--rounds`` rounds
interleaved A B, B A, ... (load on a shared machine comes and goes: both sides see it alike); the
table prints the median over rounds of each round's p50 and p90, and the median over rounds of the
ratio after/before of the paired rounds' p50s.

    python bench/ablation.py [--baseline fa0a3c2] [--rounds 4] [--changes 10] [--threads N]

``--threads`` sets torch's CPU threads here and in the notebook's kernel (default: torch's choice).
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
from tcwidgets.interventions import Edit, LatentEditor, encode_prompt, run_with_edits, start_session  # noqa: E402
from tcwidgets.splicing import splice  # noqa: E402
from tcwidgets.transcoder import Transcoder, TranscoderConfig  # noqa: E402

LAYER, N_LATENTS, K = 6, 4608, 32
BARE_RUN = """import json, time
import tcwidgets.interventions as iv
edits = [iv.Edit({layer}, w._rows[0]["latent"], scale=0.0)]
tokens = iv.encode_prompt(w.lm, {prompt!r})
# the prompt's kept clean run: a PromptSession (or, before it existed, the module's own cache)
kept = iv.start_session(w.lm, w.transcoders, tokens) if hasattr(iv, "start_session") else tokens
times = []
for _ in range({repeats} + 1):
    start = time.perf_counter()
    iv.run_with_edits(w.lm, w.transcoders, kept, edits, positions=[-1])
    times.append(1000 * (time.perf_counter() - start))
print("BARE", json.dumps(times[1:]))"""

OBSERVE = """() => {
  window.__drawn = [];
  const root = document.querySelector('.tcw-sliders');
  root.addEventListener('keydown', () => { window.__pressed = performance.now(); }, true);
  new MutationObserver(() => {
    const changed = performance.now();
    requestAnimationFrame(() => window.__drawn.push({ request: root.dataset.request,
      model: Number(root.dataset.modelMs), changed: changed - window.__pressed,
      painted: performance.now() - window.__pressed }));
  }).observe(root, { attributes: true, attributeFilter: ['data-request'] });
}"""
SETTLED = """() => { const r = document.querySelector('.tcw-sliders');
  return r && r.getAttribute('aria-busy') === 'false' && r.querySelectorAll('.tcw-bar-row').length > 0; }"""


def percentiles(values: list[float]) -> dict[str, float]:
    return {"p50": round(float(np.percentile(values, 50)), 1), "p90": round(float(np.percentile(values, 90)), 1),
            "min": round(float(np.min(values)), 1), "n": len(values)}


def prompt_of(lm: tcw.Model, length: int) -> str:
    """Text that `encode_prompt` turns into exactly ``length`` tokens (BOS included)."""
    text = " ".join(tcw.corpus.python_docs()[:3])
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    for n in range(length - 4, length + 4):
        candidate = lm.tokenizer.decode(ids[:n]).strip()
        if encode_prompt(lm, candidate).shape[1] == length:
            return candidate
    raise RuntimeError(f"no prompt of {length} tokens found")


def model_times(lm: tcw.Model, tc: Transcoder, prompt: str, repeats: int) -> dict:
    tokens = encode_prompt(lm, prompt)
    session = start_session(lm, {LAYER: tc}, tokens)
    top = int(session.latents[LAYER][0, -1].argmax())
    edits = [Edit(LAYER, top, scale=0.0)]
    steps = {
        "plain_forward_ms": lambda: lm._module(tokens),
        "rerun_all_positions_ms": lambda: splice(lm, {LAYER: tc}, tokens, mode="error", progress=False,
                                                 edit=LatentEditor(edits, [tokens.shape[1] - 1])),
        "run_with_edits_ms": lambda: run_with_edits(lm, {LAYER: tc}, session, edits, positions=[-1]),
    }
    timings: dict[str, list[float]] = {name: [] for name in steps}
    with torch.no_grad():
        for _ in range(repeats + 1):  # interleaved; the first round is a warm-up
            for name, step in steps.items():
                start = time.perf_counter()
                step()
                timings[name].append(1000 * (time.perf_counter() - start))
    return {name: percentiles(values[1:]) for name, values in timings.items()}


def widget_round(notebook: NotebookPage, prompt: str, length: int, changes: int, repeats: int) -> Samples:
    """One round on one side: ``changes`` slider moves timed from key to bars, then ``repeats`` bare
    `run_with_edits` of the same edit in the same kernel."""
    page = notebook.page
    page.bring_to_front()  # a page in the background gets its frames throttled
    box = page.locator(".tcw-sliders .tcw-prompt")
    box.fill(prompt)
    box.press("Enter")
    page.locator(f".tcw-sliders .tcw-tok[data-position='{length - 1}'][aria-pressed='true']").wait_for()
    page.wait_for_function(SETTLED)
    slider = page.locator(".tcw-sliders .tcw-row").first.locator(".tcw-slider")
    slider.focus()
    for _ in range(20):  # 1.0 -> 0.0: from here on every value edits something
        page.keyboard.press("ArrowLeft")
    page.wait_for_function(SETTLED)
    page.evaluate("window.__drawn = []")
    for n in range(changes):
        page.keyboard.press("ArrowRight" if n % 2 == 0 else "ArrowLeft")  # 0.05, 0.0, 0.05, ...
        page.wait_for_function(f"() => window.__drawn.length > {n}")
        page.wait_for_function(SETTLED)
        page.wait_for_timeout(150)
    drawn = page.evaluate("window.__drawn")
    painted, model = [d["painted"] for d in drawn], [d["model"] for d in drawn]
    page.evaluate("() => document.activeElement && document.activeElement.blur()")  # keys to the notebook
    printed = notebook.run(BARE_RUN.format(layer=LAYER, prompt=prompt, repeats=repeats))
    line = next(line for line in printed.splitlines() if line.startswith("BARE"))
    return {"key_to_bars_ms": painted, "model_ms": model, "overhead_ms": [p - m for p, m in zip(painted, model)],
            "bare_run_with_edits_ms": json.loads(line.split(" ", 1)[1])}


def measure_widgets(out: Path, env: dict[str, str], code: dict[str, Path | None], prompts: dict[int, str],
                    changes: int, repeats: int, rounds: int) -> dict[int, dict[str, list[Samples]]]:
    """Key→bars and bare runs for each side (its kernel imports the package from ``code[side]``, or
    the installed one for None), all in one JupyterLab, rounds interleaved between the sides."""
    with JupyterLab(out, env=env) as lab, chromium() as browser:
        notebooks = {}
        for side, folder in code.items():
            notebooks[side] = open_side(lab, browser, side, folder, sliders_cell(folder, prompts[min(prompts)]),
                                        lambda page: page.wait_for_function(SETTLED, timeout=SETUP_TIMEOUT * 1000))
            notebooks[side].page.evaluate(OBSERVE)
        results = {}
        for length, prompt in prompts.items():
            print(f"{length} tokens:", flush=True)
            results[length] = interleaved({side: partial(widget_round, notebook, prompt, length, changes, repeats)
                                           for side, notebook in notebooks.items()}, rounds)
        for notebook in notebooks.values():
            notebook.close()
    return results


def sliders_cell(folder: Path | None, prompt: str) -> str:
    """The code showing the sliders (a baseline in ``folder`` loads the transcoder as ``tc-v1``, which
    revisions before schema version 2 read)."""
    return ("import tcwidgets as tcw\nfrom tcwidgets.transcoder import Transcoder\n"
            "from tcwidgets.widgets.sliders import AblationSliders\n"
            f"tc = Transcoder.load({'tc' if folder is None else 'tc-v1'!r})\n"
            f"w = AblationSliders(tcw.load_model(), {{{LAYER}: tc}}, prompt={prompt!r})\nw")


def save_as_schema_1(folder: Path, copy: Path) -> None:
    """The transcoder in ``folder`` as schema version 1 in ``copy``: the same weights, a config
    without the checksums that schema version 2 added (so a baseline revision can load it)."""
    copy.mkdir(exist_ok=True)
    config = json.loads((folder / "config.json").read_text())
    config = {name: value for name, value in config.items() if name not in ("weights", "sha256")}
    (copy / "config.json").write_text(json.dumps({**config, "schema_version": 1}, indent=1))
    shutil.copyfile(folder / "weights.safetensors", copy / "weights.safetensors")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "ablation"))
    parser.add_argument("--changes", type=int, default=10, help="slider moves per side per round")
    parser.add_argument("--repeats", type=int, default=10, help="bare runs per side per round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--lengths", type=int, nargs="+", default=[16])
    parser.add_argument("--baseline", help="a git revision to measure the widget against (before)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    env = {"TCWIDGETS_CACHE": os.environ.get("TCWIDGETS_CACHE", "")}
    if args.threads:
        torch.set_num_threads(args.threads)
        env["OMP_NUM_THREADS"] = str(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lm = tcw.load_model()
    torch.manual_seed(0)
    tc = Transcoder(TranscoderConfig(d_in=lm.d_model, d_out=lm.d_model, n_latents=N_LATENTS, k=K,
                                     site={"model": lm.name, "layer": LAYER})).eval().requires_grad_(False)
    tc.save(out / "tc")
    save_as_schema_1(out / "tc", out / "tc-v1")
    prompts = {length: prompt_of(lm, length) for length in args.lengths}
    results: dict = {"device": "cpu", "cpu": cpu_name(), "torch_threads": torch.get_num_threads(),
                     "cpus": os.cpu_count(), "load_average_before": os.getloadavg(), "n_latents": N_LATENTS, "k": K,
                     "rounds": args.rounds}
    for length, prompt in prompts.items():
        results[f"{length}_tokens"] = model_times(lm, tc, prompt, args.repeats)
    del lm
    with tempfile.TemporaryDirectory(prefix="tcw-baseline-") as folder:
        code = {"before": export(args.baseline, Path(folder)), "after": None} if args.baseline else {"after": None}
        rounds = measure_widgets(out, env, code, prompts, args.changes, args.repeats, args.rounds)
    results["load_average_after"] = os.getloadavg()
    metrics = {"key_to_bars_ms": "slider move -> bars", "bare_run_with_edits_ms": "bare run_with_edits",
               "overhead_ms": "widget overhead"}
    for side in code:
        results[side] = {length: {metric: summary(rounds[length][side], metric) for metric in metrics}
                         for length in prompts}
    if args.baseline:
        results["baseline"] = args.baseline
        results["after_over_before"] = {length: {metric: paired_ratio(rounds[length]["before"],
                                                                      rounds[length]["after"], metric)
                                                 for metric in metrics} for length in prompts}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    if args.baseline:
        load = " ".join(f"{v:.1f}" for v in results["load_average_before"])
        print(f"\nAblationSliders before ({args.baseline}) and after: medians of {args.rounds} interleaved rounds, "
              f"{results['cpu']}, {results['torch_threads']} torch threads, load average {load} at the start:")
        print(side_by_side([(f"{label}, {length} tokens (ms)", rounds[length]["before"], rounds[length]["after"],
                             metric) for length in prompts for metric, label in metrics.items()]))


if __name__ == "__main__":
    main()
