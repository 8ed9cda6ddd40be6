"""The tutorials' setting: default or fast, the device, and notebook set-up on Colab."""

from __future__ import annotations

import os
import sys
from typing import TypeVar

import torch

T = TypeVar("T")

FAST: bool = os.environ.get("TCWIDGETS_TUTORIAL_FAST", "") not in ("", "0")
"""True in the fast setting (``TCWIDGETS_TUTORIAL_FAST=1``): fewer tokens and steps, same cells."""


def pick(default: T, fast: T) -> T:
    """``default`` normally, ``fast`` in the fast setting (``pick(100_000, fast=20_000)``)."""
    return fast if FAST else default


def setup(seed: int = 0) -> torch.device:
    """Prepare a notebook: seed torch, enable third-party widgets on Colab, print what runs where.

    Returns the device the tutorials train on (CUDA when present, else CPU)."""
    from .. import __version__

    torch.manual_seed(seed)
    if "google.colab" in sys.modules:  # anywidget needs Colab's custom widget manager
        from google.colab import output  # type: ignore[import-not-found]

        output.enable_custom_widget_manager()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    setting = "fast setting (TCWIDGETS_TUTORIAL_FAST=1)" if FAST else "default setting"
    print(f"tcwidgets {__version__} on {where}, {setting}")
    return device
