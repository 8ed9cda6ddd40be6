"""The tutorials' measured run times: one table, ``tutorials/run-times.json``, that the runner updates
(``python -m tcwidgets.tutorials.runner --table NOTEBOOK...``) and that every place quoting a run time
is regenerated from (`write_docs`): the table and the fast setting's range in ``tutorials/README.md``,
the **Run time** line of each notebook's first cell, and the quickstart's time in the top-level
``README.md``. So they cannot disagree.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import nbformat

TABLE = "run-times.json"
START, END = "<!-- run-times: generated from run-times.json by the runner; do not edit -->", "<!-- /run-times -->"
QUICKSTART = re.compile(r"(<!-- run-time:01-quickstart -->)(.*?)(<!-- /run-time -->)", re.S)
FAST = re.compile(r"(<!-- run-time:fast -->)(.*?)(<!-- /run-time -->)", re.S)
RUN_TIME_LINE = re.compile(r"^\*\*Run time\*\*:.*$", re.M)
FIELDS = ("cold_min", "warm_min", "fast_min", "fast_load_average", "peak_rss_gb", "peak_anon_gb", "longest_silence_s",
          "silent_cell", "load_average", "measured")


def load(folder: Path) -> dict[str, Any]:
    """The table: ``{"machine": ..., "notebooks": {stem: {"title", "cold_min", "warm_min", ...}}}``."""
    return json.loads((folder / TABLE).read_text())


def save(folder: Path, table: dict[str, Any]) -> None:
    (folder / TABLE).write_text(json.dumps(table, indent=1, ensure_ascii=False) + "\n")


def record(table: dict[str, Any], stem: str, **measured: float | int | str | None) -> None:
    """Put a measurement into the table (the values given; the others stay): any of ``cold_min``,
    ``warm_min``, ``fast_min`` (the fast setting, as CI runs it) and ``fast_load_average`` (the load
    average during that run), ``peak_rss_gb``, ``peak_anon_gb``, ``longest_silence_s`` (the longest a running cell
    showed nothing new), ``silent_cell`` (its index), ``load_average`` (the machine's 1-minute load
    average during the runs), ``measured`` (a date)."""
    unknown = set(measured) - set(FIELDS)
    if unknown:
        raise ValueError(f"run-time table fields {sorted(unknown)} unknown; the table holds {FIELDS}")
    entry = table["notebooks"].setdefault(stem, {"title": stem})
    for name, value in measured.items():
        if value is not None:
            entry[name] = round(value, 2) if isinstance(value, float) else value


def minutes(value: float) -> str:
    """``"about 4 minutes"``, ``"under a minute"``."""
    if value < 0.75:
        return "under a minute"
    whole = max(1, round(value))
    return f"about {whole} minute{'s' if whole > 1 else ''}"


def header_line(entry: dict[str, Any]) -> str:
    """A notebook's **Run time** line."""
    line = f"**Run time**: {minutes(entry['cold_min'])} on a 2-core CPU (default setting, first run"
    if entry.get("warm_min") is not None and minutes(entry["warm_min"]) != minutes(entry["cold_min"]):
        line += f"; {minutes(entry['warm_min'])} once what it trains is cached"
    return line + "); less with a GPU. Measured: [run-times.json](run-times.json)."


COLUMNS = (("cold_min", "run time, cold", " min", 1), ("warm_min", "run time, warm", " min", 1),
           ("fast_min", "run time, fast setting (CI)", " min", 1), ("peak_rss_gb", "peak RSS", " GB", 2),
           ("peak_anon_gb", "peak RSS without file-backed pages", " GB", 2),
           ("longest_silence_s", "longest wait without progress", " s", 0), ("load_average", "load average", "", 1))


def readme_table(table: dict[str, Any]) -> str:
    """The tutorials README's table: a row per notebook, a column per field measured for any of them."""
    entries = list(table["notebooks"].values())
    columns = [column for column in COLUMNS if any(entry.get(column[0]) is not None for entry in entries)]
    rows = ["| notebook | " + " | ".join(title for _, title, _, _ in columns) + " |",
            "|---|" + "---|" * len(columns)]
    for entry in entries:
        cells = ["" if entry.get(name) is None else f"{entry[name]:.{digits}f}{unit}"
                 for name, _, unit, digits in columns]
        rows.append(f"| {entry['title']} | " + " | ".join(cells) + " |")
    return "\n".join([START, f"Measured on {table['machine']}.", "", *rows, END])


def write_docs(folder: Path, readme: Path | None = None, *, write: bool = True) -> list[Path]:
    """Regenerate every quoted run time from the table in ``folder`` (the tutorials); returns the
    files that changed (with ``write=False``: that would change)."""
    table = load(folder)
    changed = []

    def update(path: Path, text: str, new: str) -> None:
        if new != text:
            changed.append(path)
            if write:
                path.write_text(new)

    index = folder / "README.md"
    text = index.read_text()
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise ValueError(f"{index} has no run-time table between {START!r} and {END!r}.")
    new = pattern.sub(lambda _: readme_table(table), text)
    fast = [entry for entry in table["notebooks"].values() if entry.get("fast_min") is not None]
    if fast:
        if not FAST.search(new):
            raise ValueError(f"{index} has no <!-- run-time:fast --> marker for the fast setting's times.")
        times, loads = [e["fast_min"] for e in fast], [e.get("fast_load_average", 0.0) for e in fast]
        span = f"{min(times):.1f}–{max(times):.1f} minutes (measured at load average up to {max(loads):.0f})"
        new = FAST.sub(lambda m: m.group(1) + span + m.group(3), new)
    update(index, text, new)
    for stem, entry in table["notebooks"].items():
        path = folder / f"{stem}.ipynb"
        notebook = nbformat.read(path, as_version=4)
        first = notebook.cells[0]
        if not RUN_TIME_LINE.search(first.source):
            raise ValueError(f"{path.name}'s first cell has no **Run time** line.")
        new = RUN_TIME_LINE.sub(lambda _: header_line(entry), first.source)
        if new != first.source:
            first.source = new
            changed.append(path)
            if write:
                nbformat.write(notebook, str(path))
    if readme is not None:
        text = readme.read_text()
        if not QUICKSTART.search(text):
            raise ValueError(f"{readme} has no <!-- run-time:01-quickstart --> marker.")
        quickstart = minutes(table["notebooks"]["01-quickstart"]["cold_min"])
        update(readme, text, QUICKSTART.sub(lambda m: m.group(1) + quickstart + m.group(3), text))
    return changed
