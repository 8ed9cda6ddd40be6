"""The widgets' front-end files: each widget's ES module and CSS, with the shared ``common.js`` /
``common.css`` joined in front (anywidget modules cannot import one another without a build step)."""

from pathlib import Path

STATIC = Path(__file__).parent / "static"


def esm(name: str) -> str:
    """``common.js`` followed by ``<name>.js``."""
    return (STATIC / "common.js").read_text() + "\n" + (STATIC / f"{name}.js").read_text()


def css(name: str) -> str:
    """``common.css`` followed by ``<name>.css``."""
    return (STATIC / "common.css").read_text() + "\n" + (STATIC / f"{name}.css").read_text()
