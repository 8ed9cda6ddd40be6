"""`attribute`: the attribution graph of a target (a latent, a logit or a logit difference) on a prompt."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..interventions import encode_prompt
from ..models import resolve
from ..splicing import check_transcoders
from .graph import CircuitGraph, Node, _Search
from .replay import CircuitError, FrozenRun


@dataclass(frozen=True)
class LatentTarget:
    """The pre-activation of transcoder ``latent`` of ``layer`` at token ``position`` (negative
    positions count from the end)."""

    layer: int
    latent: int
    position: int = -1


TokenSpec = int | str | Sequence[int | str]


@dataclass(frozen=True)
class LogitTarget:
    """The logit of ``token`` at ``position`` (default: the last), minus that of ``minus``.

    ``token`` and ``minus`` are token ids, single-token strings, or sequences of them (then the
    mean of their logits: e.g. larger digits minus smaller digits). For a model that soft-caps its
    logits (Gemma 2: ``cap · tanh(logit / cap)``), the logit before the cap.
    """

    token: TokenSpec
    position: int = -1
    minus: TokenSpec | None = None


Target = LatentTarget | LogitTarget



def _prompt_tokens(lm: Any, prompt: str | Sequence[int] | Tensor) -> tuple[Tensor, str]:
    """Token ids (as `run_with_edits` reads the prompt: BOS first for text) and the prompt's text."""
    tokens = encode_prompt(lm, prompt if isinstance(prompt, str) else torch.as_tensor(prompt))
    if len(tokens) != 1:
        raise CircuitError(f"attribute reads one prompt, got {len(tokens)}: pass one string or one row of ids.")
    return tokens[0], prompt if isinstance(prompt, str) else lm.tokenizer.decode(tokens[0])


def _token_ids(lm: Any, spec: TokenSpec | None, what: str) -> list[int]:
    if spec is None:
        return []
    items = [spec] if isinstance(spec, (int, str)) else list(spec)
    if not items:
        raise CircuitError(f"LogitTarget {what} is empty: give a token, or a list of tokens.")
    vocab = resolve(lm._module, lm.sites.unembed).weight.shape[0]
    ids = []
    for item in items:
        if isinstance(item, str):
            encoded = lm.tokenizer(item, add_special_tokens=False)["input_ids"]
            if len(encoded) != 1:
                pieces = [lm.tokenizer.decode([i]) for i in encoded]
                raise CircuitError(f"LogitTarget {what} {item!r} is {len(encoded)} tokens ({pieces}), not one: "
                                   "give a single token's text or its id.")
            item = encoded[0]
        if not isinstance(item, int) or not 0 <= item < vocab:
            raise CircuitError(f"LogitTarget {what} {item!r} is not a token id of {lm.name} (0..{vocab - 1}).")
        ids.append(item)
    return ids


def _position(position: int, n: int) -> int:
    if not isinstance(position, int) or not -n <= position < n:
        raise CircuitError(f"Target position {position!r} is outside the prompt, which has {n} tokens "
                           f"(positions 0..{n - 1}, or -{n}..-1 from the end).")
    return position % n


@torch.no_grad()
def attribute(lm: Any, transcoders: Mapping[int, Any] | Any, prompt: str | Sequence[int] | Tensor,
              target: Target, *, depth: int = 3, top_k: int | None = 5, threshold: float = 0.01,
              fold_bos: bool = True) -> CircuitGraph:
    """The attribution graph of ``target`` on ``prompt``: its largest computational paths through
    transcoder latents, attention heads, embeddings, errors and biases.

    Args:
        lm: a model from `load_model` (Llama-family, GPT-2 or GPT-NeoX architecture).
        transcoders: ``{layer: Transcoder}`` (or one transcoder); layers without one appear as
            whole-MLP nodes.
        prompt: text, or token ids.
        target: a `LatentTarget` (a latent's pre-activation) or a `LogitTarget` (a logit or a
            logit difference).
        depth: levels of predecessors to expand from the target.
        top_k: predecessors kept per expanded node (``None``: all above the threshold).
        threshold: keep a predecessor only if its path attribution is at least this fraction of
            the target's largest direct contribution (in absolute value).
        fold_bos: when the prompt starts with BOS, count what its MLPs write there as constants
            (``bias`` nodes named ``"bos"``) rather than as latents and errors, as circuit-tracer
            does: BOS is the same in every prompt, and its MLP outputs are the model's largest.

    The graph is exact under frozen attention and norms: the contributions into any node sum to
    its value (see `CircuitGraph.contributions`).
    """
    if not isinstance(depth, int) or depth < 0:
        raise CircuitError(f"depth={depth!r} must be a whole number >= 0.")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise CircuitError(f"top_k={top_k!r} must be a positive whole number, or None for all.")
    if not threshold >= 0:
        raise CircuitError(f"threshold={threshold!r} must be >= 0.")
    transcoders = check_transcoders(lm, transcoders)
    sae = [layer for layer, tc in transcoders.items() if tc.config.kind == "sae"]
    if sae:
        raise CircuitError(f"The transcoders of layers {sae} are SAEs: they read the MLP's output, which is not "
                           "linear in what came before. attribute needs transcoders (kind 'transcoder' or 'skip').")
    tokens, text = _prompt_tokens(lm, prompt)
    position = _position(target.position, len(tokens))
    if isinstance(target, LatentTarget):
        lm.check_layer(target.layer)
        if target.layer not in transcoders:
            raise CircuitError(f"LatentTarget(layer={target.layer}) needs that layer's transcoder, but transcoders "
                               f"were given for layers {sorted(transcoders)}: add {{{target.layer}: transcoder}}.")
        n_latents = transcoders[target.layer].n_latents
        if not isinstance(target.latent, int) or not 0 <= target.latent < n_latents:
            raise CircuitError(f"Latent {target.latent!r} does not exist: the layer-{target.layer} transcoder has "
                               f"{n_latents} latents (0..{n_latents - 1}).")
        run = FrozenRun(lm, transcoders, tokens, target.layer, final=False, fold_bos=fold_bos)
        target_info = {"type": "latent", "layer": target.layer, "latent": target.latent, "position": position}
    elif isinstance(target, LogitTarget):
        plus, minus = _token_ids(lm, target.token, "token"), _token_ids(lm, target.minus, "minus")
        run = FrozenRun(lm, transcoders, tokens, lm.n_layers - 1, final=True, fold_bos=fold_bos)
        probabilities = torch.softmax(run.logits[position], -1)
        target_info = {"type": "logit", "token": plus, "minus": minus, "position": position,
                       "probability": float(probabilities[plus].sum())}
    else:
        raise CircuitError(f"target must be a LatentTarget or a LogitTarget, not {type(target).__name__}.")

    strings = [lm.tokenizer.decode([t]) for t in tokens.tolist()]
    graph = CircuitGraph(lm.name, text, tokens.tolist(), strings, lm.n_layers, target_info, "", _run=run)
    if isinstance(target, LatentTarget):
        graph.target_id = graph._add_node({"kind": "latent", "layer": target.layer, "latent": target.latent,
                                           "position": position})
    else:
        direction, bias = run.logit_direction(plus, minus)
        reader, constant = run.logit_reader(direction, position)
        graph.target_id = f"logit/{position}"
        node = Node(graph.target_id, "logit", lm.n_layers, position, label=_logit_label(lm, plus, minus))
        node.value = run.read(reader) + constant + bias
        run.check_logits(position)
        graph.nodes[graph.target_id] = node
        graph._readers[graph.target_id] = (reader, constant + bias)
    scale = max(abs(c.weight) for c in graph.contributions(graph.target_id)) or 1.0
    graph.settings = {"depth": depth, "top_k": top_k, "threshold": threshold, "scale": scale,
                      "folded_positions": list(run.folded)}
    graph.nodes[graph.target_id].attribution = graph.target_value
    if depth:
        graph._grow([graph.target_id], _Search(depth, top_k, threshold, scale, progress=True))
    return graph


def _logit_label(lm: Any, plus: list[int], minus: list[int]) -> str:
    def names(ids: list[int]) -> str:
        shown = [repr(lm.tokenizer.decode([i])) for i in ids]
        return shown[0] if len(shown) == 1 else f"mean({', '.join(shown)})"

    return f"logit {names(plus)}" + (f" − {names(minus)}" if minus else "")
