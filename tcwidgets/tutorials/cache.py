"""Cached activations, transcoders and feature statistics for the tutorials.

Each is built on first use (collected, trained or analysed) and saved under
``$TCWIDGETS_CACHE/tutorials`` (default ``~/.cache/tcwidgets/tutorials``), keyed by everything that
decides it, so any notebook can be opened alone and a later one reuses what an earlier one built.
The defaults are the tutorials' standard transcoders; the fast setting (`FAST`) shrinks them.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..activations import ActivationStore, collect_activations
from ..corpus import load_corpus
from ..features import FeatureStats, analyze_features, transcoder_fingerprint
from ..models import cache_dir
from ..training import train_transcoder
from ..transcoder import Transcoder
from .setting import pick


def tutorial_cache() -> Path:
    """The folder of the tutorials' cached results: ``$TCWIDGETS_CACHE/tutorials``."""
    return cache_dir() / "tutorials"


def activations(lm: Any, layers: int | Sequence[int], *, split: str = "train", n_tokens: int | None = None,
                corpus: str = "python-docs") -> ActivationStore:
    """The MLP inputs and outputs of ``layers`` for ``n_tokens`` of a corpus split (default: the
    tutorials' standard 100k training tokens, 20k in the fast setting; the whole held-out split)."""
    layers = [layers] if isinstance(layers, int) else sorted(layers)
    if n_tokens is None and split == "train":
        n_tokens = pick(100_000, fast=20_000)
    name = f"{lm.name}-{corpus}-{split}-{n_tokens or 'all'}-layers-{'-'.join(map(str, layers))}"
    tokens = load_corpus(corpus, lm, n_tokens=n_tokens, split=split)
    return collect_activations(lm, layers, tokens, out=tutorial_cache() / "activations" / _safe(name))


def transcoders(lm: Any, layers: int | Sequence[int] = 6, *, n_tokens: int | None = None,
                n_latents: int | None = None, k: int = 32, kind: str = "transcoder", activation: str = "topk",
                epochs: int | None = None, **options: Any) -> dict[int, Transcoder]:
    """Trained transcoders ``{layer: Transcoder}``: from the cache, else trained now and cached.

    Defaults (the tutorials' standard): 100k training tokens, 8 × d_model latents, TopK k=32, two
    epochs; in the fast setting 20k tokens, 4 × d_model latents, one epoch. Other keyword arguments
    go to `train_transcoder` (and into the cache key). An interrupted training resumes."""
    layers = [layers] if isinstance(layers, int) else sorted(layers)
    n_tokens = n_tokens or pick(100_000, fast=20_000)
    n_latents = n_latents or pick(8, fast=4) * lm.d_model
    epochs = epochs or pick(2, fast=1)
    extra = "".join(f"-{key}-{value}" for key, value in sorted(options.items()))
    run = _safe(f"{lm.name}-{kind}-{activation}-k{k}-{n_latents}-latents-{n_tokens}-tokens-{epochs}-epochs{extra}")
    folder = tutorial_cache() / "transcoders" / run
    missing = [layer for layer in layers if not (folder / f"layer-{layer}" / "config.json").is_file()]
    if missing:
        store = activations(lm, missing, n_tokens=n_tokens)
        trained = train_transcoder(store, missing, n_latents=n_latents, k=k, kind=kind, activation=activation,
                                   epochs=epochs, checkpoint_dir=folder / "checkpoints", **options)
        for layer, tc in trained.items():
            tc.save(folder / f"layer-{layer}")  # config.json is written last: its presence marks a finished save
        shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    return {layer: Transcoder.load(folder / f"layer-{layer}") for layer in layers}


def features(lm: Any, transcoder: Transcoder, *, n_tokens: int | None = None) -> FeatureStats:
    """`analyze_features` of ``transcoder`` over ``n_tokens`` training tokens of the default corpus
    (default 100k, 20k in the fast setting), cached by the transcoder's fingerprint. They are read
    from the cached activations of its layer (collected if missing), so the model is not run again."""
    n_tokens = n_tokens or pick(100_000, fast=20_000)
    folder = tutorial_cache() / "features" / f"{transcoder_fingerprint(transcoder)[:16]}-{n_tokens}-tokens"
    if (folder / "stats.json").is_file():
        return FeatureStats.load(folder)
    store = activations(lm, transcoder.config.site["layer"], n_tokens=n_tokens)
    analyze_features(lm, transcoder, store).save(folder)
    return FeatureStats.load(folder)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
