"""Check cells for the tutorials' exercises.

A check says, in a coloured box, whether an answer is right, and how to get there if not. In a
learner's notebook a wrong or missing answer is reported and the notebook goes on (so "Run all"
reaches the end); in strict mode (``TCWIDGETS_TUTORIAL_STRICT=1``, set by the notebook runner in CI)
it raises `ExerciseFailed`.
"""

from __future__ import annotations

import html
import os
from typing import Any

import numpy as np
import torch

_STYLE = {
    "right": ("✅", "#1a7f37", "rgba(26,127,55,0.10)"),
    "wrong": ("❌", "#cf222e", "rgba(207,34,46,0.10)"),
    "todo": ("✏️", "#9a6700", "rgba(154,103,0,0.10)"),
}


class ExerciseFailed(AssertionError):
    """An exercise's check failed in strict mode."""


def _strict() -> bool:
    return os.environ.get("TCWIDGETS_TUTORIAL_STRICT", "") not in ("", "0")


def _report(verdict: str, name: str, message: str) -> None:
    icon, colour, background = _STYLE[verdict]
    text = f"{icon} {name}: {message}"
    try:
        from IPython import get_ipython
        from IPython.display import HTML, display
    except ImportError:  # plain Python
        print(text)
        return
    if get_ipython() is None:
        print(text)
        return
    display(HTML(
        f'<div style="border-left:4px solid {colour};background:{background};padding:6px 10px;'
        f'margin:4px 0;font-family:var(--jp-ui-font-family,sans-serif)">{html.escape(text)}</div>'
    ))


def _unanswered(answer: Any) -> bool:
    return answer is ... or answer is None


def check(name: str, passed: bool, *, success: str = "right.", hint: str = "not yet.",
          answer: Any = True) -> None:
    """Report whether an exercise is right: ``passed`` is the test, ``hint`` what to try if not.

    ``answer`` is what the learner produced; ``...`` or ``None`` reads as "not attempted yet".
    In strict mode a failure raises `ExerciseFailed`. (Nothing is returned, so a check cell shows
    only its verdict.)"""
    if _unanswered(answer):
        _report("todo", name, "not attempted yet: replace the ... in the exercise cell and run it again.")
        if _strict():
            raise ExerciseFailed(f"{name}: not attempted")
        return
    _report("right" if passed else "wrong", name, success if passed else hint)
    if not passed and _strict():
        raise ExerciseFailed(f"{name}: {hint}")


def check_close(name: str, answer: Any, expected: Any, *, rtol: float = 1e-4, atol: float = 1e-6,
                hint: str = "") -> None:
    """Check that ``answer`` equals ``expected`` (numbers, arrays or tensors) within tolerances,
    shapes included; the report shows where they differ."""
    if _unanswered(answer):
        return check(name, False, answer=answer)
    got, want = _array(answer), _array(expected)
    if got is None:
        return check(name, False, hint=f"expected a number, array or tensor, got {type(answer).__name__}. {hint}")
    if got.shape != want.shape:
        return check(name, False, hint=f"expected shape {tuple(want.shape)}, got {tuple(got.shape)}. {hint}")
    close = np.isclose(got, want, rtol=rtol, atol=atol)
    if close.all():
        shown = f"{float(want):.6g}" if want.size == 1 else f"all {want.size} values match"
        return check(name, True, success=f"right ({shown}).")
    where = np.argwhere(~close)[0]
    at = f" at index {tuple(int(i) for i in where)}" if want.ndim else ""
    message = (f"expected {want[tuple(where)]:.6g}{at}, got {got[tuple(where)]:.6g} "
               f"({int((~close).sum())} of {want.size} values differ). {hint}")
    return check(name, False, hint=message.strip())


def _array(value: Any) -> np.ndarray | None:
    if isinstance(value, torch.Tensor):
        value = value.detach().to("cpu", torch.float64).numpy()
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return array
