"""Helpers for the teaching notebooks in ``tutorials/`` (and for your own).

``from tcwidgets import tutorials as tut`` then ``tut.setup()`` at the top of a notebook:

- `setup`: seeds, the device, and the widget manager on Colab.
- `FAST` / `pick`: the fast setting (``TCWIDGETS_TUTORIAL_FAST=1``, used by CI) shrinks token counts
  and steps; a notebook never skips a cell in it.
- `activations`, `transcoders`, `cross_layer_transcoder`, `circuit_transcoders` (every layer, for
  circuits), `circuit_clt` (a cross-layer transcoder on every layer), `features`: cached results (in
  ``$TCWIDGETS_CACHE/tutorials``), built on first use, so any notebook can be opened alone.
- `check`, `check_close`: check cells that say whether an exercise is right.
"""

from .cache import (activations, circuit_clt, circuit_transcoders, cross_layer_transcoder, features, transcoders,
                    tutorial_cache)
from .checks import ExerciseFailed, check, check_close
from .setting import FAST, pick, setup

__all__ = ["FAST", "ExerciseFailed", "activations", "check", "check_close", "circuit_clt", "circuit_transcoders",
           "cross_layer_transcoder", "features", "pick", "setup", "transcoders", "tutorial_cache"]
