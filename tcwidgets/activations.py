"""Collect MLP inputs and outputs with nnsight into an `ActivationStore`.

A store on disk is a folder::

    manifest.json            model (name and weights' fingerprint), layers, sites, token count and
                             hash, dtype, per-layer mean and norm, each file's checksum
    tokens.safetensors       the token contexts the activations belong to
    shard-00000.safetensors  "<layer>.input" / "<layer>.output" rows [n, d_model], in corpus order,
    ...                      plus float64 partial sums for the statistics

Every file is written to a temporary name and renamed, and the manifest lists only finished
shards, so an interrupted collection resumes where it stopped, without duplicates; a lock on the
folder keeps two processes from collecting into it at once. Reading maps shards into memory
(``numpy.memmap``), so a store larger than RAM trains fine; each shard is checked against its
checksum when first read (`tcwidgets.files`).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .files import FileFormatError, MappedTensors, inside, load_tensors, lock, read_manifest, save_tensors, write_manifest
from .models import fingerprint
from .progress import layers_label

FORMAT = "tcwidgets.activations"
VERSION = 2  # 2: checksums of every file, the model's fingerprint, a sealed manifest
SHARD_BYTES = 64 * 2**20  # activations held in memory before a shard is written

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
OUTLIER_RATIO = 1e4
"""A row whose norm exceeds this many times the median row norm of its layer is bad data (real rows
stay within tens of times it: at most 17x in SmolLM2-135M's layers, its attention-sink tokens)."""
_RECOLLECT = "Delete the store folder and run collect_activations again with the same arguments to re-collect it."


SHUFFLES = ("global", "context", "document")


def shuffle_mode(shuffle: bool | str) -> str:
    """The name of a batch order (`ActivationStore.batches`): ``True`` is ``"global"``, ``False``
    ``"document"``; a name must be one of `SHUFFLES`."""
    if shuffle is True or shuffle is False:
        return "global" if shuffle else "document"
    if shuffle not in SHUFFLES:
        raise ValueError(f"shuffle={shuffle!r}: choose one of {', '.join(map(repr, SHUFFLES))} (or True/False)")
    return shuffle


class StoreError(FileFormatError):
    """An activation store is incomplete, corrupted, or does not match the request."""


class LayerNotInStoreError(StoreError, KeyError):
    """A layer was asked of a store that did not collect it."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0])


@dataclass(frozen=True)
class LayerStats:
    """Per-layer statistics over all stored tokens: means and average L2 norms per token."""

    in_mean: torch.Tensor
    out_mean: torch.Tensor
    in_norm: float
    out_norm: float


def _sha256(tokens: torch.Tensor) -> str:
    return hashlib.sha256(tokens.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


class _Shard:
    """One shard's tensors: memory-mapped from a file (checked against its checksum on first read),
    or held in memory."""

    def __init__(self, start: int, n_tokens: int, tensors: dict[str, torch.Tensor] | None = None,
                 path: Path | None = None, sha256: str | None = None) -> None:
        self.start, self.n_tokens, self.path = start, n_tokens, path
        self._tensors: Any = tensors if tensors is not None else MappedTensors(
            path, sha256=sha256, fix=_RECOLLECT, error=StoreError)

    @property
    def name(self) -> str:
        """How errors name the shard: its file, or its first token for a store in memory."""
        return str(self.path) if self.path else f"the shard starting at token {self.start}"

    def array(self, name: str) -> np.ndarray | torch.Tensor:
        return self._tensors[name]

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape, read from the header only."""
        if isinstance(self._tensors, MappedTensors):
            return self._tensors.shape(name)
        return tuple(self._tensors[name].shape)

    def verify(self) -> None:
        """Check the shard's file against its checksum (nothing to do in memory)."""
        if isinstance(self._tensors, MappedTensors):
            self._tensors.verify()

    def rows_into(self, name: str, index: np.ndarray, out: torch.Tensor) -> None:
        """Write rows ``index`` of one tensor into ``out`` (float32, contiguous), with no
        intermediate copy."""
        array = self.array(name)
        if isinstance(array, np.ndarray) and array.dtype == np.float32:
            # a plain ndarray view of the memmap (whose own indexing costs more); mode "raise" buffers: 2.5x slower
            np.take(np.asarray(array), index, axis=0, out=out.numpy(), mode="clip")
        else:
            out.copy_(self.rows(name, index, out.dtype))

    def rows(self, name: str, index: np.ndarray | None, dtype: torch.dtype) -> torch.Tensor:
        """Rows ``index`` (all when ``None``) of one tensor, as ``torch`` values of ``dtype``."""
        array = self.array(name)
        if isinstance(array, torch.Tensor):
            values = array if index is None else array[torch.from_numpy(index)]
            return values.to(dtype)
        values = torch.from_numpy(np.array(array) if index is None else array[index])  # copies out of the map
        if array.dtype == np.uint16:  # bfloat16 is stored as raw 16-bit words
            values = values.view(torch.bfloat16)
        return values.to(dtype)


class ActivationStore:
    """MLP inputs and outputs of chosen layers for a token set, in corpus order.

    Get one from `collect_activations` or `ActivationStore.open(path)`; `without_positions` gives a
    view that leaves some positions of every context out.
    """

    def __init__(self, manifest: dict, shards: list[_Shard], root: Path | None = None,
                 tokens: torch.Tensor | None = None, left_out: Sequence[int] = ()) -> None:
        self.manifest, self.root = manifest, root
        self._shards = shards
        self._starts = np.array([shard.start for shard in shards], dtype=np.int64)
        self._tokens = tokens
        self.left_out = tuple(sorted(set(left_out)))
        context = manifest["context"]
        if not all(0 <= position < context for position in self.left_out) or len(self.left_out) >= context:
            raise ValueError(f"positions {list(left_out)}: name positions of a context of {context} tokens "
                             "(0 to context - 1), not all of them.")
        self._keep = ~np.isin(np.arange(manifest["n_tokens"]) % context, self.left_out) if self.left_out else None
        self._stats: dict[int, LayerStats] = {}

    def without_positions(self, positions: Collection[int] = (0,)) -> ActivationStore:
        """A view of this store without the rows at ``positions`` of every context (besides any this
        view already leaves out): everything a trainer reads (`batches`, `sample`, `stats`,
        `layer`, `n_tokens`) covers the other rows only. The default, position 0, is each context's
        BOS token, whose MLP outputs in some models are thousands of times the others' (massive
        activations): in SmolLM2-135M 99.9% of layer 11's output variance, so a transcoder trained on
        them fits BOS and not the text."""
        return ActivationStore(self.manifest, self._shards, self.root, self._tokens, (*self.left_out, *positions))

    @classmethod
    def open(cls, path: str | os.PathLike, *, model: str | None = None,
             layers: Sequence[int] | None = None) -> ActivationStore:
        """Open a store folder; optionally check that it holds ``model`` and ``layers``.

        Reads the manifest and the shards' headers; checks the manifest's counts and shapes against
        the shards. Each shard is checked against its checksum when first read (`verify` checks all).
        """
        root = Path(path)
        manifest_path = root / "manifest.json"
        if not manifest_path.is_file():
            raise StoreError(f"{root} is not an activation store (no manifest.json). "
                             "Create one with tcwidgets.collect_activations(..., out=...).")
        manifest = _read_manifest(root)
        if not manifest["complete"]:
            raise StoreError(f"{root} is incomplete ({len(manifest['shards'])} of {manifest['n_shards']} shards): "
                             "its collection was interrupted. Run collect_activations again with the same "
                             "arguments and out= to resume it.")
        shards = [_Shard(entry["start"], entry["n_tokens"], path=inside(root, entry["file"], error=StoreError),
                         sha256=entry.get("sha256")) for entry in manifest["shards"]]
        _check_counts(root, manifest, shards)
        store = cls(manifest, shards, root)
        store.check(model=model, layers=layers)
        return store

    def check(self, *, model: str | None = None, layers: Sequence[int] | None = None) -> None:
        """Raise `StoreError` unless this store holds activations of ``model`` for all ``layers``."""
        if model is not None and model != self.model:
            raise StoreError(f"This store holds activations of {self.model!r}, not {model!r}: collect "
                             f"activations of {model!r} into another folder.")
        for layer in layers or ():
            self._check_layer(layer)

    def _check_layer(self, layer: int) -> None:
        if layer not in self.layers:
            raise LayerNotInStoreError(
                f"Layer {layer} is not in this store (it holds layers {self.layers} of {self.model}). "
                f"Collect it with collect_activations(lm, layers=[{layer}], ...).")

    # -- what it holds -------------------------------------------------------------------------
    @property
    def model(self) -> str:
        return self.manifest["model"]

    @property
    def layers(self) -> list[int]:
        return list(self.manifest["layers"])

    @property
    def d_model(self) -> int:
        return self.manifest["d_model"]

    @property
    def n_tokens(self) -> int:
        """The rows handed out: every stored token, less the positions a view leaves out."""
        return self.manifest["n_tokens"] if self._keep is None else int(self._keep.sum())

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.manifest["dtype"]]

    @property
    def tokens(self) -> torch.Tensor:
        """The token contexts ``[n_contexts, context]`` whose activations are stored."""
        if self._tokens is None:
            self._tokens = _read_tokens(self.root, self.manifest)
        return self._tokens

    @property
    def identity(self) -> dict[str, Any]:
        """What the stored activations are of: the model (name and weights' `fingerprint`), the
        tokens (count and hash) and the storage dtype. Equal identities, equal activations."""
        return {**{key: self.manifest.get(key) for key in ("model", "model_fingerprint", "tokens_sha256", "n_tokens",
                                                            "dtype")}, "positions_left_out": list(self.left_out)}

    def sites(self, layer: int) -> dict[str, str]:
        """The nnsight sites the layer's input and output were read from."""
        self._check_layer(layer)
        return dict(self.manifest["sites"][str(layer)])

    def stats(self, layer: int) -> LayerStats:
        """Means and average norms of the layer's inputs and outputs (over the rows a view keeps)."""
        self._check_layer(layer)
        entry = self.manifest["stats"][str(layer)]
        if self._keep is None:
            return LayerStats(torch.tensor(entry["in_mean"]), torch.tensor(entry["out_mean"]),
                              entry["in_norm"], entry["out_norm"])
        if layer not in self._stats:  # all rows' sums less the left-out rows' (a small read)
            left_out = self._gather([layer], np.flatnonzero(~self._keep))[0]
            n_all, n = self.manifest["n_tokens"], self.n_tokens
            means, norms = [], []
            for short, rows in zip(("in", "out"), left_out):
                rows = rows.double()
                means.append(((torch.tensor(entry[f"{short}_mean"], dtype=torch.float64) * n_all - rows.sum(0)) / n)
                             .float())
                norms.append(float((entry[f"{short}_norm"] * n_all - float(rows.norm(dim=1).sum())) / n))
            self._stats[layer] = LayerStats(means[0], means[1], norms[0], norms[1])
        return self._stats[layer]

    def __len__(self) -> int:
        return self.n_tokens

    def __repr__(self) -> str:
        where = str(self.root) if self.root else "in memory"
        without = f", without positions {list(self.left_out)}" if self.left_out else ""
        return f"ActivationStore({self.model}, layers={self.layers}, n_tokens={self.n_tokens:,}{without}, {where})"

    # -- reading -------------------------------------------------------------------------------
    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """All inputs and outputs of a layer, float32 ``[n_tokens, d_model]``, in corpus order."""
        self._check_layer(layer)
        values = tuple(torch.cat([s.rows(f"{layer}.{kind}", None, torch.float32) for s in self._shards])
                       for kind in ("input", "output"))
        return values if self._keep is None else tuple(v[torch.from_numpy(self._keep)] for v in values)

    def sample(self, layer: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` of ``n`` rows drawn at random (the first batch of `batches` with that seed):
        what a trainer initialises from."""
        return next(self.batches(layer, min(n, self.n_tokens), seed=seed))

    def n_batches(self, batch_size: int, epochs: int = 1, drop_last: bool = True) -> int:
        """How many batches `batches` yields."""
        per_epoch = self.n_tokens // batch_size if drop_last else math.ceil(self.n_tokens / batch_size)
        return per_epoch * epochs

    def batches(self, layer: int | Sequence[int], batch_size: int = 1024, *, shuffle: bool | str = True,
                seed: int = 0, epochs: int = 1, start: int = 0, drop_last: bool = True,
                part: tuple[int, int] = (0, 1)) -> Iterator[Any]:
        """Training batches ``(x, y)`` (float32, CPU) of one layer; with a list of layers, a list of
        ``(x, y)``, one per layer, of the same rows (one pass over the store for all of them).

        ``shuffle`` (see `shuffle_mode`) orders the rows of each epoch, seeded by ``seed`` and the
        epoch, the same for every layer; batches are consecutive slices of that order:

        - ``"global"`` (or ``True``): a permutation of all rows across shards; a batch mixes tokens
          of about as many contexts as it has tokens.
        - ``"context"``: the contexts in a random order, each context's tokens together and in
          order; a batch is the tokens of ``batch_size / context`` whole contexts (sparsify's way).
        - ``"document"`` (or ``False``): the stored corpus order (contexts pack documents in
          order, so a long document's contexts follow each other), the same every epoch.

        A view (`without_positions`) orders the rows it keeps the same way, the left-out rows taken
        out of the order. ``start`` skips that many batches without reading them, for exact resume. ``part=(i, n)``
        reads only the i-th of n equal parts of each batch (one data-parallel process's share;
        ``batch_size`` a multiple of n).
        """
        shuffle = shuffle_mode(shuffle)
        layers = [layer] if isinstance(layer, int) else list(layer)
        for each in layers:
            self._check_layer(each)
        index, parts = part
        if not (0 <= index < parts and batch_size % parts == 0):
            raise ValueError(f"part={part}: needs 0 <= i < n, and batch_size={batch_size} a multiple of n={parts}")
        share = batch_size // parts
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be positive.")
        per_epoch = self.n_batches(batch_size, 1, drop_last)
        if per_epoch == 0:
            raise StoreError(f"batch_size={batch_size} is larger than the store ({self.n_tokens} tokens).")
        for epoch in range(start // per_epoch, epochs):
            generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            if shuffle == "global":
                order = torch.randperm(self.manifest["n_tokens"], generator=generator).numpy()
            elif shuffle == "context":
                context = self.manifest["context"]
                contexts = torch.randperm(self.manifest["n_contexts"], generator=generator).numpy()
                order = (contexts[:, None] * context + np.arange(context)).ravel()
            else:
                order = np.arange(self.manifest["n_tokens"])
            if self._keep is not None:
                order = order[self._keep[order]]
            first = start - epoch * per_epoch if epoch == start // per_epoch else 0
            for batch in range(max(first, 0), per_epoch):
                begin = batch * batch_size + index * share
                pairs = self._gather(layers, order[begin:begin + share])
                yield pairs[0] if isinstance(layer, int) else pairs

    def _gather(self, layers: list[int], index: np.ndarray) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Rows ``index`` of each layer's inputs and outputs, in increasing row order."""
        index = np.sort(index)
        d = self.d_model
        out = {f"{layer}.{kind}": torch.empty(len(index), d) for layer in layers for kind in ("input", "output")}
        # each shard's rows are one slice of the sorted index: written in place, no concatenation
        bounds = np.searchsorted(index, [*self._starts, self.manifest["n_tokens"]])
        for shard, begin, end in zip(self._shards, bounds[:-1], bounds[1:]):
            if begin < end:
                local = index[begin:end] - shard.start
                for name, values in out.items():
                    shard.rows_into(name, local, values[begin:end])
        return [(out[f"{layer}.input"], out[f"{layer}.output"]) for layer in layers]

    def verify(self, layers: Sequence[int] | None = None) -> None:
        """Read every shard once (a slow, full check): each file must match its checksum, and every
        value of ``layers`` (default all) must be finite, with no row's norm above `OUTLIER_RATIO`
        times the layer's median row norm. Raises `StoreError` naming the shard, layer and value."""
        if self.root is not None:
            _read_tokens(self.root, self.manifest)
        for shard in tqdm(self._shards, desc="verifying checksums", leave=False):
            shard.verify()
        for layer in self.layers if layers is None else layers:
            self._check_layer(layer)
            for kind in ("input", "output"):
                _check_values(self._shards, layer, kind)


def _check_values(shards: list[_Shard], layer: int, kind: str) -> None:
    """Raise `StoreError` naming the first non-finite value, or the largest value of a row whose norm
    exceeds `OUTLIER_RATIO` times the median row norm, of one layer's inputs or outputs."""
    name = f"{layer}.{kind}"
    norms = []
    for shard in tqdm(shards, desc=f"checking layer {layer} {kind}s", leave=False):
        values = shard.rows(name, None, torch.float32)
        finite = torch.isfinite(values)
        if not finite.all():
            row = int((~finite).any(1).nonzero()[0])
            value = float(values[row][~finite[row]][0])
            raise StoreError(f"{shard.name} (layer {layer}) holds a non-finite {kind} value ({value}) at token "
                             f"{shard.start + row}: the store is corrupted or the model overflowed. Collect it again "
                             "(in float32 if it was half precision).")
        norms.append(values.double().norm(dim=1))
    median = float(torch.cat(norms).median())
    for shard, shard_norms in zip(shards, norms):
        if float(shard_norms.max()) > OUTLIER_RATIO * median:
            row = int(shard_norms.argmax())
            values = shard.rows(name, np.array([row]), torch.float32)[0]
            value = float(values[values.abs().argmax()])
            raise StoreError(
                f"{shard.name} (layer {layer}) holds an outlier {kind} value {value:.4g} at token {shard.start + row} "
                f"(its row's norm is {float(shard_norms[row]) / median:.3g} times the layer's median): bad data, "
                "not activations a transcoder can learn. Collect the store again; if the model itself produces "
                "it, leave those tokens out of the corpus.")


def _read_manifest(root: Path) -> dict[str, Any]:
    """The manifest of a store folder, checked for format, version, seal and field types."""
    manifest = read_manifest(root / "manifest.json", format=FORMAT, version=VERSION, error=StoreError,
                             sealed_since=2, fix=_RECOLLECT)
    try:
        for key in ("complete",):
            if not isinstance(manifest[key], bool):
                raise TypeError(f"{key!r} is not true or false")
        for key in ("n_tokens", "n_contexts", "context", "n_shards", "d_model"):
            if not isinstance(manifest[key], int) or manifest[key] < 0:
                raise TypeError(f"{key!r} is not a count")
        for entry in manifest["shards"]:
            if not all(isinstance(entry[key], int) and entry[key] >= 0 for key in ("start", "n_tokens")):
                raise TypeError(f"shard entry {entry!r} has no valid start and token count")
        if not all(isinstance(layer, int) for layer in manifest["layers"]) or manifest["dtype"] not in _DTYPES:
            raise TypeError("invalid layers or dtype")
    except (KeyError, TypeError) as error:
        raise StoreError(f"{root / 'manifest.json'} is corrupted ({error!s}). {_RECOLLECT}") from error
    return manifest


def _check_counts(root: Path, manifest: dict[str, Any], shards: list[_Shard]) -> None:
    """The manifest's counts must describe the shards: contiguous, covering ``n_tokens`` exactly, each
    holding ``[n_tokens, d_model]`` rows of every layer."""
    problem = None
    expected_start = 0
    for shard in shards:
        if shard.start != expected_start:
            problem = f"a shard starts at token {shard.start}, not {expected_start}"
            break
        for layer in manifest["layers"]:
            for kind in ("input", "output"):
                try:
                    shape = shard.shape(f"{layer}.{kind}")
                except KeyError:
                    shape = None
                if shape != (shard.n_tokens, manifest["d_model"]):
                    problem = (f"{shard.name} holds {shape} {layer}.{kind} rows where the manifest says "
                               f"({shard.n_tokens}, {manifest['d_model']})")
                    break
        expected_start += shard.n_tokens
    if problem is None and expected_start != manifest["n_tokens"]:
        problem = f"its shards hold {expected_start} tokens, its manifest says n_tokens={manifest['n_tokens']}"
    if problem is None and manifest["n_contexts"] * manifest["context"] != manifest["n_tokens"]:
        problem = (f"n_contexts={manifest['n_contexts']} contexts of {manifest['context']} tokens are not "
                   f"n_tokens={manifest['n_tokens']}")
    if problem is None and len(shards) != manifest["n_shards"]:
        problem = f"it lists {len(shards)} shards of n_shards={manifest['n_shards']}"
    if problem is not None:
        raise StoreError(f"{root} is inconsistent: {problem}. The manifest was edited or the store corrupted. "
                         f"{_RECOLLECT}")


def _read_tokens(root: Path, manifest: dict[str, Any]) -> torch.Tensor:
    """The store's token contexts, checked against the file's checksum and the manifest's hash."""
    record = manifest.get("tokens", {})
    path = root / "tokens.safetensors"
    tensors = load_tensors(path, sha256=record.get("sha256"), fix=_RECOLLECT, error=StoreError)
    tokens = tensors.get("tokens")
    shape = (manifest["n_contexts"], manifest["context"])
    if tokens is None or tuple(tokens.shape) != shape or _sha256(tokens) != manifest["tokens_sha256"]:
        raise StoreError(f"{path} does not hold the manifest's {shape[0]} x {shape[1]} token contexts: it was "
                         f"replaced or corrupted. {_RECOLLECT}")
    return tokens.long()


# -- collection ----------------------------------------------------------------------------------

def _request(lm: Any, layers: list[int], tokens: torch.Tensor, dtype: str, contexts_per_shard: int) -> dict:
    return {
        "format": FORMAT, "version": VERSION, "model": lm.name, "model_fingerprint": fingerprint(lm),
        "model_type": lm.config.model_type, "d_model": lm.d_model, "layers": layers,
        "sites": {str(layer): lm.sites.mlp_sites(layer) for layer in layers},
        "context": tokens.shape[1], "n_contexts": tokens.shape[0], "n_tokens": tokens.numel(),
        "tokens_sha256": _sha256(tokens), "dtype": dtype, "contexts_per_shard": contexts_per_shard,
        "n_shards": math.ceil(tokens.shape[0] / contexts_per_shard),
    }


_IDENTITY = ("model", "model_fingerprint", "layers", "context", "n_contexts", "tokens_sha256", "dtype",
             "contexts_per_shard")


def _resume_or_start(root: Path, request: dict, tokens: torch.Tensor) -> dict:
    """The manifest of the collection in ``root``: the one there if it is of the same request (to
    resume or return), else a new one, with the tokens file written."""
    if (root / "manifest.json").is_file():
        manifest = _read_manifest(root)
        old = manifest["version"] < 2  # written before fingerprints: the model is known by its name only
        different = [key for key in _IDENTITY if manifest.get(key) != request[key]
                     and not (old and key == "model_fingerprint")]
        if different:
            details = "; ".join(f"{key}: stored {manifest.get(key)!r}, asked {request[key]!r}"
                                for key in different if key not in ("tokens_sha256", "model_fingerprint"))
            if "model_fingerprint" in different:
                details += ("; " if details else "") + "other model weights (the same name, different parameters)"
            if "tokens_sha256" in different:
                details += ("; " if details else "") + "different tokens"
            raise StoreError(f"{root} already holds a different collection ({details}). Pass another out= "
                             "folder, or delete this one to replace it.")
        if old and not manifest["complete"]:
            raise StoreError(f"{root} holds an interrupted collection written by an older tcwidgets, which this "
                             "one cannot resume. Delete the folder and collect again.")
        return manifest
    manifest = dict(request, shards=[], complete=False)
    manifest["tokens"] = save_tensors(root / "tokens.safetensors", {"tokens": tokens.to(torch.int32)})
    write_manifest(root / "manifest.json", manifest)
    return manifest


def trace_mlp(lm: Any, batch: torch.Tensor, layers: list[int],
              after_norm: Collection[int] = ()) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One forward pass that saves every requested layer's MLP input and output (after the post-MLP
    norm on the ``after_norm`` layers), then stops."""
    saved = []
    with lm.trace(batch) as tracer:
        for layer in layers:
            saved.append((lm.mlp(layer).input.save(),
                          lm.mlp_writer(layer, after_norm=layer in after_norm).output.save()))
        tracer.stop()
    return saved


def _shard_tensors(parts: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Concatenate a shard's rows and add the float64 partial sums the statistics are built from."""
    tensors = {}
    for name, rows in parts.items():
        tensors[f"{name}.sum"] = sum(part.double().sum(0) for part in rows)
        tensors[f"{name}.norm_sum"] = sum(part.double().norm(dim=1).sum() for part in rows).reshape(1)
        tensors[name] = torch.cat(rows)
        rows.clear()
    return tensors


def _finish_stats(shards: list[_Shard], layers: list[int], n_tokens: int) -> dict:
    stats = {}
    for layer in layers:
        entry = {}
        for kind, short in (("input", "in"), ("output", "out")):
            total = sum(s.rows(f"{layer}.{kind}.sum", None, torch.float64) for s in shards)
            norm = sum(s.rows(f"{layer}.{kind}.norm_sum", None, torch.float64) for s in shards)
            entry[f"{short}_mean"] = (total / n_tokens).tolist()
            entry[f"{short}_norm"] = float(norm / n_tokens)
        stats[str(layer)] = entry
    return stats


def collect_activations(
    lm: Any,
    layers: int | Sequence[int],
    tokens: torch.Tensor,
    *,
    out: str | os.PathLike | None = None,
    batch_size: int = 32,
    dtype: str | torch.dtype = "float32",
    progress: bool = True,
) -> ActivationStore:
    """Collect the MLP input and output of ``layers`` for every token in ``tokens``.

    Args:
        lm: a model from `load_model` (local, or remote on NDIF).
        layers: one layer or several; all are read in one trace per batch, which stops right after
            the deepest.
        tokens: ``[n_contexts, context]`` token ids, e.g. from `load_corpus`.
        out: a folder for the store (resumed if it holds an interrupted collection of the same
            request); ``None`` keeps everything in memory.
        batch_size: contexts per forward pass.
        dtype: storage dtype, ``"float32"`` (default), ``"bfloat16"`` or ``"float16"``.
    """
    layers = sorted({layers} if isinstance(layers, int) else set(layers))
    if not layers:
        raise ValueError("layers is empty: name at least one layer, e.g. layers=[6].")
    for layer in layers:
        lm.check_layer(layer)
    tokens = lm.check_tokens(tokens)
    dtype_name = str(dtype).removeprefix("torch.")
    if dtype_name not in _DTYPES:
        raise ValueError(f"dtype={dtype!r}: choose one of {sorted(_DTYPES)}.")
    store_dtype = _DTYPES[dtype_name]
    context = tokens.shape[1]
    row_bytes = 2 * len(layers) * lm.d_model * store_dtype.itemsize
    contexts_per_shard = max(batch_size, SHARD_BYTES // (row_bytes * context) // batch_size * batch_size)
    request = _request(lm, layers, tokens, dtype_name, contexts_per_shard)

    if out is None:
        return _collect(lm, layers, tokens, None, dict(request, shards=[], complete=False), batch_size, store_dtype,
                        progress)
    root = Path(out)
    with lock(root, what="an activation store"):  # one collection at a time; a second waits, then resumes or reads
        manifest = _resume_or_start(root, request, tokens)
        if not manifest["complete"]:
            _collect(lm, layers, tokens, root, manifest, batch_size, store_dtype, progress)
    return ActivationStore.open(root)


def _collect(lm: Any, layers: list[int], tokens: torch.Tensor, root: Path | None, manifest: dict,
             batch_size: int, store_dtype: torch.dtype, progress: bool) -> ActivationStore | None:
    """Collect the shards ``manifest`` lacks (into ``root``, or in memory when ``None``), then the
    statistics; returns the store when it is in memory."""
    context, contexts_per_shard = tokens.shape[1], manifest["contexts_per_shard"]
    done = {entry["start"] // context for entry in manifest["shards"]}
    memory: list[_Shard] = []
    bar = tqdm(total=tokens.numel(), initial=len(done) * contexts_per_shard * context, unit="tok",
               desc=f"collecting {layers_label(layers)}", disable=not progress)
    with torch.no_grad():
        for first in range(0, tokens.shape[0], contexts_per_shard):
            if first in done:
                continue
            chunk = tokens[first:first + contexts_per_shard]
            parts: dict[str, list[torch.Tensor]] = {f"{l}.{k}": [] for l in layers for k in ("input", "output")}
            for b in range(0, len(chunk), batch_size):
                batch = chunk[b:b + batch_size].to(lm.device)
                for layer, (x, y) in zip(layers, trace_mlp(lm, batch, layers)):
                    parts[f"{layer}.input"].append(x.reshape(-1, x.shape[-1]).to("cpu", store_dtype))
                    parts[f"{layer}.output"].append(y.reshape(-1, y.shape[-1]).to("cpu", store_dtype))
                bar.update(batch.numel())
            tensors = _shard_tensors(parts)
            entry = {"file": f"shard-{first // contexts_per_shard:05d}.safetensors", "start": first * context,
                     "n_tokens": chunk.numel()}
            if root is None:
                memory.append(_Shard(entry["start"], entry["n_tokens"], tensors=tensors))
                continue
            entry.update(save_tensors(root / entry["file"], tensors))
            manifest["shards"] = sorted(manifest["shards"] + [entry], key=lambda e: e["start"])
            write_manifest(root / "manifest.json", manifest)
    bar.close()
    if root is None:
        manifest.update(complete=True, shards=[])
        manifest["stats"] = _finish_stats(memory, layers, tokens.numel())
        return ActivationStore(manifest, memory, tokens=tokens)
    shards = [_Shard(e["start"], e["n_tokens"], path=root / e["file"], sha256=e["sha256"]) for e in manifest["shards"]]
    manifest.update(complete=True, stats=_finish_stats(shards, layers, tokens.numel()))
    write_manifest(root / "manifest.json", manifest)
    return None
