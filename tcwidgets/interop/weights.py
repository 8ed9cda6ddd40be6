"""The function a transcoder computes, in model units, in the layout every exchange format shares.

    pre = W_enc · x + b_enc        z = act(pre)        ŷ = W_decᵀ · z + b_dec (+ W_skip · x)

Our `Transcoder` stores ``input_scale``/``output_scale`` beside its weights; `folded_weights` folds
them in (so the latents keep their values and the output is in model units), and
`transcoder_from_weights` builds a `Transcoder` with unit scales from weights read in another format.
Thresholds are JumpReLU's ``pre · (pre > θ)``; BatchTopK's single inference threshold is the same
function with θ repeated for every latent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..files import FileFormatError
from ..transcoder import Transcoder, TranscoderConfig

__all__ = ["FORMATS", "TranscoderFormatError", "UnrepresentableError", "Weights", "folded_weights",
           "transcoder_from_weights"]

FORMATS = ("tcwidgets", "sparsify", "saelens", "circuit-tracer")
"""The formats `load_transcoders` reads and `Transcoder.save(format=...)` writes (SAELens also covers
Gemma Scope's ``params.npz``)."""


class TranscoderFormatError(FileFormatError):
    """Files in another library's format that cannot be read exactly: unknown layout, pickles, or an
    architecture or normalisation tcwidgets has no exact equivalent for."""


class UnrepresentableError(ValueError):
    """A transcoder that the requested format cannot represent exactly (e.g. TopK in a format whose
    loaders have no TopK)."""


@dataclass
class Weights:
    """A transcoder's weights in model units (float32): ``W_enc`` [n, d_in], ``b_enc`` [n], ``W_dec``
    [n, d_out], ``b_dec`` [d_out], ``W_skip`` [d_out, d_in] or None, ``threshold`` [n] or None."""

    W_enc: Tensor
    b_enc: Tensor
    W_dec: Tensor
    b_dec: Tensor
    W_skip: Tensor | None = None
    threshold: Tensor | None = None

    def __post_init__(self) -> None:
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "W_skip", "threshold"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.detach().to(device="cpu", dtype=torch.float32).contiguous())
        n, d_in = self.W_enc.shape
        d_out = self.W_dec.shape[1]
        expected = {"b_enc": (n,), "W_dec": (n, d_out), "b_dec": (d_out,), "W_skip": (d_out, d_in),
                    "threshold": (n,)}
        wrong = [f"{name} {tuple(getattr(self, name).shape)} (expected {shape})" for name, shape in expected.items()
                 if getattr(self, name) is not None and tuple(getattr(self, name).shape) != shape]
        if wrong:
            raise TranscoderFormatError(f"inconsistent weight shapes: {', '.join(wrong)} for W_enc {(n, d_in)}")


def folded_weights(tc: Transcoder) -> Weights:
    """``tc``'s weights with its input/output scales folded in; BatchTopK's threshold per latent."""
    c = tc.config
    state = {name: t.detach().cpu().float() for name, t in tc.state_dict().items()}
    threshold = None
    if c.activation == "jumprelu":
        threshold = state["log_threshold"].exp()
    elif c.activation == "batchtopk":
        threshold = tc._calibrated_threshold().detach().cpu().float().expand(c.n_latents)
    return Weights(
        W_enc=state["W_enc"] * c.input_scale, b_enc=state["b_enc"],
        W_dec=state["W_dec"] / c.output_scale, b_dec=state["b_dec"] / c.output_scale,
        W_skip=state["W_skip"] * (c.input_scale / c.output_scale) if c.kind == "skip" else None,
        threshold=threshold,
    )


def transcoder_from_weights(weights: Weights, *, kind: str, activation: str, k: int | None = None,
                            site: dict[str, Any], device: str | torch.device | None = None) -> Transcoder:
    """A `Transcoder` with unit scales computing exactly ``weights``' function.

    JumpReLU thresholds at or below zero become the smallest positive float32 (1.2e-38; ours are stored
    as finite logarithms): with the ReLU that SAELens applies before its mask (``relu(pre) · (pre > θ)``),
    θ ≤ 0 keeps the positive pre-activations, and so does this one, but for those below 1.2e-38.
    """
    n, d_in = weights.W_enc.shape
    config = TranscoderConfig(d_in=d_in, d_out=weights.W_dec.shape[1], n_latents=n, kind=kind,
                              activation=activation, k=k if activation == "topk" else None, site=site)
    tc = Transcoder(config)
    state = {"W_enc": weights.W_enc, "b_enc": weights.b_enc, "W_dec": weights.W_dec, "b_dec": weights.b_dec}
    if kind == "skip":
        state["W_skip"] = weights.W_skip
    if activation == "jumprelu":
        state["log_threshold"] = weights.threshold.double().clamp_min(torch.finfo(torch.float32).tiny).log().float()
    tc.load_state_dict(state)
    return tc.to(device) if device is not None else tc


def positive_int(value: Any, name: str, source: str) -> int:
    """``value`` if it is a positive integer, else an error naming the field and file."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TranscoderFormatError(f"{source}: {name} must be a positive integer, found {value!r}")
    return value

