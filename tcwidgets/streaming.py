"""Train transcoders on activations computed as training consumes them, never stored on disk.

`train_streaming(lm, layers, tokens, ...)` runs the model over the token contexts (nnsight, one
trace per batch of contexts for all layers) and feeds the trainers through a bounded shuffle
buffer, SAELens's mixing-buffer idea: fill the buffer, shuffle it, hand out its first half as
training batches, refill, and so on; at the end the rest is shuffled and handed out. Memory is
the buffer (``buffer_tokens`` rows of inputs and outputs per layer), whatever the number of tokens.

`ActivationStream` is the source: it answers the calls a `Trainer` makes of an
`ActivationStore` (statistics, an initialisation sample, shuffled batches), so the trainers,
their checkpoints and exact resume are the store-based ones. The initialisation sample is random
rows of the first buffer of the training order, whose forward passes then serve the first batches:
the model runs over each token once per epoch, and the sample spans as many contexts as a buffer.
Resuming replays the model's forward passes up to the checkpoint (without training), so the
batches after it are the very same.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from .activations import ActivationStore, LayerNotInStoreError, LayerStats, StoreError, shuffle_mode, trace_mlp
from .training import train_transcoder
from .transcoder import Transcoder

__all__ = ["ActivationStream", "train_streaming"]


class ActivationStream:
    """MLP inputs and outputs of ``layers`` for ``tokens`` (``[n_contexts, context]``), computed
    by ``lm`` as they are read, in shuffled training batches through a bounded buffer.

    Args:
        lm: a model from `load_model`.
        layers: the layers to read.
        tokens: token contexts, e.g. from `load_corpus`.
        buffer_tokens: rows the shuffle buffer holds (per layer, inputs and outputs), at least
            twice the batch size; larger buffers mix tokens from more contexts into each batch.
        forward_batch: contexts per forward pass.
        sample_tokens: size of the sample (`sample`) the statistics (input and output norms) come
            from; a trainer asks for its own initialisation sample size.
        seed: the seed of the training order (`batches(seed=...)`, a `Trainer`'s seed): the
            sample is drawn from the first contexts of its first epoch, whose forward passes are
            kept for its first batches.
    """

    def __init__(self, lm: Any, layers: Sequence[int], tokens: torch.Tensor, *, buffer_tokens: int = 65536,
                 forward_batch: int = 32, sample_tokens: int = 16384, seed: int = 0):
        self.lm, self.layers = lm, sorted(set(layers))
        for layer in self.layers:
            lm.check_layer(layer)
        self.tokens = lm.check_tokens(tokens)
        self.buffer_tokens, self.forward_batch = buffer_tokens, forward_batch
        self.sample_tokens, self.seed = min(sample_tokens, self.tokens.numel()), seed
        self._samples: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._first_forwards: list[list[tuple[torch.Tensor, torch.Tensor]]] = []

    # ---- what a Trainer asks of its store -------------------------------------------------------

    @property
    def model(self) -> str:
        return self.lm.name

    @property
    def d_model(self) -> int:
        return self.lm.d_model

    @property
    def n_tokens(self) -> int:
        return self.tokens.numel()

    def __repr__(self) -> str:
        return f"ActivationStream({self.model}, layers={self.layers}, n_tokens={self.n_tokens:,})"

    def check(self, *, model: str | None = None, layers: Sequence[int] | None = None) -> None:
        """Raise `StoreError` unless this stream reads ``model`` at all ``layers``."""
        if model is not None and model != self.model:
            raise StoreError(f"This stream runs {self.model!r}, not {model!r}")
        for layer in layers or ():
            self._check_layer(layer)

    def _check_layer(self, layer: int) -> None:
        if layer not in self.layers:
            raise LayerNotInStoreError(f"layer {layer} is not streamed (layers {self.layers}): add it to layers=")

    def sites(self, layer: int) -> dict[str, str]:
        self._check_layer(layer)
        return dict(self.lm.sites.mlp_sites(layer))

    def stats(self, layer: int) -> LayerStats:
        """Means and average norms of the layer's inputs and outputs, over the sample."""
        x, y = self.sample(layer)
        return LayerStats(x.mean(0), y.mean(0), float(x.norm(dim=1).mean()), float(y.norm(dim=1).mean()))

    def sample(self, layer: int, n: int | None = None, seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` of ``n`` tokens (default ``sample_tokens``): random rows (drawn with ``seed``,
        default the stream's seed + 1, a `Trainer`'s choice) of the first buffer of the training
        order (at least ``n`` tokens of its first contexts). Collected once, for all layers."""
        self._check_layer(layer)
        seed = self.seed + 1 if seed is None else seed
        n = self.sample_tokens if n is None else min(n, self.n_tokens)
        if seed not in self._samples or len(self._samples[seed][layer][0]) < n:
            first = self._first_buffer(max(n, self.buffer_tokens))
            held = len(first[0][0])
            rows = torch.randperm(held, generator=torch.Generator().manual_seed(seed))[:max(n, self.sample_tokens)]
            self._samples[seed] = {each: (x[rows], y[rows]) for each, (x, y) in zip(self.layers, first)}
        x, y = self._samples[seed][layer]
        return x[:n], y[:n]

    def _first_buffer(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's ``(x, y)`` of the first contexts of the training order's first epoch, at
        least ``n`` tokens; their forward passes are kept for the first batches (`batches`)."""
        order, _ = self._epoch(self.seed, 0, "global")
        have = sum(len(pairs[0][0]) for pairs in self._first_forwards)
        if have < n:
            begin = len(self._first_forwards) * self.forward_batch
            contexts = math.ceil((n - have) / self.tokens.shape[1])
            contexts += -contexts % self.forward_batch  # whole forward batches, as `batches` runs them
            self._first_forwards += self._forward(order[begin:begin + contexts])
        return [(torch.cat([pairs[i][0] for pairs in self._first_forwards]),
                 torch.cat([pairs[i][1] for pairs in self._first_forwards])) for i in range(len(self.layers))]

    def _epoch(self, seed: int, epoch: int, shuffle: str) -> tuple[torch.Tensor, torch.Generator]:
        """The contexts of one epoch in training order, and the generator that then shuffles its buffers."""
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        if shuffle == "document":
            return torch.arange(len(self.tokens)), generator
        return torch.randperm(len(self.tokens), generator=generator), generator

    def verify(self) -> None:
        """Raise `StoreError` if the sample holds NaN or infinite values (the model overflowed)."""
        for layer in self.layers:
            for side, values in zip(("inputs", "outputs"), self.sample(layer)):
                if not torch.isfinite(values).all():
                    raise StoreError(f"{self.model} gives NaN or infinite MLP {side} at layer {layer}: run the "
                                     "model in float32")

    n_batches = ActivationStore.n_batches

    def batches(self, layer: int | Sequence[int], batch_size: int = 1024, *, shuffle: bool | str = True,
                seed: int = 0, epochs: int = 1, start: int = 0, drop_last: bool = True,
                part: tuple[int, int] = (0, 1)) -> Iterator[Any]:
        """Training batches ``(x, y)`` (float32, CPU) of one layer, or a list of them for a list
        of layers (the same rows), as `ActivationStore.batches`: the contexts in a shuffled order
        per epoch (seeded by ``seed`` and the epoch), their tokens mixed through the buffer
        (``shuffle="global"``); not mixed with ``"context"``; contexts in stored order too with
        ``"document"``. ``start`` skips that many batches, running the model but not handing them out."""
        shuffle = shuffle_mode(shuffle)
        layers = [layer] if isinstance(layer, int) else list(layer)
        for each in layers:
            self._check_layer(each)
        if part != (0, 1):
            raise ValueError("an ActivationStream does not split batches over data-parallel processes: "
                             "collect an activation store (collect_activations) for data-parallel training")
        if not drop_last:
            raise ValueError("an ActivationStream hands out whole batches only (drop_last=True)")
        capacity = max(self.buffer_tokens, 2 * batch_size)
        per_epoch = self.n_batches(batch_size)
        picked = [self.layers.index(each) for each in layers]
        done = 0
        kept: list[list[tuple[torch.Tensor, torch.Tensor]]] = []  # the sample's forward passes: epoch 0's first
        if seed == self.seed and shuffle != "document":
            kept, self._first_forwards = (self._first_forwards if start < per_epoch else []), []
        for epoch in range(start // per_epoch, epochs):
            order, generator = self._epoch(seed, epoch, shuffle)
            done = epoch * per_epoch
            buffer: list[torch.Tensor] | None = None  # per layer, inputs and outputs side by side
            forwards = itertools.chain(_emptied(kept), self._forward(order[len(kept) * self.forward_batch:]))
            exhausted = False
            while not exhausted:
                parts = [] if buffer is None else [buffer]
                held = 0 if buffer is None else len(buffer[0])
                while held < capacity:
                    pairs = next(forwards, None)
                    if pairs is None:
                        exhausted = True
                        break
                    parts.append([torch.cat([x, y], 1) for x, y in pairs])
                    held += len(pairs[0][0])
                if not parts:
                    break
                rows = torch.randperm(held, generator=generator) if shuffle == "global" else torch.arange(held)
                buffer = [torch.cat([p[i] for p in parts])[rows] for i in range(len(self.layers))]
                hand_out = held if exhausted else (held // 2) // batch_size * batch_size
                for begin in range(0, hand_out - batch_size + 1, batch_size):
                    if done >= start:
                        yield self._batch(buffer, picked, begin, batch_size, isinstance(layer, int))
                    done += 1
                buffer = [b[hand_out:] for b in buffer]

    def _batch(self, buffer: list[torch.Tensor], picked: list[int], begin: int, size: int, single: bool):
        d = self.d_model
        pairs = [(buffer[i][begin:begin + size, :d], buffer[i][begin:begin + size, d:]) for i in picked]
        return pairs[0] if single else pairs

    @torch.no_grad()
    def _forward(self, contexts: torch.Tensor) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
        """The layers' (inputs, outputs) ``[tokens, d]`` (float32, CPU) of ``contexts`` (indices
        into the tokens), ``forward_batch`` contexts per forward pass."""
        for begin in range(0, len(contexts), self.forward_batch):
            batch = self.tokens[contexts[begin:begin + self.forward_batch]].to(self.lm.device)
            yield [(x.reshape(-1, x.shape[-1]).to("cpu", torch.float32), y.reshape(-1, y.shape[-1]).to("cpu", torch.float32))
                   for x, y in trace_mlp(self.lm, batch, self.layers)]


def _emptied(items: list) -> Iterator:
    """The items of a list, each dropped from it as it is handed out (so its memory can go)."""
    while items:
        yield items.pop(0)


def train_streaming(
    lm: Any,
    layers: int | Sequence[int],
    tokens: torch.Tensor | str,
    *,
    n_tokens: int | None = None,
    n_latents: int | None = None,
    activation: str = "topk",
    k: int = 32,
    kind: str = "transcoder",
    epochs: int = 1,
    batch_size: int | None = None,
    lr: float | None = None,
    buffer_tokens: int = 65536,
    forward_batch: int = 32,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    resume: bool = True,
    device: str | torch.device | None = None,
    low_precision: bool | str | None = None,
    seed: int = 0,
    eval_store: Any = None,
    progress: bool = True,
    **options: Any,
) -> Transcoder | dict[int, Transcoder]:
    """Collect and train at once: transcoders for ``layers`` of ``lm`` on the activations of
    ``tokens`` (``[n_contexts, context]`` token ids, or a corpus name for `load_corpus`, of
    ``n_tokens`` tokens), streamed through a shuffle buffer of ``buffer_tokens`` rows
    (`ActivationStream`) instead of an activation store on disk.

    Each epoch runs the model over every context once; all layers train from the same pass.
    Checkpoints (``checkpoint_dir``, one ``layer-<n>`` folder each with several layers) resume
    exactly: the forward passes up to the checkpoint are replayed, without training. Other
    arguments as `train_transcoder`. Returns a transcoder, or ``{layer: transcoder}`` for a list.
    """
    if isinstance(tokens, str):
        from .corpus import load_corpus

        tokens = load_corpus(tokens, lm, n_tokens=n_tokens)
    elif n_tokens is not None:
        tokens = tokens[:math.ceil(n_tokens / tokens.shape[1])]
    listed = [layers] if isinstance(layers, int) else list(layers)
    width = n_latents or 8 * lm.d_model
    stream = ActivationStream(lm, listed, tokens, buffer_tokens=buffer_tokens, forward_batch=forward_batch,
                              sample_tokens=max(16384, 4 * width), seed=seed)
    return train_transcoder(stream, layers, n_latents=n_latents, activation=activation, k=k, kind=kind,
                            epochs=epochs, batch_size=batch_size, lr=lr, checkpoint_dir=checkpoint_dir,
                            checkpoint_every=checkpoint_every, resume=resume, device=device,
                            low_precision=low_precision, seed=seed, eval_store=eval_store, progress=progress,
                            **options)
