"""tcwidgets: train, inspect and trace transcoders with nnsight and anywidget widgets."""

from .activations import ActivationStore, LayerNotInStoreError, LayerStats, StoreError, collect_activations
from .circuits import CircuitError, CircuitGraph, GraphFileError, LatentTarget, LogitTarget, Scores, attribute
from .corpus import CorpusFileError, EmptyCorpusError, load_corpus
from .crosslayer import CrossLayerTranscoder
from .crosslayer_training import train_clt
from .evaluation import LayerMetrics, Metrics, evaluate, plot_frontier
from .features import (FeatureStats, FeatureStatsError, LatentStats, TranscoderMismatchError, analyze_features,
                       logit_effects, transcoder_fingerprint)
from .files import FileFormatError
from .finetuning import FineTuneConfig, JointFineTuner, finetune_transcoders
from .interop import TranscoderFormatError, UnrepresentableError, load_transcoders, save_transcoders
from .interpretability import (Explanation, InterpretabilityScores, LatentScore, OpenAIExplainer, TokenExplainer,
                               detection_score, interpretability_scores)
from .interventions import Edit, EditResult, PromptSession, run_with_edits, start_session
from .models import (ARCHITECTURES, Model, ModelConfigError, ModelNotFoundError, Sites, UnsupportedArchitectureError,
                     load_model)
from .splicing import SplicedRun, splice, spliced_logits
from .streaming import ActivationStream, train_streaming
from .training import CheckpointError, Trainer, TrainingConfig, train_transcoder
from .transcoder import Transcoder, TranscoderConfig, TranscoderFileError
from .widgets import AblationSliders, CircuitView, FeatureDashboard

__all__ = [
    "ARCHITECTURES", "AblationSliders", "ActivationStore", "ActivationStream", "CheckpointError", "CircuitError",
    "CircuitGraph", "CircuitView", "CorpusFileError", "CrossLayerTranscoder",
    "Edit", "EditResult", "EmptyCorpusError", "Explanation",
    "FeatureDashboard", "FeatureStats", "FeatureStatsError", "FileFormatError", "FineTuneConfig", "GraphFileError",
    "InterpretabilityScores", "JointFineTuner", "LatentScore", "LatentStats", "LatentTarget", "LayerMetrics",
    "LayerNotInStoreError", "LayerStats", "LogitTarget", "Metrics", "Model", "ModelConfigError", "ModelNotFoundError",
    "OpenAIExplainer", "PromptSession", "Scores", "Sites", "SplicedRun", "StoreError", "TokenExplainer", "Trainer",
    "TrainingConfig", "Transcoder", "TranscoderConfig", "TranscoderFileError", "TranscoderFormatError",
    "TranscoderMismatchError", "UnrepresentableError", "UnsupportedArchitectureError", "analyze_features", "attribute",
    "collect_activations", "detection_score", "evaluate", "finetune_transcoders", "interpretability_scores",
    "load_corpus", "load_model", "load_transcoders", "logit_effects", "plot_frontier", "run_with_edits",
    "save_transcoders", "splice", "spliced_logits", "start_session", "train_clt",
    "train_streaming", "train_transcoder",
    "transcoder_fingerprint",
]
__version__ = "0.1.0"
