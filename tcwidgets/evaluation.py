"""Judge transcoders on held-out tokens: reconstruction, sparsity, and the model's loss spliced.

`evaluate` runs, per batch of contexts, one clean forward pass (reading every evaluated layer's
MLP input and output, and the logits), then one pass per layer with its transcoder spliced in
(full replacement, no error term), one per layer with that MLP zero-ablated, and, with several
layers, one with all transcoders spliced and one with all those MLPs zero-ablated.

Conventions:

- Cross-entropy is the next-token loss of the predictions at positions ``0 .. context-2`` for the
  tokens ``1 .. context-1``, averaged over all of them — what Hugging Face's ``labels=`` loss
  computes. The BOS token that starts every context is never a target; the prediction made *at*
  the BOS position is included. KL divergence, ``KL(clean || spliced)`` in nats, is averaged over
  the same positions.
- Reconstruction metrics (FVU, MSE, L0, dead fraction) count every token, BOS included, as the
  activation store that transcoders are trained on does and as splicing replaces them.
- FVU = Σ‖y − ŷ‖² / Σ‖y − ȳ‖² over all tokens (ȳ the mean over these tokens), in model units,
  accumulated in float64; MSE = Σ‖y − ŷ‖² / (tokens × d_model); L0 = mean number of non-zero
  latents per token; dead fraction = share of latents that are zero on every token.
- CE loss recovered = (CE_zero − CE_spliced) / (CE_zero − CE_clean): 1 when splicing costs
  nothing, 0 when it is as bad as deleting the MLP.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .splicing import check_transcoders, run_transcoder, splice, writes_after_norm

#: The per-layer metrics, in table order.
LAYER_METRICS = ("fvu", "mse", "l0", "dead_fraction", "ce_clean", "ce_spliced", "ce_zero_ablated",
                 "ce_recovered", "kl")
_ALL_METRICS = ("ce_clean", "ce_all_spliced", "ce_all_zero_ablated", "ce_recovered_all", "kl_all")


@dataclass(frozen=True)
class LayerMetrics:
    """One layer's metrics; readable as attributes or as a dict (``m["fvu"]``)."""

    layer: int
    fvu: float
    mse: float
    l0: float
    dead_fraction: float
    ce_clean: float
    ce_spliced: float
    ce_zero_ablated: float
    ce_recovered: float
    kl: float

    def __getitem__(self, name: str) -> float:
        if name not in LAYER_METRICS:
            raise KeyError(f"No metric {name!r}; the metrics are {', '.join(LAYER_METRICS)}.")
        return getattr(self, name)

    def keys(self) -> tuple[str, ...]:
        return LAYER_METRICS

    def to_dict(self) -> dict[str, float]:
        return {name: self[name] for name in LAYER_METRICS}


@dataclass(frozen=True)
class Metrics:
    """The result of `evaluate`: per-layer `LayerMetrics` plus the all-layers-at-once losses.

    ``m[6]`` is layer 6's `LayerMetrics` (``m[6].fvu``, ``m[6]["fvu"]``); ``m.fvu`` is
    ``{layer: fvu}`` for every layer (likewise each name in `LAYER_METRICS`). ``ce_all_spliced``,
    ``ce_all_zero_ablated``, ``ce_recovered_all`` and ``kl_all`` splice (or ablate) all evaluated
    layers at once; with one layer they equal its own values. ``transcoders`` describes each
    transcoder (its config), ``label`` names the run in `plot_frontier`.
    """

    model: str
    n_contexts: int
    context: int
    layers: dict[int, LayerMetrics]
    ce_clean: float
    ce_all_spliced: float
    ce_all_zero_ablated: float
    ce_recovered_all: float
    kl_all: float
    transcoders: dict[int, dict] = dataclasses.field(default_factory=dict)
    label: str | None = None

    def __getitem__(self, layer: int) -> LayerMetrics:
        if layer not in self.layers:
            raise KeyError(f"Layer {layer} was not evaluated; evaluated layers: {list(self.layers)}.")
        return self.layers[layer]

    def __iter__(self) -> Iterator[int]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getattr__(self, name: str) -> dict[int, float]:
        if name in LAYER_METRICS:
            return {layer: metrics[name] for layer, metrics in self.__dict__["layers"].items()}
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (non-finite values become ``None``); `from_dict` reads it back."""
        return finite_or_none({
            "model": self.model, "n_contexts": self.n_contexts, "context": self.context,
            "label": self.label, **{name: getattr(self, name) for name in _ALL_METRICS},
            "layers": {str(layer): metrics.to_dict() for layer, metrics in self.layers.items()},
            "transcoders": {str(layer): config for layer, config in self.transcoders.items()},
        })

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Metrics:
        """Rebuild `Metrics` from `to_dict`'s output (e.g. after ``json.load``)."""
        def number(value: Any) -> float:
            return math.nan if value is None else float(value)

        return cls(
            model=data["model"], n_contexts=data["n_contexts"], context=data["context"],
            layers={int(layer): LayerMetrics(int(layer), **{name: number(values[name]) for name in LAYER_METRICS})
                    for layer, values in data["layers"].items()},
            **{name: number(data[name]) for name in _ALL_METRICS},
            transcoders={int(layer): config for layer, config in data.get("transcoders", {}).items()},
            label=data.get("label"),
        )

    def records(self) -> list[dict[str, Any]]:
        """One flat dict per layer: label, layer, the transcoder's config fields and the metrics."""
        return [{"label": self.label, "layer": layer, **self.transcoders.get(layer, {}), **metrics.to_dict()}
                for layer, metrics in self.layers.items()]

    # -- display -------------------------------------------------------------------------------
    def _summary(self) -> str:
        name = f"{self.label}: " if self.label else ""
        text = (f"{name}{self.model}, {self.n_contexts} contexts × {self.context} tokens; "
                f"CE clean {self.ce_clean:.4f}")
        if len(self.layers) > 1:
            text += (f", all spliced {self.ce_all_spliced:.4f} (recovered {self.ce_recovered_all:.1%}, "
                     f"KL {self.kl_all:.4f})")
        return text

    def _rows(self) -> list[list[str]]:
        return [[str(layer), f"{m.fvu:.4f}", f"{m.mse:.4g}", f"{m.l0:.1f}", f"{m.dead_fraction:.1%}",
                 f"{m.ce_spliced:.4f}", f"{m.ce_zero_ablated:.4f}", f"{m.ce_recovered:.1%}", f"{m.kl:.4f}"]
                for layer, m in self.layers.items()]

    _HEADER = ("layer", "FVU", "MSE", "L0", "dead", "CE spliced", "CE zero-abl.", "CE recovered", "KL")

    def __repr__(self) -> str:
        rows = [list(self._HEADER)] + self._rows()
        widths = [max(len(row[i]) for row in rows) for i in range(len(self._HEADER))]
        table = "\n".join("  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in rows)
        return f"Metrics({self._summary()})\n{table}"

    def _repr_html_(self) -> str:
        return html_table(self._summary(), self._HEADER, self._rows())


def html_table(summary: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A notebook's HTML view of a results table: a summary line, then the table (all text escaped)."""
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<div><p>{html.escape(summary)}</p><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def finite_or_none(value: Any) -> Any:
    """``value`` for JSON: non-finite floats (also inside dicts and lists) become ``None``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(item) for item in value]
    return value


def describe_transcoder(tc: Any) -> dict[str, Any]:
    """A JSON-friendly description of a transcoder: its config's fields (JSON values only) and sizes."""
    config = tc.config
    fields = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(vars(config))
    description = {}
    for key, value in fields.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            continue
        description[key] = value
    return {**description, "n_latents": tc.n_latents, "d_in": tc.d_in, "d_out": tc.d_out}


class ReconstructionStats:
    """Running float64 sums for FVU, MSE, L0 and dead fraction, fed batch by batch.

    ``add(latents, reconstruction, target)`` takes ``[..., n_latents]``, ``[..., d]``, ``[..., d]``
    tensors; `metrics` returns ``{"fvu", "mse", "l0", "dead_fraction"}`` over everything added
    (definitions in the module docstring).
    """

    def __init__(self, n_latents: int) -> None:
        self.n_tokens = 0
        self.squared_error = 0.0
        self.target_sum: torch.Tensor | float = 0.0
        self.target_squares = 0.0
        self.active = 0
        self.fired = torch.zeros(n_latents, dtype=torch.bool)

    def add(self, latents: torch.Tensor, reconstruction: torch.Tensor, target: torch.Tensor) -> None:
        target = target.reshape(-1, target.shape[-1]).double()
        nonzero = latents.reshape(-1, latents.shape[-1]) != 0
        self.n_tokens += len(target)
        self.squared_error += float((target - reconstruction.reshape(target.shape).double()).square().sum())
        self.target_sum = self.target_sum + target.sum(0).cpu()
        self.target_squares += float(target.square().sum())
        self.active += int(nonzero.sum())
        self.fired |= nonzero.any(0).cpu()

    def metrics(self) -> dict[str, float]:
        if not self.n_tokens:
            raise ValueError("No tokens were added.")
        variance = self.target_squares - float(self.target_sum.square().sum()) / self.n_tokens
        return {"fvu": self.squared_error / variance if variance > 0 else math.nan,
                "mse": self.squared_error / (self.n_tokens * len(self.target_sum)),
                "l0": self.active / self.n_tokens,
                "dead_fraction": 1.0 - float(self.fired.float().mean())}


def _losses(logits: torch.Tensor, targets: torch.Tensor,
            clean_log_probs: torch.Tensor | None) -> tuple[float, float, torch.Tensor]:
    """Summed next-token cross-entropy and KL(clean || these) over positions, and the log-probs.

    One context at a time, so only one ``[context, vocab]`` temporary exists besides the inputs."""
    ce, kl, log_probs = 0.0, 0.0, []
    for i in range(len(logits)):
        row = torch.log_softmax(logits[i, :-1].float(), dim=-1)
        ce -= float(row.gather(-1, targets[i, :, None]).sum())
        if clean_log_probs is not None:
            kl += float(F.kl_div(row, clean_log_probs[i], log_target=True, reduction="sum"))
        log_probs.append(row)
    return ce, kl, torch.stack(log_probs)


def evaluate(
    lm: Any,
    transcoders: Mapping[int, Any] | Any,
    tokens: torch.Tensor,
    *,
    batch_size: int = 8,
    progress: bool = True,
    label: str | None = None,
    remote: bool | str | None = None,
) -> Metrics:
    """Evaluate transcoders on held-out token contexts (``load_corpus(..., split="test")``).

    Args:
        lm: the model the transcoders were trained on.
        transcoders: ``{layer: transcoder}`` or one transcoder.
        tokens: ``[n_contexts, context]`` token ids, at least 2 tokens per context.
        batch_size: contexts per forward pass (each pass holds a few ``[batch, context, vocab]``
            float32 tensors: lower it if memory is short).
        progress: show a progress bar.
        label: a name for this run, shown in tables and by `plot_frontier`.
        remote: run the traces on NDIF (``True``) or its in-process path (``"local"``); defaults to
            the model's setting. Logits and MLP activations of each batch come back to this machine.

    See the module docstring for the exact definitions.
    """
    transcoders = check_transcoders(lm, transcoders)
    if not transcoders:
        raise ValueError("No transcoders to evaluate: pass {layer: transcoder} or one transcoder.")
    tokens = lm.check_tokens(tokens)
    if tokens.shape[1] < 2:
        raise ValueError("Contexts need at least 2 tokens to measure next-token loss.")
    layers = list(transcoders)
    runs: dict[str, dict[str, Any]] = {}  # name -> splice arguments
    for layer in layers:
        runs[f"spliced {layer}"] = {"transcoders": {layer: transcoders[layer]}}
        runs[f"zero {layer}"] = {"transcoders": {}, "zero_ablate": [layer]}
    if len(layers) > 1:
        runs["spliced all"] = {"transcoders": transcoders}
        runs["zero all"] = {"transcoders": {}, "zero_ablate": layers}

    reconstruction = {layer: ReconstructionStats(tc.n_latents) for layer, tc in transcoders.items()}
    after_norm = [layer for layer, tc in transcoders.items() if writes_after_norm(lm, tc)]
    ce = dict.fromkeys(["clean", *runs], 0.0)
    kl = dict.fromkeys(runs, 0.0)
    options = {"progress": False, "remote": remote}
    bar = tqdm(total=tokens.numel(), unit="tok", desc=f"evaluating layers {layers}", disable=not progress)
    with torch.no_grad():
        for start in range(0, len(tokens), batch_size):
            batch = tokens[start:start + batch_size]
            targets = batch[:, 1:]
            clean = splice(lm, {}, batch, save_mlp=layers, after_norm=after_norm, batch_size=len(batch), **options)
            bar.set_postfix_str("clean run done")  # news after each pass: a batch of a large model takes a while
            ce_batch, _, clean_log_probs = _losses(clean.logits, targets, None)
            ce["clean"] += ce_batch
            for layer, tc in transcoders.items():
                x, y = clean.mlp[layer]
                reconstruction[layer].add(*run_transcoder(tc, x, y), y)
            for name, arguments in runs.items():
                logits = splice(lm, tokens=batch, batch_size=len(batch), **arguments, **options).logits
                ce_batch, kl_batch, _ = _losses(logits, targets, clean_log_probs)
                ce[name] += ce_batch
                kl[name] += kl_batch
                bar.set_postfix_str(f"{name} run done")
            bar.update(batch.numel())
    bar.close()

    n_predictions = tokens.shape[0] * (tokens.shape[1] - 1)
    ce = {name: total / n_predictions for name, total in ce.items()}
    kl = {name: total / n_predictions for name, total in kl.items()}
    every = "all" if len(layers) > 1 else layers[0]
    return Metrics(
        model=lm.name, n_contexts=tokens.shape[0], context=tokens.shape[1],
        layers={layer: LayerMetrics(
            layer=layer, **reconstruction[layer].metrics(), ce_clean=ce["clean"],
            ce_spliced=ce[f"spliced {layer}"], ce_zero_ablated=ce[f"zero {layer}"],
            ce_recovered=_recovered(ce["clean"], ce[f"spliced {layer}"], ce[f"zero {layer}"]),
            kl=kl[f"spliced {layer}"]) for layer in layers},
        ce_clean=ce["clean"], ce_all_spliced=ce[f"spliced {every}"], ce_all_zero_ablated=ce[f"zero {every}"],
        ce_recovered_all=_recovered(ce["clean"], ce[f"spliced {every}"], ce[f"zero {every}"]),
        kl_all=kl[f"spliced {every}"],
        transcoders={layer: describe_transcoder(tc) for layer, tc in transcoders.items()},
        label=label,
    )


def _recovered(clean: float, spliced: float, zero: float) -> float:
    return (zero - spliced) / (zero - clean) if zero != clean else math.nan


def plot_frontier(
    results: Sequence[Metrics | Mapping[str, Any]] | Metrics,
    x: str = "l0",
    y: str = "fvu",
    label: str | Callable[[dict[str, Any]], str] | None = None,
    *,
    ax: Any = None,
) -> Any:
    """Plot ``y`` against ``x`` (FVU or MSE against L0 by default) for several runs; return the figure.

    Args:
        results: `Metrics` (one point per layer), dicts from `Metrics.to_dict`, or flat dicts with
            at least the ``x`` and ``y`` keys (plus optional ``"label"`` and ``"layer"``).
        x, y: what to plot: any metric name, or a transcoder config field such as ``"k"``.
        label: what names and groups the points: ``None`` uses each run's own label; a string is
            a field of the records (e.g. ``"activation"``); a callable maps a record to a name.
            Points with the same name are joined in ``x`` order, one line per layer.
        ax: a matplotlib axes to draw on (default: a new figure).
    """
    import matplotlib.pyplot as plt

    if isinstance(results, (Metrics, Mapping)):
        results = [results]
    records = []
    for index, result in enumerate(results):
        if isinstance(result, Mapping) and "layers" in result:
            result = Metrics.from_dict(result)
        for record in result.records() if isinstance(result, Metrics) else [dict(result)]:
            missing = [key for key in (x, y) if record.get(key) is None]
            if missing:
                raise KeyError(f"Result {index} has no {' or '.join(map(repr, missing))}; it has "
                               f"{', '.join(sorted(record))}.")
            record.setdefault("label", None)
            record["label"] = record["label"] or f"run {index}"
            records.append(record)
    if not records:
        raise ValueError("plot_frontier needs at least one result.")
    several_layers = len({record.get("layer") for record in records}) > 1
    groups: dict[str, list[dict]] = {}
    for record in records:
        name = str(label(record) if callable(label) else record.get(label or "label"))
        if several_layers and record.get("layer") is not None:
            name += f" (layer {record['layer']})"
        groups.setdefault(name, []).append(record)

    if ax is None:
        figure, ax = plt.subplots(figsize=(6, 4))
        plt.close(figure)  # the caller displays the returned figure; no second copy from pyplot
    for name, points in groups.items():
        points.sort(key=lambda record: record[x])
        ax.plot([p[x] for p in points], [p[y] for p in points], marker="o", label=name)
    ax.set_xlabel(x.upper() if x in ("l0", "fvu", "mse", "kl") else x.replace("_", " "))
    ax.set_ylabel(y.upper() if y in ("l0", "fvu", "mse", "kl") else y.replace("_", " "))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return ax.figure
