"""Run a tutorial notebook end to end, as CI and the run-time table do.

``python -m tcwidgets.tutorials.runner [--fast] [--learner] NOTEBOOK...`` executes each notebook in a
fresh kernel in an empty temporary folder, with the solutions filled in (unless ``--learner``)
and checks in strict mode, and prints its run time, the kernel's peak resident memory, and every cell
that ran more than `PROGRESS_EVERY_S` seconds without showing the learner anything new (no output,
no progress-bar update); such a cell fails the run.
``--table NOTEBOOK...`` measures them (default setting, cold then warm) into ``run-times.json`` and
regenerates every quoted run time from it (`runtimes`); ``--table --fast NOTEBOOK...`` measures the
fast setting (as CI runs them) instead; ``--table`` alone only regenerates.

Notebook conventions it relies on: an exercise is a code cell tagged ``exercise``; its solution is
the first Python code block of the next markdown cell tagged ``solution`` (a ``<details>`` block,
hidden until clicked).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import psutil

_CODE_BLOCK = re.compile(r"```(?:python)?\n(.*?)```", re.DOTALL)
PROGRESS_EVERY_S = 10.0  # a running cell shows something new at least this often (a bar's update, a line)


@dataclass
class NotebookRun:
    """How a notebook run went: wall time, the kernel's (and its children's) peak resident memory,
    and the error if one stopped it.

    Memory is the notebook's kernel's process tree only (not other children of the calling process).
    ``peak_rss_gb`` counts every resident page, including the file-backed pages of memory-mapped
    activation stores, which the kernel can drop and re-read at any time; ``peak_anon_gb`` leaves
    those out (RSS minus shared and file-backed pages): the memory a run cannot give back, which is
    what a memory limit such as Binder's 2 GB has to hold."""

    name: str
    seconds: float
    peak_rss_gb: float
    peak_anon_gb: float
    error: str | None = None
    notebook: Any = None  # the executed notebook (its outputs)
    silences: dict[int, float] = field(default_factory=dict)  # cell index -> longest stretch without news (s)
    silent_after: dict[int, str] = field(default_factory=dict)  # cell index -> what was shown before it
    load_average: float = 0.0  # the machine's 1-minute load average, averaged over the run
    cell_peaks: dict[int, float] = field(default_factory=dict)  # cell index -> peak GB without file-backed pages

    @property
    def longest_silence(self) -> tuple[int, float]:
        """``(cell index, seconds)`` of the longest time a learner saw nothing new in a running cell."""
        return max(self.silences.items(), key=lambda item: item[1], default=(-1, 0.0))

    @property
    def heaviest_cell(self) -> tuple[int, float]:
        """``(cell index, GB)`` of the first cell to bring the memory without file-backed pages to its
        peak (within 16 MB: the next cell's first sample still counts what the heaviest one held)."""
        top = max(self.cell_peaks.values(), default=0.0)
        return min(((cell, gb) for cell, gb in self.cell_peaks.items() if gb >= top - 16 / 1024),
                   default=(-1, 0.0))

    def silent_cells(self, limit: float = PROGRESS_EVERY_S) -> list[tuple[int, float]]:
        """``(cell index, seconds)`` of every cell that stayed silent longer than ``limit``, longest first."""
        return sorted(((cell, s) for cell, s in self.silences.items() if s > limit), key=lambda item: -item[1])


def tags(cell: Any) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def solution_code(cell: Any) -> str:
    """The first Python code block of a markdown solution cell."""
    match = _CODE_BLOCK.search(cell.source)
    if match is None:
        raise ValueError(f"solution cell has no ```python code block:\n{cell.source[:200]}")
    return match.group(1)


def fill_in_solutions(notebook: Any) -> int:
    """Replace every exercise cell's source with its solution; returns how many were filled."""
    cells = notebook.cells
    filled = 0
    for i, cell in enumerate(cells):
        if cell.cell_type != "code" or "exercise" not in tags(cell):
            continue
        solution = next((c for c in cells[i + 1:] if c.cell_type == "markdown" and "solution" in tags(c)), None)
        if solution is None:
            raise ValueError(f"exercise cell {i} has no markdown cell tagged 'solution' after it")
        cell.source = solution_code(solution)
        filled += 1
    return filled


# what a learner sees change while a cell runs: outputs, and widget updates (tqdm.auto's progress bars)
_NEWS = {"stream", "display_data", "update_display_data", "execute_result", "error", "clear_output", "comm_msg"}


def _news_text(msg: dict) -> str:
    """A short description of what a message showed: a stream's last line, a progress bar's text."""
    content = msg.get("content", {})
    if msg["msg_type"] == "stream":
        lines = [line for line in re.split(r"[\r\n]", content.get("text", "")) if line.strip()]
        return lines[-1].strip()[:100] if lines else "(blank output)"
    state = content.get("data", {}).get("state", {}) if msg["msg_type"] == "comm_msg" else {}
    if "value" in state or "description" in state:
        return f"widget update {state.get('description', '')} {state.get('value', '')}".strip()[:100]
    return msg["msg_type"]


def _timed(client_class: type) -> type:
    """``client_class`` (nbclient's NotebookClient) recording, per cell, the longest stretch without news
    between the cell's start, each message the learner would see, and its end; and what the learner
    saw last before that stretch."""

    class TimedClient(client_class):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, on_cell_execute=self._started, on_cell_executed=self._ended, **kwargs)
            self.silences: dict[int, float] = {}
            self.silent_after: dict[int, str] = {}
            self._last: dict[int, tuple[float, str]] = {}
            self.running_cell: int | None = None

        def _heard(self, index: int, text: str) -> None:
            now = time.monotonic()
            if index in self._last:
                since, before = self._last[index]
                if now - since > self.silences.get(index, 0.0):
                    self.silences[index], self.silent_after[index] = now - since, before
            self._last[index] = (now, text)

        def _started(self, cell: Any, cell_index: int, **_: Any) -> None:
            self._last[cell_index] = (time.monotonic(), "the cell's start")
            self.running_cell = cell_index

        def _ended(self, cell: Any, cell_index: int, **_: Any) -> None:
            self._heard(cell_index, "the cell's end")
            self.running_cell = None

        def process_message(self, msg: dict, cell: Any, cell_index: int) -> Any:
            if msg["msg_type"] in _NEWS:
                self._heard(cell_index, _news_text(msg))
            return super().process_message(msg, cell, cell_index)

    return TimedClient


def run_notebook(path: str | Path, *, fast: bool = True, solutions: bool = True, timeout: int = 1200,
                 cache: str | Path | None = None) -> NotebookRun:
    """Execute the notebook at ``path`` in a fresh kernel (in an empty temporary folder).

    ``fast`` sets ``TCWIDGETS_TUTORIAL_FAST=1``; ``solutions`` fills in the exercises and makes
    failed checks raise. ``cache`` sets ``TCWIDGETS_CACHE`` for the kernel. The error (a cell's
    traceback) is returned in the result, not raised."""
    import nbformat
    import psutil
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    path = Path(path)
    notebook = nbformat.read(path, as_version=4)
    if solutions:
        fill_in_solutions(notebook)
    env = {"TCWIDGETS_TUTORIAL_FAST": "1" if fast else "0", "TCWIDGETS_TUTORIAL_STRICT": "1" if solutions else "0",
           "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "MPLBACKEND": "Agg"}
    if cache is not None:
        env["TCWIDGETS_CACHE"] = str(cache)
    saved = {name: os.environ.get(name) for name in env}
    work = Path(tempfile.mkdtemp(prefix=f"tcw-{path.stem}-"))
    peak = [0, 0]  # RSS, anonymous
    cell_peaks: dict[int, float] = {}
    loads: list[float] = []
    stop = threading.Event()
    me = psutil.Process()
    earlier = {child.pid for child in me.children()}  # e.g. a test session's JupyterLab and browser: not ours

    def watch() -> None:  # the kernel is a new child process of this one: sample its tree's memory (and the load)
        while not stop.wait(0.2):
            loads.append(os.getloadavg()[0])
            rss = anon = 0
            for child in _new_process_trees(me, earlier):
                try:
                    memory = child.memory_info()
                except psutil.Error:
                    continue
                rss += memory.rss
                anon += memory.rss - getattr(memory, "shared", 0)
            peak[0], peak[1] = max(peak[0], rss), max(peak[1], anon)
            running = client.running_cell
            if running is not None:
                cell_peaks[running] = max(cell_peaks.get(running, 0.0), anon / 2**30)

    client = _timed(NotebookClient)(notebook, timeout=timeout, kernel_name="python3",
                                    resources={"metadata": {"path": str(work)}})
    watcher = threading.Thread(target=watch, daemon=True)
    error = None
    start = time.perf_counter()
    try:
        os.environ.update(env)
        watcher.start()
        client.execute()
    except CellExecutionError as failure:
        error = str(failure)
    finally:
        stop.set()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        shutil.rmtree(work, ignore_errors=True)
    return NotebookRun(path.name, time.perf_counter() - start, peak[0] / 2**30, peak[1] / 2**30, error, notebook,
                       client.silences, client.silent_after, sum(loads) / max(len(loads), 1), cell_peaks)


def _new_process_trees(me: psutil.Process, earlier: set[int]) -> list[psutil.Process]:
    """The child processes of ``me`` whose pids are not in ``earlier``, with all
    their descendants."""
    import psutil

    trees = []
    for child in me.children():
        if child.pid in earlier:
            continue
        trees.append(child)
        try:
            trees.extend(child.children(recursive=True))
        except psutil.Error:
            continue
    return trees


def measure(path: Path, table: dict[str, Any]) -> list[NotebookRun]:
    """Run ``path`` cold (a fresh tutorials cache) and then warm (that cache), and record both;
    returns the runs (only the cold one if it failed)."""
    from ..models import cache_dir
    from . import runtimes

    with tempfile.TemporaryDirectory(prefix="tcw-runtimes-") as folder:
        cache = Path(folder)
        (cache / "models").symlink_to(cache_dir() / "models", target_is_directory=True)  # model: de-quantised once
        cold = run_notebook(path, fast=False, cache=cache, timeout=3600)
        if cold.error:
            return [cold]
        warm = run_notebook(path, fast=False, cache=cache, timeout=3600)
    if not warm.error:
        silent = max(cold, warm, key=lambda run: run.longest_silence[1])
        runtimes.record(table, path.stem, cold_min=cold.seconds / 60, warm_min=warm.seconds / 60,
                        peak_rss_gb=max(cold.peak_rss_gb, warm.peak_rss_gb),
                        peak_anon_gb=max(cold.peak_anon_gb, warm.peak_anon_gb),
                        longest_silence_s=silent.longest_silence[1], silent_cell=silent.longest_silence[0],
                        load_average=(cold.load_average + warm.load_average) / 2,
                        measured=time.strftime("%Y-%m-%d"))
    return [cold, warm]


def measure_fast(path: Path, table: dict[str, Any]) -> NotebookRun:
    """Run ``path`` in the fast setting as CI does (a fresh tutorials cache) and record its time."""
    from ..models import cache_dir
    from . import runtimes

    with tempfile.TemporaryDirectory(prefix="tcw-runtimes-") as folder:
        cache = Path(folder)
        (cache / "models").symlink_to(cache_dir() / "models", target_is_directory=True)
        run = run_notebook(path, fast=True, cache=cache)
    if not run.error:
        runtimes.record(table, path.stem, fast_min=run.seconds / 60, fast_load_average=run.load_average)
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="*", type=Path)
    parser.add_argument("--fast", action="store_true", help="the fast setting (CI)")
    parser.add_argument("--learner", action="store_true", help="run the exercises as shipped (unanswered)")
    parser.add_argument("--table", action="store_true",
                        help="measure the notebooks (default setting, cold then warm; with --fast, the fast "
                             "setting) into run-times.json and regenerate every quoted run time from it; without "
                             "notebooks, only regenerate")
    args = parser.parse_args(argv)
    if args.table:
        return table_main(args.notebooks, fast=args.fast)
    if not args.notebooks:
        parser.error("give the notebooks to run")
    failed = 0
    for path in args.notebooks:
        run = run_notebook(path, fast=args.fast, solutions=not args.learner)
        failed += report(run)
    return 1 if failed else 0


def report(run: NotebookRun) -> int:
    """Print how a run went: time, memory, load, the longest silence and every cell silent longer than
    `PROGRESS_EVERY_S` (and the error); 1 if it failed or a cell was silent too long."""
    cell, silence = run.longest_silence
    print(f"{run.name}: {run.seconds / 60:.1f} min, peak RSS {run.peak_rss_gb:.2f} GB "
          f"({run.peak_anon_gb:.2f} GB without file-backed pages), load average {run.load_average:.1f}, "
          f"longest silence {silence:.1f} s (cell {cell}), memory peaked in cell "
          f"{run.heaviest_cell[0]}" + ("" if run.error is None else ": **failed**"), flush=True)
    for index, seconds in run.silent_cells():
        first = (run.notebook.cells[index].source.strip().splitlines() or [""])[0][:80]
        print(f"  cell {index} silent for {seconds:.1f} s (more than {PROGRESS_EVERY_S:.0f}) after "
              f"{run.silent_after.get(index, '?')!r}: {first}", flush=True)
    if run.error:
        print(run.error[-3000:], file=sys.stderr)
    return 1 if run.error or run.silent_cells() else 0


def table_main(notebooks: list[Path], *, fast: bool = False) -> int:
    from . import runtimes
    from .launch import shipped_notebooks

    folder = notebooks[0].resolve().parent if notebooks else shipped_notebooks()
    table = runtimes.load(folder)
    failed = 0
    for path in notebooks:
        runs = [measure_fast(path, table)] if fast else measure(path, table)
        failed += sum(report(run) for run in runs)
        runtimes.save(folder, table)
    readme = folder.parent / "README.md"  # the project README, in a source checkout
    changed = runtimes.write_docs(folder, readme if (readme.is_file() and runtimes.QUICKSTART.search(
        readme.read_text())) else None)
    print("updated:", ", ".join(str(path) for path in changed) or "nothing (all agree with the table)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
