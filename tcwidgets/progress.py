"""Progress bars for work that is usually quick but can take long (a large vocabulary, a deep circuit
search, a loaded machine): tqdm.auto bars that appear only once the work has run `DELAY_S` seconds,
so quick calls print nothing and a learner never waits long without news; and bars whose steps can
be slow are redrawn within a step at least every `REDRAW_S` seconds."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

DELAY_S = 2.0
REDRAW_S = 2.0  # within a long step, a bar is redrawn (its elapsed time moves on) at least this often


def layers_label(layers: Sequence[int]) -> str:
    """How a bar names the layers it works on, short enough to leave room for the bar: "layer 6",
    "layers 0, 2, 5", "30 layers, 0-29"."""
    if len(layers) == 1:
        return f"layer {layers[0]}"
    if len(layers) <= 4:
        return f"layers {', '.join(map(str, layers))}"
    return f"{len(layers)} layers, {min(layers)}-{max(layers)}"


def delayed_bar(*args: Any, **kwargs: Any) -> tqdm:
    """``tqdm(*args, **kwargs)`` that shows itself after `DELAY_S` seconds (and is gone when done)."""
    return tqdm(*args, delay=DELAY_S, leave=False, **kwargs)
