"""tcwidgets: train, inspect and trace transcoders with nnsight and anywidget widgets."""

from .activations import ActivationStore, LayerStats, StoreError, collect_activations
from .corpus import load_corpus
from .circuits import CircuitError, CircuitGraph, LatentTarget, LogitTarget, attribute
from .evaluation import LayerMetrics, Metrics, evaluate, plot_frontier
from .files import FileFormatError
from .features import (FeatureStats, FeatureStatsError, LatentStats, TranscoderMismatchError, analyze_features,
                       logit_effects, transcoder_fingerprint)
from .interventions import Edit, EditResult, run_with_edits
from .models import ARCHITECTURES, Model, Sites, load_model
from .splicing import SplicedRun, splice, spliced_logits
from .training import CheckpointError, Trainer, TrainingConfig, train_transcoder
from .transcoder import Transcoder, TranscoderConfig
from .widgets import AblationSliders, CircuitView, FeatureDashboard

__all__ = [
    "CheckpointError", "FileFormatError",
    "AblationSliders", "CircuitError", "CircuitGraph", "CircuitView", "Edit", "EditResult", "LatentTarget",
    "LogitTarget", "attribute", "run_with_edits",
    "ARCHITECTURES", "ActivationStore", "LayerMetrics", "LayerStats", "Metrics", "Model", "Sites", "SplicedRun",
    "StoreError", "Trainer", "TrainingConfig", "Transcoder", "TranscoderConfig", "collect_activations",
    "evaluate", "load_corpus", "FeatureDashboard", "FeatureStats", "FeatureStatsError", "LatentStats",
    "TranscoderMismatchError", "analyze_features", "logit_effects", "transcoder_fingerprint", "load_model", "plot_frontier", "splice", "spliced_logits", "train_transcoder",
]
__version__ = "0.1.0"
