"""Circuits: weights-based attribution through transcoders, and path search.

Dunefsky, Chlenski & Nanda (2024), "Transcoders Find Interpretable LLM Feature Circuits". Freeze
the attention patterns and the norms' scales (RMSNorm/LayerNorm denominators) at their values on a
prompt; the model is then linear from the residual stream's writers to every reader. A transcoder
latent's pre-activation, or a logit (difference), splits **exactly** into direct contributions:

- upstream transcoder latents at the same position: activation × the input-invariant product of
  the upstream decoder row and the downstream encoder row through the norm's weight (and its
  centering, for LayerNorm), times the frozen norm scale;
- attention heads: head h of layer l moving position q's residual stream to position p through
  its OV circuit, weighted by the pattern A[h, p, q]. A head node is linear, so it splits in turn
  into what position q's residual stream held before layer l;
- token embeddings (and learned position embeddings, GPT-2), biases (attention, the transcoder's
  b_dec, the latent's b_enc and norm biases, final norm / unembedding), skip paths (linear
  nodes too), each transcoder's error term (MLP output − transcoder output) and the whole MLP
  output of layers without a transcoder.

Every edge reports its weight as ``invariant × dependent``: the input-invariant factor (the source's
vector — a decoder row, an embedding, a bias — dotted with the reader's weights-only vector) and
the input-dependent one (the source's activation × frozen norm scales × attention weights).

One forward pass (nnsight, eager attention so the patterns are returned) records the patterns and
the MLP inputs/outputs; the residual stream is then replayed in float64 from the modules' own
weights and checked against the model, so an architecture this module does not understand fails
loudly instead of giving wrong numbers. `attribute` expands the largest contributions recursively
(top-k per node, depth and threshold limits) into a `CircuitGraph`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from .interventions import encode_prompt
from .models import resolve
from .splicing import check_transcoders

FORMAT = "tcwidgets.circuit"
VERSION = 1
REPLAY_TOLERANCE = 1e-3  # relative error allowed between the float64 replay and the model's float32 pass

#: Kinds of graph nodes. Expandable ones have predecessors: latents (shared by every consumer),
#: attention heads and skip paths (linear, one node per consumer).
KINDS = ("logit", "latent", "head", "skip", "embedding", "position", "error", "mlp", "bias")
EXPANDABLE = ("latent", "head", "skip")


class CircuitError(ValueError):
    """Attribution cannot run as asked (bad target, transcoders or architecture)."""


# -- targets -----------------------------------------------------------------------------------------


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
    mean of their logits: e.g. larger digits minus smaller digits).
    """

    token: TokenSpec
    position: int = -1
    minus: TokenSpec | None = None


Target = LatentTarget | LogitTarget


# -- frozen norms and attention weights ---------------------------------------------------------------


class _FrozenNorm:
    """A pre-norm (RMSNorm or LayerNorm) with its scale frozen at its value on the prompt:
    ``norm(x) = weight ⊙ C·x / scale + bias``, C the centering (LayerNorm) or the identity."""

    def __init__(self, module: torch.nn.Module, x: Tensor) -> None:
        name = type(module).__name__
        if isinstance(module, torch.nn.LayerNorm):
            self.centered, eps = True, module.eps
        elif name.endswith("RMSNorm"):
            self.centered = False
            eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        else:
            raise CircuitError(f"circuits cannot freeze a {name}: it knows RMSNorm and LayerNorm.")
        self.weight = _float64(module.weight)
        self.bias = _param(module, "bias", len(self.weight))
        self.scale = (self.center(x).pow(2).mean(-1) + eps).sqrt()  # [positions]

    def center(self, x: Tensor) -> Tensor:
        return x - x.mean(-1, keepdim=True) if self.centered else x

    def linear(self, x: Tensor) -> Tensor:
        """The part of ``norm(x)`` that is linear in ``x`` (no bias), rows = positions."""
        return self.weight * self.center(x) / self.scale[:, None]

    def __call__(self, x: Tensor) -> Tensor:
        return self.linear(x) + self.bias

    def pullback(self, w: Tensor) -> Tensor:
        """The vector u with ``u · x = w · (weight ⊙ C·x)``; divide by ``scale[p]`` for position p."""
        return self.center(self.weight * w)


@dataclass
class _OV:
    """One attention layer's value and output weights per head (float64, GQA expanded)."""

    W_V: Tensor  # [heads, d_head, d_model]: head h's values are W_V[h] @ x + b_V[h]
    b_V: Tensor  # [heads, d_head]
    W_O: Tensor  # [heads, d_head, d_model]: head h writes its mixed values v as v @ W_O[h]
    b_O: Tensor  # [d_model]


def _float64(tensor: Tensor) -> Tensor:
    return tensor.detach().to("cpu", torch.float64)


def _param(module: torch.nn.Module, name: str, size: int) -> Tensor:
    value = getattr(module, name, None)
    return _float64(value) if value is not None else torch.zeros(size, dtype=torch.float64)


def _ov_llama(attn: torch.nn.Module, config: Any) -> _OV:
    heads, d_head = config.num_attention_heads, attn.head_dim
    groups = attn.num_key_value_groups
    d = attn.o_proj.out_features
    W_V = _float64(attn.v_proj.weight).view(heads // groups, d_head, d)
    b_V = _param(attn.v_proj, "bias", (heads // groups) * d_head).view(heads // groups, d_head)
    W_O = _float64(attn.o_proj.weight).T.reshape(heads, d_head, d)
    return _OV(W_V.repeat_interleave(groups, 0), b_V.repeat_interleave(groups, 0), W_O,
               _param(attn.o_proj, "bias", d))


def _ov_gpt2(attn: torch.nn.Module, config: Any) -> _OV:
    d, heads, d_head = attn.embed_dim, attn.num_heads, attn.head_dim
    W_V = _float64(attn.c_attn.weight[:, 2 * d:]).T.reshape(heads, d_head, d)  # Conv1D computes x @ weight
    b_V = _float64(attn.c_attn.bias[2 * d:]).view(heads, d_head)
    W_O = _float64(attn.c_proj.weight).view(heads, d_head, d)
    return _OV(W_V, b_V, W_O, _param(attn.c_proj, "bias", d))


def _ov_neox(attn: torch.nn.Module, config: Any) -> _OV:
    d, d_head = config.hidden_size, attn.head_size
    heads = d // d_head
    qkv = attn.query_key_value
    W_V = _float64(qkv.weight).view(heads, 3, d_head, d)[:, 2]
    b_V = _param(qkv, "bias", 3 * d).view(heads, 3, d_head)[:, 2]
    W_O = _float64(attn.dense.weight).T.reshape(heads, d_head, d)
    return _OV(W_V.contiguous(), b_V.contiguous(), W_O, _param(attn.dense, "bias", d))


#: ``config.model_type`` -> how to read an attention layer's OV weights.
ATTENTION_OV = {"llama": _ov_llama, "mistral": _ov_llama, "qwen2": _ov_llama, "qwen3": _ov_llama,
                "gpt2": _ov_gpt2, "gpt_neox": _ov_neox}


# -- the frozen forward pass ---------------------------------------------------------------------------


@dataclass
class _Reader:
    """A linear read of the residual stream: ``sigma × (w · resid[stage][position])``.

    ``w`` depends on weights only; ``sigma`` (frozen norm scales, attention weights) on the input.
    """

    sigma: float
    w: Tensor
    stage: int
    position: int


@dataclass
class _Layer:
    """Frozen quantities of one block (float64)."""

    pattern: Tensor  # [heads, positions, positions], causal
    attn_norm: _FrozenNorm
    ov: _OV
    values: Tensor  # [heads, d_head, positions]: W_V · (linear part of the normed input)
    value_bias: Tensor  # [heads, d_head]: b_V + W_V · norm bias
    mlp_norm: _FrozenNorm
    mlp_stage: int  # where the MLP reads the residual stream
    mlp_out: Tensor  # [positions, d_model]
    tc: Any = None  # the layer's transcoder, float64 copy
    pre: Tensor | None = None  # [positions, n_latents] encoder pre-activations
    latents: Tensor | None = None  # [positions, n_latents] activations
    error: Tensor | None = None  # [positions, d_model] MLP output − transcoder output
    skip: Tensor | None = None  # [positions, d_model] skip path's output (skip transcoders)


@dataclass(frozen=True)
class Contribution:
    """One direct contribution to a node: ``weight = invariant × dependent``.

    ``source`` is the contributing node's description (``kind``, ``layer``, ``position`` and, as
    relevant, ``latent``, ``head``, ``source_position``, ``name``).
    """

    source: dict[str, Any]
    weight: float
    invariant: float
    dependent: float


class _Segment:
    """A batch of contributions of one kind (weights as tensors; described on demand)."""

    def __init__(self, kind: str, weight: Tensor, invariant: Tensor, dependent: Tensor, describe: Any) -> None:
        self.kind, self.weight, self.invariant, self.dependent = kind, weight, invariant, dependent
        self.describe = describe  # index -> source dict


class FrozenRun:
    """A prompt's forward pass with attention patterns and norm scales frozen, replayed in float64.

    Built by `attribute`; `CircuitGraph` keeps it to expand nodes later. ``stage`` numbers where
    the residual stream is read: attention of layer l reads stage 2l, its MLP 2l + 1 (2l with
    GPT-NeoX's parallel residual), the final norm 2 × n_layers; a writer is seen by later stages.
    """

    def __init__(self, lm: Any, transcoders: Mapping[int, Any], tokens: Tensor, last_layer: int,
                 final: bool) -> None:
        model_type = lm.config.model_type
        if model_type not in ATTENTION_OV:
            raise CircuitError(
                f"circuits does not support {model_type!r} models yet (supported: "
                f"{', '.join(sorted(ATTENTION_OV))}): it needs to know how to read their attention "
                "weights; add an entry to tcwidgets.circuits.ATTENTION_OV.")
        self.lm, self.tokens = lm, tokens
        self.n_layers, self.final = lm.n_layers, final
        parallel = bool(getattr(lm.config, "use_parallel_residual", False))
        module, sites = lm._module, lm.sites
        captured = _capture(lm, tokens, last_layer, final)

        self.token_embedding = captured["embed"]
        remainder = captured["resid"] - self.token_embedding
        self.position_embedding = remainder if remainder.abs().max() > 0 else None
        resid = captured["resid"] if self.position_embedding is not None else self.token_embedding
        self.resid: dict[int, Tensor] = {}
        self.layers: list[_Layer] = []
        n = len(tokens)
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        for layer in range(last_layer + 1):
            block = resolve(module, sites.block(layer))
            self.resid[2 * layer] = resid
            attn_norm = _FrozenNorm(resolve(block, sites.pre_attention_norm), resid)
            ov = ATTENTION_OV[model_type](resolve(block, sites.attention), lm.config)
            pattern = captured["patterns"][layer] * causal
            values = ov.W_V @ attn_norm.linear(resid).T  # [heads, d_head, positions]
            value_bias = ov.b_V + ov.W_V @ attn_norm.bias
            mixed = pattern @ (values.transpose(1, 2) + value_bias[:, None])  # [heads, positions, d_head]
            attn_out = mixed.transpose(0, 1).flatten(1) @ ov.W_O.flatten(0, 1) + ov.b_O
            mlp_stage = 2 * layer if parallel else 2 * layer + 1
            mlp_resid = resid if parallel else resid + attn_out
            self.resid[mlp_stage] = mlp_resid
            mlp_norm = _FrozenNorm(resolve(block, sites.pre_mlp_norm), mlp_resid)
            x = mlp_norm(mlp_resid)
            _check_replay(lm, x, captured["mlp_in"][layer], f"the MLP input of layer {layer}")
            frozen = _Layer(pattern, attn_norm, ov, values, value_bias, mlp_norm, mlp_stage, captured["mlp_out"][layer])
            if layer in transcoders:
                self._encode(frozen, transcoders[layer], x)
            self.layers.append(frozen)
            resid = resid + attn_out + frozen.mlp_out
        if final:
            self.resid[2 * self.n_layers] = resid
            self.final_norm = _FrozenNorm(resolve(module, sites.final_norm), resid)
            unembed = resolve(module, sites.unembed)
            self.unembed_weight = unembed.weight.detach()
            self.unembed_bias = getattr(unembed, "bias", None)
            self.logits = captured["logits"]  # the model's own, to check the replay

    @staticmethod
    def _encode(frozen: _Layer, tc: Any, x: Tensor) -> None:
        """The transcoder's latents and error term on the replayed MLP input (its own encode/decode)."""
        tc = copy.deepcopy(tc).to("cpu", torch.float64).eval().requires_grad_(False)
        with torch.no_grad():
            frozen.pre = tc.pre_activations(x)
            frozen.latents = tc.activate(frozen.pre)
            frozen.error = frozen.mlp_out - tc.decode(frozen.latents, x)
            if tc.config.kind == "skip":
                frozen.skip = x * tc.config.input_scale @ tc.W_skip.T / tc.config.output_scale
        frozen.tc = tc

    # -- targets and nodes as readers -------------------------------------------------------------------

    def latent_reader(self, layer: int, latent: int, position: int) -> tuple[_Reader, float]:
        """The reader of a latent's pre-activation, and its constant part (b_enc + the norm bias's term)."""
        frozen = self.layers[layer]
        tc = frozen.tc
        w_enc = tc.W_enc[latent].detach() * tc.config.input_scale
        reader = _Reader(1 / float(frozen.mlp_norm.scale[position]), frozen.mlp_norm.pullback(w_enc),
                         frozen.mlp_stage, position)
        return reader, float(tc.b_enc[latent] + w_enc @ frozen.mlp_norm.bias)

    def logit_direction(self, plus: list[int], minus: list[int]) -> tuple[Tensor, float]:
        """The unembedding direction of mean(logits[plus]) − mean(logits[minus]), and its bias."""
        rows = self.unembed_weight
        direction = _float64(rows[plus]).mean(0) - (_float64(rows[minus]).mean(0) if minus else 0)
        bias = 0.0
        if self.unembed_bias is not None:
            b = self.unembed_bias
            bias = float(_float64(b[plus]).mean() - (_float64(b[minus]).mean() if minus else 0))
        return direction, bias

    def logit_reader(self, direction: Tensor, position: int) -> tuple[_Reader, float]:
        norm = self.final_norm
        reader = _Reader(1 / float(norm.scale[position]), norm.pullback(direction), 2 * self.n_layers, position)
        return reader, float(direction @ norm.bias)

    def head_reader(self, consumer: _Reader, layer: int, head: int, source: int) -> _Reader:
        """What head ``head`` of ``layer`` reads at ``source`` on behalf of ``consumer``."""
        frozen = self.layers[layer]
        o = frozen.ov.W_O[head] @ consumer.w
        sigma = consumer.sigma * float(frozen.pattern[head, consumer.position, source])
        return _Reader(sigma / float(frozen.attn_norm.scale[source]),
                       frozen.attn_norm.pullback(frozen.ov.W_V[head].T @ o), 2 * layer, source)

    def skip_reader(self, consumer: _Reader, layer: int) -> tuple[_Reader, float]:
        """What a skip path reads at the consumer's position, and the part its norm's bias adds."""
        frozen = self.layers[layer]
        c = frozen.tc.config
        w = frozen.tc.W_skip.detach().T @ consumer.w * (c.input_scale / c.output_scale)
        p = consumer.position
        return (_Reader(consumer.sigma / float(frozen.mlp_norm.scale[p]), frozen.mlp_norm.pullback(w),
                        frozen.mlp_stage, p), consumer.sigma * float(w @ frozen.mlp_norm.bias))

    def check_logits(self, position: int) -> None:
        """Check the replay against the model's logits at ``position`` (in the model's precision)."""
        normed = self.final_norm(self.resid[2 * self.n_layers])[position]
        weight = self.unembed_weight
        logits = (weight @ normed.to(weight.device, weight.dtype)).cpu().double()
        if self.unembed_bias is not None:
            logits = logits + _float64(self.unembed_bias)
        _check_replay(self.lm, logits, self.logits[position], f"the logits at position {position}")

    def read(self, reader: _Reader) -> float:
        """The reader's value on the replayed residual stream."""
        return reader.sigma * float(reader.w @ self.resid[reader.stage][reader.position])

    # -- decomposition ---------------------------------------------------------------------------------

    def decompose(self, reader: _Reader) -> list[_Segment]:
        """Every direct contribution to ``reader``'s value, grouped in segments; they sum to it."""
        sigma, w, stage, p = reader.sigma, reader.w, reader.stage, reader.position
        segments = []

        def leaf(kind: str, vectors: Tensor, describe: Any) -> None:
            invariant = vectors @ w
            segments.append(_Segment(kind, invariant * sigma, invariant,
                                     torch.full_like(invariant, sigma), describe))

        leaf("embedding", self.token_embedding[p][None], lambda i: {"kind": "embedding", "position": p})
        if self.position_embedding is not None:
            leaf("position", self.position_embedding[p][None], lambda i: {"kind": "position", "position": p})
        for layer, frozen in enumerate(self.layers):
            if 2 * layer < stage:
                o = frozen.ov.W_O @ w  # [heads, d_head]
                invariant = (o[:, None] @ frozen.values[:, :, :p + 1])[:, 0]  # [heads, sources]
                dependent = sigma * frozen.pattern[:, p, :p + 1]
                segments.append(_Segment(
                    "head", (invariant * dependent).flatten(), invariant.flatten(), dependent.flatten(),
                    lambda i, layer=layer: {"kind": "head", "layer": layer, "head": i // (p + 1),
                                            "source_position": i % (p + 1), "position": p}))
                bias = float(frozen.ov.b_O @ w + (frozen.pattern[:, p].sum(-1) * (o * frozen.value_bias).sum(-1)).sum())
                segments.append(_Segment("bias", torch.tensor([bias * sigma]), torch.tensor([bias]),
                                         torch.tensor([sigma]), lambda i, layer=layer: {
                                             "kind": "bias", "layer": layer, "position": p, "name": "attention"}))
            if 2 * layer + 1 < stage:
                self._mlp_segments(segments, leaf, layer, frozen, sigma, w, p)
        return segments

    def _mlp_segments(self, segments: list[_Segment], leaf: Any, layer: int, frozen: _Layer, sigma: float,
                      w: Tensor, p: int) -> None:
        if frozen.tc is None:
            leaf("mlp", frozen.mlp_out[p][None], lambda i: {"kind": "mlp", "layer": layer, "position": p})
            return
        tc = frozen.tc
        active = torch.nonzero(frozen.latents[p]).flatten()
        invariant = tc.W_dec.detach()[active] @ w / tc.config.output_scale
        dependent = sigma * frozen.latents[p, active]
        segments.append(_Segment("latent", invariant * dependent, invariant, dependent,
                                 lambda i: {"kind": "latent", "layer": layer, "latent": int(active[i]),
                                            "position": p}))
        leaf("error", frozen.error[p][None], lambda i: {"kind": "error", "layer": layer, "position": p})
        leaf("bias", (tc.b_dec.detach() / tc.config.output_scale)[None],
             lambda i: {"kind": "bias", "layer": layer, "position": p, "name": "decoder"})
        if frozen.skip is not None:
            leaf("skip", frozen.skip[p][None], lambda i: {"kind": "skip", "layer": layer, "position": p})


def _capture(lm: Any, tokens: Tensor, last_layer: int, final: bool) -> dict[str, Any]:
    """One forward pass with eager attention: embeddings, the first block's input, each layer's
    attention pattern and MLP input/output up to ``last_layer``, and the logits if ``final``."""
    module, sites = lm._module, lm.sites
    before = module.config._attn_implementation
    if before != "eager":
        module.set_attn_implementation("eager")
    saved: dict[str, Any] = {"patterns": [], "mlp_in": [], "mlp_out": []}  # filled inside the trace
    try:
        with torch.no_grad(), lm.trace(tokens[None].to(lm.device), remote=False) as tracer:
            saved["embed"] = resolve(lm, sites.embed).output.save()
            saved["resid"] = resolve(lm, sites.block(0)).input.save()
            for layer in range(last_layer + 1):
                saved["patterns"].append(resolve(lm, f"{sites.block(layer)}.{sites.attention}").output[1].save())
                mlp = lm.mlp(layer)
                saved["mlp_in"].append(mlp.input.save())
                saved["mlp_out"].append(mlp.output.save())
            if final:
                saved["logits"] = lm.output.logits.save()
            else:
                tracer.stop()
    finally:
        if before != "eager":
            module.set_attn_implementation(before)
    return {key: [_float64(t[0]) for t in value] if isinstance(value, list) else _float64(value[0])
            for key, value in saved.items()}


def _check_replay(lm: Any, replayed: Tensor, actual: Tensor, what: str) -> None:
    error = float((replayed - actual).norm() / actual.norm().clamp_min(1e-12))
    if not error < REPLAY_TOLERANCE:
        raise CircuitError(
            f"The frozen replay of {lm.name} does not reproduce {what} (relative error {error:.2g}): its "
            f"{lm.config.model_type!r} blocks compute something circuits.py does not model (e.g. extra "
            "norms or scalings), so attributions would be wrong.")


# -- the graph -------------------------------------------------------------------------------------------


@dataclass
class Node:
    """A node of a `CircuitGraph`.

    ``value``: a latent's pre-activation, a head's or skip path's contribution to its consumer,
    the target's value; ``activation``: a latent's activation. ``attribution``: the node's total
    effect on the target along the graph's edges (``value`` for the target).
    """

    node_id: str
    kind: str
    layer: int
    ctx_idx: int
    feature: int | None = None
    head: int | None = None
    source_ctx_idx: int | None = None
    name: str | None = None
    value: float | None = None
    activation: float | None = None
    attribution: float = 0.0
    expanded: bool = False
    label: str = ""

    @property
    def expandable(self) -> bool:
        return self.kind in EXPANDABLE


@dataclass
class Edge:
    """``source``'s direct contribution ``weight = invariant × dependent`` to ``target``'s value."""

    source: str
    target: str
    weight: float
    invariant: float
    dependent: float


@dataclass
class _Search:
    """Path-search settings; ``scale`` is the target's total absolute direct contribution."""

    depth: int
    top_k: int | None
    threshold: float
    scale: float = 1.0


@dataclass
class CircuitGraph:
    """An attribution graph: nodes (latents, heads, embeddings, errors, biases, …) at (layer,
    position) and edges carrying direct contributions. Built by `attribute`.

    ``expand(node_id)`` adds a node's largest predecessors (needs the run it was built from, kept
    in memory; a graph read back with `from_json` cannot expand). ``to_json`` and
    ``to_circuit_tracer_json`` export it.
    """

    model: str
    prompt: str
    tokens: list[int]
    token_strings: list[str]
    n_layers: int
    target: dict[str, Any]
    target_id: str
    nodes: dict[str, Node] = field(default_factory=dict)
    edges: dict[tuple[str, str], Edge] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    _run: FrozenRun | None = field(default=None, repr=False)
    _readers: dict[str, tuple[_Reader, float]] = field(default_factory=dict, repr=False)

    # -- reading ---------------------------------------------------------------------------------------

    @property
    def target_value(self) -> float:
        return self.nodes[self.target_id].value

    def n_latents(self, layer: int) -> int | None:
        """The width of the graph's layer-``layer`` transcoder (``None`` if unknown or none)."""
        if self._run is None or layer >= len(self._run.layers) or self._run.layers[layer].tc is None:
            return None
        return self._run.layers[layer].tc.n_latents

    def predecessors(self, node_id: str) -> list[Edge]:
        """The graph's edges into ``node_id``, largest first."""
        return sorted((e for e in self.edges.values() if e.target == node_id), key=lambda e: -abs(e.weight))

    def contributions(self, node_id: str) -> list[Contribution]:
        """Every direct contribution to ``node_id`` (not only those kept in the graph), largest first.

        They sum to the node's ``value``: a latent's pre-activation, the target's value, a head's
        or skip path's contribution.
        """
        reader, constant = self._reader(node_id)
        found = [Contribution(s.describe(i), float(s.weight[i]), float(s.invariant[i]), float(s.dependent[i]))
                 for s in self._run.decompose(reader) for i in range(len(s.weight))]
        found += self._constants(node_id, constant)
        return sorted(found, key=lambda c: -abs(c.weight))

    def paths(self, limit: int = 10) -> list[tuple[float, list[str]]]:
        """The ``limit`` paths into the target with the largest attributions, as
        ``(attribution, [node ids from source to target])``. A path's attribution is its first
        edge's weight times the gain of each later edge (a latent passes on ``weight / value``
        of its own value; heads and skip paths pass theirs on whole)."""
        found: list[tuple[float, list[str]]] = []
        incoming: dict[str, list[Edge]] = {}
        for edge in self.edges.values():
            incoming.setdefault(edge.target, []).append(edge)

        def walk(node_id: str, gain: float, path: list[str]) -> None:
            for edge in incoming.get(node_id, []):
                found.append((edge.weight * gain, [edge.source, *path]))
                walk(edge.source, gain * self._gain(edge), [edge.source, *path])

        walk(self.target_id, 1.0, [self.target_id])
        return sorted(found, key=lambda item: -abs(item[0]))[:limit]

    def logit_effects(self, node_id: str, k: int = 5) -> dict[str, list[tuple[int, float]]]:
        """The ``k`` tokens a latent most promotes and most suppresses directly: its decoder row (model
        units) times the final norm's weight, through the unembedding (later layers and the final
        norm's scale ignored), as ``{"promoted": [(token id, value)], "suppressed": [...]}``."""
        node = self.nodes.get(node_id)
        if node is None or node.kind != "latent":
            raise CircuitError(f"{node_id!r} is not a latent of this graph: only latents have logit effects.")
        if self._run is None:
            raise CircuitError("This graph was read back from JSON: it has no model to compute logit effects with.")
        lm = self._run.lm
        tc = self._run.layers[node.layer].tc
        direction = tc.W_dec[node.feature] / tc.config.output_scale
        direction = direction * _float64(resolve(lm._module, lm.sites.final_norm).weight)
        unembed = resolve(lm._module, lm.sites.unembed).weight.detach()
        scores = (unembed @ direction.to(unembed.device, unembed.dtype)).cpu()
        top, bottom = scores.topk(k), scores.topk(k, largest=False)
        return {"promoted": list(zip(top.indices.tolist(), top.values.tolist())),
                "suppressed": list(zip(bottom.indices.tolist(), bottom.values.tolist()))}

    # -- growing ---------------------------------------------------------------------------------------

    def expand(self, node_id: str, *, top_k: int | None = None, threshold: float | None = None,
               depth: int = 1) -> list[str]:
        """Add the largest direct contributions to ``node_id`` (and recursively to theirs, ``depth``
        levels), keeping per node the ``top_k`` whose path attribution is at least ``threshold`` ×
        the target's total absolute direct contribution (defaults: the `attribute` settings).
        Returns the ids of the nodes added."""
        if node_id not in self.nodes:
            raise KeyError(f"No node {node_id!r} in this graph.")
        if not self.nodes[node_id].expandable:
            raise CircuitError(f"{node_id} is a {self.nodes[node_id].kind} node: it has no predecessors to expand.")
        search = _Search(depth, self.settings["top_k"] if top_k is None else top_k,
                         self.settings["threshold"] if threshold is None else threshold, self.settings["scale"])
        before = set(self.nodes)
        self._grow([node_id], search)
        return [n for n in self.nodes if n not in before]

    def _grow(self, frontier: list[str], search: _Search) -> None:
        """Breadth-first expansion, ``search.depth`` levels from ``frontier``."""
        for _ in range(search.depth):
            multipliers = self._multipliers()
            following = []
            for node_id in dict.fromkeys(frontier):
                following += self._expand_one(node_id, multipliers.get(node_id, 0.0), search)
            self._update_attributions()
            frontier = [n for n in following if not self.nodes[n].expanded]
            if not frontier:
                break

    def _expand_one(self, node_id: str, multiplier: float, search: _Search) -> list[str]:
        node = self.nodes[node_id]
        reader, constant = self._reader(node_id)
        node.expanded = True
        candidates = []  # (|attribution|, segment, index)
        for segment in self._run.decompose(reader):
            weights = segment.weight.abs() * abs(multiplier)
            keep = torch.nonzero(weights >= search.threshold * search.scale).flatten()
            if search.top_k is not None and len(keep) > search.top_k:
                keep = keep[weights[keep].topk(search.top_k).indices]
            candidates += [(float(weights[i]), segment, int(i)) for i in keep]
        candidates.sort(key=lambda c: -c[0])
        if search.top_k is not None:
            candidates = candidates[:search.top_k]
        added = []
        for _, segment, i in candidates:
            source = self._add_node(segment.describe(i), consumer=(node_id, reader))
            self.edges[(source, node_id)] = Edge(source, node_id, float(segment.weight[i]),
                                                 float(segment.invariant[i]), float(segment.dependent[i]))
            added.append(source)
        for contribution in self._constants(node_id, constant):
            if abs(contribution.weight * multiplier) >= search.threshold * search.scale:
                source = self._add_node(contribution.source)
                self.edges[(source, node_id)] = Edge(source, node_id, contribution.weight,
                                                     contribution.invariant, contribution.dependent)
        return [a for a in added if self.nodes[a].expandable]

    def _constants(self, node_id: str, constant: float) -> list[Contribution]:
        """A node's own constant input (a latent's encoder and norm biases, the final norm's and
        unembedding's biases for a logit, a skip path's norm bias) as one bias contribution."""
        if constant == 0.0:
            return []
        node = self.nodes[node_id]
        name = {"latent": "encoder", "logit": "unembedding", "skip": "skip"}[node.kind]
        return [Contribution({"kind": "bias", "layer": node.layer, "position": node.ctx_idx, "name": name},
                             constant, constant, 1.0)]

    def _reader(self, node_id: str) -> tuple[_Reader, float]:
        if self._run is None:
            raise CircuitError("This graph was read back from JSON: it has no forward pass to expand or "
                               "decompose nodes with. Run tcw.attribute again.")
        if node_id not in self._readers:
            node = self.nodes.get(node_id)
            if node is None:
                raise KeyError(f"No node {node_id!r} in this graph.")
            if node.kind != "latent":
                raise CircuitError(f"{node_id} is a {node.kind} node: it has no predecessors.")
            self._readers[node_id] = self._run.latent_reader(node.layer, node.feature, node.ctx_idx)
        return self._readers[node_id]

    def _add_node(self, source: dict[str, Any], consumer: tuple[str, _Reader] | None = None) -> str:
        """The id of the node described by ``source`` (created if new). Heads and skip paths are
        per consumer: their reader is built from the consumer's."""
        kind, layer, p = source["kind"], source.get("layer", -1), source["position"]
        run = self._run
        if kind == "head":
            q = source["source_position"]
            node_id = f"head/{layer}.{source['head']}/{q}>{p}/{consumer[0]}"
        elif kind == "skip":
            node_id = f"skip/{layer}/{p}/{consumer[0]}"
        elif kind == "latent":
            node_id = f"latent/{layer}/{source['latent']}/{p}"
        elif kind == "bias":
            node_id = f"bias/{source['name']}/{layer}/{p}"
        else:
            node_id = f"{kind}/{layer}/{p}" if kind in ("error", "mlp") else f"{kind}/{p}"
        if node_id in self.nodes:
            return node_id
        node = Node(node_id, kind, layer, p, feature=source.get("latent"), head=source.get("head"),
                    source_ctx_idx=source.get("source_position"), name=source.get("name"))
        if kind == "latent":
            frozen = run.layers[layer]
            node.value = float(frozen.pre[p, node.feature])
            node.activation = float(frozen.latents[p, node.feature])
        elif kind == "head":
            self._readers[node_id] = (run.head_reader(consumer[1], layer, node.head, node.source_ctx_idx), 0.0)
        elif kind == "skip":
            self._readers[node_id] = run.skip_reader(consumer[1], layer)
        node.label = _label(node, self.token_strings)
        self.nodes[node_id] = node
        if kind in ("head", "skip"):
            reader, constant = self._readers[node_id]
            node.value = run.read(reader) + constant
        return node_id

    # -- attributions -------------------------------------------------------------------------------------

    def _gain(self, edge: Edge) -> float:
        """How much of the source's own value an edge passes on (1 for heads and skip paths)."""
        source = self.nodes[edge.source]
        if source.kind in ("head", "skip") or not source.value:
            return 1.0
        return edge.weight / source.value

    def _multipliers(self) -> dict[str, float]:
        """∂target/∂value of each node along the graph's edges (1 for the target)."""
        outgoing: dict[str, list[Edge]] = {}
        for edge in self.edges.values():
            outgoing.setdefault(edge.source, []).append(edge)
        memo = {self.target_id: 1.0}

        def multiplier(node_id: str) -> float:
            if node_id not in memo:
                memo[node_id] = sum(self._gain(e) * multiplier(e.target) for e in outgoing.get(node_id, []))
            return memo[node_id]

        for node_id in self.nodes:
            multiplier(node_id)
        return memo

    def _update_attributions(self) -> None:
        multipliers = self._multipliers()
        totals = dict.fromkeys(self.nodes, 0.0)
        for edge in self.edges.values():
            totals[edge.source] += edge.weight * multipliers[edge.target]
        totals[self.target_id] = self.nodes[self.target_id].value
        for node_id, total in totals.items():
            self.nodes[node_id].attribution = total

    # -- export --------------------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """The whole graph as JSON-ready data: metadata, ``nodes`` and ``links`` (circuit-tracer's
        key names where they exist, plus each link's ``invariant`` and ``dependent`` factors)."""
        nodes = []
        for node in self.nodes.values():
            data = asdict(node)
            data["expandable"] = node.expandable
            nodes.append(data)
        return {"format": FORMAT, "version": VERSION, "model": self.model, "prompt": self.prompt,
                "tokens": self.tokens, "token_strings": self.token_strings, "n_layers": self.n_layers,
                "target": self.target, "target_id": self.target_id, "settings": self.settings,
                "nodes": nodes, "links": [asdict(e) for e in self.edges.values()]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CircuitGraph:
        """A graph from `to_json` data (it can be drawn and exported, not expanded)."""
        if data.get("format") != FORMAT:
            raise CircuitError(f"Not a tcwidgets circuit graph (format {data.get('format')!r}, expected {FORMAT!r}).")
        if data.get("version", 0) > VERSION:
            raise CircuitError(f"This graph was written by a newer tcwidgets (version {data['version']}); upgrade.")
        graph = cls(data["model"], data["prompt"], list(data["tokens"]), list(data["token_strings"]),
                    data["n_layers"], dict(data["target"]), data["target_id"], settings=dict(data["settings"]))
        for item in data["nodes"]:
            node = Node(**{k: v for k, v in item.items() if k != "expandable"})
            graph.nodes[node.node_id] = node
        for item in data["links"]:
            graph.edges[(item["source"], item["target"])] = Edge(**item)
        return graph

    def to_circuit_tracer_json(self, slug: str = "tcwidgets-graph") -> dict[str, Any]:
        """The attribution-graph JSON that circuit-tracer's frontend and Neuronpedia read.

        Its schema has no attention or skip nodes: with frozen attention those are linear, so
        expanded ones are folded into direct edges between their predecessors and their consumer
        (as in circuit-tracer's own graphs); unexpanded ones, biases and position embeddings are
        left out. Latents become ``"cross layer transcoder"`` nodes, errors and MLPs without a
        transcoder ``"mlp reconstruction error"``, the target latent or logit is marked.
        """
        ids, nodes = {}, []
        for node in self.nodes.values():
            converted = self._circuit_tracer_node(node)
            if converted is not None:
                ids[node.node_id] = converted["node_id"]
                nodes.append(converted)
        consumer = {e.source: e.target for e in self.edges.values() if self.nodes[e.source].kind in ("head", "skip")}
        links: dict[tuple[str, str], float] = {}
        for edge in self.edges.values():
            if edge.source not in ids:
                continue
            target = edge.target
            while target in consumer:  # a head or skip path passes its inputs on whole
                target = consumer[target]
            if target in ids:
                key = (ids[edge.source], ids[target])
                links[key] = links.get(key, 0.0) + edge.weight
        return {
            "metadata": {"slug": slug, "scan": self.model, "transcoder_list": [],
                         "prompt_tokens": self.token_strings, "prompt": self.prompt,
                         "node_threshold": self.settings.get("threshold"), "schema_version": 1},
            "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
            "nodes": nodes,
            "links": [{"source": s, "target": t, "weight": w} for (s, t), w in links.items()],
        }

    def _circuit_tracer_node(self, node: Node) -> dict[str, Any] | None:
        common = {"ctx_idx": node.ctx_idx, "influence": node.attribution, "clerp": node.label,
                  "token_prob": 0.0, "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0}
        if node.kind == "latent":
            node_id = f"{node.layer}_{node.feature}_{node.ctx_idx}"
            return {**common, "node_id": node_id, "jsNodeId": node_id, "feature": node.feature,
                    "layer": str(node.layer), "feature_type": "cross layer transcoder",
                    "activation": node.activation, "is_target_logit": node.node_id == self.target_id}
        if node.kind in ("error", "mlp"):
            return {**common, "node_id": f"{node.layer}_-1_{node.ctx_idx}", "jsNodeId": f"{node.layer}_-1-{node.ctx_idx}",
                    "feature": -1, "layer": str(node.layer), "feature_type": "mlp reconstruction error",
                    "activation": None}
        if node.kind == "embedding":
            token = self.tokens[node.ctx_idx]
            return {**common, "node_id": f"E_{token}_{node.ctx_idx}", "jsNodeId": f"E_{token}-{node.ctx_idx}",
                    "feature": node.ctx_idx, "layer": "E", "feature_type": "embedding", "activation": None}
        if node.kind == "logit":
            token = self.target["token"][0]
            layer = str(self.n_layers + 1)
            return {**common, "node_id": f"{layer}_{token}_{node.ctx_idx}", "jsNodeId": f"L_{token}-{node.ctx_idx}",
                    "feature": token, "layer": layer, "feature_type": "logit", "is_target_logit": True,
                    "activation": None}
        return None


def _label(node: Node, tokens: list[str]) -> str:
    token = tokens[node.ctx_idx] if 0 <= node.ctx_idx < len(tokens) else ""
    return {
        "latent": lambda: f"L{node.layer}/{node.feature}",
        "head": lambda: f"L{node.layer}.H{node.head} {node.source_ctx_idx}→{node.ctx_idx}",
        "skip": lambda: f"skip L{node.layer}",
        "embedding": lambda: f"token {token!r}",
        "position": lambda: f"position {node.ctx_idx}",
        "error": lambda: f"error L{node.layer}",
        "mlp": lambda: f"MLP L{node.layer}",
        "bias": lambda: f"{node.name} bias" + ("" if node.name == "unembedding" else f" L{node.layer}"),
        "logit": lambda: "logit",
    }[node.kind]()


# -- the entry point ----------------------------------------------------------------------------------------


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
              target: Target, *, depth: int = 3, top_k: int | None = 5, threshold: float = 0.01) -> CircuitGraph:
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
            the target's total absolute direct contribution.

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
        run = FrozenRun(lm, transcoders, tokens, target.layer, final=False)
        target_info = {"type": "latent", "layer": target.layer, "latent": target.latent, "position": position}
    elif isinstance(target, LogitTarget):
        plus, minus = _token_ids(lm, target.token, "token"), _token_ids(lm, target.minus, "minus")
        run = FrozenRun(lm, transcoders, tokens, lm.n_layers - 1, final=True)
        target_info = {"type": "logit", "token": plus, "minus": minus, "position": position}
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
    total = sum(abs(c.weight) for c in graph.contributions(graph.target_id))
    graph.settings = {"depth": depth, "top_k": top_k, "threshold": threshold, "scale": total or 1.0}
    graph.nodes[graph.target_id].attribution = graph.target_value
    if depth:
        graph._grow([graph.target_id], _Search(depth, top_k, threshold, total or 1.0))
    return graph


def _logit_label(lm: Any, plus: list[int], minus: list[int]) -> str:
    def names(ids: list[int]) -> str:
        shown = [repr(lm.tokenizer.decode([i])) for i in ids]
        return shown[0] if len(shown) == 1 else f"mean({', '.join(shown)})"

    return f"logit {names(plus)}" + (f" − {names(minus)}" if minus else "")
