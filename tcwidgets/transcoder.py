"""The transcoder module: a wide, sparsely activating replacement for one MLP.

A transcoder reads an MLP's input ``x`` and reconstructs its output ``y``:

    z = act(W_enc · x̃ + b_enc)        x̃ = x · input_scale
    ŷ̃ = W_dec · z + b_dec (+ W_skip · x̃)   ŷ = ŷ̃ / output_scale

Inputs and targets are scaled to an average norm of sqrt(d) while training; the scales live in
the config, so the module takes and returns *model units* and splices back into the model as is.
Latent activations ``z`` are in the normalised units.

Kinds: ``"transcoder"`` (MLP input -> MLP output), ``"skip"`` (plus an affine skip path
W_skip·x, Paulo, Shabalin & Belrose 2025) and ``"sae"`` (reconstructs its own input; x = y).
Activations: ``"relu"`` (trained with an L1 penalty weighted by decoder row norms), ``"topk"``,
``"batchtopk"`` (k × batch latents over a training batch, one threshold at inference) and
``"jumprelu"`` (trained through a straight-through estimator with an L0 penalty, Rajamanoharan
et al. 2024).

Files: ``config.json`` + ``weights.safetensors``, written atomically, never pickled; the config
records the weights' checksum and is sealed with its own (`tcwidgets.files`).
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import threads
from .files import FileFormatError, load_tensors, read_json, save_tensors, unseal, write_manifest

__all__ = [
    "SCHEMA_VERSION",
    "KINDS",
    "ACTIVATIONS",
    "LATENT_CHOICES",
    "TranscoderConfig",
    "Transcoder",
    "TranscoderOutput",
    "SparseLatents",
    "TranscoderFileError",
    "jumprelu",
    "step",
    "rectangle",
]

SCHEMA_VERSION = 2
"""Version of the on-disk format (``config.json`` + ``weights.safetensors``); 2 adds the weights'
checksum and the config's seal."""

KINDS = ("transcoder", "skip", "sae")
ACTIVATIONS = ("relu", "topk", "batchtopk", "jumprelu")
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"


class TranscoderFileError(FileFormatError):
    """A saved transcoder cannot be read: missing, truncated, corrupted or from a newer version."""


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass
class TranscoderConfig:
    """Everything needed to rebuild a `Transcoder` (its weights aside).

    ``site`` records where it belongs: ``{"model": ..., "layer": ..., "input": ..., "output": ...}``
    as given by the activation store. ``input_scale``/``output_scale`` map model units to the
    normalised units the weights live in. ``threshold_init`` and ``bandwidth`` are JumpReLU's
    initial threshold and straight-through bandwidth, in latent units.
    """

    d_in: int
    d_out: int
    n_latents: int
    kind: str = "transcoder"
    activation: str = "topk"
    k: int | None = 32
    input_scale: float = 1.0
    output_scale: float = 1.0
    threshold_init: float = 0.1
    bandwidth: float = 0.1
    site: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r} is not one of {KINDS}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation={self.activation!r} is not one of {ACTIVATIONS}")
        for name in ("d_in", "d_out", "n_latents"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.kind == "sae" and self.d_in != self.d_out:
            raise ValueError(
                f"an SAE reconstructs its own input, so d_in must equal d_out "
                f"(got d_in={self.d_in}, d_out={self.d_out})"
            )
        if self.activation in ("topk", "batchtopk"):
            if not isinstance(self.k, int) or self.k < 1:
                raise ValueError(f"activation={self.activation!r} needs a positive integer k, got {self.k!r}")
            if self.k > self.n_latents:
                raise ValueError(
                    f"k={self.k} is larger than n_latents={self.n_latents}: "
                    f"choose k <= n_latents (typically k is 1-5% of n_latents)"
                )
        for name in ("input_scale", "output_scale", "threshold_init", "bandwidth"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (the content of ``config.json``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> TranscoderConfig:
        """Rebuild a config, checking the schema version first.

        ``source`` names where ``data`` came from, for error messages.
        """
        version = data.get("schema_version")
        if not isinstance(version, int):
            raise TranscoderFileError(f"{source}: missing or invalid 'schema_version' ({version!r})")
        if version > SCHEMA_VERSION:
            raise TranscoderFileError(
                f"{source} was written by a newer tcwidgets (schema version {version}; this "
                f"tcwidgets reads up to {SCHEMA_VERSION}): upgrade with `pip install -U tcwidgets`"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TranscoderFileError(f"{source}: unknown fields {unknown} for schema version {version}")
        try:
            return cls(**data)
        except (TypeError, ValueError) as err:
            raise TranscoderFileError(f"{source}: invalid transcoder config: {err}") from err


# --------------------------------------------------------------------------------------------
# JumpReLU and its straight-through estimator
# --------------------------------------------------------------------------------------------


def rectangle(u: Tensor) -> Tensor:
    """The kernel of the straight-through estimator: 1 on (-1/2, 1/2), 0 elsewhere."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = grad * (pre > threshold)
        grad_threshold = -(threshold / eps) * rectangle((pre - threshold) / eps) * grad
        return grad_pre, _sum_to(grad_threshold, threshold.shape), None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_threshold = -(1.0 / eps) * rectangle((pre - threshold) / eps) * grad
        return torch.zeros_like(pre), _sum_to(grad_threshold, threshold.shape), None


def _sum_to(grad: Tensor, shape: torch.Size) -> Tensor:
    """Sum a broadcast gradient back to ``shape`` (the threshold's)."""
    return grad.reshape(-1, *shape).sum(0) if grad.dim() > len(shape) else grad


def jumprelu(pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """JumpReLU ``pre · H(pre - θ)`` with the straight-through pseudo-derivatives

    ∂/∂pre = H(pre - θ),   ∂/∂θ = -(θ / ε) · rectangle((pre - θ) / ε),   ε = ``bandwidth``.
    """
    return _JumpReLU.apply(pre, threshold, bandwidth)


def step(pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """Heaviside step ``H(pre - θ)`` (counts active latents for the L0 penalty), with

    ∂/∂pre = 0,   ∂/∂θ = -(1 / ε) · rectangle((pre - θ) / ε),   ε = ``bandwidth``.
    """
    return _Step.apply(pre, threshold, bandwidth)


# --------------------------------------------------------------------------------------------
# Sparse encoding
# --------------------------------------------------------------------------------------------


class SparseLatents(NamedTuple):
    """The active latents of a batch of tokens, grouped by token (``F.embedding_bag``'s layout).

    Token ``t``'s active latents are ``indices[offsets[t]:offsets[t + 1]]`` with activations
    ``values[offsets[t]:offsets[t + 1]]``; for TopK every group has exactly k entries.
    """

    indices: Tensor  # [nnz] int64 latent ids
    values: Tensor  # [nnz] activations (normalised units)
    offsets: Tensor  # [n_tokens] int64 start of each token's group

    @property
    def rows(self) -> Tensor:
        """The token index of each entry ([nnz] int64)."""
        counts = torch.diff(self.offsets, append=self.offsets.new_tensor([self.indices.numel()]))
        return torch.repeat_interleave(torch.arange(len(self.offsets), device=self.offsets.device), counts)

    def to_dense(self, n_latents: int) -> Tensor:
        """Latents as a dense ``[n_tokens, n_latents]`` tensor."""
        dense = self.values.new_zeros(len(self.offsets), n_latents)
        return dense.index_put((self.rows, self.indices), self.values, accumulate=True)


class SparseEncoding(NamedTuple):
    """Output of `Transcoder.encode_sparse`."""

    latents: SparseLatents
    pre: Tensor  # dense pre-activations [n_tokens, n_latents], no grad (maybe bfloat16)


LATENT_CHOICES = ("float32", "bfloat16", "int8")
INT8_MARGIN = 8  # extra candidates per token recomputed in float32 after the int8 choice (docs/training.md)


def latent_choice(low_precision: bool | str) -> str:
    """The name in `LATENT_CHOICES` of ``encode_sparse``'s ``low_precision`` argument."""
    if isinstance(low_precision, bool):
        return "bfloat16" if low_precision else "float32"
    if low_precision not in LATENT_CHOICES:
        raise ValueError(f"low_precision={low_precision!r}: give True, False or one of {', '.join(LATENT_CHOICES)}")
    return low_precision


def _quantize_rows(m: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 quantisation of each row of ``m``: (int8 values, float32 scale per row),
    ``m ≈ values · scale[:, None]``. (Each row's largest magnitude from its max and min: two
    reductions cost a quarter of ``abs`` and one, on CPU.)"""
    scale = torch.maximum(m.amax(1), m.amin(1).neg_()).clamp_min_(1e-12).div_(127)
    return torch.div(m, scale[:, None]).round_().to(torch.int8), scale


TOPK_GROUPS = 8  # columns per group of `_grouped_topk_indices` (the fastest of 4, 8, 16 and 32, measured)


def _topk_indices(values: Tensor, k: int) -> Tensor:
    """Indices of each row's ``k`` largest ``values``, for the TopK choice: on CPU, bfloat16 values
    are compared as their 16-bit words (torch's CPU top-k of [1024, 4608] int16 takes 11.0 ms, of
    the bfloat16 values 14.5 ms; one thread). The words order non-negative values as the floats;
    negative ones come after them in reverse order, so a row with fewer than ``k`` positive values
    gets all of them, filled up with negative ones, which the ReLU makes zero either way. Wide rows
    take the top k in two rounds (`_grouped_topk_indices`) where the second round's members are at
    most a quarter of the row."""
    if values.device.type != "cpu":
        return values.topk(k, dim=1, sorted=False).indices
    if values.dtype == torch.bfloat16:
        values = values.view(torch.int16)
    if values.shape[1] % TOPK_GROUPS == 0 and values.shape[1] >= 4 * TOPK_GROUPS * k:
        return _grouped_topk_indices(values, k)
    return values.topk(k, dim=1, sorted=False).indices


def _grouped_topk_indices(values: Tensor, k: int) -> Tensor:
    """Top-k indices of each row from two small top-k's instead of one wide one (CPU: 9.5 ms instead
    of 12.2 ms for k = 40 of [1024, 4608] int16, one thread): column j is grouped with columns
    j + c, j + 2c, ... (c = width / `TOPK_GROUPS`), the k groups of largest maxima are found, and
    the top k of their members taken. It is a top k: a row's k largest values lie in its k groups
    of largest maxima (a value's group has a maximum at least as large, and fewer than k groups
    have a larger one). Ties are broken differently from ``topk``."""
    n, width = values.shape
    stride = width // TOPK_GROUPS
    groups = values.view(n, TOPK_GROUPS, stride).amax(1).topk(k, dim=1, sorted=False).indices  # [n, k]
    members = (groups[:, None, :] + torch.arange(0, width, stride, device=values.device)[None, :, None]).view(n, -1)
    return members.gather(1, values.gather(1, members).topk(k, dim=1, sorted=False).indices)


def _sampled_dot(a: Tensor, b: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """``a[rows[i]] · b[cols[i]]`` for each i (``rows`` non-decreasing), without materialising the
    gathered rows: a sampled dense-dense product (SDDMM), ~15x faster on CPU than gathering
    ``[nnz, d]`` copies of the rows (docs/training.md)."""
    crow = torch._convert_indices_from_coo_to_csr(rows, len(a))
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(crow, cols, a.new_zeros(len(cols)), (len(a), len(b)))
        return torch.sparse.sampled_addmm(pattern, a, b.t()).values()


class _GatheredLinear(torch.autograd.Function):
    """``values[i] = x[rows[i]] · weight[cols[i]] + bias[cols[i]]``, a linear layer evaluated at a
    sparse set of (token, latent) pairs.

    The forward takes the values already computed without grad (read from the dense
    pre-activations that chose the pairs, or recomputed at the pairs in full precision). The
    backward is a sparse matrix product, so the encoder's gradient costs O(nnz · d) instead of a
    dense [tokens, n_latents] × [tokens, d] product. With ``sparse_grad`` the weight's gradient
    is a sparse tensor over the latents used (`_scatter_rows`).
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, rows: Tensor, cols: Tensor, values: Tensor,
                sparse_grad: bool = False) -> Tensor:
        ctx.save_for_backward(x, weight, rows, cols)
        ctx.sparse_grad = sparse_grad
        return values.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, rows, cols = ctx.saved_tensors
        n_latents, n_tokens = weight.shape[0], x.shape[0]
        grad = grad.to(weight.dtype)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[1]:
            grad_weight = _scatter_rows(cols, rows, grad, x.to(weight.dtype), n_latents, sparse=ctx.sparse_grad)
        if ctx.needs_input_grad[2]:
            grad_bias = torch.zeros(n_latents, dtype=weight.dtype, device=weight.device).index_add_(0, cols, grad)
        if ctx.needs_input_grad[0]:
            g = torch.sparse_coo_tensor(
                torch.stack([rows, cols]), grad, (n_tokens, n_latents), check_invariants=False
            )
            grad_x = torch.sparse.mm(g, weight).to(x.dtype)
        return grad_x, grad_weight, grad_bias, None, None, None, None


def gathered_latents(xs: Tensor, weight: Tensor, bias: Tensor, rows: Tensor, cols: Tensor,
                     values: Tensor, *, sparse_grad: bool = False) -> SparseLatents:
    """`SparseLatents` of the (token, latent) pairs ``rows``, ``cols`` (grouped by token) whose
    pre-activations ``values`` of the scaled inputs ``xs`` were computed without grad: ReLU of
    them, differentiable with respect to ``weight`` and ``bias`` (and ``xs``) through the pairs only.
    With ``sparse_grad``, ``weight``'s gradient comes as a sparse tensor over the latents used:
    for a side path (AuxK's few dead latents) whose gradient autograd then adds into the main
    path's dense one in place, instead of a dense [n_latents, d] gradient and a dense sum."""
    values = _GatheredLinear.apply(xs, weight, bias, rows, cols, values, sparse_grad)
    counts = torch.bincount(rows, minlength=len(xs))
    return SparseLatents(cols, F.relu(values), torch.cumsum(counts, 0) - counts)


def _scatter_rows(targets: Tensor, rows: Tensor, values: Tensor, dense: Tensor, n_targets: int, *,
                  sparse: bool = False) -> Tensor:
    """``out[targets[i]] += values[i] · dense[rows[i]]`` (``out``: ``[n_targets, d]``): the weight
    gradient of an embedding bag, computed as an embedding bag itself, one bag per target, the
    entries ordered by target with a stable sort (the same sums, in the same order, as torch's
    embedding-bag backward kernel, 1.4x faster than it on CPU; that kernel in turn is 1.4x faster
    than a CSR matrix product and ~10x faster than ``index_add_`` of the gathered rows). With
    ``sparse``, ``out`` is a sparse COO tensor holding only the rows of the targets present (the
    same sums)."""
    order = targets.argsort(stable=True)
    counts = torch.bincount(targets, minlength=n_targets)
    present = counts.nonzero().flatten() if sparse else None
    bags = counts if present is None else counts[present]  # one bag per target, or per target present
    sums = F.embedding_bag(rows[order], dense, torch.cumsum(bags, 0) - bags, mode="sum",
                           per_sample_weights=values[order].to(dense.dtype))
    if present is None:
        return sums
    return torch.sparse_coo_tensor(present[None], sums, (n_targets, dense.shape[1]), is_coalesced=True,
                                   check_invariants=False)


class _SparseDecode(torch.autograd.Function):
    """``out[t] = Σ values[i] · weight[indices[i]]`` over token t's entries (an embedding bag),
    with a backward that stays sparse: the weight's gradient is an embedding bag over the latents
    (`_scatter_rows`), the values' gradient a sampled dense-dense product (together ~2x faster on
    CPU than ``embedding_bag``'s own backward, which builds dense intermediates).

    With ``unit_rows`` (decoder rows held at unit norm) the weight's gradient comes out projected:
    each row's component along the row removed, as `Transcoder.project_decoder_grad` does, but
    with the rows' dot products ``Σ values[i] · grad_values[i]`` over the row's entries (a
    bincount) instead of a pass over the dense gradient. The projection is linear, so several
    decodes into one weight sum to the projection of their summed gradient. With ``sparse_grad``
    the weight's gradient is a sparse tensor over the latents used (`gathered_latents`)."""

    @staticmethod
    def forward(ctx, indices: Tensor, values: Tensor, offsets: Tensor, rows: Tensor, weight: Tensor,
                unit_rows: bool = False, sparse_grad: bool = False) -> Tensor:
        ctx.save_for_backward(indices, values, rows, weight)
        ctx.unit_rows, ctx.sparse_grad = unit_rows, sparse_grad
        return F.embedding_bag(indices, weight, offsets, mode="sum", per_sample_weights=values)

    @staticmethod
    def backward(ctx, grad: Tensor):
        indices, values, rows, weight = ctx.saved_tensors
        project = ctx.unit_rows and ctx.needs_input_grad[4]
        grad_values = grad_weight = None
        if ctx.needs_input_grad[1] or project:
            grad_values = _sampled_dot(grad, weight, rows, indices)
        if ctx.needs_input_grad[4]:
            grad_weight = _scatter_rows(indices, rows, values, grad, len(weight), sparse=ctx.sparse_grad)
            if project:
                parallel = torch.bincount(indices, weights=values * grad_values, minlength=len(weight))
                if ctx.sparse_grad:
                    present = grad_weight._indices()[0]
                    grad_weight._values().addcmul_(parallel[present].to(weight.dtype)[:, None], weight[present], value=-1)
                else:
                    grad_weight.addcmul_(parallel.to(weight.dtype)[:, None], weight, value=-1)
        return None, grad_values if ctx.needs_input_grad[1] else None, None, None, grad_weight, None, None


# --------------------------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------------------------


class TranscoderOutput(NamedTuple):
    latents: Tensor  # [..., n_latents] dense latent activations (normalised units)
    output: Tensor  # [..., d_out] reconstruction in model units


class Transcoder(nn.Module):
    """A sparse, wide replacement for one MLP (or an SAE); see the module docstring.

    Weights are stored row-major per latent: ``W_enc`` [n_latents, d_in], ``W_dec``
    [n_latents, d_out]; ``W_skip`` [d_out, d_in] for skip transcoders; ``log_threshold``
    [n_latents] for JumpReLU; the buffer ``threshold`` (scalar) for BatchTopK at inference.
    """

    def __init__(self, config: TranscoderConfig):
        super().__init__()
        self.config = config
        n, d_in, d_out = config.n_latents, config.d_in, config.d_out
        self.W_enc = nn.Parameter(torch.empty(n, d_in))
        self.b_enc = nn.Parameter(torch.zeros(n))
        self.W_dec = nn.Parameter(torch.empty(n, d_out))
        self.b_dec = nn.Parameter(torch.zeros(d_out))
        if config.kind == "skip":
            self.W_skip = nn.Parameter(torch.zeros(d_out, d_in))
        if config.activation == "jumprelu":
            self.log_threshold = nn.Parameter(torch.full((n,), math.log(config.threshold_init)))
        if config.activation == "batchtopk":
            self.register_buffer("threshold", torch.tensor(float("nan")))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random unit-norm decoder rows; encoder rows equal to the decoder rows when the two
        spaces have the same width (the SAE convention), random unit rows otherwise.

        `Trainer` replaces this with a data-dependent initialisation.
        """
        nn.init.normal_(self.W_dec)
        self.normalize_decoder()
        if self.d_in == self.d_out:
            self.W_enc.copy_(self.W_dec)
        else:
            nn.init.normal_(self.W_enc)
            self.W_enc /= self.W_enc.norm(dim=1, keepdim=True)

    # ---- shapes ---------------------------------------------------------------------------

    @property
    def n_latents(self) -> int:
        return self.config.n_latents

    @property
    def d_in(self) -> int:
        return self.config.d_in

    @property
    def d_out(self) -> int:
        return self.config.d_out

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    def extra_repr(self) -> str:
        c = self.config
        k = f", k={c.k}" if c.activation in ("topk", "batchtopk") else ""
        return f"{c.kind}, {c.activation}{k}, d_in={c.d_in}, n_latents={c.n_latents}, d_out={c.d_out}"

    # ---- dense path -------------------------------------------------------------------------

    def pre_activations(self, x: Tensor) -> Tensor:
        """Encoder pre-activations ``W_enc · x̃ + b_enc`` for MLP inputs ``x`` in model units."""
        return F.linear(x * self.config.input_scale, self.W_enc, self.b_enc)

    def activate(self, pre: Tensor) -> Tensor:
        """Apply the activation function to pre-activations (dense in, dense out).

        BatchTopK selects k × tokens latents over the batch in training mode and applies its
        calibrated threshold in eval mode (see `calibrate_threshold`).
        """
        act = self.config.activation
        if act == "relu":
            return F.relu(pre)
        if act == "jumprelu":
            return jumprelu(pre, self.log_threshold.exp(), self.config.bandwidth)
        if act == "topk":
            values, indices = pre.topk(self.config.k, dim=-1, sorted=False)
            return torch.zeros_like(pre).scatter(-1, indices, F.relu(values))
        # batchtopk
        if self.training:
            flat = pre.reshape(-1, pre.shape[-1])
            kept = flat.flatten().topk(self.config.k * flat.shape[0], sorted=False).indices
            mask = torch.zeros_like(flat, dtype=torch.bool).flatten().index_fill_(0, kept, True)
            return F.relu(pre) * mask.view(pre.shape)
        return pre * (pre > self._calibrated_threshold())

    def encode(self, x: Tensor) -> Tensor:
        """Dense latent activations ``[..., n_latents]`` for MLP inputs ``x`` (model units)."""
        return self.activate(self.pre_activations(x))

    def decode(self, latents: Tensor, x: Tensor | None = None) -> Tensor:
        """Reconstruction in model units from dense latents; skip transcoders also need ``x``."""
        out = F.linear(latents, self.W_dec.t(), self.b_dec)
        return self._finish(out, x)

    def forward(self, x: Tensor) -> TranscoderOutput:
        """``(latents, output)`` for MLP inputs ``x`` (model units)."""
        latents = self.encode(x)
        return TranscoderOutput(latents, self.decode(latents, x))

    def _finish(self, out: Tensor, x: Tensor | None) -> Tensor:
        """Add the skip path (if any) and return to model units."""
        if self.config.kind == "skip":
            if x is None:
                raise ValueError("a skip transcoder adds W_skip·x to its output: pass the MLP input x to decode")
            out = out + F.linear(x * self.config.input_scale, self.W_skip)
        return out / self.config.output_scale

    # ---- sparse path (TopK, BatchTopK) --------------------------------------------------------

    def encode_sparse(self, x: Tensor, *, low_precision: bool | str = False) -> SparseEncoding:
        """Active latents of TopK/BatchTopK as a `SparseLatents`, differentiable with respect to
        the encoder; also returns the dense pre-activations (no grad) for auxiliary losses.

        ``x`` is ``[n_tokens, d_in]`` in model units. ``low_precision`` names the precision of
        the dense matrix product that chooses the latents (`LATENT_CHOICES`; ``True`` is
        ``"bfloat16"``, ``False`` ``"float32"``): in ``"bfloat16"`` the product runs under
        autocast; in ``"int8"`` (TopK only) it is an integer product of ``x`` quantised per token
        and ``W_enc`` per latent, whose best ``k + INT8_MARGIN`` latents per token are then
        recomputed in float32 to pick the top k. Either way the selected values and gradients
        are float32, and the returned ``pre`` is bfloat16 (approximate); in ``"float32"`` it is
        exact. Only the selected latents enter the backward pass.
        """
        act = self.config.activation
        if act not in ("topk", "batchtopk"):
            raise ValueError(f"encode_sparse needs a TopK or BatchTopK transcoder, not {act!r}")
        choice = latent_choice(low_precision)
        if choice == "int8":
            if act != "topk":
                raise ValueError("the int8 latent choice is for TopK only: use low_precision='bfloat16' or False")
            return self._encode_int8(x)
        with threads.parallel():  # compute-bound: worth the threads in a training step (tcwidgets.threads)
            with torch.no_grad(), torch.autocast(x.device.type, torch.bfloat16, enabled=choice == "bfloat16"):
                pre = F.linear(x * self.config.input_scale, self.W_enc, self.b_enc)
            rows, cols = self._select(pre)
        return SparseEncoding(self.latents_at(x, rows, cols, pre), pre)

    def _encode_int8(self, x: Tensor) -> SparseEncoding:
        """TopK latents chosen from an int8 product (`encode_sparse`), refined in float32."""
        xs = x * self.config.input_scale
        n_tokens, k = len(x), self.config.k
        with torch.no_grad():
            xq, x_scale = _quantize_rows(xs)
            wq, w_scale = _quantize_rows(self.W_enc)
            n_candidates = min(self.n_latents, k + INT8_MARGIN)
            with threads.parallel():  # compute-bound: worth the threads in a training step (tcwidgets.threads)
                pre = torch._int_mm(xq, wq.t()).float().mul_(w_scale).mul_(x_scale[:, None]).add_(self.b_enc)
                pre = pre.bfloat16()
                candidates = _topk_indices(pre, n_candidates)
            rows = torch.arange(n_tokens, device=x.device).repeat_interleave(n_candidates)
            exact = (_sampled_dot(xs, self.W_enc, rows, candidates.flatten())
                     + self.b_enc[candidates.flatten()]).view(n_tokens, n_candidates)
            best = exact.topk(k, dim=1, sorted=False).indices
            cols, values = candidates.gather(1, best).flatten(), exact.gather(1, best).flatten()
        rows = torch.arange(n_tokens, device=x.device).repeat_interleave(k)
        return SparseEncoding(gathered_latents(xs, self.W_enc, self.b_enc, rows, cols, values), pre)

    def latents_at(self, x: Tensor, rows: Tensor, cols: Tensor, pre: Tensor, *, sparse_grad: bool = False) -> SparseLatents:
        """Activations (ReLU of the pre-activations) of chosen (token, latent) pairs as
        `SparseLatents`, differentiable with respect to the encoder.

        ``rows`` (token indices, non-decreasing) and ``cols`` (latent ids) name the pairs; ``pre``
        holds the dense pre-activations of ``x`` computed without grad, which the values are read
        from (recomputed at the pairs in float32 where ``pre`` is of lower precision). The
        backward pass only touches the chosen pairs; ``sparse_grad``: see `gathered_latents`.
        """
        xs = x * self.config.input_scale
        with torch.no_grad():
            if pre.dtype == self.W_enc.dtype:
                values = pre[rows, cols]
            else:
                values = _sampled_dot(xs, self.W_enc, rows, cols) + self.b_enc[cols]
        return gathered_latents(xs, self.W_enc, self.b_enc, rows, cols, values, sparse_grad=sparse_grad)

    @torch.no_grad()
    def _select(self, pre: Tensor) -> tuple[Tensor, Tensor]:
        """(rows, cols) of the latents to keep, grouped by token."""
        n_tokens, n = pre.shape
        k = self.config.k
        if self.config.activation == "topk":
            cols = _topk_indices(pre, k).flatten()
            return torch.arange(n_tokens, device=pre.device).repeat_interleave(k), cols
        if self.training:
            flat = pre.flatten().topk(k * n_tokens, sorted=False).indices.sort().values
        else:
            flat = torch.nonzero(pre.flatten() > self._calibrated_threshold()).flatten()
        return flat // n, flat % n

    def decode_sparse(self, latents: SparseLatents, x: Tensor | None = None, *, bias: bool = True,
                      unit_rows: bool = False, sparse_grad: bool = False) -> Tensor:
        """Reconstruction in model units from sparse latents (a gather of decoder rows).

        With ``bias=False`` only the latents' own contribution (no ``b_dec``, no skip path). With
        ``unit_rows`` the backward pass leaves ``W_dec``'s gradient projected as
        `project_decoder_grad` would (cheaper here than a pass over the dense gradient after it).
        ``sparse_grad``: ``W_dec``'s gradient as a sparse tensor over the latents used (for a side
        path, as in `gathered_latents`).
        """
        out = _SparseDecode.apply(latents.indices, latents.values.to(self.W_dec.dtype), latents.offsets,
                                  latents.rows, self.W_dec, unit_rows, sparse_grad)
        if not bias:
            return out / self.config.output_scale
        return self._finish(out + self.b_dec, x)

    # ---- BatchTopK threshold ------------------------------------------------------------------

    def _calibrated_threshold(self) -> Tensor:
        if torch.isnan(self.threshold):
            raise RuntimeError(
                "this BatchTopK transcoder has no inference threshold yet: call "
                "calibrate_threshold(batches_of_x) (train_transcoder does it after training)"
            )
        return self.threshold

    @torch.no_grad()
    def calibrate_threshold(self, xs: Iterable[Tensor]) -> float:
        """Set BatchTopK's inference threshold: the mean over batches of the smallest activation
        that BatchTopK keeps (so that inference keeps about k latents per token)."""
        if self.config.activation != "batchtopk":
            raise ValueError("only BatchTopK transcoders have a threshold to calibrate")
        minima = []
        for x in xs:
            pre = self.pre_activations(x).flatten()
            minima.append(pre.topk(self.config.k * len(x), sorted=False).values.min().clamp_min(0))
        if not minima:
            raise ValueError("calibrate_threshold needs at least one batch")
        self.threshold.copy_(torch.stack(minima).mean())
        return float(self.threshold)

    # ---- decoder norm ---------------------------------------------------------------------------

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale decoder rows to unit norm."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(torch.finfo(self.W_dec.dtype).eps)

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove the component of each decoder row's gradient parallel to the row (which would
        only change the row's norm, undone by `normalize_decoder`)."""
        if self.W_dec.grad is not None:
            # row-wise dot products as a batched matrix product: 2x faster on CPU than vecdot's
            # elementwise product and sum
            parallel = torch.bmm(self.W_dec.grad.unsqueeze(1), self.W_dec.unsqueeze(2)).view(-1)
            self.W_dec.grad.addcmul_(parallel[:, None], self.W_dec, value=-1)

    # ---- files ------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike, format: str = "tcwidgets", *, n_layers: int | None = None) -> Path:
        """Write ``weights.safetensors``, then ``config.json`` (with the weights' checksum) into
        directory ``path`` (created if needed), each atomically. Returns the directory.

        ``format="sparsify"``, ``"saelens"`` or ``"circuit-tracer"`` writes files that library loads
        with its own loaders, computing the same function (``n_layers``: the circuit-tracer set's
        length, padded with zero transcoders); see `tcwidgets.interop`.
        """
        if format != "tcwidgets":
            from .interop import save_transcoder

            return save_transcoder(self, path, format=format, n_layers=n_layers)
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        weights = save_tensors(path / WEIGHTS_FILE, self.state_dict(), metadata={"format": "pt"})
        write_manifest(path / CONFIG_FILE, {**self.config.to_dict(), "weights": weights})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device | None = None) -> Transcoder:
        """Load a transcoder saved with `save`, onto ``device`` (default CPU).

        Raises `TranscoderFileError` (a ``ValueError``) naming the file when it is missing,
        truncated or corrupted, written by a newer tcwidgets, or does not match its config.
        """
        path = Path(path)
        config_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
        for p in (config_path, weights_path):
            if not p.is_file():
                raise TranscoderFileError(f"{p} not found: is {path} a directory written by Transcoder.save?")
        fix = "re-save or re-train the transcoder"
        data = read_json(config_path, fix=fix, error=TranscoderFileError)
        if not isinstance(data, dict):
            raise TranscoderFileError(f"{config_path} does not hold a JSON object; {fix}")
        version = data.get("schema_version")
        if isinstance(version, int) and version <= SCHEMA_VERSION:  # a newer one is refused by from_dict
            data = unseal(config_path, data, required=version >= 2, fix=fix, error=TranscoderFileError)
        record = data.pop("weights", None)
        config = TranscoderConfig.from_dict(data, source=str(config_path))
        if not isinstance(record, dict) and config.schema_version >= 2:
            raise TranscoderFileError(f"{config_path} lacks the weights' checksum; {fix}")
        tensors = load_tensors(weights_path, sha256=(record or {}).get("sha256"), fix=fix, error=TranscoderFileError)
        model = cls(config)
        expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
        found = {name: tuple(t.shape) for name, t in tensors.items()}
        if expected != found:
            diff = sorted(
                f"{name}: expected {expected.get(name)}, found {found.get(name)}"
                for name in set(expected) | set(found)
                if expected.get(name) != found.get(name)
            )
            raise TranscoderFileError(f"{weights_path} does not match {config_path} ({'; '.join(diff)}); {fix}")
        model.load_state_dict({name: t.float() for name, t in tensors.items()})
        return model.to(device) if device is not None else model
