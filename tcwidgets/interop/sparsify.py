"""EleutherAI's sparsify format: ``<hookpoint>/cfg.json`` + ``<hookpoint>/sae.safetensors``.

``SparseCoder.encode`` takes ``topk(relu(encoder(x')))`` with ``x' = x - b_dec`` for an SAE and
``x' = x`` for a transcoder (``transcode: true``); ``decode`` sums the chosen rows of ``W_dec``
[num_latents, d_in] and adds ``b_dec``; a skip connection adds ``x @ W_skip.T`` (``W_skip``
[d_in, d_in]). Top-k of the ReLU equals our TopK (ReLU of the top k), so TopK transcoders, skip
transcoders and SAEs round-trip exactly. sparsify has no ReLU, JumpReLU or BatchTopK coder, and its
decoder has the input's width, so ``d_out`` must equal ``d_in``. The root ``config.json`` that
sparsify's trainer writes may name the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..files import load_tensors, read_json, save_tensors, write_json
from ..transcoder import Transcoder
from .sites import hookpoint, hub_model_id, layer_from_name, site
from .weights import (TranscoderFormatError, UnrepresentableError, Weights, folded_weights, positive_int,
                      transcoder_from_weights)

__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "read_sparsify", "write_sparsify"]

CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"
_FIX = "re-download or re-export it; sparsify writes it with SparseCoder.save_to_disk"


def read_sparsify(folder: Path, *, device: Any = None) -> Transcoder:
    """One sparsify coder from ``folder`` (its ``cfg.json`` and ``sae.safetensors``)."""
    cfg = read_json(folder / CONFIG_FILE, fix=_FIX, error=TranscoderFormatError)
    source = str(folder / CONFIG_FILE)
    if not isinstance(cfg, dict):
        raise TranscoderFormatError(f"{source} does not hold a JSON object: {_FIX}")
    if cfg.get("activation", "topk") != "topk":
        raise TranscoderFormatError(
            f"{source}: activation {cfg.get('activation')!r} has no equivalent in tcwidgets (only sparsify's "
            "'topk' does: ReLU then top-k, which is our TopK).")
    k = positive_int(cfg.get("k"), "k", source)
    transcode, skip = bool(cfg.get("transcode", False)), bool(cfg.get("skip_connection", False))
    if skip and not transcode:
        raise TranscoderFormatError(f"{source}: an SAE with a skip connection has no equivalent in tcwidgets "
                                    "(skip connections exist for transcoders, kind='skip').")
    tensors = load_tensors(folder / WEIGHTS_FILE, sha256=None, fix=_FIX, error=TranscoderFormatError)
    missing = sorted({"encoder.weight", "encoder.bias", "W_dec", "b_dec"} - set(tensors))
    if missing:
        raise TranscoderFormatError(f"{folder / WEIGHTS_FILE} lacks {missing}: was it saved without its "
                                    f"decoder? {_FIX}")
    W_enc, b_enc, b_dec = tensors["encoder.weight"].float(), tensors["encoder.bias"].float(), tensors["b_dec"].float()
    if not transcode:
        b_enc = b_enc - W_enc @ b_dec  # sparsify's SAEs encode x - b_dec
    weights = Weights(W_enc=W_enc, b_enc=b_enc, W_dec=tensors["W_dec"], b_dec=b_dec,
                      W_skip=tensors.get("W_skip") if skip else None)
    name = folder.name
    layer = layer_from_name(name)
    if layer is None:
        raise TranscoderFormatError(f"{folder}: cannot tell the layer from the hookpoint name {name!r} "
                                    "(expected e.g. 'layers.6.mlp'); rename the folder after its hookpoint.")
    root_config = folder.parent / "config.json"
    model = read_json(root_config, fix=_FIX, error=TranscoderFormatError).get("model") \
        if root_config.is_file() else None
    where = site(model, layer, f"{name}.input" if transcode else f"{name}.output", f"{name}.output")
    return transcoder_from_weights(weights, kind="skip" if skip else "transcoder" if transcode else "sae",
                                   activation="topk", k=k, site=where, device=device)


def write_sparsify(transcoders: dict[int, Transcoder], folder: Path) -> Path:
    """Write each transcoder into ``folder/<hookpoint>/``, where ``SparseCoder.load_many(folder, local=True)``
    (or ``SparseCoder.load_from_disk(folder/<hookpoint>)``) reads it, and the model's id into
    ``folder/config.json``. Returns ``folder``."""
    for tc in transcoders.values():
        _check_representable(tc)
    folder.mkdir(parents=True, exist_ok=True)
    for tc in transcoders.values():
        _write_one(tc, folder / hookpoint(tc.config.site))
    models = {tc.config.site.get("model") for tc in transcoders.values()}
    write_json(folder / "config.json", {"model": hub_model_id(models.pop()) if len(models) == 1 else None,
                                        "hookpoints": [hookpoint(tc.config.site) for tc in transcoders.values()]})
    return folder


def _check_representable(tc: Transcoder) -> None:
    c = tc.config
    if c.activation != "topk":
        raise UnrepresentableError(
            f"sparsify has only TopK coders; this transcoder is {c.activation!r}. Save it as 'tcwidgets', "
            "'saelens' or 'circuit-tracer' instead.")
    if c.d_in != c.d_out:
        raise UnrepresentableError(f"sparsify's decoder has the input's width; this transcoder maps {c.d_in} "
                                   f"to {c.d_out} dimensions.")


def _write_one(tc: Transcoder, folder: Path) -> None:
    c = tc.config
    w = folded_weights(tc)
    b_enc = w.b_enc + w.W_enc @ w.b_dec if c.kind == "sae" else w.b_enc  # undo the b_dec it subtracts
    tensors = {"encoder.weight": w.W_enc, "encoder.bias": b_enc, "W_dec": w.W_dec, "b_dec": w.b_dec}
    if c.kind == "skip":
        tensors["W_skip"] = w.W_skip
    folder.mkdir(parents=True, exist_ok=True)
    save_tensors(folder / WEIGHTS_FILE, tensors, metadata={"format": "pt"})
    write_json(folder / CONFIG_FILE, {
        "activation": "topk", "expansion_factor": max(c.n_latents // c.d_in, 1), "normalize_decoder": False,
        "num_latents": c.n_latents, "k": c.k, "multi_topk": False, "skip_connection": c.kind == "skip",
        "transcode": c.kind != "sae", "d_in": c.d_in,
    })
