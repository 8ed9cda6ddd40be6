"""Before/after comparisons for the widget benchmarks: the package as it was at a git revision, for
a notebook kernel to import first, and a side-by-side table of percentiles."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def export(revision: str, folder: Path) -> Path:
    """The package's files at git ``revision``, extracted into ``folder``; a kernel started with
    ``PYTHONPATH=folder`` imports them instead of the working tree's."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision, "tcwidgets"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def side_by_side(rows: list[tuple[str, dict, dict]]) -> str:
    """``(label, before, after)`` percentile dicts (``p50``, ``p90``) as a table with the p50 ratio."""
    lines = [f"{'':40}{'before p50':>11}{'p90':>8}{'after p50':>11}{'p90':>8}{'after/before':>14}"]
    for label, before, after in rows:
        ratio = after["p50"] / before["p50"] if before["p50"] > 0 else float("nan")
        lines.append(f"{label:40}{before['p50']:>11.1f}{before['p90']:>8.1f}{after['p50']:>11.1f}"
                     f"{after['p90']:>8.1f}{ratio:>14.2f}")
    return "\n".join(lines)


def cpu_name() -> str:
    """The CPU's model name (what a figure was measured on)."""
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"
