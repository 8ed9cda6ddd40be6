"""Exchange transcoders with the field: sparsify, SAELens (and Gemma Scope), circuit-tracer.

`load_transcoders` reads any of these formats (local folders or Hugging Face repositories);
``Transcoder.save(folder, format=...)`` and `save_transcoders` write them, loadable by each library's
own loaders and computing the same function. One module per format; `weights` holds the shared,
scale-folded layout.
"""

from .loading import load_transcoders, save_transcoder, save_transcoders
from .weights import FORMATS, TranscoderFormatError, UnrepresentableError

__all__ = ["FORMATS", "TranscoderFormatError", "UnrepresentableError", "load_transcoders", "save_transcoder",
           "save_transcoders"]
