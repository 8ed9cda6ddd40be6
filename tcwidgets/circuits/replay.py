"""The frozen forward pass: attention patterns and norm scales fixed at their values on a prompt,
the residual stream replayed in float64 from the model's own weights, and the exact decomposition
of any linear read of it into its writers' contributions.

One nnsight forward pass (eager attention, so the patterns are returned) records the patterns and
the MLP inputs and outputs; the replay is checked against the model at every MLP input (and at the
logits), so an architecture this module does not understand fails loudly instead of giving wrong
numbers. ``stage`` numbers where the residual stream is read: attention of layer l reads stage 2l,
its MLP 2l + 1 (2l with GPT-NeoX's parallel residual), the final norm 2 × n_layers; a writer is seen
by every later stage.
"""

from __future__ import annotations

import copy
import hashlib
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..corpus import bos_id
from ..crosslayer import LayerView
from ..progress import delayed_bar
from ..models import RUN_LOCK
from ..models import resolve
from ..splicing import writes_after_norm

REPLAY_TOLERANCE = 1e-3  # relative error allowed between the float64 replay and the model's float32 pass


class CircuitError(ValueError):
    """Attribution cannot run as asked (bad target, transcoders or architecture)."""


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
        # Gemma's RMSNorms scale by (1 + weight)
        self.weight = _float64(module.weight) + (1.0 if name.startswith("Gemma") else 0.0)
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

    def gains(self) -> Tensor:
        """``[positions, d_model]``: a post-norm (Gemma's, no centering, no bias) as per-position factors."""
        return self.weight / self.scale[:, None]


@dataclass
class _OV:
    """One attention layer's value and output weights per head (float64, GQA expanded)."""

    W_V: Tensor  # [heads, d_head, d_model]: head h's values are W_V[h] @ x + b_V[h]
    b_V: Tensor  # [heads, d_head]
    W_O: Tensor  # [heads, d_head, d_model]: head h writes its mixed values v as v @ W_O[h]
    b_O: Tensor  # [d_model]
    groups: int = 1  # heads sharing one key/value head (grouped-query attention): W_V repeats in runs of this


def _float64(tensor: Tensor) -> Tensor:
    return tensor.detach().to("cpu", torch.float64)


#: module -> (the digest of what its float64 copy was made from, a weak reference to that copy)
_COPIES: weakref.WeakKeyDictionary[torch.nn.Module, tuple[str, weakref.ref]] = weakref.WeakKeyDictionary()


def _digest(module: torch.nn.Module) -> str:
    """A SHA-256 of a module's parameters, buffers and config (0.3 s for 30 of the default model's
    circuit transcoders): any edit, in place or not, changes it."""
    digest = hashlib.sha256(repr(getattr(module, "config", None)).encode())
    for tensor in (*module.parameters(), *module.buffers()):
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def shared_copy(module: torch.nn.Module, make: Callable[[], Any]) -> Any:
    """``make()``, a frozen copy of what ``module`` holds, shared by every frozen run alive that
    needs it while ``module`` is unchanged (its `_digest`): a graph keeps the weights it was built
    from when they are edited later, and two graphs of one model and its transcoders hold one copy
    (0.5 GB for the default model's 30 circuit transcoders and attention weights), freed with the
    last run that uses it."""
    state = _digest(module)
    held = _COPIES.get(module)
    found = held[1]() if held is not None and held[0] == state else None
    if found is None:
        found = make()
        _COPIES[module] = (state, weakref.ref(found))
    return found


def _frozen_copy(tc: torch.nn.Module, dtype: torch.dtype | None = None) -> Any:
    """A copy of ``tc`` on the CPU, in ``dtype`` (``None``: its own precision), shared while unchanged."""
    return shared_copy(tc, lambda: copy.deepcopy(tc).to("cpu", dtype).eval().requires_grad_(False))


#: frozen copy -> its skip path's map in float64 (`skip_map`), made once per copy
_SKIP_MAPS: weakref.WeakKeyDictionary[torch.nn.Module, Tensor] = weakref.WeakKeyDictionary()


def skip_map(tc: torch.nn.Module) -> Tensor:
    """A frozen skip transcoder's ``W_skip × input_scale / output_scale`` in float64 (the skip path
    from model units to model units), made once per copy: the search and the full graph read it
    for every skip node and layer."""
    if tc not in _SKIP_MAPS:
        _SKIP_MAPS[tc] = _float64(tc.W_skip) * (tc.config.input_scale / tc.config.output_scale)
    return _SKIP_MAPS[tc]


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
               _param(attn.o_proj, "bias", d), groups)


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
                "gemma2": _ov_llama, "gemma3_text": _ov_llama, "gpt2": _ov_gpt2, "gpt_neox": _ov_neox}

#: ``config.model_type`` -> the block's norm applied to the attention output (Gemma's post-norms).
POST_ATTENTION_NORM = {"gemma2": "post_attention_layernorm", "gemma3_text": "post_attention_layernorm"}

#: Families whose first block reads the token embedding scaled by sqrt(d_model) (no position embedding).
SCALED_EMBEDDING = ("gemma2", "gemma3_text")


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
    mlp_out: Tensor  # [positions, d_model], what the layer's transcoder reconstructs: the MLP module's output
    # (before a post-norm), or the post-norm's output for a transcoder that writes after it (`writes_after_norm`)
    attn_gain: Tensor | None = None  # [positions, d_model]: frozen post-attention norm (Gemma), else None
    mlp_gain: Tensor | None = None  # [positions, d_model]: frozen post-MLP norm (Gemma), else None
    tc: Any = None  # the layer's transcoder: a frozen copy (`_frozen_copy`), read in float64
    pre: Tensor | None = None  # [positions, n_latents] encoder pre-activations
    latents: Tensor | None = None  # [positions, n_latents] activations
    error: Tensor | None = None  # [positions, d_model] MLP output − transcoder output
    skip: Tensor | None = None  # [positions, d_model] skip path's output (skip transcoders)
    #: the latents writing into this MLP's output: (their layer, decoder rows [n_latents, d_model], the
    #: output scale that divides them into model units); the layer's own for a transcoder, every layer up
    #: to it for a cross-layer transcoder
    writes: list[tuple[int, Tensor, float]] | None = None


class _Segment:
    """A batch of contributions (``weight = invariant × dependent``, tensors), each described on demand
    by ``describe(index)`` -> the source node's description."""

    def __init__(self, weight: Tensor, invariant: Tensor, dependent: Tensor, describe: Any) -> None:
        self.weight, self.invariant, self.dependent, self.describe = weight, invariant, dependent, describe


class FrozenRun:
    """A prompt's forward pass with attention patterns and norm scales frozen, replayed in float64.

    Built by `attribute`; `CircuitGraph` keeps it to expand nodes later. ``stage`` numbers where
    the residual stream is read: attention of layer l reads stage 2l, its MLP 2l + 1 (2l with
    GPT-NeoX's parallel residual), the final norm 2 × n_layers; a writer is seen by later stages.

    ``folded``: positions whose MLP outputs are constants of the graph (biases), not latents and
    errors: with ``fold_bos``, a first token that is BOS, as circuit-tracer treats it. BOS is the
    same in every prompt, and its MLP outputs are the model's largest (massive activations: in
    SmolLM2-135M layer 11 writes a vector of norm ~25,000 there, ~30 elsewhere), so counting them
    as errors would measure how well a transcoder fits BOS, not the prompt.
    """

    def __init__(self, lm: Any, transcoders: Mapping[int, Any], tokens: Tensor, last_layer: int,
                 final: bool, fold_bos: bool = True) -> None:
        model_type = lm.config.model_type
        if model_type not in ATTENTION_OV:
            raise CircuitError(
                f"circuits does not support {model_type!r} models yet (supported: "
                f"{', '.join(sorted(ATTENTION_OV))}): it needs to know how to read their attention "
                "weights; add an entry to tcwidgets.circuits.ATTENTION_OV.")
        self.lm, self.tokens = lm, tokens
        self.n_layers, self.final = lm.n_layers, final
        bos = bos_id(lm.tokenizer)
        self.folded: tuple[int, ...] = (0,) if fold_bos and bos is not None and int(tokens[0]) == bos else ()
        parallel = bool(getattr(lm.config, "use_parallel_residual", False))
        module, sites = lm._module, lm.sites
        captured = _capture(lm, tokens, last_layer, final)

        self.token_embedding = captured["resid"] if model_type in SCALED_EMBEDDING else captured["embed"]
        remainder = captured["resid"] - self.token_embedding
        self.position_embedding = remainder if remainder.abs().max() > 0 else None
        resid = captured["resid"] if self.position_embedding is not None else self.token_embedding
        self.resid: dict[int, Tensor] = {}
        self.layers: list[_Layer] = []
        n = len(tokens)
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        for layer in delayed_bar(range(last_layer + 1), desc="freezing the forward pass", unit="layer"):
            block = resolve(module, sites.block(layer))
            self.resid[2 * layer] = resid
            attn_norm = _FrozenNorm(resolve(block, sites.pre_attention_norm), resid)
            attention = resolve(block, sites.attention)
            ov = shared_copy(attention, lambda: ATTENTION_OV[model_type](attention, lm.config))
            pattern = captured["patterns"][layer] * causal
            values = ov.W_V @ attn_norm.linear(resid).T  # [heads, d_head, positions]
            value_bias = ov.b_V + ov.W_V @ attn_norm.bias
            mixed = pattern @ (values.transpose(1, 2) + value_bias[:, None])  # [heads, positions, d_head]
            attn_out = mixed.transpose(0, 1).flatten(1) @ ov.W_O.flatten(0, 1) + ov.b_O
            attn_gain = None
            if model_type in POST_ATTENTION_NORM:
                attn_gain = _FrozenNorm(resolve(block, POST_ATTENTION_NORM[model_type]), attn_out).gains()
                attn_out = attn_out * attn_gain
            mlp_stage = 2 * layer if parallel else 2 * layer + 1
            mlp_resid = resid if parallel else resid + attn_out
            self.resid[mlp_stage] = mlp_resid
            mlp_norm = _FrozenNorm(resolve(block, sites.pre_mlp_norm), mlp_resid)
            x = mlp_norm(mlp_resid)
            _check_replay(lm, x, captured["mlp_in"][layer], f"the MLP input of layer {layer}")
            mlp_out = captured["mlp_out"][layer]
            mlp_gain = None if sites.post_mlp_norm is None else \
                _FrozenNorm(resolve(block, sites.post_mlp_norm), mlp_out).gains()
            if layer in transcoders and writes_after_norm(lm, transcoders[layer]):  # it replaces the norm's output
                mlp_out, mlp_gain = mlp_out * mlp_gain, None
            frozen = _Layer(pattern, attn_norm, ov, values, value_bias, mlp_norm, mlp_stage, mlp_out,
                            attn_gain, mlp_gain)
            if layer in transcoders:
                self._encode(frozen, layer, transcoders[layer], x)
            self.layers.append(frozen)
            resid = resid + attn_out + (mlp_out if mlp_gain is None else mlp_out * mlp_gain)
        if final:
            self.resid[2 * self.n_layers] = resid
            self.final_norm = _FrozenNorm(resolve(module, sites.final_norm), resid)
            unembed = resolve(module, sites.unembed)
            self.unembed_weight = unembed.weight.detach()
            self.unembed_bias = getattr(unembed, "bias", None)
            self.logits = captured["logits"]  # the model's own, to check the replay
            self.softcap = getattr(lm.config, "final_logit_softcapping", None)  # Gemma: cap · tanh(logit / cap)

    def _encode(self, frozen: _Layer, layer: int, tc: Any, x: Tensor) -> None:
        """The transcoder's latents and error term on the replayed MLP input (its own encode/decode, in
        float64); a cross-layer transcoder's layer sums the writes of the latents of every layer up to it.
        A transcoder is kept in its own precision (the weights every graph reads, in float64, row by row:
        half the memory of a float64 copy, 0.36 GB for the default model's 30 circuit transcoders)."""
        if isinstance(tc, LayerView):
            self._encode_cross_layer(frozen, layer, tc, x)
            return
        frozen.tc = _frozen_copy(tc)
        with torch.no_grad():
            tc = copy.deepcopy(frozen.tc).double()  # this layer's float64 copy, freed once encoded
            frozen.pre = tc.pre_activations(x)
            frozen.latents = self._unfolded(tc.activate(frozen.pre))
            frozen.error = frozen.mlp_out - tc.decode(frozen.latents, x)
            if tc.config.kind == "skip":
                frozen.skip = x * tc.config.input_scale @ tc.W_skip.T / tc.config.output_scale
        frozen.writes = [(layer, frozen.tc.W_dec.detach(), tc.config.output_scale)]

    def _encode_cross_layer(self, frozen: _Layer, layer: int, view: LayerView, x: Tensor) -> None:
        clt = _frozen_copy(view.clt, torch.float64)
        missing = [source for source in view.sources[:-1] if self.layers[source].tc is None]
        if missing:
            raise CircuitError(f"The cross-layer transcoder's layer {layer} sums the writes of layers "
                               f"{view.sources}: pass it whole (or all of its views up to layer {layer}), not "
                               f"without layers {missing}.")
        with torch.no_grad():
            frozen.pre = clt.pre_activations(layer, x)
            frozen.latents = self._unfolded(clt.activate(layer, frozen.pre))
            latents = {source: self.layers[source].latents for source in view.sources[:-1]}
            frozen.error = frozen.mlp_out - clt.decode(layer, {**latents, layer: frozen.latents})
        frozen.tc = clt.views()[layer]
        scale = frozen.tc.config.output_scale
        frozen.writes = [(source, clt.decoder(source, layer), scale) for source in view.sources]

    def _unfolded(self, latents: Tensor) -> Tensor:
        """``latents`` with the folded positions' set to zero (their writes stay in the error term)."""
        latents[list(self.folded)] = 0
        return latents

    # -- targets and nodes as readers -------------------------------------------------------------------

    def latent_reader(self, layer: int, latent: int, position: int) -> tuple[_Reader, float]:
        """The reader of a latent's pre-activation, and its constant part (b_enc + the norm bias's term)."""
        frozen = self.layers[layer]
        tc = frozen.tc
        w_enc = _float64(tc.W_enc[latent]) * tc.config.input_scale
        reader = _Reader(1 / float(frozen.mlp_norm.scale[position]), frozen.mlp_norm.pullback(w_enc),
                         frozen.mlp_stage, position)
        return reader, float(_float64(tc.b_enc[latent]) + w_enc @ frozen.mlp_norm.bias)

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
        o = frozen.ov.W_O[head] @ _through(frozen.attn_gain, consumer.w, consumer.position)
        sigma = consumer.sigma * float(frozen.pattern[head, consumer.position, source])
        return _Reader(sigma / float(frozen.attn_norm.scale[source]),
                       frozen.attn_norm.pullback(frozen.ov.W_V[head].T @ o), 2 * layer, source)

    def skip_reader(self, consumer: _Reader, layer: int) -> tuple[_Reader, float]:
        """What a skip path reads at the consumer's position, and the part its norm's bias adds."""
        frozen = self.layers[layer]
        p = consumer.position
        w = skip_map(frozen.tc).T @ _through(frozen.mlp_gain, consumer.w, p)
        return (_Reader(consumer.sigma / float(frozen.mlp_norm.scale[p]), frozen.mlp_norm.pullback(w),
                        frozen.mlp_stage, p), consumer.sigma * float(w @ frozen.mlp_norm.bias))

    def check_logits(self, position: int) -> None:
        """Check the replay against the model's logits at ``position`` (in the model's precision)."""
        normed = self.final_norm(self.resid[2 * self.n_layers])[position]
        weight = self.unembed_weight
        logits = (weight @ normed.to(weight.device, weight.dtype)).cpu().double()
        if self.unembed_bias is not None:
            logits = logits + _float64(self.unembed_bias)
        if self.softcap:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        _check_replay(self.lm, logits, self.logits[position], f"the logits at position {position}")

    def read(self, reader: _Reader) -> float:
        """The reader's value on the replayed residual stream."""
        return reader.sigma * float(reader.w @ self.resid[reader.stage][reader.position])

    # -- decomposition ---------------------------------------------------------------------------------

    def decompose(self, reader: _Reader) -> list[_Segment]:
        """Every direct contribution to ``reader``'s value, grouped in segments; they sum to it. A latent's
        writes into every MLP output the reader sees are summed into one contribution (a cross-layer
        transcoder's latents write to several)."""
        sigma, w, stage, p = reader.sigma, reader.w, reader.stage, reader.position
        writes: dict[int, Tensor] = {}  # latent layer -> invariant of its active latents at p
        segments = [_leaf(reader, self.token_embedding[p], {"kind": "embedding", "position": p})]
        if self.position_embedding is not None:
            segments.append(_leaf(reader, self.position_embedding[p], {"kind": "position", "position": p}))
        for layer, frozen in enumerate(self.layers):
            if 2 * layer < stage:
                w_attn = _through(frozen.attn_gain, w, p)
                o = frozen.ov.W_O @ w_attn  # [heads, d_head]
                invariant = (o[:, None] @ frozen.values[:, :, :p + 1])[:, 0]  # [heads, sources]
                dependent = sigma * frozen.pattern[:, p, :p + 1]
                segments.append(_Segment(
                    (invariant * dependent).flatten(), invariant.flatten(), dependent.flatten(),
                    lambda i, layer=layer: {"kind": "head", "layer": layer, "head": i // (p + 1),
                                            "source_position": i % (p + 1), "position": p}))
                bias = float(frozen.ov.b_O @ w_attn + (frozen.pattern[:, p].sum(-1) * (o * frozen.value_bias).sum(-1)).sum())
                segments.append(_Segment(torch.tensor([bias * sigma]), torch.tensor([bias]), torch.tensor([sigma]),
                                         lambda i, layer=layer: {"kind": "bias", "layer": layer, "position": p,
                                                                 "name": "attention"}))
            if 2 * layer + 1 < stage:
                segments += self._mlp_segments(reader, layer, frozen, writes)
        for layer, invariant in writes.items():
            active = torch.nonzero(self.layers[layer].latents[p]).flatten()
            dependent = sigma * self.layers[layer].latents[p, active]
            segments.append(_Segment(invariant * dependent, invariant, dependent,
                                     lambda i, layer=layer, active=active: {"kind": "latent", "layer": layer,
                                                                            "latent": int(active[i]), "position": p}))
        return segments

    def _mlp_segments(self, reader: _Reader, layer: int, frozen: _Layer, writes: dict[int, Tensor]) -> list[_Segment]:
        """What one MLP writes: its error, decoder bias and skip path (its latents' writes are added to
        ``writes``, by the latents' layer); or itself, whole."""
        p = reader.position
        where = {"layer": layer, "position": p}
        if frozen.mlp_gain is not None:  # what the MLP module outputs passes through the frozen post-norm
            reader = _Reader(reader.sigma, reader.w * frozen.mlp_gain[p], reader.stage, p)
        if p in self.folded:  # the MLP's output less its skip path: one constant
            constant = frozen.mlp_out[p] if frozen.tc is None else \
                frozen.error[p] + _float64(frozen.tc.b_dec) / frozen.tc.config.output_scale
            segments = [_leaf(reader, constant, {"kind": "bias", "name": "bos", **where})]
            if frozen.skip is not None:
                segments.append(_leaf(reader, frozen.skip[p], {"kind": "skip", **where}))
            return segments
        if frozen.tc is None:
            return [_leaf(reader, frozen.mlp_out[p], {"kind": "mlp", **where})]
        tc = frozen.tc
        for source, decoder, scale in frozen.writes:
            active = torch.nonzero(self.layers[source].latents[p]).flatten()
            writes[source] = writes.get(source, 0) + _float64(decoder[active]) / scale @ reader.w
        segments = [
            _leaf(reader, frozen.error[p], {"kind": "error", **where}),
            _leaf(reader, _float64(tc.b_dec) / tc.config.output_scale, {"kind": "bias", "name": "decoder", **where}),
        ]
        if frozen.skip is not None:
            segments.append(_leaf(reader, frozen.skip[p], {"kind": "skip", **where}))
        return segments


def _through(gain: Tensor | None, w: Tensor, position: int) -> Tensor:
    """A reader's vector seen through a frozen post-norm at ``position`` (unchanged without one)."""
    return w if gain is None else w * gain[position]


def _leaf(reader: _Reader, vector: Tensor, source: dict[str, Any]) -> _Segment:
    """The contribution of one vector written to the residual stream (activation 1)."""
    invariant = (vector @ reader.w)[None]
    return _Segment(invariant * reader.sigma, invariant, torch.full_like(invariant, reader.sigma), lambda i: source)


def _capture(lm: Any, tokens: Tensor, last_layer: int, final: bool) -> dict[str, Any]:
    """One forward pass with eager attention: embeddings, the first block's input, each layer's
    attention pattern and MLP input/output up to ``last_layer``, and the logits if ``final``.

    Holds the lock that `run_with_edits` holds (a widget's worker thread may be tracing the same
    model), since it also switches the model to eager attention for the pass.
    """
    module = lm._module
    saved: dict[str, Any] = {"patterns": [], "mlp_in": [], "mlp_out": []}  # filled inside the trace
    with RUN_LOCK:
        before = module.config._attn_implementation
        if before != "eager":
            module.set_attn_implementation("eager")
        try:
            _trace(lm, tokens, last_layer, final, saved)
        finally:
            if before != "eager":
                module.set_attn_implementation(before)
    return {key: [_float64(t[0]) for t in value] if isinstance(value, list) else _float64(value[0])
            for key, value in saved.items()}


def _trace(lm: Any, tokens: Tensor, last_layer: int, final: bool, saved: dict[str, Any]) -> None:
    """The nnsight trace of `_capture`: saves into ``saved`` (names assigned in a trace body stay there)."""
    sites = lm.sites
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


def _check_replay(lm: Any, replayed: Tensor, actual: Tensor, what: str) -> None:
    error = float((replayed - actual).norm() / actual.norm().clamp_min(1e-12))
    if not error < REPLAY_TOLERANCE:
        raise CircuitError(
            f"The frozen replay of {lm.name} does not reproduce {what} (relative error {error:.2g}): its "
            f"{lm.config.model_type!r} blocks compute something circuits.py does not model (e.g. extra "
            "norms or scalings), so attributions would be wrong.")
