"""Per-latent statistics of a transcoder over a token set, for dashboards.

`analyze_features` runs the model over the tokens once (one nnsight trace per batch, stopped at the
transcoder's layer), encodes the MLP input (the MLP output for an SAE) and keeps, per latent and in
bounded memory: the top activating examples, a uniform sample of firing examples grouped by
activation quantile, firing count, sum and maximum, and a histogram; then adds two weights-only
views, logit effects and the tokens whose embeddings excite the latent. It returns `FeatureStats`.

A stats folder (all writes atomic, ``stats.json`` last, so an interrupted save never looks
complete)::

    stats.json          format, version, model, transcoder fingerprint and config, settings, the
                        other files' checksums (sealed with its own, `tcwidgets.files`)
    stats.safetensors   per-latent arrays (first axis = latent) and the analysed token contexts
    vocab.json          the display string of every token id

`FeatureStats.load` reads only ``stats.json`` and the safetensors header; a latent's rows are read
from the memory-mapped file when asked for (checked against its checksum on the first read), so
stats of thousands of latents open at once.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .activations import ActivationStore
from .files import (FileFormatError, MappedTensors, atomic_write, checksum, read_json, read_manifest, save_tensors,
                    write_manifest)
from .corpus import bos_id
from .models import resolve
from .progress import delayed_bar
from .splicing import check_transcoders, traced_input, transcoder_input, writes_after_norm

FORMAT = "tcwidgets.features"
VERSION = 2  # 2: checksums of the arrays and the vocabulary, a sealed stats.json
SORT_KEYS = ("density", "max", "mean_active", "index")

_STATS, _ARRAYS, _VOCAB = "stats.json", "stats.safetensors", "vocab.json"
_FIX = "run analyze_features again and save."
_EMPTY = -1  # token index of an empty example slot


class FeatureStatsError(FileFormatError):
    """Feature statistics are missing, corrupted, from a newer version, or do not match."""


class TranscoderMismatchError(FeatureStatsError):
    """Feature statistics were computed for a different transcoder or model."""


def transcoder_fingerprint(transcoder: torch.nn.Module) -> str:
    """A SHA-256 of a transcoder's config and weights: equal fingerprints, same transcoder."""
    digest = hashlib.sha256(json.dumps(transcoder.config.to_dict(), sort_keys=True).encode())
    for name, tensor in sorted(transcoder.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


# -- what one latent looks like -----------------------------------------------------------------

@dataclass(frozen=True)
class Example:
    """One token where a latent fires, with a window of context around it.

    ``tokens`` and ``acts`` cover the window (clipped to the context): token ids and this latent's
    activation at each; ``center`` is the example token's index in the window.
    """

    context: int
    position: int
    value: float
    tokens: np.ndarray
    acts: np.ndarray
    center: int


@dataclass(frozen=True)
class QuantileGroup:
    """Examples whose activations lie between quantiles ``low`` and ``high`` (fractions) of the
    latent's firing activations; ``min``/``max`` are the smallest and largest sampled values in it."""

    low: float
    high: float
    min: float
    max: float
    examples: list[Example]


@dataclass(frozen=True)
class LatentStats:
    """Everything recorded for one latent. Activations are in the transcoder's latent units.

    ``histogram_edges``/``histogram_counts``: firing activations (> 0) in equal-width bins from 0.
    ``promoted``/``suppressed``/``embedding``: ``(token id, value)`` pairs, strongest first
    (``embedding`` is ``None`` for an SAE, see `analyze_features`).
    """

    index: int
    count: int
    n_tokens: int
    mean_active: float
    max: float
    histogram_edges: np.ndarray
    histogram_counts: np.ndarray
    top: list[Example]
    quantiles: list[QuantileGroup]
    sample_size: int
    promoted: list[tuple[int, float]]
    suppressed: list[tuple[int, float]]
    embedding: list[tuple[int, float]] | None

    @property
    def density(self) -> float:
        """The fraction of analysed tokens on which the latent fires."""
        return self.count / self.n_tokens


# -- the statistics -------------------------------------------------------------------------------

class FeatureStats:
    """Per-latent statistics from `analyze_features`; `save` them and `load` them lazily.

    ``latent(i)`` gives a `LatentStats`; ``density``, ``max`` and ``mean_active`` are per-latent
    vectors; ``order`` sorts latents and ``search`` finds latents by token text.
    """

    def __init__(self, meta: dict, arrays: Mapping[str, np.ndarray], vocab: list[str] | None = None,
                 root: Path | None = None) -> None:
        self.meta, self.root = meta, root
        self._arrays = arrays
        if vocab is not None:
            self.vocab = vocab

    # -- files -------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the stats folder ``path`` (created if needed); returns it."""
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        arrays = save_tensors(root / _ARRAYS, {name: np.asarray(array) for name, array in self._arrays.items()})
        text = json.dumps(self.vocab)
        atomic_write(root / _VOCAB, lambda temporary: Path(temporary).write_text(text))
        write_manifest(root / _STATS, {**self.meta, "version": VERSION, "arrays": arrays,
                                       "vocab": {"sha256": checksum(root / _VOCAB)}})
        return root

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureStats:
        """Open a stats folder written by `save`. Reads the metadata and the array index only."""
        root = Path(path)
        meta_path = root / _STATS
        if not meta_path.is_file():
            raise FeatureStatsError(f"{root} holds no feature statistics (no {_STATS}). Create them with "
                                    "tcwidgets.analyze_features(lm, transcoder, tokens).save(path).")
        meta = read_manifest(meta_path, format=FORMAT, version=VERSION, fix=_FIX, error=FeatureStatsError,
                             sealed_since=2)
        for name in (_ARRAYS, _VOCAB):
            if not (root / name).is_file():
                raise FeatureStatsError(f"{root / name} is missing; {_FIX}")
        arrays_sha256, vocab_sha256 = _recorded(meta, "arrays"), _recorded(meta, "vocab")
        stats = cls(meta, MappedTensors(root / _ARRAYS, sha256=arrays_sha256, fix=_FIX, error=FeatureStatsError),
                    root=root)
        stats._vocab_sha256 = vocab_sha256
        return stats

    _vocab_sha256: str | None = None  # the checksum stats.json records for vocab.json

    @cached_property
    def vocab(self) -> list[str]:
        """The display string of every token id."""
        return read_json(self.root / _VOCAB, sha256=self._vocab_sha256, fix=_FIX, error=FeatureStatsError)

    # -- what the stats describe ----------------------------------------------------------------------
    @property
    def n_latents(self) -> int:
        return self.meta["n_latents"]

    @property
    def n_tokens(self) -> int:
        """How many tokens were analysed (BOS positions excluded when asked)."""
        return self.meta["n_tokens"]

    @property
    def model(self) -> str:
        return self.meta["model"]

    @property
    def fingerprint(self) -> str:
        """The `transcoder_fingerprint` of the analysed transcoder."""
        return self.meta["fingerprint"]

    @property
    def transcoder(self) -> dict:
        """The analysed transcoder's config."""
        return self.meta["transcoder"]

    def __len__(self) -> int:
        return self.n_latents

    def __repr__(self) -> str:
        site = self.transcoder.get("site", {})
        return (f"FeatureStats({self.model}, layer {site.get('layer')}, {self.transcoder['kind']}, "
                f"{self.n_latents:,} latents over {self.n_tokens:,} tokens)")

    def check_transcoder(self, transcoder: torch.nn.Module, model: str | None = None) -> None:
        """Raise `TranscoderMismatchError` unless these stats were computed for ``transcoder``
        (and, when given, the model named ``model``)."""
        if model is not None and model != self.model:
            raise TranscoderMismatchError(f"These stats were computed on {self.model!r}, not {model!r}: "
                                          "run analyze_features with this model.")
        if transcoder_fingerprint(transcoder) != self.fingerprint:
            raise TranscoderMismatchError(
                f"These stats were computed for a different transcoder ({self.transcoder['kind']}, "
                f"{self.transcoder['n_latents']} latents, layer {self.transcoder['site'].get('layer')}; the "
                "weights differ). Run analyze_features(lm, transcoder, tokens) for this transcoder.")

    # -- per-latent vectors ------------------------------------------------------------------------------
    @cached_property
    def count(self) -> np.ndarray:
        """How many analysed tokens each latent fires on."""
        return np.asarray(self._arrays["count"])

    @property
    def density(self) -> np.ndarray:
        return self.count / self.n_tokens

    @cached_property
    def max(self) -> np.ndarray:
        return np.asarray(self._arrays["max"])

    @property
    def mean_active(self) -> np.ndarray:
        """Mean activation over the tokens where the latent fires (0 for dead latents)."""
        return np.asarray(self._arrays["sum"]) / np.maximum(self.count, 1)

    def order(self, by: str = "density", descending: bool = True) -> np.ndarray:
        """Latent indices sorted by ``"density"``, ``"max"``, ``"mean_active"`` or ``"index"``."""
        if by not in SORT_KEYS:
            raise ValueError(f"Cannot sort by {by!r}: choose one of {SORT_KEYS}.")
        keys = np.arange(self.n_latents) if by == "index" else getattr(self, by)
        order = np.argsort(keys, kind="stable")
        return order[::-1] if descending else order

    def search(self, query: str, limit: int = 100) -> list[tuple[int, int]]:
        """Latents whose examples' activating tokens or logit effects contain ``query``.

        Matches are case-insensitive substrings of the tokens' text. Returns ``(latent, hits)``
        pairs, most hits first, then the highest maximum activation.
        """
        needle = query.strip().lower()
        if not needle:
            return []
        matches = np.array([i for i, text in enumerate(self.vocab) if needle in text.lower()], dtype=np.int64)
        if matches.size == 0:
            return []
        flat = np.asarray(self._arrays["tokens"]).reshape(-1)
        hits = np.zeros(self.n_latents, dtype=np.int64)
        for name in ("top_index", "sample_index"):
            index = np.asarray(self._arrays[name]).reshape(self.n_latents, -1)
            centers = np.where(index >= 0, flat[np.maximum(index, 0)], _EMPTY)
            hits += np.isin(centers, matches).sum(1)
        for name in ("promoted_ids", "suppressed_ids"):
            hits += np.isin(np.asarray(self._arrays[name]), matches).sum(1)
        found = np.flatnonzero(hits)
        found = found[np.lexsort((-self.max[found], -hits[found]))][:limit]
        return [(int(i), int(hits[i])) for i in found]

    # -- one latent ----------------------------------------------------------------------------------------
    def latent(self, index: int) -> LatentStats:
        """Everything recorded for latent ``index`` (read from disk on demand)."""
        if not isinstance(index, (int, np.integer)) or not 0 <= index < self.n_latents:
            raise IndexError(f"Latent {index!r} is out of range: these stats have {self.n_latents} latents, "
                             f"numbered 0 to {self.n_latents - 1}.")
        index = int(index)
        row = {name: self._row(name, index) for name in self._arrays.keys() if name not in _SHARED}
        count = int(row["count"])
        width = float(row["hist_width"])
        counts = row["hist_counts"]
        quantiles = self.meta["settings"]["quantiles"]
        groups = []
        for group in range(quantiles):
            examples = self._examples(row["sample_index"][group], row["sample_value"][group],
                                      row["sample_acts"][group])
            low, high = row["quantile_bounds"][group]
            groups.append(QuantileGroup(group / quantiles, (group + 1) / quantiles, float(low), float(high), examples))
        return LatentStats(
            index=index, count=count, n_tokens=self.n_tokens,
            mean_active=float(row["sum"]) / max(count, 1), max=float(row["max"]),
            histogram_edges=np.arange(counts.size + 1) * width, histogram_counts=counts,
            top=self._examples(row["top_index"], row["top_value"], row["top_acts"]),
            quantiles=groups, sample_size=int(row["sample_size"]),
            promoted=_pairs(row["promoted_ids"], row["promoted_values"]),
            suppressed=_pairs(row["suppressed_ids"], row["suppressed_values"]),
            embedding=_pairs(row["embedding_ids"], row["embedding_values"]) if "embedding_ids" in row else None,
        )

    def _row(self, name: str, index: int) -> np.ndarray:
        """Row ``index`` of a per-latent array (the only read of per-latent data)."""
        try:
            return np.array(self._arrays[name][index])
        except (OSError, ValueError) as error:
            raise FeatureStatsError(f"Could not read latent {index} from {self.root}: {error}. "
                                    "Run analyze_features again and save.") from error

    @cached_property
    def tokens(self) -> np.ndarray:
        """The analysed token contexts ``[n_contexts, context]``."""
        return np.asarray(self._arrays["tokens"])

    def _examples(self, index: np.ndarray, values: np.ndarray, acts: np.ndarray) -> list[Example]:
        left, _ = self.meta["settings"]["window"]
        context_length = self.tokens.shape[1]
        examples = []
        for token_index, value, window_acts in zip(index, values, acts):
            if token_index == _EMPTY:
                continue
            context, position = divmod(int(token_index), context_length)
            start, stop = max(position - left, 0), min(position - left + len(window_acts), context_length)
            offset = start - (position - left)
            examples.append(Example(context, position, float(value), self.tokens[context, start:stop].copy(),
                                    window_acts[offset:offset + stop - start], position - start))
        return examples


_SHARED = ("tokens",)  # arrays not indexed by latent


def _pairs(ids: np.ndarray, values: np.ndarray) -> list[tuple[int, float]]:
    return [(int(i), float(v)) for i, v in zip(ids, values)]


def _recorded(meta: dict, name: str) -> str | None:
    """The checksum ``stats.json`` records for one of the other files, taken out of ``meta`` (none
    before version 2)."""
    record = meta.pop(name, None)
    if meta["version"] < 2:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("sha256"), str):
        raise FeatureStatsError(f"stats.json lacks the checksum of its {name}; {_FIX}")
    return record["sha256"]


# -- streaming accumulation -----------------------------------------------------------------------------

class _Accumulator:
    """Running per-latent statistics over batches of dense latents ``[contexts, context, n_latents]``."""

    def __init__(self, n_latents: int, *, top_k: int, sample_size: int, window: tuple[int, int],
                 n_bins: int, seed: int) -> None:
        self.n_bins = n_bins
        self.count = torch.zeros(n_latents, dtype=torch.int64)
        self.sum = torch.zeros(n_latents, dtype=torch.float64)
        self.max = torch.zeros(n_latents)
        self.hist = torch.zeros(n_latents, n_bins, dtype=torch.int64)
        self.exponent = torch.zeros(n_latents, dtype=torch.int64)  # bin width 2**exponent; set on first firing
        # top examples, keyed by activation (largest kept); the sample, keyed by a random number (smallest kept)
        self.top = _Reservoir(n_latents, top_k, window, largest=True)
        self.sample = _Reservoir(n_latents, sample_size, window, largest=False)
        self.generator = torch.Generator().manual_seed(seed)

    def add(self, latents: torch.Tensor, first_token: int) -> None:
        """Add one batch; ``first_token`` is the flat index of its first token in the token set.

        Activations are never negative (every activation function ends in a ReLU or a
        threshold at or above zero), so a latent fires where its activation is positive.
        """
        n_latents = latents.shape[2]
        flat = latents.reshape(-1, n_latents)
        cols, rows = (flat > 0).nonzero(as_tuple=True)  # the firing (token, latent) pairs
        values = flat[cols, rows]
        new = self.count == 0
        self.count += torch.bincount(rows, minlength=n_latents)
        self.sum.index_add_(0, rows, values.double())
        batch_max = flat.amax(0).clamp_min(0)
        self.max = torch.maximum(self.max, batch_max)
        self._histogram(rows, values, batch_max, new)

        self.top.add(rows, cols, values, latents, first_token)
        self.sample.add(rows, cols, torch.rand(rows.numel(), generator=self.generator), latents, first_token)

    def _histogram(self, rows: torch.Tensor, values: torch.Tensor, batch_max: torch.Tensor,
                   new: torch.Tensor) -> None:
        """Bins of width 2**exponent from 0; a latent whose maximum outgrows its bins doubles the
        width, merging bins in pairs, so counts stay exact and at least half the bins are in use."""
        fires = batch_max > 0
        needed = torch.floor(torch.log2(batch_max.double() / self.n_bins)).long() + 1
        self.exponent = torch.where(new & fires, needed, self.exponent)
        while (grow := fires & ~new & (needed > self.exponent)).any():
            merged = self.hist[grow].view(-1, self.n_bins // 2, 2).sum(2)
            self.hist[grow] = torch.cat([merged, torch.zeros_like(merged)], 1)
            self.exponent[grow] += 1
        scaled = values.double() * torch.pow(2.0, -self.exponent[rows].double())
        bins = scaled.floor().long().clamp_(max=self.n_bins - 1)
        self.hist += torch.bincount(rows * self.n_bins + bins, minlength=self.hist.numel()).view_as(self.hist)

    def finish(self, quantiles: int, per_quantile: int) -> dict[str, np.ndarray]:
        top_index, top_value, top_acts, _ = self.top.result()
        sample = self._quantile_groups(quantiles, per_quantile)
        return {
            "count": self.count.numpy(), "sum": self.sum.numpy(), "max": self.max.numpy(),
            "hist_counts": self.hist.numpy(),
            "hist_width": np.where(self.count.numpy() > 0, np.exp2(self.exponent.double().numpy()), 0.0),
            "top_index": top_index, "top_value": top_value, "top_acts": top_acts, **sample,
        }

    def _quantile_groups(self, quantiles: int, per_quantile: int) -> dict[str, np.ndarray]:
        """Split each latent's uniform sample of firing tokens, sorted by activation, into
        ``quantiles`` equal groups and keep up to ``per_quantile`` evenly spaced examples of each."""
        index, value, acts, keys = self.sample.result()
        n_latents, size = value.shape
        order = np.argsort(np.where(np.isfinite(keys), value, np.inf), axis=1, kind="stable")
        index, value = np.take_along_axis(index, order, 1), np.take_along_axis(value, order, 1)
        acts = np.take_along_axis(acts, order[..., None], 1)
        n = np.isfinite(keys).sum(1)[:, None]  # sampled examples per latent
        group = np.arange(quantiles)[None, :]
        low, high = group * n // quantiles, (group + 1) * n // quantiles  # [latents, quantiles]
        take = np.minimum(high - low, per_quantile)
        slot = np.arange(per_quantile)[None, None, :]
        rank = low[..., None] + slot * (high - low)[..., None] // np.maximum(take, 1)[..., None]
        valid = slot < take[..., None]
        rank = np.where(valid, rank, 0).reshape(n_latents, -1)
        bounds = np.full((n_latents, quantiles, 2), np.nan, dtype=np.float32)
        filled = high > low
        latent_ids = np.nonzero(filled)[0]
        bounds[filled, 0] = value[latent_ids, low[filled]]
        bounds[filled, 1] = value[latent_ids, high[filled] - 1]
        shape = (n_latents, quantiles, per_quantile)
        return {
            "sample_index": np.where(valid, np.take_along_axis(index, rank, 1).reshape(shape), _EMPTY),
            "sample_value": np.where(valid, np.take_along_axis(value, rank, 1).reshape(shape), 0).astype(np.float32),
            "sample_acts": np.take_along_axis(acts, rank[..., None], 1).reshape(*shape, -1) * valid[..., None],
            "quantile_bounds": bounds, "sample_size": n[:, 0].astype(np.int64),
        }


class _Reservoir:
    """Per latent, the ``size`` firing tokens with the largest (or smallest) keys so far, each with
    its token index, activation and window of activations. Empty slots hold a non-finite key."""

    def __init__(self, n_latents: int, size: int, window: tuple[int, int], largest: bool) -> None:
        self.largest, self.left = largest, window[0]
        self.empty = -math.inf if largest else math.inf
        self.keys = torch.full((n_latents, size), self.empty)
        self.index = torch.full((n_latents, size), _EMPTY, dtype=torch.int64)
        self.acts = torch.zeros(n_latents, size, window[0] + 1 + window[1])

    def add(self, latent: torch.Tensor, token: torch.Tensor, keys: torch.Tensor, latents: torch.Tensor,
            first_token: int) -> None:
        """Merge a batch's firing pairs (``latent``, ``token`` column, ``keys``) into the reservoir;
        ``latents`` is the batch ``[contexts, context, n_latents]``. Windows are gathered only for
        the pairs that are kept."""
        n_latents, size = self.keys.shape
        # the batch's best `size` candidates per latent, as [n_latents, size] (sorting only firing pairs)
        order = torch.sort(keys, descending=self.largest, stable=True).indices
        order = order[torch.sort(latent[order], stable=True).indices]
        latent, token, keys = latent[order], token[order], keys[order]
        rank = _rank_within(latent, n_latents)
        first = rank < size
        candidates = torch.full((n_latents, size), self.empty)
        candidates[latent[first], rank[first]] = keys[first]
        rows = torch.zeros(n_latents, size, dtype=torch.int64)
        rows[latent[first], rank[first]] = token[first]

        # winners among the kept and the new; a new winner takes the slot of a loser in its latent
        both = torch.cat([self.keys, candidates], 1)
        best = both.topk(size, dim=1, largest=self.largest).indices
        won = torch.zeros_like(both, dtype=torch.bool).scatter_(1, best, True)
        won &= torch.isfinite(both)
        free_latent, free_slot = (~won[:, :size]).nonzero(as_tuple=True)
        new_latent, new_rank = won[:, size:].nonzero(as_tuple=True)
        free = torch.zeros(n_latents, size, dtype=torch.int64)
        free[free_latent, _rank_within(free_latent, n_latents)] = free_slot
        slot = free[new_latent, _rank_within(new_latent, n_latents)]
        new_rows = rows[new_latent, new_rank]
        self.keys[new_latent, slot] = candidates[new_latent, new_rank]
        self.index[new_latent, slot] = new_rows + first_token
        context = latents.shape[1]
        positions = (new_rows % context)[:, None] + torch.arange(self.acts.shape[2]) - self.left
        inside = (positions >= 0) & (positions < context)
        windows = latents[(new_rows // context)[:, None], positions.clamp(0, context - 1), new_latent[:, None]]
        self.acts[new_latent, slot] = windows * inside

    def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(index, value, acts, keys)``, best key first; empty slots (last) have index -1, zeros and a
        non-finite key."""
        order = self.keys.argsort(dim=1, descending=self.largest, stable=True)
        keys = self.keys.gather(1, order)
        filled = torch.isfinite(keys)
        index = torch.where(filled, self.index.gather(1, order), _EMPTY)
        acts = self.acts.gather(1, order[..., None].expand_as(self.acts)) * filled[..., None]
        return index.numpy(), acts[..., self.left].numpy(), acts.numpy(), keys.numpy()


def _rank_within(group: torch.Tensor, n_groups: int) -> torch.Tensor:
    """For a sorted vector of group ids, each element's position within its group."""
    counts = torch.bincount(group, minlength=n_groups)
    return torch.arange(group.numel()) - (torch.cumsum(counts, 0) - counts)[group]


# -- weights-only views ----------------------------------------------------------------------------------

def _norm_weight(norm: torch.nn.Module) -> torch.Tensor:
    """The elementwise scale a norm applies (Gemma's RMSNorm multiplies by ``1 + weight``)."""
    weight = norm.weight.detach().double()
    return weight + 1 if type(norm).__name__.startswith("Gemma") else weight


def _extremes(rows: torch.Tensor, columns: torch.Tensor | Callable[[int, int], torch.Tensor], n: int, *,
              lowest: bool, n_columns: int | None = None, budget: int = 2**24,
              progress: str | None = None) -> tuple[np.ndarray, ...]:
    """For each row r of ``rows`` [n_rows, d], the ``n`` largest (and smallest) entries of
    ``columns @ r``: ids and values. ``columns`` is a ``[n_columns, d]`` tensor or a function giving
    its rows ``start:stop`` (then pass ``n_columns``), so a large vocabulary is never held whole;
    scores are computed in blocks of at most ``budget`` values. ``progress`` (a description) shows
    a bar of the blocks when they take more than a moment (`delayed_bar`)."""
    n_columns = len(columns) if isinstance(columns, torch.Tensor) else n_columns
    piece = max(1, budget // max(1, rows.shape[0]))
    best: dict[bool, tuple[torch.Tensor, torch.Tensor] | None] = {True: None, False: None}
    for first in delayed_bar(range(0, n_columns, piece), desc=progress, unit="block", disable=progress is None):
        block = columns[first:first + piece] if isinstance(columns, torch.Tensor) else columns(first, first + piece)
        scores = rows @ block.T
        for largest in (True, False) if lowest else (True,):
            values, ids = scores.topk(min(n, scores.shape[1]), dim=1, largest=largest)
            if best[largest] is not None:  # merge with the best of the earlier blocks
                values, ids = torch.cat([best[largest][0], values], 1), torch.cat([best[largest][1], ids + first], 1)
                values, order = values.topk(n, dim=1, largest=largest)
                ids = ids.gather(1, order)
            else:
                ids = ids + first
            best[largest] = values, ids
    found = [best[True][1].int(), best[True][0]]
    if lowest:
        found += [best[False][1].int(), best[False][0]]
    return tuple(part.numpy() for part in found)


@torch.no_grad()
def logit_effects(lm: Any, transcoder: torch.nn.Module, k: int = 12,
                  latents: Sequence[int] | None = None, *, progress: bool = False) -> dict[str, np.ndarray]:
    """The ``k`` tokens each latent (all, or ``latents``) most promotes and most suppresses directly.

    The decoder row in model units, scaled by the final norm's weight, through the unembedding:
    the direct effect on each logit of one unit of activation, ignoring later layers and the
    final norm's data-dependent scale. Returns ``promoted_ids``, ``promoted_values``,
    ``suppressed_ids``, ``suppressed_values``, each ``[n_latents, k]``, strongest first.
    ``progress`` shows a bar over blocks of the vocabulary when they take more than a moment.
    """
    module, sites = lm._module, lm.sites
    unembed = resolve(module, sites.unembed).weight.detach().float().cpu()
    decoder = transcoder.W_dec.detach().cpu().double()
    if latents is not None:
        decoder = decoder[list(latents)]
    directions = decoder / transcoder.config.output_scale * _norm_weight(resolve(module, sites.final_norm)).cpu()
    ids, values, low_ids, low_values = _extremes(directions.float(), unembed, min(k, unembed.shape[0]), lowest=True,
                                                 progress="logit effects" if progress else None)
    return {"promoted_ids": ids, "promoted_values": values, "suppressed_ids": low_ids, "suppressed_values": low_values}


@torch.no_grad()
def _weight_views(lm: Any, transcoder: torch.nn.Module, layer: int, n: int,
                  progress: bool) -> dict[str, np.ndarray]:
    """`logit_effects` of every latent and, for transcoders, the tokens whose embeddings most
    excite each encoder row (see `analyze_features`)."""
    views = logit_effects(lm, transcoder, n, progress=progress)
    if transcoder.config.kind != "sae":
        module, sites = lm._module, lm.sites
        embed = resolve(module, sites.embed).weight.detach()
        norm = resolve(module, f"{sites.block(layer)}.{sites.pre_mlp_norm}")
        scale = transcoder.config.input_scale

        def inputs(start: int, stop: int) -> torch.Tensor:  # a slice at a time: Gemma's 262k tokens are 0.7 GB
            return (norm(embed[start:stop]) * scale).float().cpu()
        ids, values = _extremes(transcoder.W_enc.detach().float().cpu(), inputs, min(n, len(embed)), lowest=False,
                                n_columns=len(embed), progress="embedding views" if progress else None)
        views.update(embedding_ids=ids, embedding_values=values)
    return views


def _vocabulary(tokenizer: Any, size: int) -> list[str]:
    """The display string of each token id below ``size`` (the unembedding's row count)."""
    known = min(len(tokenizer), size)
    texts = tokenizer.batch_decode([[i] for i in range(known)])
    return texts + [f"<unused {i}>" for i in range(known, size)]


# -- the entry point -----------------------------------------------------------------------------------------

@torch.no_grad()
def analyze_features(
    lm: Any,
    transcoder: torch.nn.Module,
    tokens: torch.Tensor | ActivationStore,
    *,
    top_k: int = 20,
    quantiles: int = 4,
    per_quantile: int = 5,
    sample_size: int = 64,
    window: tuple[int, int] = (16, 6),
    n_bins: int = 48,
    n_logits: int = 12,
    exclude_bos: bool = True,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = True,
) -> FeatureStats:
    """Per-latent statistics of ``transcoder`` over ``tokens``, for `FeatureDashboard`.

    One pass over the tokens, ``batch_size`` contexts per nnsight trace (stopped after the
    transcoder's layer); memory stays bounded by the batch and the per-latent state. Given an
    `ActivationStore` that holds the transcoder's layer instead of tokens, the stored MLP
    activations are read (in corpus order) and the model is not run.

    Args:
        lm: the model from `load_model` the transcoder was trained on.
        transcoder: a `Transcoder` (its ``config.site["layer"]`` says where it reads: the MLP
            input, or the MLP output for an SAE).
        tokens: ``[n_contexts, context]`` token ids, e.g. from `load_corpus`, or an
            `ActivationStore` of ``lm`` holding the layer.
        top_k: top activating examples kept per latent.
        quantiles, per_quantile: a uniform sample of ``sample_size`` firing tokens per latent is
            sorted by activation and split into ``quantiles`` equal groups, ``per_quantile``
            evenly spaced examples of each are kept (exact quantiles when the latent fires on
            fewer than ``sample_size`` tokens).
        window: tokens of context kept before and after each example.
        n_bins: histogram bins (equal width from 0; at least half of them in use).
        n_logits: tokens kept per logit-effect and embedding list.
        exclude_bos: ignore positions holding the BOS token (attention sinks, whose huge
            activations would otherwise top many latents).
        batch_size: contexts per forward pass (or per read from a store).
        seed: the random sample behind the quantile groups depends only on it.
        progress: show a progress bar.

    Weights-only views, per latent:

    - *logit effects*: the decoder row (in model units) scaled by the final norm's weight and
      multiplied by the unembedding: the direct effect on each logit of one unit of activation,
      ignoring later layers and the final norm's data-dependent scale. Most promoted and most
      suppressed tokens are kept.
    - *embedding*: each token's embedding passed through the layer's pre-MLP norm (the module
      itself, weight included) and the encoder (without bias and activation): how much the latent
      would fire if the residual stream at this layer held only that token's embedding, ignoring
      attention, earlier MLPs and position. Not computed for an SAE, which reads the MLP output.
    """
    layer = transcoder.config.site.get("layer")
    if layer is None:
        raise ValueError("The transcoder's config.site has no 'layer': analyze_features needs to know which "
                         "MLP it replaces (config.site = {'model': ..., 'layer': ...}).")
    check_transcoders(lm, {layer: transcoder})
    store = tokens if isinstance(tokens, ActivationStore) else None
    if store is not None:
        store.check(model=lm.name, layers=[layer])
        if writes_after_norm(lm, transcoder) and transcoder.config.kind == "sae":
            raise ValueError(f"This SAE reads the output of layer {layer}'s post-MLP norm, and stores hold the MLP "
                             "module's output (before that norm): pass tokens instead of the store.")
        tokens = store.tokens
    tokens = lm.check_tokens(tokens)
    include = torch.ones_like(tokens, dtype=torch.bool)
    bos = bos_id(lm.tokenizer)
    if exclude_bos and bos is not None:
        include = tokens != bos
    n_tokens = int(include.sum())
    if n_tokens == 0:
        raise ValueError("Every token is a BOS token, so there is nothing to analyse: pass real text, or "
                         "exclude_bos=False.")
    for name, value in (("top_k", top_k), ("quantiles", quantiles), ("per_quantile", per_quantile),
                        ("sample_size", sample_size), ("n_logits", n_logits), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer.")
    if n_bins < 2 or n_bins % 2:
        raise ValueError(f"n_bins={n_bins} must be an even number of at least 2.")

    context = tokens.shape[1]
    state = _Accumulator(transcoder.n_latents, top_k=top_k, sample_size=sample_size,
                         window=tuple(window), n_bins=n_bins, seed=seed)
    stored = None if store is None else store.batches(layer, batch_size * context, shuffle=False, drop_last=False)
    training = transcoder.training
    transcoder.eval()  # inference behaviour (BatchTopK's calibrated threshold)
    try:
        for start in tqdm(range(0, len(tokens), batch_size), desc="analysing features", disable=not progress,
                          leave=False):
            batch = tokens[start:start + batch_size]
            if store is None:
                site = traced_input(lm, transcoder, batch)
            else:
                site = transcoder_input(transcoder, *(values.view(*batch.shape, -1) for values in next(stored)))
            latents = transcoder.encode(site).float().cpu()  # [batch, context, n_latents]
            latents *= include[start:start + batch_size, :, None]
            state.add(latents, start * context)
    finally:
        transcoder.train(training)

    arrays = state.finish(quantiles, per_quantile)
    arrays.update(_weight_views(lm, transcoder, layer, n_logits, progress))
    arrays["tokens"] = tokens.to(torch.int32).numpy()
    meta = {
        "format": FORMAT, "version": VERSION, "model": lm.name, "fingerprint": transcoder_fingerprint(transcoder),
        "transcoder": transcoder.config.to_dict(), "n_latents": transcoder.n_latents, "n_tokens": n_tokens,
        "settings": {"top_k": top_k, "quantiles": quantiles, "per_quantile": per_quantile,
                     "sample_size": sample_size, "window": list(window), "n_bins": n_bins,
                     "n_logits": n_logits, "exclude_bos": exclude_bos, "seed": seed},
    }
    vocab = _vocabulary(lm.tokenizer, resolve(lm._module, lm.sites.unembed).weight.shape[0])
    return FeatureStats(meta, arrays, vocab)
