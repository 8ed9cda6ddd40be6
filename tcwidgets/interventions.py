"""Ablation and steering: run a model with transcoder latents edited, through nnsight.

Each transcoder is spliced in (by `splicing.splice`) *keeping its error term*, so with no edit the
model computes exactly what it computes without transcoders. An `Edit` changes one latent at the
chosen token positions before decoding, so the MLP's output changes by exactly the decoded
difference:

- ``scale=s``: activation ``a`` becomes ``s·a`` (``scale=0`` zero-ablates the latent);
- ``clamp=v``: it becomes ``v`` whatever it was;
- ``steer=α``: it becomes ``a + α``, which adds exactly ``α × W_dec[latent] / output_scale`` (the
  latent's decoder row in model units) to the MLP's output.

Activations, clamp values and steering amounts are in the transcoder's latent units (those of
``tc(x).latents``). With ``replace=True`` the error terms are dropped: each MLP is replaced by its
(edited) reconstruction, which measures how much the transcoders alone carry.

A `PromptSession` is a prompt's clean run kept as an object: its tokens, clean logits, every
transcoder's latents and (local runs) the model's key/value cache. Pass it to `run_with_edits` in
place of the prompt to edit that prompt again and again: no edits returns the clean logits without a
run, and edits that start at token position p > 0 (which cannot change what comes before p) rerun
only positions p and after from the cache, so moving a slider on the last token of a prompt costs one
token's forward pass.
"""

from __future__ import annotations

import copy
import math
import numbers
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from .corpus import bos_id
from .models import RUN_LOCK
from .crosslayer import unspliced_sources
from .splicing import check_transcoders, splice

EDIT_KINDS = ("scale", "clamp", "steer")


@dataclass(frozen=True)
class Edit:
    """One latent edit: give exactly one of ``scale``, ``clamp`` or ``steer``.

    ``Edit(layer=6, latent=123, scale=0.0)`` zero-ablates latent 123 of the layer-6 transcoder;
    ``scale=2.0`` doubles it, ``clamp=5.0`` sets it to 5, ``steer=3.0`` adds 3 × its decoder row
    to the MLP output.
    """

    layer: int
    latent: int
    scale: float | None = None
    clamp: float | None = None
    steer: float | None = None

    def __post_init__(self) -> None:
        for name in ("layer", "latent"):
            value = getattr(self, name)
            try:
                number = operator.index(value)
            except TypeError:
                number = -1
            if isinstance(value, bool) or number < 0:
                raise ValueError(f"Edit {name}={value!r}: give a whole number ≥ 0.")
            object.__setattr__(self, name, number)
        given = [name for name in EDIT_KINDS if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"Edit(layer={self.layer}, latent={self.latent}) needs exactly one of scale=, clamp= "
                             f"or steer=, got {' and '.join(given) or 'none'}: e.g. scale=0.0 zero-ablates it.")
        value = getattr(self, given[0])
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"Edit(layer={self.layer}, latent={self.latent}): {given[0]}={value!r} must be a "
                             "finite number.")
        object.__setattr__(self, given[0], float(value))

    def __repr__(self) -> str:
        return f"Edit(layer={self.layer}, latent={self.latent}, {self.kind}={self.value!r})"

    @property
    def kind(self) -> str:
        """``"scale"``, ``"clamp"`` or ``"steer"``."""
        return next(name for name in EDIT_KINDS if getattr(self, name) is not None)

    @property
    def value(self) -> float:
        """The factor, the clamp value or the steering amount."""
        return getattr(self, self.kind)


@dataclass(frozen=True)
class EditResult:
    """What `run_with_edits` returns (tensors on CPU).

    ``logits``: ``[n, prompt_length, vocab]`` over the prompt. ``tokens``: the prompt followed by
    the generated continuation, ``[n, prompt_length + generate]``. ``latents``: each transcoder's
    *unedited* latents over the prompt, ``{layer: [n, prompt_length, n_latents]}`` (only with
    ``save_latents=True``).
    """

    logits: torch.Tensor
    tokens: torch.Tensor
    prompt_length: int
    latents: dict[int, torch.Tensor]

    @property
    def continuation(self) -> torch.Tensor:
        """The generated tokens ``[n, generate]``."""
        return self.tokens[:, self.prompt_length:]


def encode_prompt(lm: Any, prompt: str | torch.Tensor) -> torch.Tensor:
    """Token ids ``[n, length]`` of a prompt, checked for ``lm``.

    A string is tokenised as `load_corpus` tokenises documents: BOS first (when the tokenizer has
    one), then the text. A tensor of token ids is used as given.
    """
    if isinstance(prompt, torch.Tensor):
        return lm.check_tokens(prompt)
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string or a tensor of token ids, not {type(prompt).__name__}.")
    if not prompt.strip():
        raise ValueError("The prompt is empty: type some text.")
    ids = lm.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    bos = bos_id(lm.tokenizer)
    ids = ([bos] if bos is not None else []) + ids
    if lm.max_context is not None and len(ids) > lm.max_context:
        raise ValueError(f"The prompt has {len(ids)} tokens but {lm.name} reads at most {lm.max_context}: "
                         "shorten it.")
    return torch.tensor([ids], dtype=torch.long)


def check_edits(transcoders: Mapping[int, Any], edits: Edit | Iterable[Edit]) -> list[Edit]:
    """The edits as a list, each checked against the transcoders (``{layer: transcoder}``)."""
    edits = [edits] if isinstance(edits, Edit) else list(edits)
    for edit in edits:
        if not isinstance(edit, Edit):
            raise TypeError(f"edits must be tcwidgets.Edit objects, got {type(edit).__name__}: "
                            "e.g. Edit(layer=6, latent=123, scale=0.0).")
        if edit.layer not in transcoders:
            have = ", ".join(map(str, sorted(transcoders))) or "none"
            raise ValueError(f"Layer {edit.layer} has no transcoder here (transcoders are given for layers: {have}): "
                             f"pass one for layer {edit.layer}, or edit a latent of another layer.")
        width = transcoders[edit.layer].n_latents
        if edit.latent >= width:
            raise ValueError(f"Latent {edit.latent} is out of range: the layer-{edit.layer} transcoder has {width} "
                             f"latents, numbered 0 to {width - 1}.")
    return edits


def check_positions(positions: int | Sequence[int] | None, length: int) -> list[int] | None:
    """Positions as sorted non-negative indices into a prompt of ``length`` tokens (``None``: all).

    Negative positions count from the end (``-1`` is the last token).
    """
    if positions is None:
        return None
    positions = [positions] if isinstance(positions, int) else list(positions)
    if not positions:
        raise ValueError("positions=[] edits nothing: give token positions, or None for all of them.")
    resolved = set()
    for position in positions:
        if isinstance(position, bool) or not isinstance(position, int) or not -length <= position < length:
            raise ValueError(f"Position {position!r} is outside the prompt's {length} tokens: use 0 to {length - 1} "
                             f"(or -{length} to -1 from the end).")
        resolved.add(position % length)
    return sorted(resolved)


@dataclass(frozen=True, eq=False)
class PromptSession:
    """A prompt's clean run, kept to answer edits of that prompt (see `start_session`).

    ``tokens``: ``[n, length]``; ``logits``: the clean logits ``[n, length, vocab]``; ``latents``:
    each transcoder's latents ``{layer: [n, length, n_latents]}`` (all on CPU); ``cache``: the
    model's key/value cache of the prompt on the model's device (``None`` for remote runs, which
    cannot reuse it); ``residuals``: the residual stream entering each transcoder's layer
    ``{layer: [n, length, d_model]}`` (local runs), from which a rerun skips the layers before the
    first edited one. Give it to `run_with_edits` as its prompt.
    """

    lm: Any
    transcoders: dict[int, Any]
    tokens: torch.Tensor
    logits: torch.Tensor
    latents: dict[int, torch.Tensor]
    cache: Any
    remote: bool | str
    residuals: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def length(self) -> int:
        """The number of tokens of the prompt."""
        return self.tokens.shape[1]

    def cache_before(self, start: int) -> Any:
        """A copy of the key/value cache of the first ``start`` tokens (the session's stays whole)."""
        cache = copy.deepcopy(self.cache)
        cache.crop(start - self.length)  # a negative crop removes that many tokens from the end
        return cache


def start_session(lm: Any, transcoders: Mapping[int, Any] | Any, prompt: str | torch.Tensor, *,
                  remote: bool | str | None = None) -> PromptSession:
    """Run ``prompt`` once, clean, keeping what later edits of it reuse: one forward pass that
    yields the logits, every transcoder's latents and (locally) the key/value cache.

    The transcoders are spliced with their error terms and no edit, so the logits are exactly the
    clean model's. Arguments as for `run_with_edits`.
    """
    transcoders = check_transcoders(lm, transcoders)
    tokens = encode_prompt(lm, prompt)
    remote = lm.remote if remote is None else remote
    cache = None if remote else DynamicCache()
    with RUN_LOCK:
        run = splice(lm, transcoders, tokens, mode="error", save_latents=True, batch_size=len(tokens),
                     progress=False, remote=remote, past_key_values=cache, save_blocks=[] if remote else list(transcoders))
    return PromptSession(lm, transcoders, tokens, run.logits, run.latents, cache, remote, run.blocks)


class LatentEditor:
    """``edit(layer, latents) -> latents`` for `splice` that applies `Edit`\\ s at token positions.

    Plain data and tensor operations only, so nnsight can ship it to NDIF with the trace.
    """

    def __init__(self, edits: Sequence[Edit], positions: list[int] | None) -> None:
        self.by_layer: dict[int, list[tuple[int, str, float]]] = {}
        for edit in edits:
            self.by_layer.setdefault(edit.layer, []).append((edit.latent, edit.kind, edit.value))
        self.positions = positions

    def __call__(self, layer: int, latents: torch.Tensor) -> torch.Tensor:
        edits = self.by_layer.get(layer)
        if not edits:
            return latents
        edited = latents.clone()
        where = slice(None) if self.positions is None else self.positions
        for latent, kind, value in edits:
            current = edited[:, where, latent]
            if kind == "scale":
                current = current * value
            elif kind == "clamp":
                current = torch.full_like(current, value)
            else:
                current = current + value
            edited[:, where, latent] = current
        return edited


def run_with_edits(
    lm: Any,
    transcoders: Mapping[int, Any] | Any,
    prompt: str | torch.Tensor | PromptSession,
    edits: Edit | Iterable[Edit] = (),
    *,
    positions: int | Sequence[int] | None = None,
    replace: bool = False,
    generate: int = 0,
    sample: bool = False,
    save_latents: bool = False,
    on_step: Callable[[int, int], None] | None = None,
    remote: bool | str | None = None,
) -> EditResult:
    """Run ``lm`` on ``prompt`` with transcoder latents edited.

    Args:
        lm: a model from `load_model`.
        transcoders: ``{layer: transcoder}`` (or one transcoder).
        prompt: text (tokenised with BOS first, see `encode_prompt`), token ids ``[n, length]``, or
            a `PromptSession` of this model (from `start_session`), whose clean run is reused.
        edits: `Edit`\\ s, applied in order; none runs the model unchanged.
        positions: token positions to edit (negative ones count from the end), ``None`` for all.
            When generating, ``None`` also edits the generated tokens.
        replace: drop the error terms: every transcoder's layer then runs on the (edited)
            reconstruction alone.
        generate: also generate this many tokens, with the edits applied at every step.
        sample: sample the continuation from the softmax instead of taking the most likely token
            (seed it with ``torch.manual_seed``).
        save_latents: also return every transcoder's unedited latents over the prompt.
        on_step: called as ``on_step(done, total)`` after each forward pass (``total`` is
            ``max(generate, 1)``); raise from it to stop early.
        remote: run on NDIF (``True``) or through its request path in-process (``"local"``);
            defaults to the model's own setting (a session's: the session's).
    """
    session = prompt if isinstance(prompt, PromptSession) else None
    if session is not None and session.lm is not lm:
        raise ValueError("This PromptSession was started with another model: start one with this model "
                         "(tcw.start_session(lm, transcoders, prompt)).")
    transcoders = check_transcoders(lm, transcoders)
    edits = check_edits(transcoders, edits)
    tokens = session.tokens if session is not None else encode_prompt(lm, prompt)
    length = tokens.shape[1]
    positions = check_positions(positions, length)
    if isinstance(generate, bool) or not isinstance(generate, int) or generate < 0:
        raise ValueError(f"generate={generate!r}: give the number of tokens to generate (0 for none).")
    if generate and lm.max_context is not None and length + generate > lm.max_context:
        raise ValueError(f"The prompt ({length} tokens) and {generate} generated tokens exceed {lm.name}'s "
                         f"{lm.max_context}: generate fewer.")
    # a cross-layer transcoder's edited latents write to later layers too: splice those as well
    edited_layers = {layer for edit in edits for layer in getattr(transcoders[edit.layer], "writes_to", [edit.layer])}
    spliced = {layer: tc for layer, tc in transcoders.items()
               if replace or save_latents or layer in edited_layers}
    remote = (session.remote if session is not None else lm.remote) if remote is None else remote
    # what the session's clean run answers: the clean logits, and (locally) the cache of the tokens
    # before the first edited position, from which an error-term run continues
    latents_known = session is not None and all(session.transcoders.get(layer) is tc for layer, tc in spliced.items())
    clean = session is not None and not replace and (not save_latents or latents_known)
    start = positions[0] if clean and not remote and session.cache is not None and positions is not None else 0

    def forward(ids: torch.Tensor, latents: bool) -> Any:
        editor = LatentEditor(edits, positions) if edits else None
        return splice(lm, spliced, ids, mode="replace" if replace else "error", edit=editor, save_latents=latents,
                      batch_size=len(ids), progress=False, remote=remote)

    def first_forward() -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """The logits over the prompt (and latents), reusing the session's clean run where it can."""
        known = {layer: session.latents[layer].clone() for layer in spliced} if clean and save_latents else {}
        if clean and not edits:
            return session.logits.clone(), known  # copies: what the caller changes is not the session's
        if not start:
            run = forward(tokens, save_latents and not known)
            return run.logits, known or run.latents
        editor = LatentEditor(edits, [position - start for position in positions])
        # the layers before the first edited one compute what the clean run did: skipped
        first = min(edited_layers)
        skip = first in session.residuals and not unspliced_sources(spliced) and not any(
            hasattr(tc, "writes_to") for tc in spliced.values())
        rerun = {layer: tc for layer, tc in spliced.items() if layer >= first} if skip else spliced
        rest = splice(lm, rerun, tokens[:, start:], mode="error", edit=editor, batch_size=len(tokens),
                      progress=False, remote=False, past_key_values=session.cache_before(start),
                      start_at=(first, session.residuals[first][:, start:]) if skip else None)
        return torch.cat([session.logits[:, :start], rest.logits], dim=1), known

    total = max(generate, 1)
    with RUN_LOCK:
        logits, latents = first_forward()
        if on_step is not None:
            on_step(1, total)
        generated, last = tokens, logits[:, -1]
        for step in range(1, generate + 1):
            if sample:
                new = torch.multinomial(torch.softmax(last.double(), -1), 1)
            else:
                new = last.argmax(-1, keepdim=True)
            generated = torch.cat([generated, new], dim=1)
            if step < generate:
                last = forward(generated, False).logits[:, -1]
                if on_step is not None:
                    on_step(step + 1, total)
    return EditResult(logits, generated, length, latents)
