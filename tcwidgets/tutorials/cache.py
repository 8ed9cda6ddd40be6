"""Cached activations, transcoders and feature statistics for the tutorials.

Each is built on first use (collected, trained or analysed) and saved under
``$TCWIDGETS_CACHE/tutorials`` (default ``~/.cache/tcwidgets/tutorials``), keyed by everything that
decides it, so any notebook can be opened alone and a later one reuses what an earlier one built.
The defaults are the tutorials' standard transcoders; the fast setting (`FAST`) shrinks them.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .. import heap
from ..activations import ActivationStore, collect_activations
from ..corpus import load_corpus
from ..crosslayer import CONFIG_FILE, CrossLayerTranscoder
from ..crosslayer_training import train_clt
from ..features import FeatureStats, analyze_features, transcoder_fingerprint
from ..models import cache_dir
from ..training import train_transcoder
from ..transcoder import Transcoder
from .greater_than import year_sentences
from .setting import pick


#: How the circuits' transcoders are trained, in their cache key: a change of training makes new ones.
CIRCUITS_TRAINING = "no-bos"


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
    n_tokens, n_latents, epochs, extra = _standard(lm, n_tokens, n_latents, epochs, options)
    run = _safe(f"{lm.name}-{kind}-{activation}-k{k}-{n_latents}-latents-{n_tokens}-tokens-{epochs}-epochs{extra}")
    return _trained(tutorial_cache() / "transcoders" / run, layers,
                    lambda missing: activations(lm, missing, n_tokens=n_tokens),
                    n_latents=n_latents, k=k, kind=kind, activation=activation, epochs=epochs, **options)


def _standard(lm: Any, n_tokens: int | None, n_latents: int | None, epochs: int | None,
              options: dict[str, Any]) -> tuple[int, int, int, str]:
    """The tutorials' standard tokens, latents and epochs where not given, and ``options`` as a cache key suffix."""
    return (n_tokens or pick(100_000, fast=20_000), n_latents or pick(8, fast=4) * lm.d_model,
            epochs or pick(2, fast=1), _key(options))


def _key(options: dict[str, Any]) -> str:
    """Keyword arguments as a cache-key suffix: ``-name-value`` for each, sorted by name."""
    return "".join(f"-{key}-{value}" for key, value in sorted(options.items()))


def cross_layer_transcoder(lm: Any, layers: Sequence[int], *, n_tokens: int | None = None,
                           n_latents: int | None = None, k: int = 32, epochs: int | None = None,
                           **options: Any) -> CrossLayerTranscoder:
    """A TopK cross-layer transcoder on ``layers``: from the cache, else trained now (`train_clt`) and
    cached. ``n_latents`` per layer; the defaults (and ``options``, in the cache key) as `transcoders`'."""
    layers = sorted(layers)
    n_tokens, n_latents, epochs, extra = _standard(lm, n_tokens, n_latents, epochs, options)
    folder = tutorial_cache() / "crosslayer" / _safe(
        f"{lm.name}-topk-k{k}-{n_latents}-latents-{n_tokens}-tokens-{epochs}-epochs-layers-"
        f"{'-'.join(map(str, layers))}{extra}")
    return _cached_clt(folder, folder, lambda: activations(lm, layers, n_tokens=n_tokens), layers,
                       n_latents=n_latents, k=k, epochs=epochs, **options)


def circuit_transcoders(lm: Any, layers: int | Sequence[int] | str = "all", *, n_tokens: int | None = None,
                        n_latents: int | None = None, k: int | None = None, epochs: int | None = None,
                        **options: Any) -> dict[int, Transcoder]:
    """TopK transcoders for circuits ``{layer: Transcoder}`` (``layers="all"``: every layer): from
    the cache, else trained now, every missing layer in one pass over one store, and cached.

    They are trained on the default corpus plus one third as many tokens of sentences about spans
    of years (`greater_than.year_sentences`), so that they reconstruct the greater-than prompts,
    without each context's BOS position (`ActivationStore.without_positions`: its MLP outputs are
    the model's largest, and would take the fit; graphs fold BOS into constants, see `attribute`).
    Defaults (chosen by measurement, see docs/circuits.md): 24k tokens, 2 × d_model latents, k=8,
    four epochs; in the fast setting 12k tokens and two epochs. The store (bfloat16, deleted after training) holds
    30 layers × 2 × d_model × 2 bytes per token: 0.8 GB for the default model's 12k tokens."""
    if isinstance(layers, str) and layers != "all":
        raise ValueError(f"layers={layers!r}: pass \"all\", a layer number or a list of layer numbers.")
    layers = list(range(lm.n_layers)) if layers == "all" else [layers] if isinstance(layers, int) else sorted(layers)
    n_tokens = n_tokens or pick(24_576, fast=12_288)
    n_latents = n_latents or 2 * lm.d_model
    k = k or 8
    epochs = epochs or pick(4, fast=2)
    run = _safe(f"{lm.name}-circuits-{CIRCUITS_TRAINING}-k{k}-{n_latents}-latents-{n_tokens}-tokens-{epochs}-epochs"
                f"{_key(options)}")
    folder = tutorial_cache() / "circuit-transcoders" / run
    trained = _trained(folder, layers, lambda missing: _circuit_store(lm, missing, n_tokens, folder / "store"),
                       n_latents=n_latents, k=k, epochs=epochs, batch_size=256, **options)
    shutil.rmtree(folder / "store", ignore_errors=True)
    return trained


def circuit_clt(lm: Any, *, n_tokens: int | None = None, n_latents: int | None = None, k: int = 4,
                epochs: int = 2, **options: Any) -> CrossLayerTranscoder:
    """A TopK cross-layer transcoder on every layer, for circuits: from the cache, else trained now
    (an interrupted collection or training resumes) and cached.

    Trained on the same tokens as `circuit_transcoders` (the default corpus plus one third year
    sentences; 24k tokens, 12k in the fast setting; without BOS). ``n_latents`` and ``k`` are per layer (default
    2 × d_model latents, as `circuit_transcoders`, and k=4: 30 × 4 = 120 active latents per token,
    matched to four late layers at k=32). Each latent writes to every later layer: for the default
    model that is 329M parameters, and training held 8.6 GB (docs/circuits.md), beyond the
    tutorials' 2 GB. Other keyword arguments go to `train_clt` (and into the cache key)."""
    n_tokens = n_tokens or pick(24_576, fast=12_288)
    n_latents = n_latents or 2 * lm.d_model
    run = _safe(f"{lm.name}-clt-{CIRCUITS_TRAINING}-k{k}-{n_latents}-latents-{n_tokens}-tokens-{epochs}-epochs"
                f"{_key(options)}")
    folder = tutorial_cache() / "circuit-clt" / run
    layers = list(range(lm.n_layers))
    return _cached_clt(folder, folder / "clt", lambda: _circuit_store(lm, layers, n_tokens, folder / "store"), layers,
                       n_latents=n_latents, k=k, epochs=epochs, batch_size=256,
                       checkpoint_every=max(1, n_tokens * epochs // 256 // 4), **options)


def _cached_clt(folder: Path, saved: Path, store: Callable[[], ActivationStore], layers: list[int],
                **train_options: Any) -> CrossLayerTranscoder:
    """The cross-layer transcoder saved in ``saved``; if there is none, trained (`train_clt`, with
    checkpoints in ``folder`` so an interruption resumes) on ``store()``, saved, and the checkpoints
    (and a store collected into ``folder``) deleted."""
    if not (saved / CONFIG_FILE).is_file():  # written last: its presence marks a finished save
        train_clt(store(), layers, checkpoint_dir=folder / "checkpoints", **train_options).save(saved)
        for done in ("checkpoints", "store"):
            shutil.rmtree(folder / done, ignore_errors=True)
    return CrossLayerTranscoder.load(saved)


def _circuit_store(lm: Any, layers: list[int], n_tokens: int, out: Path) -> ActivationStore:
    """The circuits' training store (bfloat16) without each context's BOS position: ``n_tokens`` of
    the default corpus and year sentences (one third), collected into ``out`` (an interrupted
    collection resumes)."""
    years = n_tokens // 3
    tokens = torch.cat([load_corpus("python-docs", lm, n_tokens=n_tokens - years),
                        load_corpus(year_sentences(), lm, n_tokens=years)])
    return collect_activations(lm, layers, tokens, out=out, batch_size=4, dtype="bfloat16").without_positions()


def _trained(folder: Path, layers: list[int], store: Callable[[list[int]], ActivationStore],
             **training: Any) -> dict[int, Transcoder]:
    """The transcoders of ``layers`` saved in ``folder``; the missing ones trained together first, on
    ``store(missing)``, with `train_transcoder` and ``training`` (an interrupted training resumes)."""
    missing = [layer for layer in layers if not (folder / f"layer-{layer}" / "config.json").is_file()]
    if missing:
        trained = train_transcoder(store(missing), missing, checkpoint_dir=folder / "checkpoints", **training)
        for layer, tc in trained.items():
            tc.save(folder / f"layer-{layer}")  # config.json is written last: its presence marks a finished save
        shutil.rmtree(folder / "checkpoints", ignore_errors=True)
        del trained
        heap.trim()  # trained in `heap.retained`: their memory goes back only when trimmed (0.16 GB for 30 layers)
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
