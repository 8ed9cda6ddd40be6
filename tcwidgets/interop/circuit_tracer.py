"""circuit-tracer's transcoder sets: ``config.yaml`` + one ``layer_<i>.safetensors`` per layer.

``config.yaml`` holds ``model_kind: transcoder_set``, ``model_name``, ``feature_input_hook`` /
``feature_output_hook`` (TransformerLens-style names: ``mlp.hook_in`` / ``mlp.hook_out``) and
optionally ``transcoders``, the list of files (``hf://`` URIs in published sets). Each file holds
``W_enc`` [d_transcoder, d_model] (our layout), ``W_dec`` [d_transcoder, d_model], ``b_enc``,
``b_dec``, optionally ``W_skip`` [d_model, d_model] and ``activation_function.threshold`` (JumpReLU
``pre · (pre > θ)``, with no ReLU, so a negative θ, which ours cannot hold, is refused; without it the
activation is ReLU). Gemma Scope sets list ``params.npz`` files
(read as Gemma Scope); Gemma Scope 2 files use ``w_enc`` [d_model, d_transcoder], ``w_dec``,
``threshold`` and ``affine_skip_connection`` [d_model, d_model] (transposed).

Their loader needs a transcoder for every layer from 0 (their replacement model, for every layer of
the model), so `write_circuit_tracer` pads missing layers with zero transcoders (output exactly 0),
which `read_circuit_tracer` skips. circuit-tracer's loaders have no TopK (its ``TopK`` module keeps
negative values: no ReLU after the top-k), so TopK transcoders are refused; BatchTopK is written as
JumpReLU with its threshold on every latent (the same function). All transcoders of a set share their
width and whether they have a skip path.

Hooks: ours read the MLP input and write the MLP output, circuit-tracer's ``mlp.hook_in`` /
``mlp.hook_out``. For Gemma 2 and 3 its nnsight mapping names no ``mlp.hook_out``: its Gemma sets
(Gemma Scope) write ``hook_mlp_out``, *after* ``post_feedforward_layernorm``, a non-linear norm that no
weight folding can absorb. A Gemma Scope transcoder loaded here keeps ``output="hook_mlp_out"`` in its
site, and `splice`, `evaluate`, `analyze_features` and `attribute` then replace the norm's output, as
Gemma Scope trained it (`tcwidgets.splicing.writes_after_norm`). The other way round, a Gemma set
trained here (on the MLP module's output) loads with ``load_transcoder_set`` and computes the same
function, but circuit-tracer's replacement model of Gemma would splice it after the post-MLP norm, where
it was not trained: export Gemma transcoders for circuit-tracer knowing that.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from ..crosslayer import CrossLayerConfig, CrossLayerTranscoder
from ..files import atomic_write, load_tensors, save_tensors
from ..transcoder import Transcoder
from .saelens import read_gemma_scope
from .sites import hub_model_id, model_alias, site
from .weights import TranscoderFormatError, UnrepresentableError, Weights, folded_weights, transcoder_from_weights

__all__ = ["CLT_KIND", "CONFIG_FILE", "INPUT_HOOK", "OUTPUT_HOOK", "read_circuit_tracer", "read_circuit_tracer_clt",
           "read_config", "set_files", "write_circuit_tracer", "write_circuit_tracer_clt"]

CONFIG_FILE = "config.yaml"
CLT_KIND = "cross_layer_transcoder"
INPUT_HOOK, OUTPUT_HOOK = "mlp.hook_in", "mlp.hook_out"
_FIX = "re-download the set or write it again with TranscoderSet.to_safetensors"


def read_config(folder: Path, *, kinds: tuple[str, ...] = ("transcoder_set",)) -> dict[str, Any]:
    """``config.yaml`` of a circuit-tracer set, checked to be of one of ``kinds`` (``model_kind``)."""
    path = folder / CONFIG_FILE
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as cause:
        raise TranscoderFormatError(f"{path} is unreadable ({cause}): {_FIX}") from cause
    if not isinstance(config, dict):
        raise TranscoderFormatError(f"{path} does not hold a mapping: {_FIX}")
    if config.get("model_kind") not in kinds:
        raise TranscoderFormatError(f"{path}: model_kind {config.get('model_kind')!r} is not one of {kinds}.")
    return config


def set_files(config: dict[str, Any], folder: Path) -> dict[int, str]:
    """The set's files by layer, as named in the config (``hf://`` URIs or paths) or found in ``folder``."""
    listed = config.get("transcoders")
    if isinstance(listed, list):
        return {layer: str(name) for layer, name in enumerate(listed)}
    found = {int(path.stem.split("_", 1)[1]): path.name for path in folder.glob("layer_*.safetensors")
             if path.stem.split("_", 1)[1].isdigit()}
    if not found:
        raise TranscoderFormatError(f"{folder}: {CONFIG_FILE} lists no transcoders and there is no "
                                    "layer_<i>.safetensors beside it.")
    return found


def read_circuit_tracer(folder: Path, *, layers: list[int] | None = None, device: Any = None,
                        fetch: Callable[[str], Path] | None = None) -> dict[int, Transcoder]:
    """The transcoders of a circuit-tracer set in ``folder`` (zero padding layers left out).

    Files are looked up beside ``config.yaml`` by name (or as absolute paths); ``fetch`` resolves the
    others (downloads, ``hf://`` URIs).
    """
    config = read_config(folder)
    files = set_files(config, folder)
    wanted = sorted(files) if layers is None else layers
    unknown = sorted(set(wanted) - set(files))
    if unknown:
        raise TranscoderFormatError(f"{folder}: the set has no layers {unknown} (it has {sorted(files)}).")
    model = config.get("model_name")
    transcoders = {}
    for layer in wanted:
        path = _local(files[layer], folder, fetch)
        if path.suffix == ".npz":
            tc = read_gemma_scope(path, source=f"{config.get('repo_id', '')} {files[layer]} transcoders", device=device)
        else:
            weights = _weights(load_tensors(path, sha256=None, fix=_FIX, error=TranscoderFormatError), path)
            if not (weights.W_enc.any() or weights.W_dec.any() or weights.b_dec.any()):
                continue  # a zero transcoder padding the set
            tc = transcoder_from_weights(
                weights, kind="skip" if weights.W_skip is not None else "transcoder",
                activation="jumprelu" if weights.threshold is not None else "relu",
                site=site(model, layer, config.get("feature_input_hook", INPUT_HOOK),
                          config.get("feature_output_hook", OUTPUT_HOOK)), device=device)
        transcoders[layer] = tc
    return transcoders


def _local(name: str, folder: Path, fetch: Callable[[str], Path] | None) -> Path:
    beside = folder / Path(name.removeprefix("hf://")).name
    if beside.is_file():
        return beside
    if Path(name).is_absolute() and Path(name).is_file():
        return Path(name)
    if fetch is not None:
        return fetch(name)
    raise TranscoderFormatError(f"{folder}: {CONFIG_FILE} names {name!r}, which is not in the folder.")


def _weights(tensors: dict[str, torch.Tensor], path: Path) -> Weights:
    if "w_enc" in tensors:  # Gemma Scope 2
        skip = tensors.get("affine_skip_connection")
        return Weights(W_enc=tensors["w_enc"].float().T, b_enc=tensors["b_enc"], W_dec=tensors["w_dec"],
                       b_dec=tensors["b_dec"], W_skip=skip.float().T if skip is not None else None,
                       threshold=tensors["threshold"])
    missing = sorted({"W_enc", "b_enc", "W_dec", "b_dec"} - set(tensors))
    if missing:
        raise TranscoderFormatError(f"{path} lacks {missing}: {_FIX}")
    threshold = tensors.get("activation_function.threshold")
    if threshold is not None and bool((threshold < 0).any()):
        raise TranscoderFormatError(
            f"{path}: {int((threshold < 0).sum())} JumpReLU thresholds are negative. circuit-tracer's JumpReLU "
            "(pre · (pre > θ), no ReLU) then keeps negative activations, which tcwidgets' JumpReLU (θ > 0) cannot.")
    return Weights(W_enc=tensors["W_enc"], b_enc=tensors["b_enc"], W_dec=tensors["W_dec"], b_dec=tensors["b_dec"],
                   W_skip=tensors.get("W_skip"), threshold=threshold)


def write_circuit_tracer(transcoders: dict[int, Transcoder], folder: Path, *, n_layers: int | None = None) -> Path:
    """Write a set that circuit-tracer's ``load_transcoder_set`` (and `read_circuit_tracer`) reads.

    Layers 0 to ``n_layers - 1`` (default: up to the highest given layer) that have no transcoder get a
    zero transcoder. Returns ``folder``.
    """
    for layer, tc in transcoders.items():
        _check_representable(tc, layer)
    widths = {tc.n_latents for tc in transcoders.values()}
    skips = {tc.config.kind == "skip" for tc in transcoders.values()}
    if len(widths) > 1 or len(skips) > 1:
        raise UnrepresentableError("a circuit-tracer set needs transcoders of one width, all with or all without "
                                   f"a skip path; got widths {sorted(widths)} and kinds "
                                   f"{sorted({tc.config.kind for tc in transcoders.values()})}.")
    last = max(transcoders)
    n_layers = last + 1 if n_layers is None else n_layers
    if n_layers <= last:
        raise ValueError(f"n_layers={n_layers} leaves out layer {last}.")
    first = next(iter(transcoders.values()))
    d_model, width, skip = first.d_in, first.n_latents, skips.pop()
    folder.mkdir(parents=True, exist_ok=True)
    for layer in range(n_layers):
        if layer in transcoders:
            w = folded_weights(transcoders[layer])
            tensors = {"W_enc": w.W_enc, "W_dec": w.W_dec, "b_enc": w.b_enc, "b_dec": w.b_dec}
            if w.threshold is not None:
                tensors["activation_function.threshold"] = w.threshold
            if w.W_skip is not None:
                tensors["W_skip"] = w.W_skip
        else:
            tensors = {"W_enc": torch.zeros(width, d_model), "W_dec": torch.zeros(width, d_model),
                       "b_enc": torch.zeros(width), "b_dec": torch.zeros(d_model)}
            if skip:
                tensors["W_skip"] = torch.zeros(d_model, d_model)
        save_tensors(folder / f"layer_{layer}.safetensors", tensors)
    models = {tc.config.site.get("model") for tc in transcoders.values()}
    _write_config(folder, "transcoder_set", models.pop() if len(models) == 1 else None,
                  transcoders=[f"layer_{layer}.safetensors" for layer in range(n_layers)])
    return folder


def _write_config(folder: Path, kind: str, model: str | None, **more: Any) -> None:
    """``config.yaml`` of a set of ``kind`` (``model_kind``) for ``model``, reading the MLP input and writing
    the MLP output."""
    config = {"model_kind": kind, "model_name": hub_model_id(model), "feature_input_hook": INPUT_HOOK,
              "feature_output_hook": OUTPUT_HOOK, "scan": folder.name, **more}
    atomic_write(folder / CONFIG_FILE, lambda temporary: Path(temporary).write_text(yaml.safe_dump(config, sort_keys=False)))


# ---- cross-layer transcoders -------------------------------------------------------------------------


def write_circuit_tracer_clt(clt: CrossLayerTranscoder, folder: Path, *, n_layers: int | None = None) -> Path:
    """Write the files circuit-tracer's ``load_clt`` reads: ``config.yaml`` (``model_kind:
    cross_layer_transcoder``), and for every model layer ``i`` from 0 to ``n_layers - 1`` (default: the
    CLT's last layer) ``W_enc_<i>.safetensors`` (``W_enc_<i>`` [n, d], ``b_enc_<i>``, ``b_dec_<i>``,
    ``threshold_<i>`` for JumpReLU) and ``W_dec_<i>.safetensors`` (``W_dec_<i>`` [n, n_layers - i, d]),
    scales folded in. Model layers the CLT does not span get zero weights: no latents there, nothing
    written there. TopK has no circuit-tracer equivalent and is refused. Returns ``folder``."""
    c = clt.config
    if c.activation == "topk":
        raise UnrepresentableError(
            "circuit-tracer's cross-layer transcoders are ReLU or JumpReLU (no TopK: no file stores k): train "
            "with activation='jumprelu' or 'relu' to save for circuit-tracer, or save as 'tcwidgets'.")
    last = clt.layers[-1]
    n_layers = last + 1 if n_layers is None else n_layers
    if n_layers <= last:
        raise ValueError(f"n_layers={n_layers} leaves out layer {last}.")
    n, d = c.n_latents, c.d_model
    state = {name: t.detach().cpu().float() for name, t in clt.state_dict().items()}
    folder.mkdir(parents=True, exist_ok=True)
    for layer in range(n_layers):
        encoder = {f"W_enc_{layer}": torch.zeros(n, d), f"b_enc_{layer}": torch.zeros(n),
                   f"b_dec_{layer}": torch.zeros(d)}
        if c.activation == "jumprelu":
            encoder[f"threshold_{layer}"] = torch.zeros(n)
        decoder = torch.zeros(n, n_layers - layer, d)
        if layer in clt.layers:
            i = clt.index(layer)
            encoder[f"W_enc_{layer}"] = state["W_enc"][i] * c.input_scales[i]
            encoder[f"b_enc_{layer}"] = state["b_enc"][i]
            if c.activation == "jumprelu":
                encoder[f"threshold_{layer}"] = state["log_threshold"][i].exp()
            for j in range(i, clt.n_layers):
                decoder[:, clt.layers[j] - layer] = state[f"W_dec_{i}"][:, j - i] / c.output_scales[j]
        if layer in clt.layers:
            j = clt.index(layer)
            encoder[f"b_dec_{layer}"] = state["b_dec"][j] / c.output_scales[j]
        save_tensors(folder / f"W_enc_{layer}.safetensors", encoder)
        save_tensors(folder / f"W_dec_{layer}.safetensors", {f"W_dec_{layer}": decoder})
    _write_config(folder, CLT_KIND, c.model)
    return folder


def read_circuit_tracer_clt(folder: Path, *, n_layers: int, path: Callable[[str], Path] | None = None,
                            device: Any = None) -> CrossLayerTranscoder:
    """The cross-layer transcoder of circuit-tracer's files (``W_enc_<i>`` / ``W_dec_<i>`` for model layers
    0 to ``n_layers - 1``) in ``folder``; ``path(name)`` finds a file (default: in ``folder``). Model layers
    with no latents and nothing written to them (the padding `write_circuit_tracer_clt` adds) are left out.
    The hooks stay circuit-tracer's names in ``config.sites``; published CLTs read ``hook_resid_mid``,
    the residual stream *before* the pre-MLP norm, where `splice` hands each layer the MLP input (after it):
    such a CLT loads, but its splice is not the replacement circuit-tracer computes."""
    config = read_config(folder, kinds=(CLT_KIND,))
    if n_layers < 1:
        raise TranscoderFormatError(f"{folder}: {CONFIG_FILE} says it is a cross-layer transcoder, but there is no "
                                    f"W_enc_0.safetensors beside it: {_FIX}")
    path = path or (lambda name: folder / name)
    encoders, decoders = [], []
    for layer in range(n_layers):
        tensors = load_tensors(path(f"W_enc_{layer}.safetensors"), sha256=None, fix=_FIX, error=TranscoderFormatError)
        decoder = load_tensors(path(f"W_dec_{layer}.safetensors"), sha256=None, fix=_FIX, error=TranscoderFormatError)
        missing = sorted({f"W_enc_{layer}", f"b_enc_{layer}", f"b_dec_{layer}"} - set(tensors)
                         | {f"W_dec_{layer}"} - set(decoder))
        if missing:
            raise TranscoderFormatError(f"{folder}: layer {layer}'s files lack {missing}: {_FIX}")
        encoders.append({name.removesuffix(f"_{layer}"): t.float() for name, t in tensors.items()})
        decoders.append(decoder[f"W_dec_{layer}"].float())
    n, d = encoders[0]["W_enc"].shape
    thresholded = "threshold" in encoders[0]
    if thresholded and any(bool((e["threshold"] < 0).any()) for e in encoders):
        raise TranscoderFormatError(f"{folder}: some JumpReLU thresholds are negative; circuit-tracer's JumpReLU "
                                    "then keeps negative activations, which tcwidgets' JumpReLU (θ > 0) cannot.")
    def silent(layer: int) -> bool:  # padding: its latents write nothing, and nothing is written to it
        return not (decoders[layer].any() or encoders[layer]["b_dec"].any()
                    or any(decoders[i][:, layer - i].any() for i in range(layer)))

    kept = [layer for layer in range(n_layers) if not silent(layer)]
    if not kept:
        raise TranscoderFormatError(f"{folder}: every weight of this cross-layer transcoder is zero.")
    model, reads = config.get("model_name"), config.get("feature_input_hook", INPUT_HOOK)
    if reads != INPUT_HOOK:
        warnings.warn(f"{folder}: this cross-layer transcoder reads {reads!r} (circuit-tracer's hook_resid_mid is "
                      "the residual stream before the pre-MLP norm), while splice, evaluate and run_with_edits hand "
                      "each layer its MLP input (after the norm): it loads as it is (its weights can be saved again), "
                      "but splice, evaluate, analyze_features and attribute refuse it, as it does not compute "
                      "circuit-tracer's replacement there.", stacklevel=3)
    clt = CrossLayerTranscoder(CrossLayerConfig(
        d_model=d, n_latents=n, layers=kept, activation="jumprelu" if thresholded else "relu",
        model=model_alias(model), sites=[{"input": reads,
                                          "output": config.get("feature_output_hook", OUTPUT_HOOK)}] * len(kept)))
    state = {"W_enc": torch.stack([encoders[layer]["W_enc"] for layer in kept]),
             "b_enc": torch.stack([encoders[layer]["b_enc"] for layer in kept]),
             "b_dec": torch.stack([encoders[layer]["b_dec"] for layer in kept])}
    for i, layer in enumerate(kept):
        state[f"W_dec_{i}"] = decoders[layer][:, [later - layer for later in kept[i:]]]
    if thresholded:
        state["log_threshold"] = torch.stack([encoders[layer]["threshold"] for layer in kept]).double().clamp_min(
            torch.finfo(torch.float32).tiny).log().float()
    clt.load_state_dict(state)
    return clt.eval().to(device) if device is not None else clt.eval()


def _check_representable(tc: Transcoder, layer: int) -> None:
    c = tc.config
    if c.kind == "sae":
        raise UnrepresentableError(f"layer {layer}: circuit-tracer sets hold MLP transcoders, not SAEs.")
    if c.activation == "topk":
        raise UnrepresentableError(
            f"layer {layer}: circuit-tracer's transcoder loaders have no TopK (its TopK module keeps negative "
            "values, with no ReLU after the top-k, and no file stores k). Save it as 'sparsify' or 'tcwidgets', or "
            "train a ReLU, JumpReLU or BatchTopK transcoder for circuit-tracer.")
    if c.d_in != c.d_out:
        raise UnrepresentableError(f"layer {layer}: circuit-tracer transcoders read and write d_model; this one maps "
                                   f"{c.d_in} to {c.d_out} dimensions.")
