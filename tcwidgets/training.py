"""Train transcoders on an activation store.

A lean trainer in the spirit of EleutherAI's sparsify: few options, strong defaults.

- Shuffled batches from the store (deterministic given the seed; whole contexts or the corpus order
  with ``shuffle=``), Adam with a linear warm-up and a linear decay to zero, a learning rate scaled
  with the width.
- Inputs and targets scaled to an average norm of sqrt(d) (the scales live in the transcoder's
  config, so it works in model units); loss = fraction of variance unexplained (FVU).
- Unit-norm decoder rows (the gradient component parallel to each row is removed before the step,
  rows are renormalised after it), except for ReLU, whose L1 penalty is weighted by the rows' norms.
- A data-driven initialisation (see `initialize` and docs/training.md for the measurements),
  ``b_dec`` at the target mean; a skip transcoder's affine path at the ridge regression of the
  target on the input, its latents on the residual (docs/circuits.md).
- AuxK (Gao et al. 2024) for latents that have not fired in the last ``dead_window`` tokens.
- Optional Matryoshka prefixes (``matryoshka=``): the loss also sums the FVU of nested prefixes of
  the latents, each reconstructing alone.
- TopK/BatchTopK train through a sparse path: the encoder's and decoder's backward passes only
  touch the active latents.
- Checkpoints (safetensors + JSON, never pickles, checksummed) written atomically, and exact
  resume: an interrupted run resumed from its checkpoint ends with the same weights, bit for bit on
  CPU. A checkpoint records its store's identity (model weights, tokens, layer) and is refused for
  another store.
"""

from __future__ import annotations

import math
import os
import queue
import shutil
import threading
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import heap, threads
from .activations import OUTLIER_RATIO, shuffle_mode
from .calibration import fastest_latent_choice
from .evaluation import ReconstructionStats
from .files import FileFormatError, atomic_folder, load_tensors, read_manifest, save_tensors, write_manifest
from .progress import REDRAW_S, delayed_bar, layers_label
from .transcoder import SparseLatents, Transcoder, TranscoderConfig, latent_choice, step as heaviside

__all__ = [
    "CheckpointError", "Trainer", "TrainingConfig", "default_batch_size", "default_lr", "fit_together",
    "initialize", "least_squares_skip", "reconstruction_metrics", "train_transcoder",
]

CHECKPOINT_FORMAT = "tcwidgets.checkpoint"
CHECKPOINT_VERSION = 2  # 2: the store's full identity, checksums, a sealed trainer.json
_SPARSE = ("topk", "batchtopk")
_DEFAULT_SPARSITY = {"relu": 3e-3, "jumprelu": 1e-3}
_ADDED_SINCE_VERSION_2 = ("matryoshka", "shuffle")  # settings older checkpoints ran with at their defaults


class CheckpointError(FileFormatError):
    """A training checkpoint is unreadable, corrupted, or of another run (settings or store)."""


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass
class TrainingConfig:
    """What a training run computes (everything that decides the final weights).

    Args:
        n_latents: width of the transcoder; default 8 × the model's width.
        kind: ``"transcoder"``, ``"skip"`` or ``"sae"``.
        activation: ``"topk"``, ``"batchtopk"``, ``"relu"`` or ``"jumprelu"``.
        k: active latents per token (TopK, BatchTopK).
        epochs: passes over the store.
        batch_size: tokens per step; default `default_batch_size` (a few hundred steps or more).
        lr: Adam's peak learning rate; default `default_lr` (scaled with the width).
        warmup: fraction of the steps with a linear warm-up; the rest decays linearly to zero.
        sparsity_coefficient: L1 (ReLU) or L0 (JumpReLU) penalty weight, per token, relative to
            the FVU; default 3e-3 (ReLU), 1e-3 (JumpReLU).
        sparsity_warmup: fraction of the steps over which that weight rises linearly from zero.
        auxk_coefficient: weight of the AuxK loss (TopK, BatchTopK); 0 turns it off.
        k_aux: dead latents used by AuxK per token; default half the output width.
        dead_window: a latent is dead when it has not fired in this many tokens; default
            min(10M, a quarter of the tokens per epoch).
        seed: initialisation and batch order.
        matryoshka: nested prefix sizes ``(m1, m2, ...)`` (TopK, BatchTopK; Bussmann et al. 2025,
            Nabeshima 2024): the loss sums the FVU of each prefix's reconstruction, made with only
            the chosen latents among the first ``m_i`` (the others zeroed), and of the whole
            width's (counted once); strictly increasing, at most ``n_latents``. The history
            records each prefix's FVU as ``fvu_<m>``.
        shuffle: batch order (`ActivationStore.batches`): ``"global"`` (tokens shuffled across
            the whole store), ``"context"`` (whole contexts in a shuffled order) or ``"document"``
            (the stored corpus order).
    """

    n_latents: int | None = None
    kind: str = "transcoder"
    activation: str = "topk"
    k: int = 32
    epochs: int = 1
    batch_size: int | None = None
    lr: float | None = None
    warmup: float = 0.05
    sparsity_coefficient: float | None = None
    sparsity_warmup: float = 0.1
    auxk_coefficient: float = 1 / 32
    k_aux: int | None = None
    dead_window: int | None = None
    seed: int = 0
    matryoshka: tuple[int, ...] | None = None
    shuffle: str = "global"

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if not (value is None and name == "batch_size") and not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("warmup", "sparsity_warmup"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} is a fraction of the steps in [0, 1), got {getattr(self, name)!r}")
        for name in ("lr", "sparsity_coefficient", "k_aux", "dead_window", "n_latents"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive (or None for the default), got {value!r}")
        if self.auxk_coefficient < 0:
            raise ValueError(f"auxk_coefficient must be >= 0, got {self.auxk_coefficient!r}")
        self.shuffle = shuffle_mode(self.shuffle)
        if self.matryoshka is not None:
            self.matryoshka = _check_matryoshka(self.matryoshka, self.activation, self.n_latents)


def _check_matryoshka(sizes: Sequence[int], activation: str, n_latents: int | None) -> tuple[int, ...]:
    """``sizes`` as a tuple, or a ValueError naming what is wrong with them."""
    if activation not in _SPARSE:
        raise ValueError(f"matryoshka=... needs activation='topk' or 'batchtopk', not {activation!r}: "
                         f"drop matryoshka or change the activation")
    sizes = tuple(sizes)
    if not sizes or not all(isinstance(m, int) and m >= 1 for m in sizes):
        raise ValueError(f"matryoshka={sizes!r}: give prefix sizes as positive integers, e.g. (128, 512, 2048)")
    if any(b <= a for a, b in zip(sizes, sizes[1:])):
        raise ValueError(f"matryoshka={sizes!r}: prefix sizes must be strictly increasing")
    if n_latents is not None and sizes[-1] > n_latents:
        raise ValueError(f"matryoshka={sizes!r}: the prefixes cannot be wider than n_latents={n_latents}")
    return sizes


def default_lr(n_latents: int) -> float:
    """Adam's peak learning rate for a width: 8e-4 / sqrt(n_latents / 16384), at most 2e-3.

    The 1/sqrt(width) scaling is Gao et al.'s (2024) and sparsify's; the constant is four times
    sparsify's 2e-4, measured best for runs of a few hundred steps (docs/training.md).
    """
    return min(8e-4 / math.sqrt(n_latents / 2**14), 2e-3)  # narrow ones diverge above ~2e-3


def default_batch_size(n_tokens: int) -> int:
    """Tokens per step for a run of ``n_tokens`` (all epochs): the power of two nearest
    ``n_tokens / 768``, within [256, 4096]. Short runs need many small steps (on 200k tokens,
    256-token batches reach a held-out FVU of 0.23 where 1024-token batches reach 0.26); long runs
    can afford large, efficient batches."""
    return int(min(4096, max(256, 2 ** round(math.log2(max(1, n_tokens / 768))))))


def lr_factor(step: int, total: int, warmup: float) -> float:
    """Learning-rate multiplier at ``step`` (0-based): linear warm-up, then linear decay to 0."""
    warm = max(1, round(warmup * total))
    if step < warm:
        return (step + 1) / warm
    return max(0.0, (total - step) / max(1, total - warm))


# --------------------------------------------------------------------------------------------
# Initialisation
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def initialize(tc: Transcoder, x: Tensor, y: Tensor, generator: torch.Generator) -> None:
    """Data-driven initialisation from a sample of training pairs (model units).

    Each latent starts as one training token, the tokens chosen spread over the input directions
    (farthest-point seeding): its decoder row is that token's centred (scaled) target, normalised; its
    encoder row is that token's centred (scaled) input direction, scaled so pre-activations have
    unit variance over the sample; its bias puts its pre-activation above zero on a share
    k / n_latents of the sample, so every latent starts firing equally often, with small
    activations. ``b_dec`` is the target mean; a skip transcoder's affine path ``W_skip·x̃ + b_dec``
    starts as the ridge regression of the target on the input (`least_squares_skip`), and its
    decoder rows as the seed tokens' residuals of that regression, so the latents start on what the
    skip path leaves. (Alternatives and their measurements: docs/training.md, docs/circuits.md.)
    """
    c = tc.config
    xs, ys = x * c.input_scale, y * c.output_scale
    x_mean, y_mean = xs.mean(0), ys.mean(0)
    if c.kind == "skip":
        W_skip, b_skip = least_squares_skip(xs, ys)
        tc.W_skip.copy_(W_skip)
        ys = ys - (xs.double() @ W_skip.t() + b_skip).to(ys.dtype)  # the residual the latents learn
        y_mean = ys.mean(0)
    directions = _unit_rows(xs - x_mean)
    pick = _spread_rows(directions, c.n_latents, generator)
    sample = xs[:_BIAS_TOKENS]
    enc = directions[pick]
    pre = enc @ sample.t()  # [n_latents, tokens]: the top-k along rows is 2.4x faster than along columns
    scale = pre.std()
    share = max(1, round((c.k or 1) / c.n_latents * len(sample)))
    tc.W_enc.copy_(enc / scale)
    tc.b_enc.copy_(-pre.topk(share, dim=1).values[:, -1] / scale)
    tc.W_dec.copy_(_unit_rows(ys[pick] - y_mean))
    tc.b_dec.copy_(y_mean + (b_skip if c.kind == "skip" else 0))
    if c.kind == "skip":
        _fit_latent_scale(tc, x[: len(sample)], ys[: len(sample)] - y_mean)


def _fit_latent_scale(tc: Transcoder, x: Tensor, residual: Tensor) -> None:
    """Scale every latent's activation by the one factor whose ``W_dec·z`` best fits ``residual``
    (scaled units) on ``x`` (model units), so that the fresh latents do not overshoot a residual
    that is small next to the target (unscaled, they took the fresh FVU on the tests' store from
    the regression's 0.015 to 0.029 on layer 0; docs/circuits.md). Encoder, bias and threshold
    scale together, which scales the activations and keeps the active latents."""
    written = tc.encode(x) @ tc.W_dec
    factor = max(float((written * residual).sum() / (written * written).sum().clamp_min(1e-12)), 1e-6)
    tc.W_enc.mul_(factor)
    tc.b_enc.mul_(factor)
    if tc.config.activation == "jumprelu":
        tc.log_threshold.add_(math.log(factor))


SKIP_RIDGE = 1e-3
"""`least_squares_skip`'s ridge term, relative to the inputs' mean variance (docs/circuits.md)."""


def least_squares_skip(xs: Tensor, ys: Tensor, ridge: float = SKIP_RIDGE) -> tuple[Tensor, Tensor]:
    """``(W, b)`` (float64) minimising ``mean |ys - xs·Wᵀ - b|² + λ|W|²`` over the rows, with
    λ = ``ridge`` × the mean variance of ``xs``'s columns and ``W`` blind to the mean input's
    direction (``W·x̄ = 0``, so ``b`` is the output mean): the ridge regression of the (scaled) MLP
    output on the (scaled) MLP input less its part along x̄, solved from the centred normal
    equations in float64. Without that constraint the fit maps the large mean input to a large
    output that ``b`` cancels, and an attribution graph then shows paths of ±10 through skip
    paths and decoder biases that cancel each other (docs/circuits.md)."""
    x, y = xs.double(), ys.double()
    x_mean, y_mean = x.mean(0), y.mean(0)
    direction = x_mean / x_mean.norm().clamp_min(1e-30)
    x, y = x - x_mean, y - y_mean
    x = x - (x @ direction)[:, None] * direction
    gram = x.t() @ x
    gram.diagonal().add_(ridge * gram.trace() / len(gram))
    W = torch.linalg.solve(gram, x.t() @ y).t()
    return W - (W @ direction)[:, None] * direction, y_mean


_SPREAD_DIMS = 128
_BIAS_TOKENS = 2048  # tokens the encoder biases are set on (4096 before: 2x the CPU time, FVU 0.0002 better)


def _spread_rows(x: Tensor, n: int, generator: torch.Generator, rounds: int = 64) -> Tensor:
    """Indices of ``n`` rows of ``x`` (unit vectors) spread over its directions: farthest-point
    seeding by cosine distance (from one random row, repeatedly take the rows farthest from all
    taken so far), ``n / rounds`` rows per round, skipping copies within a round (`_distinct`);
    cosines in a 128-dimensional random projection when ``x`` is wider. Near-duplicate seeds
    start latents that compete for the same tokens until one of them dies: on the reference run,
    random seeds leave 7.3% of the latents dead on held-out tokens, farthest-point seeding that
    allows copies 1.6%, without copies 0.1% (docs/training.md)."""
    if n >= len(x):  # fewer rows than latents: take them all, then repeat
        return torch.randperm(len(x), generator=generator).repeat(math.ceil(n / len(x)))[:n]
    if x.shape[1] > _SPREAD_DIMS:  # cosines in a random projection: 4x cheaper for d = 576
        projection = torch.randn(x.shape[1], _SPREAD_DIMS, generator=generator, dtype=x.dtype)
        x = _unit_rows(x @ projection.to(x.device))
    per_round = math.ceil(n / rounds)
    first = torch.randint(len(x), (1,), generator=generator)
    distance = 1 - (x @ x[first].t()).amax(1)  # to the nearest taken row
    chosen, taken = [], 0
    while taken < n:
        need = min(per_round, n - taken)
        candidates = distance.topk(min(len(x), 4 * need)).indices
        pick = _distinct(x[candidates], distance[candidates], need)
        if len(pick) == 0:  # all rows taken, or only duplicates left: repeat random rows
            rest = torch.randperm(len(x), generator=generator)[: n - taken]
            chosen.append(rest)
            break
        pick = candidates[pick]
        chosen.append(pick)
        taken += len(pick)
        distance = torch.minimum(distance, 1 - (x @ x[pick].t()).amax(1))
        distance[pick] = -1
    return torch.cat(chosen)[:n]


def _distinct(rows: Tensor, distance: Tensor, need: int) -> Tensor:
    """Up to ``need`` of ``rows`` (ordered by decreasing ``distance``), skipping any that is nearer
    to an accepted one than half its own distance to the rows taken in earlier rounds: the farthest
    rows of a round can be copies of each other (every sequence's first token has the same
    activations), and copies start latents that compete until all but one die."""
    sims = (rows @ rows.t()).cpu().numpy()
    distance = distance.cpu().numpy()
    nearest = np.full(len(rows), -np.inf, dtype=sims.dtype)  # each row's largest cosine to an accepted one
    accepted: list[int] = []
    for i in range(len(rows)):
        if distance[i] < 1e-6 or len(accepted) == need:
            break
        if accepted and 1 - float(nearest[i]) < 0.5 * float(distance[i]):
            continue
        accepted.append(i)
        np.maximum(nearest, sims[:, i], out=nearest)
    return torch.tensor(accepted, dtype=torch.long)


def _unit_rows(m: Tensor) -> Tensor:
    return m / m.norm(dim=1, keepdim=True).clamp_min(1e-12)


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------


class Trainer:
    """Train one transcoder on one layer of an `ActivationStore`.

    ``trainer = Trainer(store, 6, TrainingConfig(n_latents=4608, k=32))``, then
    ``tc = trainer.fit()``. ``trainer.history`` holds a record every ``log_every`` steps (step,
    tokens, loss, fvu, l0, dead_fraction, lr, auxk); ``callback(trainer, record)`` is called with
    each; `plot_history` draws them.

    Args:
        store: the training activations.
        layer: which of its layers.
        config: the `TrainingConfig` (default: all defaults).
        transcoder: start from this transcoder instead of the default initialisation.
        model: if given, the store must hold activations of this model.
        checkpoint_dir: write checkpoints here every ``checkpoint_every`` steps and at the end.
        checkpoint_every: steps between checkpoints (default: about 10 per run).
        resume: continue from the latest checkpoint in ``checkpoint_dir`` if there is one (it must
            be of the same configuration and store); ``False`` starts over, deleting it.
        device: default CUDA when available, else CPU.
        low_precision: the precision of the matrix product that chooses TopK/BatchTopK latents
            (``"float32"`` or ``False``, ``"bfloat16"`` or ``True``, ``"int8"``: TopK only; see
            `Transcoder.encode_sparse`); default: the fastest measured on this machine
            (`calibration.fastest_latent_choice`, cached per machine). A resumed run keeps the
            precision its checkpoint was trained with.
        data_parallel: train this one layer across the processes of a ``torchrun`` launch
            (DistributedDataParallel: gloo on CPU, NCCL on CUDA, one GPU per process): each
            process takes its share of every batch (``batch_size`` is the global batch, a
            multiple of the number of processes), gradients are summed, and every process ends
            with the same weights, those of one process training on the whole batch (up to
            floating-point summation order). Rank 0 writes the checkpoints. BatchTopK picks its
            k × tokens latents within each process's share.
        eval_store: held-out activations; `reconstruction_metrics` on it after training, in
            ``trainer.eval_metrics``.
        log_every: steps between history records.
        callback: ``callback(trainer, record)`` after each history record (e.g. a live plot).
        progress: show a progress bar.
    """

    def __init__(
        self,
        store: Any,
        layer: int,
        config: TrainingConfig | None = None,
        *,
        transcoder: Transcoder | None = None,
        model: str | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every: int | None = None,
        resume: bool = True,
        device: str | torch.device | None = None,
        low_precision: bool | str | None = None,
        data_parallel: bool = False,
        eval_store: Any = None,
        log_every: int = 10,
        callback: Callable[[Trainer, dict[str, float]], None] | None = None,
        progress: bool = True,
    ):
        config = config or TrainingConfig()
        if model is not None:
            store.check(model=model)
        sites = store.sites(layer)  # raises a KeyError naming the store's layers
        if eval_store is not None:
            eval_store.check(model=store.model, layers=[layer])
        self.store, self.layer, self.eval_store = store, layer, eval_store
        self.device = torch.device(device) if device is not None else _default_device()
        self.rank, self.world = _init_data_parallel(self.device) if data_parallel else (0, 1)
        if data_parallel and self.device.type == "cuda" and device is None:
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        self.log_every, self.callback, self.progress = log_every, callback, progress

        d = store.d_model
        self.config = config = replace(
            config, n_latents=config.n_latents or 8 * d,
            batch_size=config.batch_size or default_batch_size(store.n_tokens * config.epochs),
        )
        n_latents = config.n_latents
        if config.batch_size % self.world:
            raise ValueError(f"batch_size={config.batch_size} does not split evenly over {self.world} "
                             f"data-parallel processes: choose a multiple of {self.world}")
        self.total_steps = store.n_batches(config.batch_size, config.epochs)
        if self.total_steps == 0:
            raise ValueError(f"batch_size={config.batch_size} is larger than the store ({store.n_tokens} tokens)")
        self.lr = config.lr or default_lr(n_latents)
        self.k_aux = config.k_aux or d // 2
        self.dead_window = config.dead_window or min(10_000_000, max(1, store.n_tokens // 4))
        self.sparsity = config.sparsity_coefficient or _DEFAULT_SPARSITY.get(config.activation, 0.0)
        self.checkpoint_every = checkpoint_every or max(1, self.total_steps // 10)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        stats = store.stats(layer)
        self._squared_norm_limits = ((OUTLIER_RATIO * stats.in_norm) ** 2, (OUTLIER_RATIO * stats.out_norm) ** 2)

        if transcoder is None:
            transcoder = self._new_transcoder(sites)
        elif (transcoder.d_in, transcoder.d_out, transcoder.config.activation) != (d, d, config.activation):
            raise ValueError("the given transcoder does not match the store's width or the configured activation")
        self.transcoder = transcoder.to(self.device).train()
        self._latent_choice_given = low_precision is not None
        if low_precision is None:
            low_precision = (fastest_latent_choice(self.transcoder, config.batch_size)
                             if config.activation in _SPARSE else "float32")
        self.latent_choice = latent_choice(low_precision)
        self.optimizer = torch.optim.Adam(self.transcoder.parameters(), lr=self.lr, fused=True)
        self.objective: nn.Module = _Objective(self)
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.objective = DistributedDataParallel(
                self.objective, device_ids=[self.device] if self.device.type == "cuda" else None)
        self.tokens_since_fired = torch.zeros(n_latents, dtype=torch.long, device=self.device)
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.eval_metrics: dict[str, float] | None = None
        self._sums: dict[str, float] = {}

        if self.checkpoint_dir is not None:
            resume_or_clear(self.checkpoint_dir, resume, self._load_checkpoint)

    def _new_transcoder(self, sites: dict[str, str]) -> Transcoder:
        c, store, layer = self.config, self.store, self.layer
        stats = store.stats(layer)
        sae = c.kind == "sae"
        d = store.d_model
        n = min(store.n_tokens, max(16384, 4 * c.n_latents))
        x, y = store.sample(layer, n, seed=c.seed + 1)
        if not all(_plausible(norm, values) for norm, values in ((stats.in_norm, x), (stats.out_norm, y))):
            store.verify([layer])  # names the shard, token and value: NaN, infinite, or an outlier
        tc = Transcoder(TranscoderConfig(
            d_in=d, d_out=d, n_latents=c.n_latents, kind=c.kind, activation=c.activation, k=c.k,
            input_scale=math.sqrt(d) / (stats.out_norm if sae else stats.in_norm),
            output_scale=math.sqrt(d) / stats.out_norm,
            site={"model": store.model, "layer": layer, **sites},
        ))
        initialize(tc, y if sae else x, y, torch.Generator().manual_seed(c.seed))
        return tc

    # ---- training -----------------------------------------------------------------------------

    def fit(self) -> Transcoder:
        """Train to the end (from the latest checkpoint if resumed); return the transcoder."""
        return fit_together([self])[self.layer]

    def train_batch(self, x: Tensor, y: Tensor) -> dict[str, float] | None:
        """One optimisation step on a batch (MLP inputs and outputs, model units), then the
        history record, callback and checkpoint when they are due. Returns the record, if any."""
        self._check_batch(x, y)
        self._train_step(x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True))
        self.step += 1
        record = None
        if self.step % self.log_every == 0 or self.step == self.total_steps:
            record = self._log()
            if self.callback is not None:
                self.callback(self, record)
        if self.checkpoint_dir is not None and self.rank == 0 and (
            self.step % self.checkpoint_every == 0 or self.step == self.total_steps
        ):
            self.save_checkpoint()
        return record

    def _finish(self) -> Transcoder:
        tc = self.transcoder.eval()
        if tc.config.activation == "batchtopk" and torch.isnan(tc.threshold):
            c = self.config
            xs = (x.to(self.device) for x, _ in _take(
                self.store.batches(self.layer, c.batch_size, seed=c.seed + 2), 16))
            tc.calibrate_threshold(xs)
        if self.eval_store is not None:
            self.eval_metrics = reconstruction_metrics(tc, self.eval_store, self.layer)
            if self.progress:
                m = self.eval_metrics
                tqdm.write(f"layer {self.layer}: held-out FVU {m['fvu']:.4f}, L0 {m['l0']:.1f}, "
                           f"dead {m['dead_fraction']:.2%}")
        return tc

    def _check_batch(self, x: Tensor, y: Tensor) -> None:
        for name, t, limit in zip(("inputs", "outputs"), (x, y), self._squared_norm_limits):
            if not float(torch.linalg.vector_norm(t, dim=1).max()) ** 2 <= limit:  # also catches NaN (one pass)
                self.store.verify([self.layer])  # names the shard, token and value
                raise ValueError(
                    f"batch {self.step} of layer {self.layer} has NaN, infinite or outlier MLP {name}: the "
                    f"activation store is corrupted or the model overflowed; store.verify() finds the "
                    f"shard; re-collect the activations (in float32 if they were half precision)"
                )

    def _train_step(self, x: Tensor, y: Tensor) -> None:
        # a sparse step's gathers and scatters on one thread; its dense latent choice takes the threads
        # back (tcwidgets.threads). A dense step (ReLU, JumpReLU) is matrix products: all threads
        with threads.serial(self.device.type == "cpu" and self.config.activation in _SPARSE):
            self._step(x, y)

    def _step(self, x: Tensor, y: Tensor) -> None:
        tc, c = self.transcoder, self.config
        factor = lr_factor(self.step, self.total_steps, c.warmup)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * factor
        if c.kind == "sae":
            x = y
        n_tokens = c.batch_size  # over all data-parallel processes
        mean = self._sum_over_processes(y.sum(0)) / n_tokens
        total_variance = self._sum_over_processes((y - mean).square().sum())
        dead = (self.tokens_since_fired >= self.dead_window).nonzero().flatten()
        warm = max(1, round(c.sparsity_warmup * self.total_steps))
        penalty_weight = self.sparsity * min(1.0, (self.step + 1) / warm)
        step = self.objective(x, y, total_variance, dead, penalty_weight)

        self.optimizer.zero_grad(set_to_none=True)
        # DistributedDataParallel averages the processes' gradients; their sum is the batch's.
        # torch.autograd.backward, not Tensor.backward: nnsight patches the latter with a tracer
        # that parses the caller's source on every call (1 ms per step, measured)
        torch.autograd.backward(step.loss * self.world if self.world > 1 else step.loss)
        constrained = c.activation != "relu"
        if constrained and c.activation not in _SPARSE:  # the sparse decodes project their own gradients
            tc.project_decoder_grad()
        self.optimizer.step()
        if constrained:
            tc.normalize_decoder()

        with torch.no_grad():
            fired = self._sum_over_processes(step.fired)
            self.tokens_since_fired.add_(n_tokens).masked_fill_(fired > 0, 0)
            metrics = {"loss": step.loss, "fvu": step.fvu, "l0": step.active / n_tokens,
                       **{f"fvu_{m}": value for m, value in step.prefix_fvus.items()}}
            if step.auxk is not None:
                metrics["auxk"] = step.auxk
            for name, value in metrics.items():
                self._sums[name] = self._sums.get(name, 0.0) + value.detach()
        self._sums["n"] = self._sums.get("n", 0) + 1

    def _sum_over_processes(self, t: Tensor) -> Tensor:
        """``t`` summed over the data-parallel processes (``t`` itself in one process)."""
        if self.world == 1:
            return t
        t = t.clone()
        torch.distributed.all_reduce(t)
        return t

    def _log(self) -> dict[str, float]:
        n = self._sums.pop("n")
        names = sorted(self._sums)
        sums = self._sum_over_processes(torch.stack([torch.as_tensor(self._sums[name]) for name in names]))
        record = {"step": self.step, "tokens": self.step * self.config.batch_size}
        record.update({name: float(value) / n for name, value in zip(names, sums.tolist())})
        record["dead_fraction"] = float((self.tokens_since_fired >= self.dead_window).float().mean())
        record["lr"] = self.lr * lr_factor(self.step - 1, self.total_steps, self.config.warmup)
        self._sums.clear()
        if not math.isfinite(record["loss"]):
            raise FloatingPointError(
                f"the loss of layer {self.layer} became {record['loss']} by step {self.step}: "
                f"lower the learning rate (now {self.lr:.2e}) with lr=..."
            )
        self.history.append(record)
        return record

    # ---- reporting ------------------------------------------------------------------------------

    def plot_history(self):
        """A matplotlib figure of the history (FVU, L0, dead fraction, learning rate vs tokens)."""
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 4, figsize=(14, 3), constrained_layout=True)
        tokens = [r["tokens"] for r in self.history]
        for ax, (name, label) in zip(axes, [("fvu", "FVU"), ("l0", "L0"),
                                            ("dead_fraction", "dead fraction"), ("lr", "learning rate")]):
            ax.plot(tokens, [r[name] for r in self.history])
            ax.set_xlabel("tokens")
            ax.set_title(label)
        if self.history and "auxk" in self.history[-1]:
            axes[0].plot(tokens, [r.get("auxk", math.nan) for r in self.history])
            axes[0].legend(["FVU", "AuxK"])
        axes[0].set_yscale("log")
        return fig

    # ---- checkpoints ------------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Write a checkpoint of the current step to ``checkpoint_dir/step-XXXXXXXX`` (atomically:
        written to a temporary folder, then renamed) and delete older ones. Returns its path."""
        if self.checkpoint_dir is None:
            raise ValueError("this Trainer has no checkpoint_dir")
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        target = self.checkpoint_dir / f"step-{self.step:08d}"
        with atomic_folder(target) as tmp:
            self.transcoder.save(tmp / "transcoder")
            tensors = {"tokens_since_fired": self.tokens_since_fired}
            names = {p: name for name, p in self.transcoder.named_parameters()}
            for p, state in self.optimizer.state.items():
                for key, value in state.items():
                    tensors[f"optimizer.{names[p]}.{key}"] = value.detach().reshape(value.shape)
            write_manifest(tmp / "trainer.json", {
                "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": self.step,
                "training": asdict(self.config), "store": self._store_identity(), "history": self.history,
                "latent_choice": self.latent_choice,
                "tensors": save_tensors(tmp / "trainer.safetensors", tensors),
            })
        clear_checkpoints(self.checkpoint_dir, keep=target)
        return target

    def _store_identity(self) -> dict[str, Any]:
        """What the training data is: the store's `identity` (model weights, tokens) and the layer."""
        identity = getattr(self.store, "identity", None) or {"model": self.store.model, "n_tokens": self.store.n_tokens}
        return {**identity, "layer": self.layer}

    def _load_checkpoint(self, path: Path) -> None:
        fix = f"delete {path} to resume from an older checkpoint, or pass resume=False to start over"
        meta = read_manifest(path / "trainer.json", format=CHECKPOINT_FORMAT, version=CHECKPOINT_VERSION, fix=fix,
                             error=CheckpointError, sealed_since=2)
        try:
            training = meta["training"]
            saved = TrainingConfig(**{f.name: training[f.name] for f in fields(TrainingConfig)
                                      if f.name in training or f.name not in _ADDED_SINCE_VERSION_2})
            stored, step, history = dict(meta["store"]), int(meta["step"]), list(meta["history"])
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{path / 'trainer.json'} is corrupted ({err!s}); {fix}") from err
        identity = self._store_identity()
        differences = {
            **{name: (getattr(saved, name), getattr(self.config, name)) for name in asdict(saved)
               if getattr(saved, name) != getattr(self.config, name)},
            **{name: (value, identity.get(name)) for name, value in stored.items() if value != identity.get(name)},
        }
        if differences:
            listed = ", ".join(f"{name}: checkpoint {_short(a)}, now {_short(b)}" for name, (a, b) in differences.items())
            what = "another store" if set(differences) <= set(stored) else "other settings"
            raise CheckpointError(
                f"{self.checkpoint_dir} holds a run with {what} ({listed}): use another "
                f"checkpoint_dir, or resume=False to start over"
            )
        self._resume_latent_choice(meta.get("latent_choice", self.latent_choice), path)
        tc = type(self.transcoder).load(path / "transcoder", device=self.device)
        self.transcoder.load_state_dict(tc.state_dict())
        record = meta.get("tensors") if meta["version"] >= 2 else {}
        if not isinstance(record, dict):
            raise CheckpointError(f"{path / 'trainer.json'} lacks the checksum of trainer.safetensors; {fix}")
        tensors = load_tensors(path / "trainer.safetensors", sha256=record.get("sha256"), fix=fix,
                               device=self.device, error=CheckpointError)
        params = dict(self.transcoder.named_parameters())
        index = {name: i for i, name in enumerate(params)}
        state: dict[int, dict[str, Tensor]] = {}
        try:
            self.tokens_since_fired.copy_(tensors.pop("tokens_since_fired"))
            for key, value in tensors.items():
                _, name, field_name = key.split(".")
                state.setdefault(index[name], {})[field_name] = value.cpu() if field_name == "step" else value
            self.optimizer.load_state_dict({"state": state,
                                            "param_groups": self.optimizer.state_dict()["param_groups"]})
        except (KeyError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"{path / 'trainer.safetensors'} does not match this run ({err!s}); {fix}") from err
        self.step = step
        self.history = history

    def _resume_latent_choice(self, saved: str, path: Path) -> None:
        """Continue in the latent-choice precision the checkpoint was trained with (exact resume),
        unless this run was given another explicitly."""
        if saved == self.latent_choice:
            return
        if self._latent_choice_given:
            raise CheckpointError(f"{path} was trained with low_precision={saved!r}, this run asks for "
                                  f"{self.latent_choice!r}: leave low_precision unset to continue the run as it "
                                  f"was, or resume=False to start over")
        self.latent_choice = saved
        getattr(self.objective, "module", self.objective).latent_choice = saved


def _short(value: Any) -> str:
    """A value for an error message: hashes shortened to 12 characters."""
    return repr(value[:12] + "…") if isinstance(value, str) and len(value) == 64 else repr(value)


class StepResult(NamedTuple):
    """One training step's loss and what the trainer books from it (sums over this process's
    tokens; the normalisers are the whole batch's)."""

    loss: Tensor
    fvu: Tensor
    auxk: Tensor | None  # None without AuxK
    fired: Tensor  # [n_latents] how many of the tokens each latent fired on
    active: Tensor  # active (token, latent) pairs
    prefix_fvus: dict[int, Tensor]  # Matryoshka: FVU of each prefix narrower than the whole width


class _Objective(nn.Module):
    """A training step's loss: FVU plus AuxK (TopK, BatchTopK) or the sparsity penalty (ReLU,
    JumpReLU). A module so that DistributedDataParallel can wrap it; ``x`` and ``y`` are this
    process's share of the batch, ``total_variance`` the whole batch's."""

    def __init__(self, trainer: Trainer):
        super().__init__()
        self.transcoder = trainer.transcoder
        self.config, self.n_tokens = trainer.config, trainer.config.batch_size
        self.latent_choice, self.k_aux = trainer.latent_choice, trainer.k_aux

    def forward(self, x: Tensor, y: Tensor, total_variance: Tensor, dead: Tensor,
                penalty_weight: float) -> StepResult:
        tc, c = self.transcoder, self.config
        if c.activation in _SPARSE:
            encoding = tc.encode_sparse(x, low_precision=self.latent_choice)
            latents = encoding.latents
            error = y - tc.decode_sparse(latents, x, unit_rows=True)
            fvu = error.square().sum() / total_variance
            prefix_fvus = {m: prefix_fvu(tc, latents, m, x, y, total_variance)
                           for m in c.matryoshka or () if m < tc.n_latents}
            loss, auxk = fvu + sum(prefix_fvus.values()), None
            if c.auxk_coefficient > 0:
                auxk = self._auxk(x, encoding.pre, error.detach(), total_variance, dead)
                loss = loss + c.auxk_coefficient * auxk
            fired = latents.indices[latents.values > 0]
            fired_counts = torch.bincount(fired, minlength=tc.n_latents)
            active = torch.tensor(fired.numel(), device=x.device)
        else:
            pre = tc.pre_activations(x)
            z = tc.activate(pre)
            error = y - tc.decode(z, x)
            fvu = error.square().sum() / total_variance
            if c.activation == "relu":
                penalty = (z * tc.W_dec.norm(dim=1)).sum() / self.n_tokens
            else:
                penalty = heaviside(pre, tc.log_threshold.exp(), tc.config.bandwidth).sum() / self.n_tokens
            loss, auxk = fvu + penalty_weight * penalty, None
            fired_mask = z > 0
            fired_counts = fired_mask.sum(0)
            active = fired_mask.sum()
            prefix_fvus = {}
        return StepResult(loss, fvu, auxk, fired_counts, active, prefix_fvus)

    def _auxk(self, x: Tensor, pre: Tensor, error: Tensor, total_variance: Tensor, dead: Tensor) -> Tensor:
        """AuxK: the top ``k_aux`` dead latents of each token reconstruct the residual error."""
        tc = self.transcoder
        if len(dead) == 0:
            return error.new_zeros(())
        k_aux = min(self.k_aux, len(dead))
        if k_aux == len(dead):  # every dead latent, for every token: no top-k to take
            cols = dead.repeat(len(x))
        else:
            cols = dead[pre[:, dead].topk(k_aux, dim=1, sorted=False).indices].flatten()
        rows = torch.arange(len(x), device=x.device).repeat_interleave(k_aux)
        # the few dead latents' weight gradients come sparse, added into the main path's dense ones
        aux = tc.latents_at(x, rows, cols, pre, sparse_grad=True)
        fit = tc.decode_sparse(aux, bias=False, unit_rows=True, sparse_grad=True)
        return min(1.0, len(dead) / self.k_aux) * (fit - error).square().sum() / total_variance


def prefix_fvu(tc: Transcoder, latents: SparseLatents, m: int, x: Tensor, y: Tensor, total_variance: Tensor) -> Tensor:
    """Matryoshka: the summed squared error of the reconstruction from the active latents among the
    first ``m`` only (the others zeroed), over ``total_variance``."""
    kept = latents._replace(values=latents.values * (latents.indices < m))
    return (y - tc.decode_sparse(kept, x, unit_rows=True)).square().sum() / total_variance


def _init_data_parallel(device: torch.device) -> tuple[int, int]:
    """(rank, world size) of a torchrun launch, starting torch.distributed if needed (NCCL on
    CUDA, gloo on CPU)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ:
            raise ValueError("data_parallel=True needs a torchrun launch (torchrun --nproc_per_node=N ...), "
                             "which sets RANK and WORLD_SIZE")
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def latest_checkpoint(directory: Path) -> Path | None:
    done = sorted(directory.glob("step-[0-9]*")) if directory.is_dir() else []
    return done[-1] if done else None


def resume_or_clear(directory: Path, resume: bool, load: Callable[[Path], None]) -> None:
    """Load the newest checkpoint in ``directory`` with ``load`` (``resume``), or else clear the folder's
    checkpoints so that a fresh run does not mix with an old one."""
    latest = latest_checkpoint(directory)
    if latest is not None and resume:
        load(latest)
    elif latest is not None:
        clear_checkpoints(directory)


def clear_checkpoints(directory: Path, keep: Path | None = None) -> None:
    """Delete checkpoints (and leftovers of interrupted ones) other than ``keep``."""
    for path in [*directory.glob("step-[0-9]*"), *directory.glob(".step-*")]:
        if path != keep:
            shutil.rmtree(path, ignore_errors=True)


def _plausible(mean_norm: float, sample: Tensor) -> bool:
    """Whether a layer's average row norm (from the store's statistics) is finite and near the typical
    norm of a sample of its rows; one huge value in the store inflates the average."""
    typical = float(sample.norm(dim=1).median())
    return math.isfinite(mean_norm) and math.isfinite(typical) and mean_norm <= OUTLIER_RATIO * typical


def fit_together(trainers: Sequence[Trainer]) -> dict[int, Transcoder]:
    """Train one `Trainer` per layer of the same store from one pass over it: each batch is read
    once for all layers (the same shuffled rows for every layer) and handed to every trainer, so
    each ends exactly as if trained alone. Trainers resumed from checkpoints of different steps
    skip the batches they have done. Returns ``{layer: transcoder}``."""
    first = trainers[0]
    c = first.config
    layers = [t.layer for t in trainers]
    for t in trainers[1:]:
        if (t.store, t.total_steps, t.config.batch_size, t.config.seed, t.config.epochs, t.config.shuffle,
                t.world) != (first.store, first.total_steps, c.batch_size, c.seed, c.epochs, c.shuffle, first.world):
            raise ValueError("fit_together needs trainers of one store with the same batch_size, epochs, "
                             "seed, shuffle and data parallelism")
    if len(set(layers)) != len(layers):
        raise ValueError(f"fit_together needs one trainer per layer, got layers {layers}")
    start = min(t.step for t in trainers)
    batches = first.store.batches(layers, c.batch_size, shuffle=c.shuffle, seed=c.seed, epochs=c.epochs, start=start,
                                  part=(first.rank, first.world))
    bar = tqdm(total=first.total_steps, initial=start, desc=f"training {layers_label(layers)}", unit="step",
               disable=first.rank != 0 or not any(t.progress for t in trainers))
    if first.device.type != "cpu":  # on CPU reading competes with the training's own threads (measured)
        batches = _prefetch(batches)
    drawn = time.monotonic()
    try:
        with heap.retained():
            for step, pairs in enumerate(batches, start):
                for t, (x, y) in zip(trainers, pairs):
                    record = t.train_batch(x, y) if t.step == step else None
                    if record is not None:
                        prefix = "" if len(trainers) == 1 else f"L{t.layer} "
                        bar.set_postfix({f"{prefix}fvu": f"{record['fvu']:.4f}", f"{prefix}l0": f"{record['l0']:.1f}",
                                         f"{prefix}dead": f"{record['dead_fraction']:.1%}"}, refresh=False)
                    if time.monotonic() - drawn >= REDRAW_S:  # many layers (and their checkpoints) in one step
                        bar.refresh()
                        drawn = time.monotonic()
                bar.update()
                drawn = time.monotonic()
    finally:
        bar.close()
    return {t.layer: t._finish() for t in trainers}


def _prefetch(iterable, depth: int = 2):
    """Iterate ``iterable`` in a background thread, ``depth`` items ahead (reading the next batch
    from the store overlaps the training step)."""
    items: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def offer(item) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for item in iterable:
                if not offer(item):
                    return
            offer(done)
        except BaseException as error:  # re-raised in the consumer
            offer(error)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while (item := items.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def _take(iterable, n: int):
    for i, item in enumerate(iterable):
        if i == n:
            return
        yield item


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --------------------------------------------------------------------------------------------
# Evaluation on stored activations and the one-call entry point
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def reconstruction_metrics(tc: Transcoder, store: Any, layer: int | None = None,
                           batch_size: int = 4096) -> dict[str, float]:
    """FVU, MSE, L0 and dead fraction of ``tc`` on all of a store's activations (definitions in
    `tcwidgets.evaluation`). ``layer`` defaults to the transcoder's site layer."""
    layer = tc.config.site.get("layer") if layer is None else layer
    stats = ReconstructionStats(tc.n_latents)
    was_training = tc.training
    tc.eval()
    n_tokens = getattr(store, "n_tokens", None)
    batches = delayed_bar(store.batches(layer, batch_size, shuffle=False, drop_last=False), unit="batch",
                          desc="reconstruction metrics",
                          total=None if n_tokens is None else math.ceil(n_tokens / batch_size))
    for x, y in batches:
        x, y = x.to(tc.device), y.to(tc.device)
        latents, output = tc(y if tc.config.kind == "sae" else x)
        stats.add(latents, output, y)
    tc.train(was_training)
    return stats.metrics()


def train_transcoder(
    store: Any,
    layer: int | Sequence[int],
    *,
    n_latents: int | None = None,
    activation: str = "topk",
    k: int = 32,
    kind: str = "transcoder",
    epochs: int = 1,
    batch_size: int | None = None,
    lr: float | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    resume: bool = True,
    device: str | torch.device | None = None,
    low_precision: bool | str | None = None,
    data_parallel: bool = False,
    seed: int = 0,
    eval_store: Any = None,
    progress: bool = True,
    model: str | None = None,
    callback: Callable[[Trainer, dict[str, float]], None] | None = None,
    **options: Any,
) -> Transcoder | dict[int, Transcoder]:
    """Train a transcoder on ``layer`` of an activation store (see `Trainer`, `TrainingConfig`).

    With a list of layers, trains one per layer from one pass over the store (`fit_together`: each
    batch read once for all layers; checkpoints in ``checkpoint_dir/layer-<n>``) and returns
    ``{layer: transcoder}``. ``data_parallel=True`` under torchrun: every process trains
    every layer on its share of each batch (see `Trainer`). ``options`` are further
    `TrainingConfig` fields (``warmup``, ``sparsity_coefficient``, ``auxk_coefficient``, ...).
    """
    config = TrainingConfig(n_latents=n_latents, kind=kind, activation=activation, k=k, epochs=epochs,
                            batch_size=batch_size, lr=lr, seed=seed, **options)
    layers = [layer] if isinstance(layer, int) else list(layer)
    if not layers:
        raise ValueError("layer is empty: name at least one layer")
    store.check(model=model, layers=layers)
    if len(set(layers)) != len(layers):
        raise ValueError(f"layer lists {layers}: name each layer once")
    trainers = []
    # each trainer initialises its transcoder from the data (seconds per layer): show it for many layers
    for each in tqdm(layers, desc="initialising", unit="layer", leave=False, disable=not progress or len(layers) < 4):
        directory = checkpoint_dir
        if checkpoint_dir is not None and not isinstance(layer, int):
            directory = Path(checkpoint_dir) / f"layer-{each}"
        trainers.append(Trainer(store, each, config, model=model, checkpoint_dir=directory,
                                checkpoint_every=checkpoint_every, resume=resume, device=device,
                                low_precision=low_precision, data_parallel=data_parallel, eval_store=eval_store, callback=callback, progress=progress))
        heap.trim()  # the initialisation's temporaries (a skip path's float64 fit: ~0.3 GB) would stay resident,
        # fragmented between the transcoders: 30 layers' initialisation held 1.5 GB, 0.75 GB with this
    trained = fit_together(trainers)
    del trainers
    heap.trim()  # their optimiser states, freed now, were allocated while `heap.retained` kept them in the heap
    return trained[layer] if isinstance(layer, int) else trained
