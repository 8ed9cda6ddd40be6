"""Where a transcoder reads and writes, translated between tcwidgets' sites and the peers' hook names.

tcwidgets records ``config.site = {"model", "layer", "input", "output"}`` with nnsight module paths
(``"model.layers.6.mlp.input"``). sparsify names a hookpoint by its module path below the base model
(``"layers.6.mlp"``); SAELens and circuit-tracer use TransformerLens hook names
(``"blocks.6.ln2.hook_normalized"``, ``"mlp.hook_in"``) plus, for SAELens, the Hugging Face module names.
"""

from __future__ import annotations

import re
from typing import Any

from ..models import EMBEDDED_MODELS

__all__ = ["hookpoint", "hub_model_id", "layer_from_name", "model_alias", "site", "transformer_lens_hooks"]


def layer_from_name(name: str) -> int | None:
    """The layer number in a hook or folder name (``blocks.6.hook_mlp_out``, ``layers.6.mlp``,
    ``layer_6``), or None."""
    match = re.search(r"(?:^|[._/])(?:blocks|layers|layer|h)[._](\d+)(?:$|[._/])", name)
    return int(match.group(1)) if match else None


def hub_model_id(model: str | None) -> str | None:
    """The Hugging Face id of an embedded model's alias (what peers load), else ``model`` unchanged."""
    embedded = EMBEDDED_MODELS.get(model or "")
    return embedded.hub_id if embedded else model


def model_alias(model: str | None) -> str | None:
    """The embedded alias of a Hugging Face id (what `load_model` names the model), else ``model``."""
    for alias, embedded in EMBEDDED_MODELS.items():
        if model == embedded.hub_id:
            return alias
    return model


def hookpoint(site: dict[str, Any]) -> str:
    """sparsify's hookpoint for a transcoder's site: the MLP module path below the base model."""
    module = site.get("input", "").removesuffix(".input")
    if "." in module:
        return module.split(".", 1)[1]
    return f"layers.{site.get('layer')}.mlp"


def site(model: str | None, layer: int, input: str, output: str) -> dict[str, Any]:
    """A `TranscoderConfig.site` for a transcoder read from another format (hook names kept as theirs)."""
    return {"model": model_alias(model), "layer": layer, "input": input, "output": output}


def transformer_lens_hooks(kind: str, layer: int) -> tuple[str, str]:
    """TransformerLens hook names (input, output) of an MLP transcoder (or an SAE on the MLP output)
    at ``layer``, as SAELens records them."""
    output = f"blocks.{layer}.hook_mlp_out"
    return (output if kind == "sae" else f"blocks.{layer}.ln2.hook_normalized"), output
