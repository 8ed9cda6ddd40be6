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
was at git revision REV (its files exported to a temporary folder that the kernel imports first),
and a table prints before and after side by side.

    python bench/ablation.py [--baseline fa0a3c2] [--changes 20] [--threads N] [--out bench/results/ablation]

``--threads`` sets torch's CPU threads here and in the notebook's kernel (default: torch's choice).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import tcwidgets as tcw  # noqa: E402
from baseline import cpu_name, export, side_by_side  # noqa: E402
from browser.harness import JupyterLab, NotebookPage, chromium, write_notebook  # noqa: E402
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
print("BARE", iv.__file__, json.dumps(times[1:]))"""

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


def widget_times(notebook: NotebookPage, prompt: str, length: int, changes: int) -> dict:
    page = notebook.page
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
    painted = [d["painted"] for d in drawn]
    model = [d["model"] for d in drawn]
    return {"key_to_bars_ms": percentiles(painted), "model_ms": percentiles(model),
            "overhead_ms": percentiles([p - m for p, m in zip(painted, model)])}


def measure_widget(out: Path, env: dict[str, str], prompts: dict[int, str], changes: int, repeats: int) -> dict:
    """Key→bars and a bare run in one JupyterLab kernel (whose imports follow ``env``)."""
    results = {}
    write_notebook(out / "bench.ipynb", [
        "import tcwidgets as tcw\nfrom tcwidgets.transcoder import Transcoder\n"
        "from tcwidgets.widgets.sliders import AblationSliders\n"
        f"w = AblationSliders(tcw.load_model(), {{{LAYER}: Transcoder.load('tc')}}, prompt={prompts[min(prompts)]!r})\nw"])
    with JupyterLab(out, env=env) as lab, chromium() as browser:
        notebook = NotebookPage(lab, browser.new_page(viewport={"width": 1400, "height": 1000}), "bench.ipynb").open()
        notebook.run_all()
        notebook.page.wait_for_function(SETTLED)
        notebook.page.evaluate(OBSERVE)
        for length, prompt in prompts.items():
            results[length] = widget_times(notebook, prompt, length, changes)
            notebook.page.evaluate("() => document.activeElement && document.activeElement.blur()")  # keys to the notebook
            printed = notebook.run(BARE_RUN.format(layer=LAYER, prompt=prompt, repeats=repeats))
            line = next(line for line in printed.splitlines() if line.startswith("BARE"))
            _, code, times = line.split(" ", 2)
            results[length]["bare_run_with_edits_ms"] = percentiles(json.loads(times))
            results[length]["code"] = code
        notebook.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "ablation"))
    parser.add_argument("--changes", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=20)
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
    prompts = {length: prompt_of(lm, length) for length in args.lengths}
    results: dict = {"device": "cpu", "cpu": cpu_name(), "torch_threads": torch.get_num_threads(),
                     "cpus": os.cpu_count(), "load_average_before": os.getloadavg()[0], "n_latents": N_LATENTS, "k": K}
    for length, prompt in prompts.items():
        results[f"{length}_tokens"] = model_times(lm, tc, prompt, args.repeats)
    del lm
    if args.baseline:  # first, so that a machine getting busier does not favour the new code
        with tempfile.TemporaryDirectory(prefix="tcw-baseline-") as folder:
            code = export(args.baseline, Path(folder))
            results["before"] = measure_widget(out, {**env, "PYTHONPATH": str(code)}, prompts, args.changes,
                                               args.repeats)
        results["baseline"] = args.baseline
    results["after"] = measure_widget(out, env, prompts, args.changes, args.repeats)
    results["load_average_after"] = os.getloadavg()[0]
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    if args.baseline:
        print(f"\nAblationSliders before ({args.baseline}) and after, {results['cpu']}, "
              f"{results['torch_threads']} torch threads, load {results['load_average_before']:.1f}:")
        print(side_by_side([(f"{label}, {length} tokens (ms)", results["before"][length][name],
                              results["after"][length][name]) for length in args.lengths
                             for name, label in (("key_to_bars_ms", "slider move -> bars"),
                                                 ("bare_run_with_edits_ms", "bare run_with_edits"),
                                                 ("overhead_ms", "widget overhead"))]))


if __name__ == "__main__":
    main()
