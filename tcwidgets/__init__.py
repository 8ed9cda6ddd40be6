"""tcwidgets: train, inspect and trace transcoders with nnsight and anywidget widgets."""

from .activations import ActivationStore, LayerStats, StoreError, collect_activations
from .corpus import load_corpus
from .models import ARCHITECTURES, Model, Sites, load_model

__all__ = [
    "ARCHITECTURES", "ActivationStore", "LayerStats", "Model", "Sites", "StoreError",
    "collect_activations", "load_corpus", "load_model",
]
__version__ = "0.1.0"
