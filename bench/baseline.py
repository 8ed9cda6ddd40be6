"""Before/after comparisons for the widget benchmarks: the package as it was at a git revision, for
a notebook kernel to import first; rounds of measurement interleaved between the two sides (so that
load that comes and goes on a shared machine hits both alike); and a side-by-side table of the
rounds' medians with the ratio of paired rounds."""

from __future__ import annotations

import platform
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from browser.harness import JupyterLab, NotebookPage, write_notebook

ROOT = Path(__file__).resolve().parents[1]
SETUP_TIMEOUT = 900  # seconds for a side's notebook to show its widget (loading takes minutes on a busy machine)

Samples = dict[str, list[float]]  # metric name -> the round's samples (ms)


def export(revision: str, folder: Path) -> Path:
    """The package's files at git ``revision``, extracted into ``folder``; a kernel that puts
    ``folder`` first on ``sys.path`` imports them instead of the working tree's."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision, "tcwidgets"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def open_side(lab: JupyterLab, browser: Any, side: str, folder: Path | None, code: str,
              ready: Callable[[Any], None]) -> NotebookPage:
    """A notebook ``side.ipynb`` running ``code`` in its own kernel and page, importing the package
    from ``folder`` (a baseline from `export`; None: the installed one), checked; ``ready(page)``
    waits for its widget."""
    first = "" if folder is None else f"import sys\nsys.path.insert(0, {str(folder)!r})\n"
    write_notebook(lab.root / f"{side}.ipynb", [first + code])
    notebook = NotebookPage(lab, browser.new_page(viewport={"width": 1400, "height": 1000}), f"{side}.ipynb").open()
    notebook.run_all(timeout=SETUP_TIMEOUT)
    ready(notebook.page)
    imported = notebook.run("import tcwidgets\nprint(tcwidgets.__file__)").strip()
    if (folder is not None) != imported.startswith(str(folder)):
        raise RuntimeError(f"the {side} kernel imported {imported}, not the package from {folder}")
    return notebook


def interleaved(sides: dict[str, Callable[[], Samples]], rounds: int) -> dict[str, list[Samples]]:
    """Call each side's round ``rounds`` times, alternating which side goes first (A B, B A, A B, ...);
    returns each side's rounds in order, so round ``i`` of one side ran next to round ``i`` of the other."""
    results: dict[str, list[Samples]] = {name: [] for name in sides}
    names = list(sides)
    for round_ in range(rounds):
        for name in names if round_ % 2 == 0 else names[::-1]:
            results[name].append(sides[name]())
            print(f"round {round_ + 1}/{rounds}, {name}: "
                  + ", ".join(f"{metric} p50 {np.median(values):.1f}" for metric, values in results[name][-1].items()),
                  flush=True)
    return results


def summary(rounds: list[Samples], metric: str) -> dict[str, float]:
    """A side's figure for ``metric``: the median over rounds of each round's p50 and p90 (one busy
    round moves it little), and every round's p50."""
    p50s = [float(np.percentile(r[metric], 50)) for r in rounds]
    p90s = [float(np.percentile(r[metric], 90)) for r in rounds]
    return {"p50": round(float(np.median(p50s)), 1), "p90": round(float(np.median(p90s)), 1),
            "round_p50s": [round(v, 1) for v in p50s], "n": sum(len(r[metric]) for r in rounds)}


def paired_ratio(before: list[Samples], after: list[Samples], metric: str) -> float:
    """The median over rounds of after's p50 over before's p50 in the same round (measured minutes apart)."""
    return float(np.median([np.percentile(a[metric], 50) / np.percentile(b[metric], 50)
                            for b, a in zip(before, after, strict=True)]))


def side_by_side(rows: list[tuple[str, list[Samples], list[Samples], str]]) -> str:
    """``(label, before rounds, after rounds, metric)`` as a table: medians over rounds of p50 and p90,
    and the median ratio of paired rounds' p50s (below 1: after is faster)."""
    lines = [f"{'':40}{'before p50':>11}{'p90':>8}{'after p50':>11}{'p90':>8}{'after/before':>14}"]
    for label, before, after, metric in rows:
        b, a = summary(before, metric), summary(after, metric)
        lines.append(f"{label:40}{b['p50']:>11.1f}{b['p90']:>8.1f}{a['p50']:>11.1f}{a['p90']:>8.1f}"
                     f"{paired_ratio(before, after, metric):>14.2f}")
    return "\n".join(lines)


def cpu_name() -> str:
    """The CPU's model name (what a figure was measured on)."""
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"
