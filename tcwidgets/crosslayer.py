"""The cross-layer transcoder (CLT): latents that read one layer's MLP input and write to that layer's
MLP output and every later one's (Ameisen et al. 2025, "Circuit Tracing"; circuit-tracer's
``CrossLayerTranscoder``).

For the CLT's layers ``l_0 < l_1 < ... < l_{L-1}`` (indices ``i``, ``j`` below):

    z_i = act(W_enc[i] · x̃_i + b_enc[i])                 x̃_i = x_i · input_scales[i]
    ŷ̃_j = Σ_{i ≤ j} W_dec_i[:, j - i]ᵀ · z_i + b_dec[j]    ŷ_j = ŷ̃_j / output_scales[j]

so the output at layer ``l_j`` sums the writes of the latents of every CLT layer up to it. Weights
are circuit-tracer's layout: ``W_enc`` [L, n, d], ``b_enc`` [L, n], ``W_dec_i`` [n, L - i, d]
(one parameter per source layer), ``b_dec`` [L, d]; JumpReLU adds ``log_threshold`` [L, n].
Activations: ``"topk"`` (k per token and layer), ``"jumprelu"`` (``pre · (pre > θ)``, θ > 0) and
``"relu"`` (circuit-tracer's CLTs without thresholds).

Everywhere a ``{layer: transcoder}`` dict goes (`splice`, `evaluate`, `run_with_edits`), a CLT goes
as it is: `CrossLayerTranscoder.views` presents it as one `LayerView` per layer, whose output is
the sum of the writes into that layer.

Files: ``crosslayer.json`` (a sealed manifest with the config and the weights' checksum) +
``weights.safetensors``, written atomically (`tcwidgets.files`); ``save(format="circuit-tracer")``
writes circuit-tracer's ``config.yaml`` + ``W_enc_<i>`` / ``W_dec_<i>`` files
(`tcwidgets.interop.circuit_tracer`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .files import FileFormatError, load_tensors, read_manifest, save_tensors, write_manifest
from .transcoder import TranscoderConfig, jumprelu

__all__ = ["ACTIVATIONS", "CONFIG_FILE", "CrossLayerConfig", "CrossLayerFileError", "CrossLayerTranscoder",
           "LayerView", "WEIGHTS_FILE", "unspliced_sources"]

FORMAT, VERSION = "tcwidgets.crosslayer", 1
CONFIG_FILE, WEIGHTS_FILE = "crosslayer.json", "weights.safetensors"
ACTIVATIONS = ("topk", "jumprelu", "relu")


class CrossLayerFileError(FileFormatError):
    """A saved cross-layer transcoder cannot be read: missing, truncated, corrupted or from a newer version."""


@dataclass
class CrossLayerConfig:
    """Everything needed to rebuild a `CrossLayerTranscoder` (its weights aside).

    ``layers``: the model layers it spans, ascending; ``n_latents``: latents per layer. ``sites``:
    one ``{"input": ..., "output": ...}`` per layer (the store's module paths, or a peer's hook names),
    ``model`` the model's name. ``input_scales``/``output_scales`` (one per layer) map model units to
    the normalised units the weights live in. ``threshold_init``/``bandwidth``: JumpReLU's initial
    threshold and straight-through bandwidth.
    """

    d_model: int
    n_latents: int
    layers: list[int]
    activation: str = "topk"
    k: int | None = 32
    input_scales: list[float] = field(default_factory=list)
    output_scales: list[float] = field(default_factory=list)
    threshold_init: float = 0.1
    bandwidth: float = 0.1
    model: str | None = None
    sites: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.layers = [int(layer) for layer in self.layers]
        if not self.layers or self.layers != sorted(set(self.layers)) or self.layers[0] < 0:
            raise ValueError(f"layers={self.layers}: name each layer once, in ascending order (e.g. [0, 1, 2])")
        n_layers = len(self.layers)
        self.input_scales = [float(s) for s in self.input_scales] or [1.0] * n_layers
        self.output_scales = [float(s) for s in self.output_scales] or [1.0] * n_layers
        self.sites = [dict(site) for site in self.sites] or [{} for _ in self.layers]
        for name in ("input_scales", "output_scales", "sites"):
            if len(getattr(self, name)) != n_layers:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries for {n_layers} layers")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation={self.activation!r} is not one of {ACTIVATIONS}")
        for name in ("d_model", "n_latents"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.activation == "topk":
            if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
                raise ValueError(f"activation='topk' needs a positive integer k, got {self.k!r}")
            if self.k > self.n_latents:
                raise ValueError(f"k={self.k} is larger than n_latents={self.n_latents}: choose k <= n_latents "
                                 "(typically k is 1-5% of n_latents)")
        else:
            self.k = None
        for value in [*self.input_scales, *self.output_scales, self.threshold_init, self.bandwidth]:
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"scales, threshold_init and bandwidth must be positive finite numbers, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (the ``config`` of ``crosslayer.json``)."""
        return asdict(self)

    def site(self, index: int) -> dict[str, Any]:
        """Layer ``layers[index]``'s site in `TranscoderConfig.site`'s form."""
        return {"model": self.model, "layer": self.layers[index], **self.sites[index]}


class CrossLayerTranscoder(nn.Module):
    """A sparse replacement for several MLPs at once; see the module docstring.

    ``encode(layer, x)`` gives a layer's latents, ``decode(layer, latents)`` the output at a layer from
    ``{source layer: latents}`` of the layers up to it, ``forward(xs)`` both for all layers.
    """

    def __init__(self, config: CrossLayerConfig):
        super().__init__()
        self.config = config
        n_layers, n, d = len(config.layers), config.n_latents, config.d_model
        self.W_enc = nn.Parameter(torch.empty(n_layers, n, d))
        self.b_enc = nn.Parameter(torch.zeros(n_layers, n))
        for i in range(n_layers):
            self.register_parameter(f"W_dec_{i}", nn.Parameter(torch.zeros(n, n_layers - i, d)))
        self.b_dec = nn.Parameter(torch.zeros(n_layers, d))
        if config.activation == "jumprelu":
            self.log_threshold = nn.Parameter(torch.full((n_layers, n), math.log(config.threshold_init)))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random unit-norm encoder rows and same-layer decoder rows, zero writes to later layers
        (`train_clt` replaces this with a data-driven initialisation)."""
        nn.init.normal_(self.W_enc)
        self.W_enc /= self.W_enc.norm(dim=-1, keepdim=True)
        for i in range(self.n_layers):
            self.W_dec(i).zero_()
            nn.init.normal_(self.W_dec(i)[:, 0])
        self.normalize_decoder()

    # ---- shapes -------------------------------------------------------------------------------------

    @property
    def layers(self) -> list[int]:
        return self.config.layers

    @property
    def n_layers(self) -> int:
        return len(self.config.layers)

    @property
    def n_latents(self) -> int:
        """Latents per layer."""
        return self.config.n_latents

    @property
    def d_model(self) -> int:
        return self.config.d_model

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    def extra_repr(self) -> str:
        c = self.config
        k = f", k={c.k}" if c.activation == "topk" else ""
        return f"{c.activation}{k}, layers={c.layers}, n_latents={c.n_latents} per layer, d_model={c.d_model}"

    def index(self, layer: int) -> int:
        """The position of model layer ``layer`` among the CLT's layers."""
        try:
            return self.config.layers.index(layer)
        except ValueError:
            raise KeyError(f"layer {layer} is not one of this cross-layer transcoder's layers "
                           f"{self.config.layers}") from None

    def W_dec(self, i: int) -> Tensor:
        """Source index ``i``'s decoder [n_latents, L - i, d]: its writes to layers ``layers[i:]``."""
        return getattr(self, f"W_dec_{i}")

    def decoder(self, source: int, target: int) -> Tensor:
        """The decoder rows [n_latents, d] (normalised units) from model layer ``source``'s latents to
        model layer ``target``'s output (``source <= target``)."""
        i, j = self.index(source), self.index(target)
        if i > j:
            raise ValueError(f"layer {source}'s latents write to layers {self.layers[i:]}, not to {target}")
        return self.W_dec(i)[:, j - i]

    # ---- dense path ---------------------------------------------------------------------------------

    def pre_activations(self, layer: int, x: Tensor) -> Tensor:
        """Encoder pre-activations of model layer ``layer`` for its MLP inputs ``x`` (model units)."""
        i = self.index(layer)
        return F.linear(x * self.config.input_scales[i], self.W_enc[i], self.b_enc[i])

    def activate(self, layer: int, pre: Tensor) -> Tensor:
        """The activation function of model layer ``layer``'s latents (dense in, dense out)."""
        act = self.config.activation
        if act == "relu":
            return F.relu(pre)
        if act == "jumprelu":
            return jumprelu(pre, self.log_threshold[self.index(layer)].exp(), self.config.bandwidth)
        values, indices = pre.topk(self.config.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter(-1, indices, F.relu(values))

    def encode(self, layer: int, x: Tensor) -> Tensor:
        """Dense latents ``[..., n_latents]`` of model layer ``layer`` for its MLP inputs (model units)."""
        return self.activate(layer, self.pre_activations(layer, x))

    def decode(self, layer: int, latents: Mapping[int, Tensor]) -> Tensor:
        """The output at model layer ``layer`` (model units) from ``{source layer: latents}``, which must
        hold every CLT layer up to ``layer``."""
        j = self.index(layer)
        missing = [source for source in self.layers[:j + 1] if source not in latents]
        if missing:
            raise ValueError(f"the output at layer {layer} sums the writes of layers {self.layers[:j + 1]}: "
                             f"pass the latents of layers {missing} too")
        out = self.b_dec[j]
        for i, source in enumerate(self.layers[:j + 1]):
            out = out + latents[source].to(self.W_enc.dtype) @ self.W_dec(i)[:, j - i]
        return out / self.config.output_scales[j]

    def forward(self, xs: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """``(latents, outputs)``, one of each per CLT layer, for the MLP inputs ``xs`` of its layers."""
        if len(xs) != self.n_layers:
            raise ValueError(f"pass one MLP input per layer {self.layers}, got {len(xs)}")
        latents = {layer: self.encode(layer, x) for layer, x in zip(self.layers, xs)}
        return list(latents.values()), [self.decode(layer, latents) for layer in self.layers]

    # ---- as per-layer transcoders -------------------------------------------------------------------

    def views(self) -> dict[int, LayerView]:
        """``{layer: LayerView}``: this CLT as per-layer transcoders for `splice` and everything built on
        it (each layer's output is the sum of the writes into it; see `LayerView`). The same views on
        every call."""
        if "_views" not in self.__dict__:
            self.__dict__["_views"] = {layer: LayerView(self, layer) for layer in self.layers}
        return dict(self.__dict__["_views"])

    # ---- decoder norm -------------------------------------------------------------------------------

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale each latent's decoder (its writes to all later layers together) to unit norm."""
        for i in range(self.n_layers):
            w = self.W_dec(i)
            w /= w.flatten(1).norm(dim=1).clamp_min(torch.finfo(w.dtype).eps)[:, None, None]

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove the component of each latent's decoder gradient parallel to its decoder."""
        for i in range(self.n_layers):
            w = self.W_dec(i)
            if w.grad is not None:
                flat, grad = w.flatten(1), w.grad.flatten(1)
                parallel = torch.bmm(grad.unsqueeze(1), flat.unsqueeze(2)).view(-1)
                grad.addcmul_(parallel[:, None], flat, value=-1)

    # ---- files --------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike, format: str = "tcwidgets", *, n_layers: int | None = None) -> Path:
        """Write ``weights.safetensors``, then ``crosslayer.json`` (sealed, with the weights' checksum)
        into directory ``path``, each atomically. Returns the directory.

        ``format="circuit-tracer"`` writes the files circuit-tracer's ``load_clt`` reads (every model
        layer from 0 to ``n_layers - 1``, default the last CLT layer; layers the CLT lacks write nothing);
        see `tcwidgets.interop.circuit_tracer`.
        """
        if format == "circuit-tracer":
            from .interop.circuit_tracer import write_circuit_tracer_clt

            return write_circuit_tracer_clt(self, Path(path), n_layers=n_layers)
        if format != "tcwidgets":
            raise ValueError(f"format={format!r}: a cross-layer transcoder saves as 'tcwidgets' or 'circuit-tracer'")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        weights = save_tensors(path / WEIGHTS_FILE, self.state_dict(), metadata={"format": "pt"})
        write_manifest(path / CONFIG_FILE, {"format": FORMAT, "version": VERSION, "config": self.config.to_dict(),
                                            "weights": weights})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device | None = None) -> CrossLayerTranscoder:
        """Load a cross-layer transcoder written by `save`, onto ``device`` (default CPU); raises
        `CrossLayerFileError` naming the file when it is missing, corrupted or from a newer version."""
        path = Path(path)
        fix = "re-save or re-train the cross-layer transcoder"
        manifest = read_manifest(path / CONFIG_FILE, format=FORMAT, version=VERSION, fix=fix,
                                 error=CrossLayerFileError, sealed_since=1)
        try:
            data = manifest["config"]
            unknown = sorted(set(data) - {f.name for f in fields(CrossLayerConfig)})
            if unknown:
                raise ValueError(f"unknown fields {unknown}")
            config = CrossLayerConfig(**data)
            sha256 = manifest["weights"]["sha256"]
        except (KeyError, TypeError, ValueError) as err:
            raise CrossLayerFileError(
                f"{path / CONFIG_FILE}: invalid cross-layer transcoder config ({err}); {fix}") from err
        tensors = load_tensors(path / WEIGHTS_FILE, sha256=sha256, fix=fix, error=CrossLayerFileError)
        model = cls(config)
        expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
        found = {name: tuple(t.shape) for name, t in tensors.items()}
        if expected != found:
            diff = sorted(f"{name}: expected {expected.get(name)}, found {found.get(name)}"
                          for name in set(expected) | set(found) if expected.get(name) != found.get(name))
            raise CrossLayerFileError(f"{path / WEIGHTS_FILE} does not match {path / CONFIG_FILE} "
                                      f"({'; '.join(diff)}); {fix}")
        model.load_state_dict({name: t.float() for name, t in tensors.items()})
        return model.to(device) if device is not None else model


class LayerView(nn.Module):
    """One layer of a `CrossLayerTranscoder`, used like a per-layer `Transcoder` by `splice`.

    ``encode``, ``W_enc`` and ``W_dec`` (the latents' summed writes) serve `analyze_features` and the
    dashboard. Layers run in ascending order within one forward pass: ``view(x)`` encodes its layer's latents,
    records them on the CLT (the first CLT layer starts a new pass) and returns ``(latents, output)``,
    the output summing the writes of the latents recorded for every CLT layer up to this one.
    ``decode(edited)`` records edited latents, and decodes from the edited latents of every layer up
    to this one. `splice` has every layer up to the highest spliced one `record` its latents.
    """

    def __init__(self, clt: CrossLayerTranscoder, layer: int):
        super().__init__()
        self.clt, self.layer, self.position = clt, layer, clt.index(layer)
        c = clt.config
        self.config = TranscoderConfig(
            d_in=c.d_model, d_out=c.d_model, n_latents=c.n_latents, activation=c.activation, k=c.k,
            input_scale=c.input_scales[self.position], output_scale=c.output_scales[self.position],
            threshold_init=c.threshold_init, bandwidth=c.bandwidth, site=c.site(self.position))

    n_latents = property(lambda self: self.config.n_latents)
    d_in = property(lambda self: self.config.d_in)
    d_out = property(lambda self: self.config.d_out)
    device = property(lambda self: self.clt.device)

    @property
    def sources(self) -> list[int]:
        """The CLT layers whose latents write into this layer's output (up to and including it)."""
        return self.clt.layers[:self.position + 1]

    @property
    def writes_to(self) -> list[int]:
        """The layers this layer's latents write to (it and every later CLT layer)."""
        return self.clt.layers[self.position:]

    def record(self, x: Tensor) -> Tensor:
        """Encode this layer's latents for MLP inputs ``x`` and record them for the later layers."""
        latents = self.clt.encode(self.layer, x)
        run = self.clt.__dict__.setdefault("_run", {})
        if self.position == 0:
            run.clear()
        run[self.layer] = (latents, latents)  # (as encoded, as edited)
        return latents

    def _recorded(self, which: int) -> dict[int, Tensor]:
        run = self.clt.__dict__.get("_run", {})
        missing = [layer for layer in self.sources if layer not in run]
        if missing:
            raise RuntimeError(f"layer {self.layer} of the cross-layer transcoder sums the writes of layers "
                               f"{self.sources}, but layers {missing} were not encoded in this pass: run the "
                               "layers in ascending order (splice does)")
        return {layer: run[layer][which] for layer in self.sources}

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        latents = self.record(x)
        return latents, self.clt.decode(self.layer, self._recorded(0))

    def encode(self, x: Tensor) -> Tensor:
        """This layer's latents for MLP inputs ``x`` (recording nothing)."""
        return self.clt.encode(self.layer, x)

    @property
    def W_enc(self) -> Tensor:
        """This layer's encoder [n_latents, d] (normalised units)."""
        return self.clt.W_enc[self.position]

    @property
    def b_enc(self) -> Tensor:
        """This layer's encoder bias [n_latents]."""
        return self.clt.b_enc[self.position]

    @property
    def b_dec(self) -> Tensor:
        """The decoder bias of this layer's output [d] (normalised units)."""
        return self.clt.b_dec[self.position]

    @property
    def W_dec(self) -> Tensor:
        """Each latent's writes into this and every later layer, summed, in this layer's normalised units
        (``W_dec / config.output_scale`` is in model units): its direct effect on the residual stream, as
        `logit_effects` reads a decoder row."""
        c, i = self.clt.config, self.position
        writes = self.clt.W_dec(i) / self.clt.W_dec(i).new_tensor(c.output_scales[i:])[:, None]
        return writes.sum(1) * c.output_scales[i]

    def decode(self, latents: Tensor, x: Tensor | None = None) -> Tensor:
        """The output at this layer with this layer's latents replaced by ``latents`` (and earlier layers'
        by their edited latents, if they were decoded edited in this pass)."""
        run = self.clt.__dict__.setdefault("_run", {})
        if self.layer in run:
            run[self.layer] = (run[self.layer][0], latents)
        return self.clt.decode(self.layer, {**self._recorded(1), self.layer: latents})

    def extra_repr(self) -> str:
        return f"layer {self.layer} of a cross-layer transcoder over layers {self.clt.layers}"


def unspliced_sources(transcoders: Mapping[int, Any]) -> dict[int, LayerView]:
    """``{layer: view}`` of the cross-layer transcoder layers whose latents the spliced views of
    ``transcoders`` sum, but that are not spliced themselves: `splice` has them `LayerView.record` their
    latents (from the clean MLP input) without replacing their MLP's output."""
    return {layer: view.clt.views()[layer] for view in transcoders.values() if isinstance(view, LayerView)
            for layer in view.sources if layer not in transcoders}
