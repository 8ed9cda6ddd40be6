"""Train a cross-layer transcoder on an activation store that holds several layers.

The per-layer trainer's recipe (`tcwidgets.training`), across layers: one pass over the store reads
the same shuffled rows of every layer; inputs and targets scaled per layer to an average norm of
sqrt(d); loss = the mean over layers of each layer's FVU (every layer's output sums the writes of the
latents of it and every earlier layer); each latent's decoder (its writes to all later layers
together) kept at unit norm; a data-driven initialisation per layer (`training.initialize`: each
latent starts as a training token of its own layer, writing only to that layer); AuxK per layer, a
dead latent's writes fitting the error of its own and every later layer; Adam with warm-up and
decay; TopK through the sparse path (only the active latents enter the backward pass).

Checkpoints, exact resume (bit for bit on CPU), the history and its plot, the learning-rate
schedule and the checks of the store are `training.Trainer`'s own: `CrossLayerTrainer` is a
`Trainer` whose transcoder is a `CrossLayerTranscoder`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from . import heap, threads
from .activations import OUTLIER_RATIO
from .crosslayer import CrossLayerConfig, CrossLayerTranscoder
from .evaluation import ReconstructionStats
from .training import (_DEFAULT_SPARSITY, Trainer, TrainingConfig, _default_device, _plausible, resume_or_clear,
                       default_batch_size, default_lr, initialize, lr_factor)
from .transcoder import SparseLatents, Transcoder, TranscoderConfig, _SparseDecode, gathered_latents
from .transcoder import step as heaviside

__all__ = ["CrossLayerTrainer", "train_clt"]


class CrossLayerTrainer(Trainer):
    """Train one `CrossLayerTranscoder` on ``layers`` of an `ActivationStore`.

    A `Trainer` (history, `plot_history`, checkpoints and exact resume are its own) with one
    transcoder for all the layers; ``history`` records ``fvu`` (the mean over layers), ``l0`` (active
    latents per token and layer), ``dead_fraction`` (over all layers' latents), ``lr`` and ``auxk``.
    Arguments as `Trainer`'s; TrainingConfig's ``kind`` must be ``"transcoder"``, its ``activation``
    ``"topk"``, ``"jumprelu"`` or ``"relu"``, and ``n_latents`` counts the latents of each layer.
    ``eval_metrics`` (with ``eval_store``) is ``{layer: {"fvu", "mse", "l0", "dead_fraction"}}``.
    """

    def __init__(
        self,
        store: Any,
        layers: Sequence[int],
        config: TrainingConfig | None = None,
        *,
        model: str | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every: int | None = None,
        resume: bool = True,
        device: str | torch.device | None = None,
        eval_store: Any = None,
        log_every: int = 10,
        callback: Callable[[Trainer, dict[str, float]], None] | None = None,
        progress: bool = True,
    ):  # Trainer.__init__ builds one per-layer transcoder; everything its methods use is set here
        config = config or TrainingConfig()
        layers = list(layers)
        if not layers:
            raise ValueError("layers is empty: name the layers the cross-layer transcoder spans")
        if layers != sorted(set(layers)):
            raise ValueError(f"layers={layers}: name each layer once, in ascending order")
        if config.kind != "transcoder":
            raise ValueError(f"kind={config.kind!r}: a cross-layer transcoder reads MLP inputs and writes MLP "
                             "outputs (kind='transcoder'); train skip transcoders or SAEs with train_transcoder")
        if config.activation not in ("topk", "jumprelu", "relu"):
            raise ValueError(f"activation={config.activation!r}: cross-layer transcoders train with 'topk', "
                             "'jumprelu' or 'relu'")
        if config.matryoshka:
            raise ValueError(f"matryoshka={config.matryoshka}: nested prefixes are for per-layer TopK and BatchTopK "
                             "training (train_transcoder); train the cross-layer transcoder without it")
        store.check(model=model, layers=layers)
        if eval_store is not None:
            eval_store.check(model=store.model, layers=layers)
        self.store, self.layer, self.layers, self.eval_store = store, layers, layers, eval_store
        self.device = torch.device(device) if device is not None else _default_device()
        self.rank, self.world = 0, 1
        self.log_every, self.callback, self.progress = log_every, callback, progress
        d = store.d_model
        self.config = config = replace(
            config, n_latents=config.n_latents or 8 * d,
            batch_size=config.batch_size or default_batch_size(store.n_tokens * config.epochs))
        self.total_steps = store.n_batches(config.batch_size, config.epochs)
        if self.total_steps == 0:
            raise ValueError(f"batch_size={config.batch_size} is larger than the store ({store.n_tokens} tokens)")
        self.lr = config.lr or default_lr(config.n_latents)
        self.k_aux = config.k_aux or d // 2
        self.dead_window = config.dead_window or min(10_000_000, max(1, store.n_tokens // 4))
        self.sparsity = config.sparsity_coefficient or _DEFAULT_SPARSITY.get(config.activation, 0.0)
        self.checkpoint_every = checkpoint_every or max(1, self.total_steps // 10)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        stats = [store.stats(layer) for layer in layers]
        self._limits = [((OUTLIER_RATIO * s.in_norm) ** 2, (OUTLIER_RATIO * s.out_norm) ** 2) for s in stats]
        self.transcoder = self._new_clt().to(self.device).train()
        self.latent_choice = "float32"  # what the inherited checkpoints record
        self.optimizer = torch.optim.Adam(self.transcoder.parameters(), lr=self.lr, fused=True)
        self.tokens_since_fired = torch.zeros(len(layers), config.n_latents, dtype=torch.long, device=self.device)
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.eval_metrics: dict[int, dict[str, float]] | None = None
        self._sums: dict[str, Any] = {}
        if self.checkpoint_dir is not None:
            resume_or_clear(self.checkpoint_dir, resume, self._load_checkpoint)

    def _new_clt(self) -> CrossLayerTranscoder:
        """A CLT initialised layer by layer as `training.initialize` starts a per-layer transcoder, each
        latent writing only to its own layer."""
        c, store, d = self.config, self.store, self.store.d_model
        n = min(store.n_tokens, max(16384, 4 * c.n_latents))
        samples, scales = [], []
        for layer in self.layers:
            stats = store.stats(layer)
            x, y = store.sample(layer, n, seed=c.seed + 1)
            if not all(_plausible(norm, values) for norm, values in ((stats.in_norm, x), (stats.out_norm, y))):
                store.verify([layer])  # names the shard, token and value: NaN, infinite, or an outlier
            samples.append((x, y))
            scales.append((math.sqrt(d) / stats.in_norm, math.sqrt(d) / stats.out_norm))
        clt = CrossLayerTranscoder(CrossLayerConfig(
            d_model=d, n_latents=c.n_latents, layers=self.layers, activation=c.activation, k=c.k,
            input_scales=[s for s, _ in scales], output_scales=[s for _, s in scales], model=store.model,
            sites=[store.sites(layer) for layer in self.layers]))
        initialising = tqdm(list(zip(samples, scales)), desc="initialising", unit="layer", disable=not self.progress)
        with torch.no_grad():
            for i, ((x, y), (input_scale, output_scale)) in enumerate(initialising):
                tc = Transcoder(TranscoderConfig(d_in=d, d_out=d, n_latents=c.n_latents, activation=c.activation, k=c.k,
                                                 input_scale=input_scale, output_scale=output_scale))
                initialize(tc, x, y, torch.Generator().manual_seed(c.seed + i))
                clt.W_enc[i] = tc.W_enc
                clt.b_enc[i] = tc.b_enc
                clt.W_dec(i).zero_()[:, 0] = tc.W_dec
                clt.b_dec[i] = tc.b_dec
        return clt

    # ---- training -------------------------------------------------------------------------------------

    def fit(self) -> CrossLayerTranscoder:
        """Train to the end (from the latest checkpoint if resumed); return the cross-layer transcoder."""
        c = self.config
        batches = self.store.batches(self.layers, c.batch_size, shuffle=c.shuffle, seed=c.seed, epochs=c.epochs,
                                     start=self.step)
        bar = tqdm(total=self.total_steps, initial=self.step, unit="step", disable=not self.progress,
                   desc=f"training a cross-layer transcoder on layers {', '.join(map(str, self.layers))}")
        try:
            with heap.retained():
                for pairs in batches:
                    record = self.train_batch(torch.stack([x for x, _ in pairs]), torch.stack([y for _, y in pairs]))
                    if record is not None:
                        bar.set_postfix({"fvu": f"{record['fvu']:.4f}", "l0": f"{record['l0']:.1f}",
                                         "dead": f"{record['dead_fraction']:.1%}"})
                    bar.update()
        finally:
            bar.close()
        return self._finish()

    def _finish(self) -> CrossLayerTranscoder:
        clt = self.transcoder.eval()
        if self.eval_store is not None:
            self.eval_metrics = reconstruction_metrics(clt, self.eval_store)
            if self.progress:
                for layer, m in self.eval_metrics.items():
                    tqdm.write(f"layer {layer}: held-out FVU {m['fvu']:.4f}, L0 {m['l0']:.1f}, "
                               f"dead {m['dead_fraction']:.2%}")
        return clt

    def _check_batch(self, x: Tensor, y: Tensor) -> None:
        for layer, xs, ys, limits in zip(self.layers, x, y, self._limits):
            for name, t, limit in zip(("inputs", "outputs"), (xs, ys), limits):
                if not float(t.square().sum(1).max()) <= limit:  # also catches NaN
                    self.store.verify([layer])  # names the shard, token and value
                    raise ValueError(
                        f"batch {self.step} of layer {layer} has NaN, infinite or outlier MLP {name}: the "
                        f"activation store is corrupted or the model overflowed; store.verify() finds the "
                        f"shard; re-collect the activations (in float32 if they were half precision)")

    def _step(self, x: Tensor, y: Tensor) -> None:
        """One step on ``x``, ``y`` [layers, batch, d] (model units), on the threads
        `Trainer._train_step` gives it."""
        clt, c = self.transcoder, self.config
        factor = lr_factor(self.step, self.total_steps, c.warmup)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * factor
        n_layers, n_tokens, d = y.shape
        scales = clt.config
        xs = x * x.new_tensor(scales.input_scales)[:, None, None]
        target = (y * y.new_tensor(scales.output_scales)[:, None, None]).transpose(0, 1)  # [batch, layers, d]
        variance = (target - target.mean(0)).square().sum((0, 2))  # [layers]
        warm = max(1, round(c.sparsity_warmup * self.total_steps))
        penalty_weight = self.sparsity * min(1.0, (self.step + 1) / warm)

        reconstruction = clt.b_dec.expand(n_tokens, n_layers, d)
        auxk_inputs, penalty = [], x.new_zeros(())
        fired = torch.zeros_like(self.tokens_since_fired)
        for i in range(n_layers):
            decoder = clt.W_dec(i).view(c.n_latents, -1)
            if c.activation == "topk":
                with torch.no_grad(), threads.parallel():  # compute-bound: worth the threads
                    pre = F.linear(xs[i], clt.W_enc[i], clt.b_enc[i])
                    cols = pre.topk(c.k, dim=-1, sorted=False).indices.flatten()
                rows = torch.arange(n_tokens, device=x.device).repeat_interleave(c.k)
                latents = _latents_at(clt, i, xs[i], rows, cols, pre)
                writes = _SparseDecode.apply(latents.indices, latents.values, latents.offsets, rows, decoder)
                fired[i] = torch.bincount(latents.indices[latents.values > 0], minlength=c.n_latents)
                auxk_inputs.append(pre)
            else:
                pre = F.linear(xs[i], clt.W_enc[i], clt.b_enc[i])
                z = clt.activate(self.layers[i], pre)
                writes = z @ decoder
                if c.activation == "relu":
                    penalty = penalty + (z * decoder.norm(dim=1)).sum() / n_tokens
                else:
                    active = heaviside(pre, clt.log_threshold[i].exp(), clt.config.bandwidth)
                    penalty = penalty + active.sum() / n_tokens
                fired[i] = (z > 0).sum(0)
            reconstruction = reconstruction + F.pad(writes.view(n_tokens, -1, d), (0, 0, i, 0))  # to layers >= i
        error = target - reconstruction
        fvu = (error.square().sum((0, 2)) / variance).mean()
        loss, auxk = fvu + penalty_weight * penalty / n_layers, None
        if c.activation == "topk" and c.auxk_coefficient > 0:
            auxk = self._auxk(xs, auxk_inputs, error.detach(), variance)
            loss = loss + c.auxk_coefficient * auxk

        self.optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)  # not Tensor.backward, which nnsight patches (see training.py)
        constrained = c.activation != "relu"
        if constrained:
            clt.project_decoder_grad()
        self.optimizer.step()
        if constrained:
            clt.normalize_decoder()

        with torch.no_grad():
            self.tokens_since_fired.add_(n_tokens).masked_fill_(fired > 0, 0)
            metrics = {"loss": loss, "fvu": fvu, "l0": (fired.sum() / n_layers).float() / n_tokens}
            if auxk is not None:
                metrics["auxk"] = auxk
            for name, value in metrics.items():
                self._sums[name] = self._sums.get(name, 0.0) + value.detach()
        self._sums["n"] = self._sums.get("n", 0) + 1

    def _auxk(self, xs: Tensor, pres: list[Tensor], error: Tensor, variance: Tensor) -> Tensor:
        """AuxK per layer: the top ``k_aux`` dead latents of each token fit the residual error of their
        own and every later layer (what their writes reach); the mean over layers."""
        clt, n_tokens = self.transcoder, error.shape[0]
        total = error.new_zeros(())
        for i, pre in enumerate(pres):
            dead = (self.tokens_since_fired[i] >= self.dead_window).nonzero().flatten()
            if len(dead) == 0:
                continue
            k_aux = min(self.k_aux, len(dead))
            cols = dead[pre[:, dead].topk(k_aux, dim=1, sorted=False).indices].flatten()
            rows = torch.arange(n_tokens, device=xs.device).repeat_interleave(k_aux)
            aux = _latents_at(clt, i, xs[i], rows, cols, pre)
            fit = _SparseDecode.apply(aux.indices, aux.values, aux.offsets, rows, clt.W_dec(i).view(clt.n_latents, -1))
            residual = error[:, i:].reshape(n_tokens, -1)
            total = total + min(1.0, len(dead) / self.k_aux) * (fit - residual).square().sum() / variance[i:].sum()
        return total / len(pres)


def _latents_at(clt: CrossLayerTranscoder, i: int, x: Tensor, rows: Tensor, cols: Tensor, pre: Tensor) -> SparseLatents:
    """Activations of the chosen (token, latent) pairs of layer index ``i`` (``x`` scaled, ``pre``
    its float32 pre-activations), as in `Transcoder.latents_at`."""
    return gathered_latents(x, clt.W_enc[i], clt.b_enc[i], rows, cols, pre[rows, cols])


@torch.no_grad()
def reconstruction_metrics(clt: CrossLayerTranscoder, store: Any,
                           batch_size: int = 4096) -> dict[int, dict[str, float]]:
    """``{layer: {"fvu", "mse", "l0", "dead_fraction"}}`` of ``clt`` on all of a store's activations."""
    stats = {layer: ReconstructionStats(clt.n_latents) for layer in clt.layers}
    was_training = clt.training
    clt.eval()
    for pairs in store.batches(clt.layers, batch_size, shuffle=False, drop_last=False):
        latents, outputs = clt([x.to(clt.device) for x, _ in pairs])
        for layer, z, output, (_, y) in zip(clt.layers, latents, outputs, pairs):
            stats[layer].add(z, output, y.to(clt.device))
    clt.train(was_training)
    return {layer: s.metrics() for layer, s in stats.items()}


def train_clt(
    store: Any,
    layers: Sequence[int],
    *,
    n_latents: int | None = None,
    k: int = 32,
    activation: str = "topk",
    epochs: int = 1,
    batch_size: int | None = None,
    lr: float | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    resume: bool = True,
    device: str | torch.device | None = None,
    seed: int = 0,
    eval_store: Any = None,
    progress: bool = True,
    model: str | None = None,
    callback: Callable[[Trainer, dict[str, float]], None] | None = None,
    **options: Any,
) -> CrossLayerTranscoder:
    """Train a cross-layer transcoder on ``layers`` of an activation store (see `CrossLayerTrainer`).

    ``n_latents`` and ``k`` are per layer (default 8 × the model's width, 32); ``activation`` is
    ``"topk"``, ``"jumprelu"`` or ``"relu"``. ``options`` are further `TrainingConfig` fields
    (``warmup``, ``sparsity_coefficient``, ``auxk_coefficient``, ...).
    """
    config = TrainingConfig(n_latents=n_latents, activation=activation, k=k, epochs=epochs, batch_size=batch_size,
                            lr=lr, seed=seed, **options)
    return CrossLayerTrainer(store, layers, config, model=model, checkpoint_dir=checkpoint_dir,
                             checkpoint_every=checkpoint_every, resume=resume, device=device, eval_store=eval_store,
                             callback=callback, progress=progress).fit()
