"""anywidget widgets: plain ES modules and CSS in ``static/``, no build step (see README.md)."""

from .circuit_view import CircuitView
from .dashboard import FeatureDashboard
from .sliders import AblationSliders

__all__ = ["AblationSliders", "CircuitView", "FeatureDashboard"]
