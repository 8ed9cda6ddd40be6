"""Test helper: change a store's shard as a collection that produced those values would have written it."""

from collections.abc import Callable
from pathlib import Path

import torch

from tcwidgets import activations, files


def rewrite_shard(root: Path, edit: Callable[[dict[str, torch.Tensor]], object], index: int = 0) -> None:
    """Change shard ``index``'s rows with ``edit(tensors)`` and write it back with its partial sums, the
    store's statistics, checksums and seal recomputed, so only the values differ from a real collection."""
    manifest = files.read_manifest(root / "manifest.json", format=activations.FORMAT, version=activations.VERSION,
                                   fix="")
    entry = manifest["shards"][index]
    tensors = files.load_tensors(root / entry["file"], sha256=entry["sha256"], fix="")
    edit(tensors)
    rows = {name: [tensors[name]] for name in tensors if name.endswith(("input", "output"))}
    entry.update(files.save_tensors(root / entry["file"], activations._shard_tensors(rows)))
    shards = [activations._Shard(e["start"], e["n_tokens"], path=root / e["file"], sha256=e["sha256"])
              for e in manifest["shards"]]
    manifest["stats"] = activations._finish_stats(shards, manifest["layers"], manifest["n_tokens"])
    files.write_manifest(root / "manifest.json", manifest)
