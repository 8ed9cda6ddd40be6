"""Put transcoders into a model's forward pass with nnsight.

This is the one place where transcoders replace MLPs; evaluation, interventions and circuits all go
through `splice`. In one trace per batch of contexts, layers are visited in ascending order and
each chosen MLP is

- **spliced**, ``mode="replace"``: its output is replaced by the transcoder's reconstruction
  (no error term) — the model then runs on the transcoder alone at that layer;
- **spliced**, ``mode="error"``: its output becomes the reconstruction plus the error term
  (MLP output − reconstruction). Unedited, that is the clean model; the latents are a handle for
  edits: ``edit(layer, latents) -> latents`` changes them before decoding while the error term
  stays that of the *unedited* reconstruction;
- **zero-ablated**: its output is replaced by zeros.

A transcoder (``config.kind`` ``"transcoder"`` or ``"skip"``) reads the MLP's input; an SAE
(``"sae"``) reads the MLP's output. Transcoders work in model units; everything here does too.

On Gemma 2 and 3, whose MLP output passes through a post-MLP norm, a transcoder whose site names the
output after that norm (Gemma Scope's and circuit-tracer's ``hook_mlp_out``, or
``post_feedforward_layernorm.output``) replaces the norm's output instead of the MLP module's
(`writes_after_norm`); tcwidgets' own transcoders reconstruct the MLP module's output.
"""

from __future__ import annotations

import inspect
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import nnsight
import torch
from tqdm.auto import tqdm

from .activations import trace_mlp
from .crosslayer import CrossLayerTranscoder, unspliced_sources
from .models import resolve

Mode = Literal["replace", "error"]
#: ``edit(layer, latents) -> latents``: change a spliced layer's latents before they are decoded.
LatentEdit = Callable[[int, torch.Tensor], torch.Tensor]


class SplicedRun(NamedTuple):
    """What `splice` returns: logits, plus what was asked to be kept (on CPU, batches concatenated).

    ``latents``: each spliced layer's latents ``[n, context, n_latents]`` before any edit (only
    with ``save_latents=True``). ``mlp``: ``{layer: (input, output)}`` of the layers in
    ``save_mlp``, as the MLP saw and produced them in this run (before any replacement; the output
    after the post-MLP norm on the ``after_norm`` layers). ``blocks``: ``{layer: residual}``, the
    residual stream entering each layer of ``save_blocks`` ``[n, context, d_model]``.
    """

    logits: torch.Tensor
    latents: dict[int, torch.Tensor]
    mlp: dict[int, tuple[torch.Tensor, torch.Tensor]]
    blocks: dict[int, torch.Tensor] = {}


def check_transcoders(lm: Any, transcoders: Mapping[int, Any] | Any) -> dict[int, Any]:
    """Validate transcoders against a model; return them as ``{layer: transcoder}`` in layer order.

    Accepts one transcoder (its layer is ``config.site["layer"]``), a ``{layer: transcoder}``
    mapping or a `CrossLayerTranscoder` (as its per-layer views, `CrossLayerTranscoder.views`). Raises
    a clear error when a layer is not the model's, when a transcoder was trained on
    another layer or on a model of another width, or when its weights are not finite.
    """
    if isinstance(transcoders, CrossLayerTranscoder):
        transcoders = transcoders.views()
    if not isinstance(transcoders, Mapping):
        transcoders = {transcoders.config.site["layer"]: transcoders}
    checked = {}
    for layer, tc in sorted(transcoders.items()):
        lm.check_layer(layer)
        site = tc.config.site
        if site.get("layer") != layer:
            raise ValueError(f"The transcoder given for layer {layer} was trained on layer {site.get('layer')} "
                             f"of {site.get('model')}: pass it as {{{site.get('layer')}: tc}}.")
        for what, size in (("input", tc.d_in), ("output", tc.d_out)):
            if size != lm.d_model:
                raise ValueError(
                    f"The layer-{layer} transcoder's {what} has {size} dimensions but {lm.name}'s MLPs have "
                    f"{lm.d_model}: it was trained on another model ({site.get('model')!r}). Load the model "
                    "it was trained on, or train one on this model's activations.")
        if site.get("model") not in (None, lm.name):
            warnings.warn(f"The layer-{layer} transcoder was trained on {site['model']!r}, not {lm.name!r}; "
                          "its sizes match, so it is used anyway.", stacklevel=2)
        _check_mlp_site(site, layer)
        if writes_after_norm(lm, tc) and lm.sites.post_mlp_norm is None:
            raise ValueError(
                f"The layer-{layer} transcoder writes after a post-MLP norm ({site['output']!r}), which "
                f"{lm.name} does not have: it was made for a model with one (Gemma 2 or 3, {site.get('model')!r}).")
        bad = _non_finite(tc)
        if bad:
            raise ValueError(f"The layer-{layer} transcoder has NaN or infinite values in {', '.join(bad)}: "
                             "its training diverged. Retrain it (e.g. with a lower learning rate) or load an "
                             "earlier checkpoint.")
        if tc.training and getattr(tc.config, "activation", None) == "batchtopk":
            warnings.warn(f"The layer-{layer} BatchTopK transcoder is in training mode, so its latents depend "
                          "on the whole batch; call tc.eval() to use its inference threshold.", stacklevel=2)
        checked[layer] = tc
    return checked


def writes_after_norm(lm: Any, tc: Any) -> bool:
    """Whether ``tc`` reconstructs the output of the post-MLP norm (Gemma 2 and 3) rather than the MLP
    module's output: its site's output is TransformerLens' ``hook_mlp_out`` (which Gemma Scope and
    circuit-tracer's Gemma sets use) or the norm's own output."""
    norm = lm.sites.post_mlp_norm
    output = tc.config.site.get("output") or ""
    return norm is not None and (output.endswith("hook_mlp_out") or output.endswith(f"{norm}.output"))


def _check_mlp_site(site: dict[str, Any], layer: int) -> None:
    """Refuse a transcoder or SAE that reads or writes the residual stream or attention (not an MLP)."""
    for end in ("input", "output"):
        hook = site.get(end) or ""
        if any(name in hook for name in ("hook_resid", "attn", "hook_z")):
            raise ValueError(
                f"The layer-{layer} transcoder's {end} is {hook!r}, not an MLP site: tcwidgets splices transcoders "
                "that read an MLP's input and SAEs on an MLP's output. Load one trained on an MLP "
                "(e.g. Gemma Scope's '-transcoders' or '-mlp-' sets rather than '-res-').")


_FINITE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # transcoder -> parameter versions found finite


def _non_finite(tc: Any) -> list[str]:
    """Names of ``tc``'s parameters with NaN or infinite values; parameters found finite are not
    scanned again until they change (a fresh tensor or an in-place update bumps its version)."""
    parameters = list(tc.named_parameters())
    versions = tuple((id(value), value._version) for _, value in parameters)
    if _FINITE.get(tc) == versions:
        return []
    bad = [name for name, value in parameters if not torch.isfinite(value).all()]
    if not bad:
        _FINITE[tc] = versions
    return bad


def splice(
    lm: Any,
    transcoders: Mapping[int, Any] | Any,
    tokens: torch.Tensor,
    *,
    mode: Mode = "replace",
    zero_ablate: Sequence[int] = (),
    edit: LatentEdit | None = None,
    save_latents: bool = False,
    save_mlp: Sequence[int] = (),
    after_norm: Sequence[int] = (),
    batch_size: int = 8,
    progress: bool = True,
    remote: bool | str | None = None,
    past_key_values: Any = None,
    save_blocks: Sequence[int] = (),
    start_at: tuple[int, torch.Tensor] | None = None,
) -> SplicedRun:
    """Run ``lm`` on ``tokens`` with transcoders spliced in and chosen MLPs zero-ablated.

    Args:
        lm: a model from `load_model`.
        transcoders: ``{layer: transcoder}`` or one transcoder; ``{}`` runs the clean model.
        tokens: ``[n_contexts, context]`` (or ``[context]``) token ids.
        mode: ``"replace"`` (reconstruction only) or ``"error"`` (reconstruction plus error term).
        zero_ablate: layers whose MLP output is replaced by zeros (not also spliced).
        edit: ``edit(layer, latents) -> latents``, applied to every spliced layer's latents before
            decoding. It runs inside the trace, so with ``remote=True`` it must be shippable
            (a notebook function or a ``tcwidgets`` one).
        save_latents: also return the spliced layers' latents.
        save_mlp: also return these layers' MLP inputs and outputs.
        after_norm: layers whose MLP output is taken (saved, zeroed) after the post-MLP norm (Gemma);
            a spliced transcoder that writes there (`writes_after_norm`) adds its layer itself.
        batch_size: contexts per forward pass.
        progress: show a progress bar when there is more than one batch.
        remote: run on NDIF (``True``) or through its request path in-process (``"local"``);
            defaults to the model's own setting.
        past_key_values: the model's key/value cache (a transformers ``Cache``) of tokens that come
            before ``tokens``, which then continue them (one batch only; the cache grows by them).
        save_blocks: also return the residual stream entering these layers.
        start_at: ``(layer, residual)``: skip the layers before ``layer``, whose output would be
            ``residual`` (the stream entering ``layer`` on ``tokens``, e.g. saved by ``save_blocks``
            of an earlier run); no transcoder, ablation or saved site may lie before it.
    """
    transcoders = check_transcoders(lm, transcoders)
    tokens = lm.check_tokens(tokens)
    if mode not in ("replace", "error"):
        raise ValueError(f"mode={mode!r}: choose 'replace' (reconstruction only) or 'error' (reconstruction "
                         "plus error term).")
    zero = sorted(set(zero_ablate))
    save_mlp = sorted(set(save_mlp))
    after = sorted(set(after_norm) | {layer for layer, tc in transcoders.items() if writes_after_norm(lm, tc)})
    for layer in zero + save_mlp + after:
        lm.check_layer(layer)
    if after and lm.sites.post_mlp_norm is None:
        raise ValueError(f"after_norm={after}: {lm.name} has no norm after its MLPs.")
    both = sorted(set(zero) & set(transcoders))
    if both:
        raise ValueError(f"Layers {both} are both zero-ablated and spliced: choose one per layer.")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be positive.")
    if past_key_values is not None and len(tokens) > batch_size:
        raise ValueError(f"past_key_values continues one batch: pass batch_size >= {len(tokens)}.")
    save_blocks = sorted(set(save_blocks))
    for layer in save_blocks:
        lm.check_layer(layer)
    if start_at is not None:
        first = min([*transcoders, *zero, *save_mlp, *save_blocks, *unspliced_sources(transcoders)], default=None)
        if first is not None and first < start_at[0]:
            raise ValueError(f"start_at skips the layers before {start_at[0]}, but layer {first} is spliced, "
                             "ablated or saved: start at or before it.")
        if len(tokens) > batch_size:
            raise ValueError(f"start_at continues one batch: pass batch_size >= {len(tokens)}.")
    remote = lm.remote if remote is None else remote

    batches = range(0, len(tokens), batch_size)
    parts = []
    with torch.no_grad():
        for start in tqdm(batches, desc="splicing", unit="batch", disable=not progress or len(batches) < 2):
            logits, latents, mlp, blocks = _trace(lm, tokens[start:start + batch_size].to(lm.device), transcoders,
                                                  mode, zero, edit, save_latents, save_mlp, after, remote,
                                                  past_key_values, save_blocks, start_at)
            parts.append(SplicedRun(logits.cpu(), _to_cpu(latents), _to_cpu(mlp), _to_cpu(blocks)))
    return SplicedRun(
        torch.cat([part.logits for part in parts]),
        {layer: torch.cat([part.latents[layer] for part in parts]) for layer in parts[0].latents},
        {layer: tuple(torch.cat([part.mlp[layer][i] for part in parts]) for i in range(2)) for layer in save_mlp},
        {layer: torch.cat([part.blocks[layer] for part in parts]) for layer in save_blocks},
    )


def spliced_logits(lm: Any, transcoders: Mapping[int, Any] | Any, tokens: torch.Tensor,
                   **options: Any) -> torch.Tensor:
    """The logits ``[n_contexts, context, vocab]`` of ``splice(lm, transcoders, tokens, **options)``."""
    return splice(lm, transcoders, tokens, **options).logits


def _to_cpu(values: dict) -> dict:
    return {key: tuple(v.cpu() for v in value) if isinstance(value, tuple) else value.cpu()
            for key, value in values.items()}


def _cache_argument(lm: Any) -> str:
    """The name under which the model's forward takes a key/value cache: ``cache`` (transformers ≥ 5.x,
    which warns about the old name) or ``past_key_values``."""
    parameters = inspect.signature(lm._module.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _trace(lm: Any, tokens: torch.Tensor, transcoders: dict[int, Any], mode: Mode, zero: list[int],
           edit: LatentEdit | None, save_latents: bool, save_mlp: list[int], after_norm: list[int],
           remote: bool | str, past_key_values: Any, save_blocks: list[int],
           start_at: tuple[int, torch.Tensor] | None) -> tuple[torch.Tensor, dict, dict, dict]:
    """One forward pass of a batch; layers in ascending order (nnsight needs execution order)."""
    sources = unspliced_sources(transcoders)  # cross-layer transcoder layers read but not spliced
    layers = sorted(set(transcoders) | set(zero) | set(save_mlp) | set(sources) | set(save_blocks))
    cache = {}
    if past_key_values is not None:  # the mask covers the cached tokens and the new ones
        mask = torch.ones(len(tokens), past_key_values.get_seq_length() + tokens.shape[1], dtype=torch.long,
                          device=tokens.device)
        cache = {_cache_argument(lm): past_key_values, "use_cache": True, "attention_mask": mask}
    with lm.trace(tokens, remote=remote, **cache):
        latents, mlp, blocks = nnsight.save({}), nnsight.save({}), nnsight.save({})
        if start_at is not None:
            for layer in range(start_at[0]):
                resolve(lm, lm.sites.block(layer)).skip(start_at[1].to(tokens.device))
        for layer in layers:
            if layer in save_blocks:
                blocks[layer] = resolve(lm, lm.sites.block(layer)).input
            if layer not in transcoders and layer not in zero and layer not in save_mlp and layer not in sources:
                continue
            tc = transcoders.get(layer)
            reads_input = layer in save_mlp or layer in sources or (tc is not None and tc.config.kind != "sae")
            x = lm.mlp(layer).input if reads_input else None
            envoy = lm.mlp_writer(layer, after_norm=layer in after_norm)
            y = envoy.output
            if layer in sources:
                sources[layer].record(transcoder_input(sources[layer], x, y))
            if layer in save_mlp:
                mlp[layer] = (x, y)
            if layer in zero:
                envoy.output = torch.zeros_like(y)
            elif tc is not None:
                z, new = _spliced_output(tc, layer, x, y, mode, edit)
                if save_latents:
                    latents[layer] = z
                envoy.output = new
        logits = lm.output.logits.save()
    return logits, latents, mlp, blocks


def run_transcoder(tc: Any, mlp_input: torch.Tensor | None,
                   mlp_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(latents, reconstruction)`` at one site; the reconstruction in the MLP output's dtype."""
    latents, reconstruction = tc(transcoder_input(tc, mlp_input, mlp_output))
    return latents, reconstruction.to(mlp_output.dtype)


def traced_input(lm: Any, tc: Any, batch: torch.Tensor) -> torch.Tensor:
    """What ``tc`` reads on ``batch``, from one forward pass stopped after its layer: the MLP input, or
    for an SAE the MLP output (after the post-MLP norm when it writes there)."""
    layer = tc.config.site["layer"]
    mlp_input, mlp_output = trace_mlp(lm, batch, [layer], [layer] if writes_after_norm(lm, tc) else [])[0]
    return transcoder_input(tc, mlp_input, mlp_output)


def transcoder_input(tc: Any, mlp_input: torch.Tensor | None, mlp_output: torch.Tensor) -> torch.Tensor:
    """What ``tc`` reads (an SAE the MLP output, a transcoder its input), on its device and in its dtype.

    Moves ``tc`` to the activations' device when they differ (e.g. a CPU transcoder and a GPU model).
    """
    source = mlp_output if tc.config.kind == "sae" else mlp_input
    tc.to(source.device)
    return source.to(next(tc.parameters()).dtype)


def _spliced_output(tc: Any, layer: int, x: torch.Tensor | None, y: torch.Tensor, mode: Mode,
                    edit: LatentEdit | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The latents and the MLP's new output (runs inside the trace).

    ``"replace"``: the (edited) reconstruction. ``"error"``: ``y + (edited reconstruction −
    reconstruction)``, i.e. the edited reconstruction plus the unedited error term ``y − ŷ``;
    unedited, exactly ``y``.
    """
    source = transcoder_input(tc, x, y)
    latents, reconstruction = tc(source)
    output = reconstruction
    if edit is not None:
        edited = edit(layer, latents)
        if not isinstance(edited, torch.Tensor) or edited.shape != latents.shape:
            raise ValueError(f"edit(layer={layer}, latents) must return a tensor of the latents' shape "
                             f"{tuple(latents.shape)}, got {getattr(edited, 'shape', type(edited).__name__)}.")
        output = tc.decode(edited, source)
    if mode == "error":
        output = y + (output - reconstruction)
    return latents, output.to(y.dtype)
