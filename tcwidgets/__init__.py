"""tcwidgets: train, inspect and trace transcoders with nnsight and anywidget widgets."""

from .activations import ActivationStore, LayerStats, StoreError, collect_activations
from .corpus import load_corpus
from .circuits import CircuitError, CircuitGraph, LatentTarget, LogitTarget, attribute
from .evaluation import LayerMetrics, Metrics, evaluate, plot_frontier
from .features import (FeatureStats, FeatureStatsError, LatentStats, TranscoderMismatchError, analyze_features,
                       logit_effects, transcoder_fingerprint)
from .interop import TranscoderFormatError, UnrepresentableError, load_transcoders, save_transcoders
from .interventions import Edit, EditResult, PromptSession, run_with_edits, start_session
from .models import ARCHITECTURES, Model, Sites, load_model
from .splicing import SplicedRun, splice, spliced_logits
from .streaming import ActivationStream, train_streaming
from .training import Trainer, TrainingConfig, train_transcoder
from .transcoder import Transcoder, TranscoderConfig
from .widgets import AblationSliders, CircuitView, FeatureDashboard

__all__ = [
    "AblationSliders", "CircuitError", "CircuitGraph", "CircuitView", "Edit", "EditResult", "LatentTarget",
    "LogitTarget", "PromptSession", "attribute", "run_with_edits", "start_session",
    "ARCHITECTURES", "ActivationStore", "LayerMetrics", "LayerStats", "Metrics", "Model", "Sites", "SplicedRun",
    "StoreError", "Trainer", "TrainingConfig", "Transcoder", "TranscoderConfig", "collect_activations",
    "evaluate", "load_corpus", "FeatureDashboard", "FeatureStats", "FeatureStatsError", "LatentStats",
    "TranscoderMismatchError", "analyze_features", "logit_effects", "transcoder_fingerprint", "load_model", "plot_frontier", "splice", "spliced_logits", "train_transcoder",
    "ActivationStream", "train_streaming",
    "TranscoderFormatError", "UnrepresentableError", "load_transcoders", "save_transcoders",
]
__version__ = "0.1.0"
