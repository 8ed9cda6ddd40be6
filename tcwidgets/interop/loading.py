"""`load_transcoders`: transcoders in any supported format, from a local folder or a Hugging Face repo;
`save_transcoders`: write them in any of those formats.

The format is recognised from file names alone (so a hub repository is listed, then only the files
of the wanted layers are downloaded):

==============  ==============================================================
tcwidgets       ``config.json`` + ``weights.safetensors`` (``Transcoder.save``); a cross-layer
                transcoder: ``crosslayer.json`` + ``weights.safetensors``
sparsify        ``<hookpoint>/cfg.json`` + ``sae.safetensors``
saelens         ``cfg.json`` + ``sae_weights.safetensors``; Gemma Scope ``params.npz``
circuit-tracer  ``config.yaml`` + ``layer_<i>.safetensors``; a cross-layer transcoder
                (``model_kind: cross_layer_transcoder``): ``W_enc_<i>`` + ``W_dec_<i>.safetensors``
==============  ==============================================================

each in the folder itself or in its sub-folders (one transcoder per folder, e.g. one per layer).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from ..crosslayer import CrossLayerTranscoder
from ..files import read_json
from ..transcoder import Transcoder
from .circuit_tracer import CLT_KIND, read_circuit_tracer, read_circuit_tracer_clt, read_config, write_circuit_tracer
from .saelens import read_gemma_scope, read_saelens, write_saelens
from .sites import layer_from_name
from .sparsify import read_sparsify, write_sparsify
from .weights import FORMATS, TranscoderFormatError

__all__ = ["load_transcoders", "save_transcoder", "save_transcoders"]

#: format -> the files that mark a folder as holding one transcoder (or a set) of it
_MARKERS: dict[str, tuple[str, ...]] = {
    "circuit-tracer": ("config.yaml",),
    "tcwidgets": ("config.json", "weights.safetensors"),
    "tcwidgets-crosslayer": ("crosslayer.json", "weights.safetensors"),
    "sparsify": ("cfg.json", "sae.safetensors"),
    "saelens": ("cfg.json", "sae_weights.safetensors"),
    "gemma-scope": ("params.npz",),
}
_PICKLES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle")
_KNOWN = ("tcwidgets (config.json + weights.safetensors), sparsify (<hookpoint>/cfg.json + sae.safetensors), "
          "SAELens (cfg.json + sae_weights.safetensors, or Gemma Scope's params.npz), circuit-tracer "
          "(config.yaml + layer_<i>.safetensors)")
_MAX_DEPTH = 4


@dataclass
class _Source:
    """Where files come from: a local folder, or a hub repository (files downloaded when first asked for)."""

    name: str
    files: list[str]  # relative POSIX paths
    path: Callable[[str], Path]  # relative path -> local file (downloading it if need be)
    fetch_uri: Callable[[str], Path] | None = None  # hf://owner/repo/file -> local file


def _local_source(root: Path) -> _Source:
    files = []
    for folder, subfolders, names in os.walk(root):
        depth = len(Path(folder).relative_to(root).parts)
        subfolders[:] = [] if depth >= _MAX_DEPTH else sorted(s for s in subfolders if not s.startswith("."))
        files += [PurePosixPath(Path(folder).relative_to(root).as_posix(), name).as_posix().removeprefix("./")
                  for name in names]
    return _Source(str(root), sorted(files), lambda relative: root / relative)


def _hub_source(reference: str) -> _Source:
    """A hub repository ``owner/name[/subfolder][@revision]``, listed without downloading."""
    from huggingface_hub import HfApi, hf_hub_download

    path, _, revision = reference.partition("@")
    parts = path.split("/")
    repo_id, subfolder = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        listed = HfApi().list_repo_files(repo_id, revision=revision or None)
    except Exception as cause:  # offline, unknown repo, gated repo: huggingface_hub raises many kinds
        raise TranscoderFormatError(
            f"{reference!r} is not a local folder, and the Hugging Face repository {repo_id!r} could not be listed "
            f"({type(cause).__name__}: {cause}). Check the name, your connection (HF_HUB_OFFLINE) and access "
            "to gated repositories, or download the files and pass their folder.") from cause
    prefix = f"{subfolder}/" if subfolder else ""
    files = sorted(name[len(prefix):] for name in listed if name.startswith(prefix))

    def download(relative: str) -> Path:
        return Path(hf_hub_download(repo_id, f"{prefix}{relative}", revision=revision or None))

    def fetch_uri(uri: str) -> Path:
        owner, name, file = uri.removeprefix("hf://").split("/", 2)
        file, _, file_revision = file.partition("@")
        return Path(hf_hub_download(f"{owner}/{name}", file, revision=file_revision or None))

    return _Source(reference, files, download, fetch_uri)


def _units(source: _Source) -> tuple[str, list[str]]:
    """The format and the folders (relative, ``""`` for the root) that hold one transcoder each (or a set)."""
    by_folder: dict[str, set[str]] = {}
    for file in source.files:
        folder, _, name = file.rpartition("/")
        by_folder.setdefault(folder, set()).add(name)
    found: dict[str, list[str]] = {}
    for folder in sorted(by_folder, key=lambda f: (f.count("/") if f else -1, f)):
        for format, markers in _MARKERS.items():
            if set(markers) <= by_folder[folder]:
                found.setdefault(format, []).append(folder)
                break
    if "" in sum(found.values(), []):  # the root itself holds one: take only that
        format = next(format for format, folders in found.items() if "" in folders)
        return format, [""]
    if len(found) == 1:
        return next(iter(found.items()))
    if len(found) > 1:
        raise TranscoderFormatError(
            f"{source.name} mixes formats ({', '.join(f'{format}: {folders[:3]}' for format, folders in found.items())}); "
            "pass the sub-folder of the one you want.")
    pickles = [file for file in source.files if file.endswith(_PICKLES)]
    if pickles:
        raise TranscoderFormatError(
            f"{source.name} holds {pickles[0]!r}, a pickled checkpoint: loading it would run whatever code it "
            "contains, so tcwidgets never unpickles. Where you trust the file, convert it to safetensors (e.g. "
            "torch.load(path, weights_only=True), then the library's own save, or safetensors.torch.save_file), "
            "or use the authors' safetensors release.")
    raise TranscoderFormatError(f"{source.name} holds no transcoders in a format tcwidgets reads: {_KNOWN}.")


def _layer_of(format: str, source: _Source, folder: str) -> int | None:
    """A unit's layer, from names or its small config file (before any weights are downloaded)."""
    def config(name: str) -> dict:
        data = read_json(source.path(f"{folder}/{name}".lstrip("/")), fix="re-download it",
                         error=TranscoderFormatError)
        return data if isinstance(data, dict) else {}

    if format == "tcwidgets":
        return (config("config.json").get("site") or {}).get("layer")
    if format == "saelens":
        cfg = config("cfg.json")
        hook = (cfg.get("metadata") or {}).get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point") or ""
        return layer_from_name(hook) if layer_from_name(hook) is not None else cfg.get("hook_layer")
    return layer_from_name(f"{source.name}/{folder}")


def load_transcoders(source: str | os.PathLike, *, layers: list[int] | None = None,
                     device: str | Any = None) -> dict[int, Transcoder] | CrossLayerTranscoder:
    """Transcoders from a folder or Hugging Face repository in any format tcwidgets reads.

    Args:
        source: a local folder (or a Gemma Scope ``params.npz``), or a hub repository
            ``"owner/name"``, optionally with a sub-folder and a revision: ``"owner/name/sub@rev"``.
            Only the files of the requested layers are downloaded.
        layers: the layers to load (default: all found).
        device: where to put them (default CPU).

    Returns ``{layer: Transcoder}`` in eval mode, each with its scales folded into the weights (unit
    ``input_scale``/``output_scale``) and ``config.site`` naming the model (its tcwidgets alias when it is
    an embedded model), the layer and the input and output hooks in the source's own terms, so `splice`,
    `evaluate`, `analyze_features`, the widgets and `attribute` take them as they are. A cross-layer
    transcoder (ours, or circuit-tracer's) comes back whole, as a `CrossLayerTranscoder` (``layers``
    must then be None). Formats: see
    `tcwidgets.interop.loading`. Raises `TranscoderFormatError` for a folder in no known format (listing
    them), pickled checkpoints (never unpickled), and architectures with no exact equivalent here.
    """
    local = Path(source)
    if local.is_file():
        if local.name.endswith(_PICKLES):
            _units(_Source(str(local), [local.name], lambda relative: local))  # raises the pickle error
        if local.suffix == ".npz":
            tc = read_gemma_scope(local, source=str(local), device=device)
            return {tc.config.site["layer"]: tc}
        raise TranscoderFormatError(f"{local} is a single file; pass the folder that holds it ({_KNOWN}).")
    if local.is_dir():
        origin = _local_source(local)
    elif re.fullmatch(r"[\w.-]+/[\w.-]+(/[^@]*)?(@[\w./-]+)?", str(source)):
        origin = _hub_source(str(source))
    else:
        raise TranscoderFormatError(f"{source!r} is neither a local folder nor a Hugging Face repository id "
                                    "('owner/name').")
    format, folders = _units(origin)
    if format == "tcwidgets-crosslayer" or (format == "circuit-tracer" and _is_clt(origin, folders)):
        if layers is not None:
            raise TranscoderFormatError(f"{origin.name} holds a cross-layer transcoder, which loads whole: "
                                        "leave out layers=.")
        return _load_clt(format, origin, folders, device)
    if format == "circuit-tracer":
        return _load_set(origin, folders, layers, device)
    by_layer: dict[int, list[str]] = {}
    for folder in folders:
        layer = _layer_of(format, origin, folder)
        if not isinstance(layer, int):
            raise TranscoderFormatError(f"{origin.name}/{folder}: cannot tell which layer this {format} transcoder "
                                        "is for (no layer in its config or folder name).")
        by_layer.setdefault(layer, []).append(folder)
    _check_layers(origin.name, by_layer, layers)
    transcoders = {}
    for layer in sorted(by_layer if layers is None else layers):
        (folder,) = by_layer[layer]
        transcoders[layer] = _read(format, origin, folder, device).eval()
    return transcoders


def _check_layers(name: str, by_layer: dict[int, list], layers: list[int] | None) -> None:
    missing = sorted(set(layers or []) - set(by_layer))
    if missing:
        raise TranscoderFormatError(f"{name} has no transcoder for layers {missing}; it has layers {sorted(by_layer)}.")
    for layer in sorted(by_layer if layers is None else layers):
        if len(by_layer[layer]) > 1:
            raise TranscoderFormatError(
                f"{name} has {len(by_layer[layer])} transcoders for layer {layer} ({', '.join(by_layer[layer][:4])}); "
                "pass the folder of the one you want.")


def _read(format: str, source: _Source, folder: str, device: Any) -> Transcoder:
    """Download (if need be) and read one unit."""
    local = [source.path(f"{folder}/{marker}".lstrip("/")) for marker in _MARKERS[format]]
    where = local[0].parent
    if format == "tcwidgets":
        return Transcoder.load(where, device=device)
    if format == "sparsify":
        root_config = f"{folder.rpartition('/')[0]}/config.json".lstrip("/")
        if root_config in source.files:
            source.path(root_config)
        return read_sparsify(where, device=device)
    if format == "saelens":
        return read_saelens(where, device=device)
    return read_gemma_scope(local[0], source=f"{source.name}/{folder}", device=device)


def _load_set(source: _Source, folders: list[str], layers: list[int] | None, device: Any) -> dict[int, Transcoder]:
    if len(folders) > 1:
        raise TranscoderFormatError(f"{source.name} holds {len(folders)} circuit-tracer sets ({', '.join(folders[:4])}); "
                                    "pass the folder of the one you want.")
    (folder,) = folders
    where = source.path(f"{folder}/config.yaml".lstrip("/")).parent
    prefix = f"{folder}/" if folder else ""

    def fetch(name: str) -> Path:
        if name.startswith("hf://"):
            if source.fetch_uri is None:
                raise TranscoderFormatError(f"{where}: config.yaml names {name}, which is not in the folder.")
            return source.fetch_uri(name)
        if f"{prefix}{name}" not in source.files:
            raise TranscoderFormatError(f"{where}: config.yaml names {name!r}, which is not in the folder.")
        return source.path(f"{prefix}{name}")

    return {layer: tc.eval() for layer, tc in read_circuit_tracer(where, layers=layers, device=device,
                                                                  fetch=fetch).items()}


def _is_clt(source: _Source, folders: list[str]) -> bool:
    """Whether the (single) circuit-tracer folder holds a cross-layer transcoder."""
    if len(folders) != 1:
        return False
    where = source.path(f"{folders[0]}/config.yaml".lstrip("/")).parent
    return read_config(where, kinds=("transcoder_set", CLT_KIND)).get("model_kind") == CLT_KIND


def _load_clt(format: str, source: _Source, folders: list[str], device: Any) -> CrossLayerTranscoder:
    if len(folders) > 1:
        raise TranscoderFormatError(f"{source.name} holds {len(folders)} cross-layer transcoders "
                                    f"({', '.join(folders[:4])}); pass the folder of the one you want.")
    prefix = f"{folders[0]}/" if folders[0] else ""
    if format == "tcwidgets-crosslayer":
        source.path(f"{prefix}crosslayer.json")
        return CrossLayerTranscoder.load(source.path(f"{prefix}weights.safetensors").parent, device=device).eval()
    n_layers = sum(1 for file in source.files if re.fullmatch(re.escape(prefix) + r"W_enc_\d+\.safetensors", file))
    where = source.path(f"{prefix}config.yaml").parent
    return read_circuit_tracer_clt(where, n_layers=n_layers, path=lambda name: source.path(f"{prefix}{name}"),
                                   device=device)


def save_transcoders(transcoders: dict[int, Transcoder], folder: str | os.PathLike, *, format: str = "tcwidgets",
                     n_layers: int | None = None) -> Path:
    """Write ``{layer: transcoder}`` in one of `FORMATS`, loadable by that library's own loaders.

    tcwidgets and SAELens: one sub-folder per layer (``layer_<i>``); sparsify: one per hookpoint
    (``layers.<i>.mlp``, what ``SparseCoder.load_many`` reads); circuit-tracer: one set, padded with zero
    transcoders up to ``n_layers`` (default: the highest layer + 1; their replacement model needs every
    layer of the model). Scales are folded into the weights. Raises `UnrepresentableError` where the
    format cannot hold a transcoder exactly (e.g. TopK for SAELens transcoders and circuit-tracer).
    """
    if format not in FORMATS:
        raise ValueError(f"format={format!r} is not one of {FORMATS}.")
    if not transcoders:
        raise ValueError("save_transcoders needs at least one transcoder.")
    for layer, tc in transcoders.items():
        if tc.config.site.get("layer") not in (None, layer):
            raise ValueError(f"the transcoder given for layer {layer} is for layer {tc.config.site['layer']}.")
    folder = Path(folder)
    if format == "sparsify":
        return write_sparsify(transcoders, folder)
    if format == "circuit-tracer":
        return write_circuit_tracer(transcoders, folder, n_layers=n_layers)
    for layer, tc in transcoders.items():
        target = folder / f"layer_{layer}"
        tc.save(target) if format == "tcwidgets" else write_saelens(tc, target)
    return folder


def save_transcoder(tc: Transcoder, folder: str | os.PathLike, *, format: str, n_layers: int | None = None) -> Path:
    """`Transcoder.save` in another library's format: SAELens into ``folder`` itself, sparsify into
    ``folder/<hookpoint>`` (sparsify knows the layer only from that name), circuit-tracer as a set padded
    with zero transcoders (see `save_transcoders`)."""
    if format not in FORMATS or format == "tcwidgets":
        raise ValueError(f"format={format!r} is not one of {FORMATS[1:]}.")
    layer = tc.config.site.get("layer")
    if not isinstance(layer, int):
        raise ValueError(f"saving as {format} needs the transcoder's layer: set tc.config.site['layer'].")
    if format == "saelens":
        return write_saelens(tc, Path(folder))
    return save_transcoders({layer: tc}, folder, format=format, n_layers=n_layers)
