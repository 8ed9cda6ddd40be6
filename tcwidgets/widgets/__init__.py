"""anywidget widgets: plain ES modules and CSS in ``static/``, no build step (see README.md)."""

from .dashboard import FeatureDashboard

__all__ = ["FeatureDashboard"]
