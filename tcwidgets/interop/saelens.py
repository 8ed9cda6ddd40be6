"""SAELens' format (``cfg.json`` + ``sae_weights.safetensors``) and Gemma Scope's ``params.npz``.

SAELens stores ``W_enc`` [d_in, d_sae] and ``W_dec`` [d_sae, d_out] (transposed from ours for the
encoder). Its SAEs subtract ``b_dec`` from the input before encoding when ``apply_b_dec_to_input``
(folded here into ``b_enc``); TopK SAEs may scale pre-activations by the decoder row norms
(``rescale_acts_by_decoder_norm``, folded into encoder and decoder); JumpReLU is
``relu(pre) · (pre > threshold)`` (older files store ``log_threshold``). Architectures read:
``standard``, ``jumprelu``, ``topk``, ``transcoder``, ``skip_transcoder``, ``jumprelu_transcoder`` and
``jumprelu_skip_transcoder``; run-time normalisations (``constant_norm_rescale``, ``layer_norm``,
whitening) depend on each input token and are refused, as is ``expected_average_only_in``, whose
factor is not in the files (fold it with SAELens' ``fold_activation_norm_scaling_factor`` and save
again).

Writing: hooks as TransformerLens names (``blocks.<i>.ln2.hook_normalized`` -> ``blocks.<i>.hook_mlp_out``)
and, exactly, as our module sites (``hf_hook_name``: ``model.layers.<i>.mlp.input``; for Gemma the MLP
output is before ``post_feedforward_layernorm``, where TransformerLens' ``hook_mlp_out`` is after it).
SAEs as ``standard`` / ``jumprelu`` / ``topk``; transcoders as ``transcoder`` /
``jumprelu_transcoder`` and skip transcoders as ``skip_transcoder`` / ``jumprelu_skip_transcoder``
(BatchTopK as JumpReLU with its threshold on every latent: the same function). SAELens has no TopK
transcoder, so a TopK transcoder or skip transcoder is refused.

Gemma Scope (``params.npz``, read with pickles disallowed): JumpReLU with the same layout and no
``b_dec`` subtraction; the layer comes from the ``layer_N`` folder, transcoder or SAE from the repository
or folder name.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..files import load_tensors, read_json, save_tensors, write_json
from ..transcoder import Transcoder
from .sites import hub_model_id, layer_from_name, site, transformer_lens_hooks
from .weights import (TranscoderFormatError, UnrepresentableError, Weights, folded_weights, positive_int,
                      transcoder_from_weights)

__all__ = ["CONFIG_FILE", "GEMMA_SCOPE_FILE", "WEIGHTS_FILE", "read_gemma_scope", "read_saelens", "write_saelens"]

CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
GEMMA_SCOPE_FILE = "params.npz"
FORMAT_VERSION = "6.54.0"
"""The SAELens version whose layout `write_saelens` follows (SAELens reads files from 6.0 on as is)."""

#: architecture -> (our kind, our activation)
_ARCHITECTURES = {
    "standard": ("sae", "relu"), "jumprelu": ("sae", "jumprelu"), "topk": ("sae", "topk"),
    "transcoder": ("transcoder", "relu"), "skip_transcoder": ("skip", "relu"),
    "jumprelu_transcoder": ("transcoder", "jumprelu"), "jumprelu_skip_transcoder": ("skip", "jumprelu"),
}
_FIX = "re-download it or save it again with SAELens' save_model"


def read_saelens(folder: Path, *, device: Any = None) -> Transcoder:
    """One SAE or transcoder from a SAELens folder (``cfg.json`` + ``sae_weights.safetensors``)."""
    source = str(folder / CONFIG_FILE)
    cfg = read_json(folder / CONFIG_FILE, fix=_FIX, error=TranscoderFormatError)
    if not isinstance(cfg, dict):
        raise TranscoderFormatError(f"{source} does not hold a JSON object: {_FIX}")
    metadata = cfg.get("metadata") or {}
    architecture = cfg.get("architecture", "standard")
    if architecture == "standard" and cfg.get("activation_fn", cfg.get("activation_fn_str")) == "topk":
        architecture = "topk"  # SAELens < 6 wrote TopK SAEs as standard ones with a topk activation
    if architecture not in _ARCHITECTURES:
        raise TranscoderFormatError(f"{source}: SAELens architecture {architecture!r} has no exact equivalent in "
                                    f"tcwidgets; readable: {', '.join(_ARCHITECTURES)}.")
    kind, activation = _ARCHITECTURES[architecture]
    normalisation = cfg.get("normalize_activations") or "none"
    if normalisation != "none":
        raise TranscoderFormatError(
            f"{source}: normalize_activations={normalisation!r} is not a fixed linear map stored in the files "
            "(it is computed per token, or its factor lives outside them). Fold it into the weights with SAELens "
            "(sae.fold_activation_norm_scaling_factor(factor)), save again, then load.")
    if (cfg.get("reshape_activations") or "none") != "none":
        raise TranscoderFormatError(f"{source}: attention-head SAEs (reshape_activations="
                                    f"{cfg['reshape_activations']!r}) have no MLP site in tcwidgets.")
    tensors = load_tensors(folder / WEIGHTS_FILE, sha256=None, fix=_FIX, error=TranscoderFormatError)
    scaling = tensors.pop("scaling_factor", None)
    if scaling is not None and not torch.all(scaling == 1):
        raise TranscoderFormatError(f"{folder / WEIGHTS_FILE}: a fine-tuning scaling_factor other than 1 has no "
                                    "equivalent in tcwidgets; fold it into W_dec with SAELens first.")
    missing = sorted({"W_enc", "b_enc", "W_dec", "b_dec"} - set(tensors))
    if missing:
        raise TranscoderFormatError(f"{folder / WEIGHTS_FILE} lacks {missing}: {_FIX}")
    weights = _weights(tensors, kind, activation, str(folder / WEIGHTS_FILE))
    apply_b_dec = cfg.get("apply_b_dec_to_input", kind == "sae" and "metadata" not in cfg)
    if kind == "sae" and apply_b_dec:
        weights.b_enc = weights.b_enc - weights.W_enc @ weights.b_dec
    if activation == "topk" and cfg.get("rescale_acts_by_decoder_norm", False):
        norms = weights.W_dec.norm(dim=1)
        weights.W_enc, weights.b_enc, weights.W_dec = (weights.W_enc * norms[:, None], weights.b_enc * norms,
                                                       weights.W_dec / norms[:, None])
    k = cfg.get("k", (cfg.get("activation_fn_kwargs") or {}).get("k"))
    hook_in = metadata.get("hook_name", cfg.get("hook_name", cfg.get("hook_point")))
    hook_out = metadata.get("hook_name_out", cfg.get("hook_name_out", hook_in))
    layer = layer_from_name(hook_in or "")
    if layer is None:
        layer = cfg.get("hook_layer", metadata.get("hook_layer"))
    if not isinstance(layer, int):
        raise TranscoderFormatError(f"{source}: cannot tell the layer from hook_name {hook_in!r}.")
    where = site(metadata.get("model_name", cfg.get("model_name")), layer, metadata.get("hf_hook_name") or hook_in,
                 metadata.get("hf_hook_name_out") or metadata.get("hf_hook_name") or hook_out)
    return transcoder_from_weights(weights, kind=kind, activation=activation,
                                   k=positive_int(k, "k", source) if activation == "topk" else None,
                                   site=where, device=device)


def _weights(tensors: dict[str, torch.Tensor], kind: str, activation: str, source: str) -> Weights:
    """Our layout from SAELens' / Gemma Scope's (``W_enc`` transposed, thresholds named ours)."""
    threshold = tensors.get("threshold")
    if threshold is None and "log_threshold" in tensors:
        threshold = tensors["log_threshold"].float().exp()
    if activation == "jumprelu" and threshold is None:
        raise TranscoderFormatError(f"{source}: a JumpReLU SAE without 'threshold': {_FIX}")
    if kind == "skip" and "W_skip" not in tensors:
        raise TranscoderFormatError(f"{source}: a skip transcoder without 'W_skip': {_FIX}")
    return Weights(W_enc=tensors["W_enc"].float().T, b_enc=tensors["b_enc"], W_dec=tensors["W_dec"],
                   b_dec=tensors["b_dec"], W_skip=tensors.get("W_skip") if kind == "skip" else None,
                   threshold=threshold if activation == "jumprelu" else None)


def read_gemma_scope(path: Path, *, source: str, device: Any = None) -> Transcoder:
    """One Gemma Scope JumpReLU SAE or transcoder from its ``params.npz`` (never unpickling).

    ``source`` (the repository id or local path it came from) tells transcoders (``...-transcoders``)
    from SAEs, the model (``gemma-scope-2b-pt-...`` is ``google/gemma-2-2b``) and the hooks.
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: torch.from_numpy(np.array(data[name], dtype=np.float32)) for name in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as cause:
        raise TranscoderFormatError(f"{path} is not a readable numpy archive without pickles ({cause}): "
                                    "re-download it.") from cause
    arrays = {name[:1].upper() + name[1:] if name.startswith("w_") else name: t for name, t in arrays.items()}
    missing = sorted({"W_enc", "b_enc", "W_dec", "b_dec", "threshold"} - set(arrays))
    if missing:
        raise TranscoderFormatError(f"{path} lacks {missing}: is it a Gemma Scope params.npz?")
    kind = "transcoder" if "transcoder" in source else "sae"
    layer = layer_from_name(str(path.relative_to(path.anchor)))
    if layer is None:
        raise TranscoderFormatError(f"{path}: cannot tell the layer (Gemma Scope keeps it in a layer_N folder).")
    hook_in, hook_out = transformer_lens_hooks(kind, layer)
    if "res" in re.split(r"[-/]", source):
        hook_in = hook_out = f"blocks.{layer}.hook_resid_post"
    model = re.search(r"gemma-scope-(\d+b)-(pt|it)", source)
    where = site(f"google/gemma-2-{model.group(1)}{'-it' if model.group(2) == 'it' else ''}" if model else None,
                 layer, hook_in, hook_out)
    return transcoder_from_weights(_weights(arrays, kind, "jumprelu", str(path)), kind=kind, activation="jumprelu",
                                   site=where, device=device)


def write_saelens(tc: Transcoder, folder: Path) -> Path:
    """Write ``tc`` where SAELens' ``SAE.load_from_disk(folder)`` reads it. Returns ``folder``."""
    c = tc.config
    activation = "jumprelu" if c.activation == "batchtopk" else c.activation
    if c.kind != "sae" and activation == "topk":
        raise UnrepresentableError(
            "SAELens has no TopK transcoder (its transcoders are ReLU or JumpReLU, and an SAE cannot hold a "
            "transcoder's two sites or skip path). Save it as 'sparsify' or 'tcwidgets', or train a JumpReLU, "
            "ReLU or BatchTopK transcoder for SAELens.")
    architecture = {("sae", "relu"): "standard", ("sae", "jumprelu"): "jumprelu", ("sae", "topk"): "topk",
                    ("transcoder", "relu"): "transcoder", ("transcoder", "jumprelu"): "jumprelu_transcoder",
                    ("skip", "relu"): "skip_transcoder", ("skip", "jumprelu"): "jumprelu_skip_transcoder"}[
        (c.kind, activation)]
    w = folded_weights(tc)
    tensors = {"W_enc": w.W_enc.T, "b_enc": w.b_enc, "W_dec": w.W_dec, "b_dec": w.b_dec}
    if w.threshold is not None:
        tensors["threshold"] = w.threshold
    if w.W_skip is not None:
        tensors["W_skip"] = w.W_skip
    layer = c.site.get("layer")
    hook_in, hook_out = transformer_lens_hooks(c.kind, layer)
    cfg = {"architecture": architecture, "d_in": c.d_in, "d_sae": c.n_latents, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": False, "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"model_name": hub_model_id(c.site.get("model")), "hook_name": hook_in,
                        "sae_lens_version": FORMAT_VERSION, "sae_lens_training_version": FORMAT_VERSION}}
    if "input" in c.site and "output" in c.site:  # the exact modules, as Hugging Face names them
        cfg["metadata"]["hf_hook_name"] = c.site["output" if c.kind == "sae" else "input"]
    if c.kind != "sae":
        cfg["d_out"] = c.d_out
        cfg["metadata"]["hook_name_out"] = hook_out
        if "output" in c.site:
            cfg["metadata"]["hf_hook_name_out"] = c.site["output"]
    if activation == "topk":
        cfg["k"], cfg["rescale_acts_by_decoder_norm"] = c.k, False
    folder.mkdir(parents=True, exist_ok=True)
    save_tensors(folder / WEIGHTS_FILE, {name: t.contiguous() for name, t in tensors.items()})
    write_json(folder / CONFIG_FILE, cfg)
    return folder
