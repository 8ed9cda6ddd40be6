"""Test helper: change a store's shard as a collection that produced those values would have written it."""

from collections.abc import Callable
from pathlib import Path

import torch

from tcwidgets import activations, files


def rewrite_shard(root: Path, edit: Callable[[dict[str, torch.Tensor]], object], index: int = 0) -> None:
    """Change shard ``index``'s tensors with ``edit(tensors)`` and record the new file in the manifest
    (checksum and seal consistent), so only the values differ from a real collection."""
    manifest = files.read_manifest(root / "manifest.json", format=activations.FORMAT, version=activations.VERSION,
                                   fix="")
    entry = manifest["shards"][index]
    tensors = files.load_tensors(root / entry["file"], sha256=entry["sha256"], fix="")
    edit(tensors)
    entry.update(files.save_tensors(root / entry["file"], tensors))
    files.write_manifest(root / "manifest.json", manifest)
