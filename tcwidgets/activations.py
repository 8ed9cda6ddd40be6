"""Collect MLP inputs and outputs with nnsight into an `ActivationStore`.

A store on disk is a folder::

    manifest.json            model, layers, sites, token count, dtype, per-layer mean and norm
    tokens.safetensors       the token contexts the activations belong to
    shard-00000.safetensors  "<layer>.input" / "<layer>.output" rows [n, d_model], in corpus order,
    ...                      plus float64 partial sums for the statistics

Every file is written to a temporary name and renamed, and the manifest lists only finished
shards, so an interrupted collection resumes where it stopped, without duplicates. Reading maps
shards into memory (``numpy.memmap``), so a store larger than RAM trains fine.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

FORMAT = "tcwidgets.activations"
VERSION = 1
SHARD_BYTES = 64 * 2**20  # activations held in memory before a shard is written

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_NUMPY = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}


class StoreError(ValueError):
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


def atomic_write(path: Path, write: Any) -> None:
    """Call ``write(temporary_path)``, then rename the result to ``path``."""
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(descriptor)
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_json(path: Path, data: dict) -> None:
    """Write JSON atomically."""
    atomic_write(path, lambda temporary: Path(temporary).write_text(json.dumps(data, indent=1)))


def _sha256(tokens: torch.Tensor) -> str:
    return hashlib.sha256(tokens.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """Parse a safetensors header: (header dict, byte offset of the data). Raises `StoreError`."""
    try:
        size = path.stat().st_size
        with path.open("rb") as file:
            (length,) = struct.unpack("<Q", file.read(8))
            if length > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(file.read(length))
        end = max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"), default=0)
        if 8 + length + end != size:
            raise ValueError(f"file has {size} bytes, its header describes {8 + length + end}")
    except (OSError, ValueError, KeyError, TypeError, struct.error) as error:
        raise StoreError(f"{path} is truncated or corrupted ({error}). Delete it and run "
                         "collect_activations again with the same arguments to re-collect it.") from error
    return header, 8 + length


class _Shard:
    """One shard's tensors: memory-mapped from a file, or held in memory."""

    def __init__(self, start: int, n_tokens: int, tensors: dict[str, torch.Tensor] | None = None,
                 path: Path | None = None) -> None:
        self.start, self.n_tokens, self.path = start, n_tokens, path
        self._tensors = tensors
        self._maps: dict[str, np.ndarray] = {}

    def array(self, name: str) -> np.ndarray | torch.Tensor:
        if self._tensors is not None:
            return self._tensors[name]
        if name not in self._maps:
            header, offset = read_safetensors_header(self.path)
            entry = header[name]
            begin, _ = entry["data_offsets"]
            self._maps[name] = np.memmap(self.path, dtype=_NUMPY[entry["dtype"]], mode="r",
                                         offset=offset + begin, shape=tuple(entry["shape"]))
        return self._maps[name]

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

    Get one from `collect_activations` or `ActivationStore.open(path)`.
    """

    def __init__(self, manifest: dict, shards: list[_Shard], root: Path | None = None,
                 tokens: torch.Tensor | None = None) -> None:
        self.manifest, self.root = manifest, root
        self._shards = shards
        self._starts = np.array([shard.start for shard in shards], dtype=np.int64)
        self._tokens = tokens

    @classmethod
    def open(cls, path: str | os.PathLike, *, model: str | None = None,
             layers: Sequence[int] | None = None) -> ActivationStore:
        """Open a store folder; optionally check that it holds ``model`` and ``layers``."""
        root = Path(path)
        manifest_path = root / "manifest.json"
        if not manifest_path.is_file():
            raise StoreError(f"{root} is not an activation store (no manifest.json). "
                             "Create one with tcwidgets.collect_activations(..., out=...).")
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as error:
            raise StoreError(f"{manifest_path} is corrupted ({error}).") from error
        if manifest.get("format") != FORMAT:
            raise StoreError(f"{manifest_path} is not a tcwidgets activation manifest.")
        if manifest.get("version", 0) > VERSION:
            raise StoreError(f"{root} was written by a newer tcwidgets (store version {manifest['version']}); "
                             "upgrade tcwidgets to read it.")
        if not manifest["complete"]:
            raise StoreError(f"{root} is incomplete ({len(manifest['shards'])} of {manifest['n_shards']} shards): "
                             "its collection was interrupted. Run collect_activations again with the same "
                             "arguments and out= to resume it.")
        shards = []
        for entry in manifest["shards"]:
            file = root / entry["file"]
            if not file.is_file():
                raise StoreError(f"{file} is missing. Run collect_activations again with the same arguments "
                                 "to re-collect it.")
            read_safetensors_header(file)  # a truncated or corrupted shard fails here, not deep in torch
            shards.append(_Shard(entry["start"], entry["n_tokens"], path=file))
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
        return self.manifest["n_tokens"]

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.manifest["dtype"]]

    @property
    def tokens(self) -> torch.Tensor:
        """The token contexts ``[n_contexts, context]`` whose activations are stored."""
        if self._tokens is None:
            from safetensors.torch import load_file

            self._tokens = load_file(self.root / "tokens.safetensors")["tokens"].long()
        return self._tokens

    def sites(self, layer: int) -> dict[str, str]:
        """The nnsight sites the layer's input and output were read from."""
        self._check_layer(layer)
        return dict(self.manifest["sites"][str(layer)])

    def stats(self, layer: int) -> LayerStats:
        """Means and average norms of the layer's inputs and outputs."""
        self._check_layer(layer)
        entry = self.manifest["stats"][str(layer)]
        return LayerStats(torch.tensor(entry["in_mean"]), torch.tensor(entry["out_mean"]),
                          entry["in_norm"], entry["out_norm"])

    def __len__(self) -> int:
        return self.n_tokens

    def __repr__(self) -> str:
        where = str(self.root) if self.root else "in memory"
        return f"ActivationStore({self.model}, layers={self.layers}, n_tokens={self.n_tokens:,}, {where})"

    # -- reading -------------------------------------------------------------------------------
    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """All inputs and outputs of a layer, float32 ``[n_tokens, d_model]``, in corpus order."""
        self._check_layer(layer)
        return tuple(torch.cat([s.rows(f"{layer}.{kind}", None, torch.float32) for s in self._shards])
                     for kind in ("input", "output"))

    def sample(self, layer: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` of ``n`` rows drawn at random (the first batch of `batches` with that seed):
        what a trainer initialises from."""
        return next(self.batches(layer, min(n, self.n_tokens), seed=seed))

    def n_batches(self, batch_size: int, epochs: int = 1, drop_last: bool = True) -> int:
        """How many batches `batches` yields."""
        per_epoch = self.n_tokens // batch_size if drop_last else math.ceil(self.n_tokens / batch_size)
        return per_epoch * epochs

    def batches(self, layer: int | Sequence[int], batch_size: int = 1024, *, shuffle: bool = True, seed: int = 0,
                epochs: int = 1, start: int = 0, drop_last: bool = True,
                part: tuple[int, int] = (0, 1)) -> Iterator[Any]:
        """Training batches ``(x, y)`` (float32, CPU) of one layer; with a list of layers, a list of
        ``(x, y)``, one per layer, of the same rows (one pass over the store for all of them).

        Each epoch draws its own permutation of all rows across shards (seeded by ``seed`` and the
        epoch), so batches are deterministic and the same for every layer; ``start`` skips that
        many batches without reading them, for exact resume. With ``shuffle=False`` rows come in
        corpus order. ``part=(i, n)`` reads only the i-th of n equal parts of each batch (one
        data-parallel process's share; ``batch_size`` a multiple of n).
        """
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
            if shuffle:
                generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
                order = torch.randperm(self.n_tokens, generator=generator).numpy()
            else:
                order = np.arange(self.n_tokens)
            first = start - epoch * per_epoch if epoch == start // per_epoch else 0
            for batch in range(max(first, 0), per_epoch):
                begin = batch * batch_size + index * share
                pairs = self._gather(layers, order[begin:begin + share])
                yield pairs[0] if isinstance(layer, int) else pairs

    def _gather(self, layers: list[int], index: np.ndarray) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Rows ``index`` of each layer's inputs and outputs, in increasing row order."""
        index = np.sort(index)
        shard_of = np.searchsorted(self._starts, index, side="right") - 1
        parts: dict[str, list[torch.Tensor]] = {f"{layer}.{kind}": [] for layer in layers for kind in ("input", "output")}
        for shard_index in np.unique(shard_of):
            shard = self._shards[shard_index]
            local = index[shard_of == shard_index] - shard.start
            for name, values in parts.items():
                values.append(shard.rows(name, local, torch.float32))
        return [(torch.cat(parts[f"{layer}.input"]), torch.cat(parts[f"{layer}.output"])) for layer in layers]

    def verify(self) -> None:
        """Read every shard once and check every value is finite (a slow, full check)."""
        for shard in tqdm(self._shards, desc="verifying shards", leave=False):
            for layer in self.layers:
                for kind in ("input", "output"):
                    if not torch.isfinite(shard.rows(f"{layer}.{kind}", None, torch.float32)).all():
                        raise StoreError(f"Shard starting at token {shard.start} has non-finite {kind} "
                                         f"values at layer {layer}: the store is corrupted or the model "
                                         "overflowed. Collect it again (in float32 if it was half precision).")


# -- collection ----------------------------------------------------------------------------------

def _request(lm: Any, layers: list[int], tokens: torch.Tensor, dtype: str, contexts_per_shard: int) -> dict:
    return {
        "format": FORMAT, "version": VERSION, "model": lm.name, "model_type": lm.config.model_type,
        "d_model": lm.d_model, "layers": layers,
        "sites": {str(layer): lm.sites.mlp_sites(layer) for layer in layers},
        "context": tokens.shape[1], "n_contexts": tokens.shape[0], "n_tokens": tokens.numel(),
        "tokens_sha256": _sha256(tokens), "dtype": dtype, "contexts_per_shard": contexts_per_shard,
        "n_shards": math.ceil(tokens.shape[0] / contexts_per_shard),
    }


_IDENTITY = ("model", "layers", "context", "n_contexts", "tokens_sha256", "dtype", "contexts_per_shard")


def _resume_or_start(root: Path, request: dict, tokens: torch.Tensor) -> dict:
    manifest_path = root / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        different = [key for key in _IDENTITY if manifest.get(key) != request[key]]
        if different:
            details = "; ".join(f"{key}: stored {manifest.get(key)!r}, asked {request[key]!r}"
                                for key in different if key != "tokens_sha256")
            if "tokens_sha256" in different:
                details += ("; " if details else "") + "different tokens"
            raise StoreError(f"{root} already holds a different collection ({details}). Pass another out= "
                             "folder, or delete this one to replace it.")
        return manifest
    root.mkdir(parents=True, exist_ok=True)
    atomic_write(root / "tokens.safetensors",
                 lambda temporary: save_file({"tokens": tokens.to(torch.int32).contiguous()}, temporary))
    manifest = dict(request, shards=[], complete=False)
    write_json(manifest_path, manifest)
    return manifest


def trace_mlp(lm: Any, batch: torch.Tensor, layers: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One forward pass that saves every requested layer's MLP input and output, then stops."""
    saved = []
    with lm.trace(batch) as tracer:
        for layer in layers:
            mlp = lm.mlp(layer)
            saved.append((mlp.input.save(), mlp.output.save()))
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

    root = Path(out) if out is not None else None
    manifest = _resume_or_start(root, request, tokens) if root else dict(request, shards=[], complete=False)
    if manifest["complete"]:
        return ActivationStore.open(root)
    done = {entry["start"] // context for entry in manifest["shards"]}
    memory: list[_Shard] = []
    bar = tqdm(total=tokens.numel(), initial=len(done) * contexts_per_shard * context, unit="tok",
               desc=f"collecting layers {layers}", disable=not progress)
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
            atomic_write(root / entry["file"], lambda temporary: save_file(tensors, temporary))
            entry["bytes"] = (root / entry["file"]).stat().st_size
            manifest["shards"] = sorted(manifest["shards"] + [entry], key=lambda e: e["start"])
            write_json(root / "manifest.json", manifest)
    bar.close()
    if root is None:
        manifest.update(complete=True, shards=[])
        manifest["stats"] = _finish_stats(memory, layers, tokens.numel())
        return ActivationStore(manifest, memory, tokens=tokens)
    shards = [_Shard(e["start"], e["n_tokens"], path=root / e["file"]) for e in manifest["shards"]]
    manifest.update(complete=True, stats=_finish_stats(shards, layers, tokens.numel()))
    write_json(root / "manifest.json", manifest)
    return ActivationStore.open(root)
