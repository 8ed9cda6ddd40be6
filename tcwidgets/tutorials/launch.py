"""``tcwidgets tutorials``: copy the notebooks into a working folder and open JupyterLab on them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path


def shipped_notebooks() -> Path:
    """The folder of the notebooks that come with this tcwidgets: ``tcwidgets/notebooks`` in an
    installed wheel, ``tutorials/`` in a source checkout (an editable install)."""
    installed = Path(str(files("tcwidgets"))) / "notebooks"
    if installed.is_dir():
        return installed
    checkout = Path(__file__).resolve().parents[2] / "tutorials"
    if checkout.is_dir():
        return checkout
    raise FileNotFoundError("this tcwidgets installation has no tutorials; reinstall it from a source "
                            "checkout (pip install -e .) or from its wheel")


def copy_tutorials(folder: str | Path) -> list[tuple[str, str]]:
    """Copy the shipped notebooks and their documents (README, run times, the case study notebook 7
    links to) into ``folder``; a file already there is never overwritten, so a learner's edits survive.
    Returns ``(name, "copied" | "kept")`` per file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    source = shipped_notebooks()
    done = []
    for path in sorted([*source.glob("*.ipynb"), *source.glob("*.md"), *source.glob("*.json")]):
        target = folder / path.name
        if target.exists():
            done.append((path.name, "kept"))
        else:
            shutil.copyfile(path, target)
            done.append((path.name, "copied"))
    return done


def open_tutorials(folder: str | Path, lab_args: Sequence[str] = (), *, open_lab: bool = True) -> int:
    """Copy the tutorials into ``folder`` and run JupyterLab there (until it is stopped with
    Ctrl-C); ``lab_args`` go to JupyterLab (``--no-browser``, ``--port=8888``...). On POSIX,
    JupyterLab replaces this process; elsewhere its exit status is returned."""
    folder = Path(folder).resolve()
    report = copy_tutorials(folder)
    copied = [name for name, what in report if what == "copied"]
    kept = [name for name, what in report if what == "kept"]
    print(f"tutorials in {folder}: {len(copied)} copied, {len(kept)} already there (kept as they are)")
    if kept:
        print("  to get a fresh copy of one, rename or delete yours and run this again")
    if not open_lab:
        return 0
    first = next((name for name, _ in report if name.endswith(".ipynb")), "")
    command = [sys.executable, "-m", "jupyterlab", f"--ServerApp.root_dir={folder}", *lab_args]
    if first and not any(arg.startswith("--LabApp.default_url") for arg in lab_args):
        command.append(f"--LabApp.default_url=/lab/tree/{first}")
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # containers often run as root; JupyterLab refuses without this
        command.append("--allow-root")
    sys.stdout.flush()
    if os.name == "posix":  # JupyterLab takes this process over, so Ctrl-C and signals reach it directly
        os.execv(sys.executable, command)
    try:
        return subprocess.call(command)
    except KeyboardInterrupt:
        return 0
