"""Every widget's stylesheet stays inside its own root class.

anywidget puts each widget's ``_css`` into the page's head, where a bare ``.tcw-row`` styles every
widget on the page (an AblationSliders shown once broke every FeatureDashboard's layout). So every
selector must start inside the widget's root class; ``common.css`` may start inside any of them.
"""

import re
from pathlib import Path

import pytest

from tcwidgets.widgets import assets

ROOTS = {"dashboard": {".tcw-dashboard"}, "sliders": {".tcw-sliders"}, "circuit_view": {".tcw-circuit"}}
ROOTS["common"] = set().union(*ROOTS.values())


def selectors(css: str) -> list[str]:
    """Every style rule's selectors (comma-separated parts), looking into @media and @supports and
    skipping @keyframes' steps."""
    css = re.sub(r"/\*.*?\*/", "", css, flags=re.S)
    found, stack, start = [], [], 0
    for i, char in enumerate(css):
        if char == "{":
            prelude = css[start:i].strip()
            stack.append(prelude)
            if not prelude.startswith("@") and not any(p.startswith("@keyframes") for p in stack[:-1]):
                found += split_top_level(prelude)
            start = i + 1
        elif char == "}":
            stack.pop()
            start = i + 1
        elif char == ";" and (not stack or stack[-1].startswith("@")):
            start = i + 1  # a declaration-less statement (@import) or a declaration inside an at-rule
    assert not stack, "unbalanced braces"
    return found


def split_top_level(prelude: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in prelude:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    return [*parts, current.strip()]


def scoped(selector: str, roots: set[str]) -> bool:
    """Does ``selector``'s first compound name one of ``roots`` (directly, or as ``:is()`` of roots only)?"""
    first = re.split(r"\s*[\s>+~]\s*(?![^(]*\))", selector.strip(), maxsplit=1)[0]
    match = re.match(r":is\(([^()]*)\)", first)
    if match:
        return all(part.strip() in roots for part in match.group(1).split(","))
    return any(re.search(re.escape(root) + r"(?![\w-])", first) for root in roots)


def test_the_checker_catches_a_leak() -> None:
    css = ".tcw-sliders .a, .b { x: 1 } @media (x) { .tcw-sliders-x .c { y: 2 } } @keyframes k { to { z: 3 } }"
    found = selectors(css)
    assert found == [".tcw-sliders .a", ".b", ".tcw-sliders-x .c"]
    assert [scoped(s, {".tcw-sliders"}) for s in found] == [True, False, False]
    assert scoped(":is(.tcw-sliders, .tcw-dashboard) .x", {".tcw-sliders", ".tcw-dashboard"})
    assert not scoped(":is(.tcw-sliders, .other) .x", {".tcw-sliders"})


@pytest.mark.parametrize("name", sorted(ROOTS))
def test_every_selector_is_inside_the_root_class(name: str) -> None:
    css = (assets.STATIC / f"{name}.css").read_text()
    found = selectors(css)
    assert found, f"no rules parsed from {name}.css"
    leaks = [s for s in found if not scoped(s, ROOTS[name])]
    assert not leaks, f"{name}.css styles outside {sorted(ROOTS[name])}: {leaks}"


def test_every_stylesheet_is_checked() -> None:
    assert {path.stem for path in Path(assets.STATIC).glob("*.css")} == set(ROOTS)
