"""Fine-tune several transcoders jointly, all spliced into the model at once.

Each transcoder is trained alone on clean activations; spliced in together (no error terms), each
reads inputs carrying the errors of those before it, and the model degrades far more than with
one (Dunefsky et al. 2024 report 3.59 -> 4.23 nats for GPT-2 with every MLP replaced). Joint
fine-tuning trains them with all of them in place, toward the clean model's next-token
distribution (end-to-end training, Braun et al. 2024; sparsify's ``loss_fn="kl"``), while each
keeps reconstructing its own MLP:

    loss = KL(clean || spliced) + fvu_coefficient · Σ_layers FVU_layer

- KL is the next-token KL divergence in nats, averaged over the positions `evaluate` uses
  (``0 .. context-2``); the clean distribution comes from a clean pass over the same batch.
- ``FVU_layer`` compares the transcoder's reconstruction with **what its MLP computes on the input
  it reads in the spliced run** (both from the same pass, the MLP runs anyway). Not the clean
  run's MLP output: that target would ask each layer to also undo the errors of the layers before
  it, which is the KL term's job, and the FVU would stop measuring how faithfully the transcoder
  replaces *its* MLP — the property circuits and error terms rely on. The FVU gradient reaches
  only the layer's own transcoder (its input and target are detached); the KL gradient reaches
  every transcoder through the spliced forward pass.

A `CrossLayerTranscoder` is fine-tuned as one model: all its layers spliced in at once, each layer's
reconstruction the sum of the writes into it (`CrossLayerTranscoder.views`, as `splice` runs it), and
``FVU_layer`` that sum against the layer's MLP output. Its FVU gradient then reaches the encoders of
the layer and every earlier CLT layer and their writes into the layer (still not the inputs: those
stay detached).

Transcoders stay in inference mode (BatchTopK uses its calibrated threshold, as when spliced);
decoder rows stay unit norm as in `Trainer` (except ReLU's). The model's own weights are frozen.
TopK and BatchTopK keep their sparsity; ReLU and JumpReLU transcoders get no sparsity penalty
here, so watch the ``l0`` values of the history.

Checkpoints follow `Trainer`'s: written atomically (a temporary folder renamed), refused when
they belong to another run (other settings, model, tokens or starting transcoders), and an
interrupted run resumed from one ends with the same weights, bit for bit on CPU.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import nnsight
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .crosslayer import CrossLayerTranscoder, LayerView
from .features import transcoder_fingerprint
from .files import FileFormatError, atomic_folder, inside, load_tensors, read_manifest, save_tensors, write_json
from .splicing import check_transcoders, run_transcoder, writes_after_norm
from .training import clear_checkpoints, lr_factor, resume_or_clear
from .transcoder import Transcoder

__all__ = ["FineTuneConfig", "JointFineTuner", "finetune_transcoders"]

CHECKPOINT_FORMAT = "tcwidgets.finetune-checkpoint"
CHECKPOINT_VERSION = 1
_MANIFEST, _STATE = "finetune.json", "state.safetensors"


@dataclass(frozen=True)
class FineTuneConfig:
    """What a joint fine-tuning run computes (everything that decides the final weights).

    Args:
        epochs: passes over the token contexts.
        batch_size: contexts per step (a batch's contexts that do not fill a step are dropped).
        lr: Adam's peak learning rate (linear warm-up, then linear decay to zero).
        warmup: fraction of the steps with a linear warm-up.
        fvu_coefficient: weight of the sum of the layers' FVUs against the KL divergence.
        seed: the order of the contexts.
    """

    epochs: int = 1
    batch_size: int = 8
    lr: float = 1e-4
    warmup: float = 0.05
    fvu_coefficient: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}.")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup is a fraction of the steps in [0, 1), got {self.warmup!r}.")
        if not (isinstance(self.fvu_coefficient, (int, float)) and self.fvu_coefficient >= 0):
            raise ValueError(f"fvu_coefficient must be >= 0 (0: KL only), got {self.fvu_coefficient!r}.")


class JointFineTuner:
    """Fine-tune ``{layer: transcoder}`` or a cross-layer transcoder jointly on ``tokens`` (see the
    module docstring).

    ``tuner = JointFineTuner(lm, transcoders, tokens, FineTuneConfig(...))``, then
    ``tuned = tuner.fit()``: new ``{layer: transcoder}``, or a new `CrossLayerTranscoder` when given
    one. The given transcoders are copied, never changed. ``tuner.history`` holds a record every
    ``log_every`` steps (step, tokens, loss, kl, fvu = the layers' mean, ``fvu_<layer>``,
    ``l0_<layer>``, lr); ``callback(tuner, record)`` is called with each.

    Args:
        lm: a model from `load_model` (local; its weights are frozen while fine-tuning).
        transcoders: ``{layer: transcoder}``, one transcoder, or a `CrossLayerTranscoder` (all its
            layers), spliced in all at once.
        tokens: ``[n_contexts, context]`` training token contexts.
        config: the `FineTuneConfig` (default: all defaults).
        checkpoint_dir: write checkpoints here every ``checkpoint_every`` steps and at the end.
        checkpoint_every: steps between checkpoints (default: about 10 per run).
        resume: continue from the latest checkpoint in ``checkpoint_dir`` when there is one (it
            must be of this same run); ``False`` starts over, deleting it.
        log_every: steps between history records.
        callback: ``callback(tuner, record)`` after each history record.
        progress: show a progress bar.
    """

    def __init__(
        self,
        lm: Any,
        transcoders: Mapping[int, Transcoder] | Transcoder | CrossLayerTranscoder,
        tokens: torch.Tensor,
        config: FineTuneConfig | None = None,
        *,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every: int | None = None,
        resume: bool = True,
        log_every: int = 10,
        callback: Callable[[JointFineTuner, dict[str, float]], None] | None = None,
        progress: bool = True,
    ) -> None:
        given = check_transcoders(lm, transcoders)
        if not given:
            raise ValueError("No transcoders to fine-tune: pass {layer: transcoder}.")
        clt = transcoders if isinstance(transcoders, CrossLayerTranscoder) else None
        if clt is None and any(isinstance(tc, LayerView) for tc in given.values()):
            raise ValueError("These are layers of a cross-layer transcoder (its layers share one set of weights): "
                             "pass the CrossLayerTranscoder itself, which is fine-tuned with all its layers at once.")
        self.lm, self.config = lm, config or FineTuneConfig()
        self.tokens = lm.check_tokens(tokens)
        if self.tokens.shape[1] < 2:
            raise ValueError("Contexts need at least 2 tokens to measure next-token KL divergence.")
        self.steps_per_epoch = len(self.tokens) // self.config.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"batch_size={self.config.batch_size} contexts is more than the {len(self.tokens)} "
                             "given: pass more contexts or a smaller batch_size.")
        self.total_steps = self.steps_per_epoch * self.config.epochs
        # what is trained and checkpointed: {"<layer>": transcoder}, or {"clt": the cross-layer transcoder}
        owners: dict[str, Transcoder | CrossLayerTranscoder] = (
            {"clt": clt} if clt is not None else {str(layer): tc for layer, tc in given.items()})
        self.identity = {
            "model": lm.name, "layers": list(given),
            "tokens": hashlib.sha256(self.tokens.cpu().numpy().tobytes()).hexdigest(),
            "tokens_shape": list(self.tokens.shape),
            "transcoders": {key: transcoder_fingerprint(owner) for key, owner in owners.items()},
        }
        self._owners = {key: copy.deepcopy(owner).to(lm.device).eval() for key, owner in owners.items()}
        #: the fine-tuned cross-layer transcoder (None for per-layer transcoders)
        self.clt: CrossLayerTranscoder | None = self._owners.get("clt")
        #: ``{layer: transcoder}`` as spliced (a cross-layer transcoder's `LayerView` per layer)
        self.transcoders: dict[int, Transcoder | LayerView] = (
            self.clt.views() if self.clt is not None else {int(key): tc for key, tc in self._owners.items()})
        parameters = [p for owner in self._owners.values() for p in owner.parameters()]
        for p in parameters:
            p.requires_grad_(True)
        self.optimizer = torch.optim.Adam(parameters, lr=self.config.lr)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.checkpoint_every = checkpoint_every or max(1, self.total_steps // 10)
        self.log_every, self.callback, self.progress = log_every, callback, progress
        self.step = 0
        self.history: list[dict[str, float]] = []
        self._sums: dict[str, float] = {}
        if self.checkpoint_dir is not None:
            resume_or_clear(self.checkpoint_dir, resume, self._load_checkpoint)

    # ---- training ---------------------------------------------------------------------------------

    def fit(self) -> dict[int, Transcoder] | CrossLayerTranscoder:
        """Fine-tune to the end (from the latest checkpoint if resumed); return the new transcoders
        (``{layer: transcoder}``, or the new `CrossLayerTranscoder` when given one)."""
        what = "a cross-layer transcoder on layers" if self.clt is not None else "layers"
        bar = tqdm(total=self.total_steps, initial=self.step, desc=f"fine-tuning {what} {list(self.transcoders)}",
                   unit="step", disable=not self.progress)
        frozen = [(p, p.requires_grad) for p in self.lm._module.parameters()]
        for p, _ in frozen:
            p.requires_grad_(False)
        try:
            while self.step < self.total_steps:
                self._train_step(self._batch(self.step))
                self.step += 1
                bar.update()
                if self.step % self.log_every == 0 or self.step == self.total_steps:
                    record = self._log()
                    bar.set_postfix(kl=f"{record['kl']:.4f}", fvu=f"{record['fvu']:.4f}")
                    if self.callback is not None:
                        self.callback(self, record)
                if self.checkpoint_dir is not None and (
                        self.step % self.checkpoint_every == 0 or self.step == self.total_steps):
                    self.save_checkpoint()
        finally:
            bar.close()
            for p, requires_grad in frozen:
                p.requires_grad_(requires_grad)
        return self.clt if self.clt is not None else dict(self.transcoders)

    def _batch(self, step: int) -> torch.Tensor:
        """The contexts of ``step``: epoch ``e``'s order is a permutation seeded by ``seed + e``."""
        epoch, index = divmod(step, self.steps_per_epoch)
        order = torch.randperm(len(self.tokens), generator=torch.Generator().manual_seed(self.config.seed + epoch))
        size = self.config.batch_size
        return self.tokens[order[index * size:(index + 1) * size]]

    def _train_step(self, batch: torch.Tensor) -> None:
        c = self.config
        for group in self.optimizer.param_groups:
            group["lr"] = c.lr * lr_factor(self.step, self.total_steps, c.warmup)
        batch = batch.to(self.lm.device)
        with torch.no_grad():
            clean = _clean_logits(self.lm, batch)
            clean_log_probs = torch.log_softmax(clean[:, :-1].float(), dim=-1)
            del clean
        with torch.enable_grad():
            logits, mlp = _spliced_pass(self.lm, batch, self.transcoders)
            log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            kl = F.kl_div(log_probs, clean_log_probs, log_target=True, reduction="sum") / log_probs.shape[:2].numel()
            loss = kl
            metrics = {"kl": kl.detach()}
            fvus = []
            for layer, tc in self.transcoders.items():  # ascending: a CLT layer sums the writes of those before
                x, y = (None if value is None else value.detach() for value in mlp[layer])
                latents, reconstruction = run_transcoder(tc, x, y)
                y, reconstruction = y.flatten(0, -2), reconstruction.flatten(0, -2)
                fvu = (y - reconstruction).square().sum() / (y - y.mean(0)).square().sum()
                fvus.append(fvu)
                metrics[f"fvu_{layer}"] = fvu.detach()
                metrics[f"l0_{layer}"] = (latents != 0).sum(-1).float().mean().detach()
            fvu_total = torch.stack(fvus).sum()
            loss = loss + c.fvu_coefficient * fvu_total
            metrics.update(loss=loss.detach(), fvu=fvu_total.detach() / len(fvus))
            self.optimizer.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)  # not Tensor.backward, which nnsight patches (see training.py)
        constrained = [owner for owner in self._owners.values() if owner.config.activation != "relu"]
        for tc in constrained:
            tc.project_decoder_grad()
        self.optimizer.step()
        for tc in constrained:
            tc.normalize_decoder()
        for name, value in metrics.items():
            self._sums[name] = self._sums.get(name, 0.0) + float(value)
        self._sums["n"] = self._sums.get("n", 0) + 1

    def _log(self) -> dict[str, float]:
        n = self._sums.pop("n")
        record = {"step": self.step, "tokens": self.step * self.config.batch_size * self.tokens.shape[1]}
        record.update({name: value / n for name, value in sorted(self._sums.items())})
        record["lr"] = self.config.lr * lr_factor(self.step - 1, self.total_steps, self.config.warmup)
        self._sums.clear()
        if not math.isfinite(record["loss"]):
            raise FloatingPointError(f"The fine-tuning loss became {record['loss']} by step {self.step}: lower "
                                     f"the learning rate (now {self.config.lr:.2e}) with lr=...")
        self.history.append(record)
        return record

    # ---- checkpoints --------------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Write the current step to ``checkpoint_dir/step-XXXXXXXX`` (a temporary folder, then
        renamed) and delete older checkpoints. Returns its path."""
        if self.checkpoint_dir is None:
            raise ValueError("This JointFineTuner has no checkpoint_dir.")
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        target = self.checkpoint_dir / f"step-{self.step:08d}"
        with atomic_folder(target) as temporary:
            names = self._parameter_names()
            tensors = {f"{key}.{name}": value for key, owner in self._owners.items()
                       for name, value in owner.state_dict().items()}
            for parameter, state in self.optimizer.state.items():
                for key, value in state.items():
                    tensors[f"optimizer.{names[parameter]}.{key}"] = value
            record = save_tensors(temporary / _STATE, tensors)
            write_json(temporary / _MANIFEST, {
                "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": self.step,
                "settings": asdict(self.config), "identity": self.identity, "history": self.history,
                "files": {_STATE: record},
            })
        clear_checkpoints(self.checkpoint_dir, keep=target)
        return target

    def _parameter_names(self) -> dict[torch.nn.Parameter, str]:
        return {p: f"{key}.{name}" for key, owner in self._owners.items() for name, p in owner.named_parameters()}

    def _load_checkpoint(self, path: Path) -> None:
        fix = f"delete {path} to resume from an older checkpoint, or pass resume=False to start over"
        meta = read_manifest(path / _MANIFEST, format=CHECKPOINT_FORMAT, version=CHECKPOINT_VERSION, fix=fix)
        saved = {"settings": meta.get("settings"), "identity": meta.get("identity")}
        now = {"settings": asdict(self.config), "identity": self.identity}
        differences = [f"{part} {name}: checkpoint {saved[part].get(name)!r}, now {value!r}"
                       for part in now for name, value in now[part].items()
                       if not isinstance(saved[part], dict) or saved[part].get(name) != value]
        if differences:
            raise ValueError(f"{self.checkpoint_dir} holds another run's checkpoint ({'; '.join(differences)}): "
                             "use another checkpoint_dir, or resume=False to start over.")
        files = meta.get("files", {})
        if _STATE not in files:
            raise FileFormatError(f"{path / _MANIFEST} lists no {_STATE}: {fix}.")
        tensors = load_tensors(inside(path, _STATE), sha256=files[_STATE].get("sha256"), fix=fix,
                               device=self.lm.device)
        with torch.no_grad():
            for key, owner in self._owners.items():
                owner.load_state_dict({name: tensors.pop(f"{key}.{name}") for name in owner.state_dict()})
        index = {name: i for i, name in enumerate(self._parameter_names().values())}
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():  # optimizer.<layer or "clt">.<parameter>.<field>
            _, owner, name, field = key.split(".")
            state.setdefault(index[f"{owner}.{name}"], {})[field] = value.cpu() if field == "step" else value
        self.optimizer.load_state_dict({"state": state, "param_groups": self.optimizer.state_dict()["param_groups"]})
        self.step, self.history = meta["step"], meta["history"]


def _clean_logits(lm: Any, batch: torch.Tensor) -> torch.Tensor:
    with lm.trace(batch, remote=False):
        logits = lm.output.logits.save()
    return logits


def _spliced_pass(lm: Any, batch: torch.Tensor,
                  transcoders: dict[int, Transcoder | LayerView]) -> tuple[torch.Tensor, dict[int, tuple]]:
    """Logits with every transcoder spliced in (no error terms), differentiable with respect to the
    transcoders, and each layer's MLP input and output in this run (before the replacement)."""
    with lm.trace(batch, remote=False):
        mlp = nnsight.save({})
        for layer, tc in transcoders.items():  # ascending layers: nnsight needs execution order
            x = lm.mlp(layer).input if tc.config.kind != "sae" else None
            envoy = lm.mlp_writer(layer, after_norm=writes_after_norm(lm, tc))
            y = envoy.output
            mlp[layer] = (x, y)
            envoy.output = run_transcoder(tc, x, y)[1]
        logits = lm.output.logits.save()
    return logits, mlp


def finetune_transcoders(
    lm: Any,
    transcoders: Mapping[int, Transcoder] | Transcoder | CrossLayerTranscoder,
    tokens: torch.Tensor,
    *,
    epochs: int = 1,
    batch_size: int = 8,
    lr: float = 1e-4,
    warmup: float = 0.05,
    fvu_coefficient: float = 1.0,
    seed: int = 0,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    resume: bool = True,
    callback: Callable[[JointFineTuner, dict[str, float]], None] | None = None,
    progress: bool = True,
) -> dict[int, Transcoder] | CrossLayerTranscoder:
    """Fine-tune transcoders jointly, all spliced in at once, on KL to the clean model plus each
    layer's FVU; return new ``{layer: transcoder}``, or a new `CrossLayerTranscoder` when given one
    (all its layers and cross-layer writes spliced in and trained together). The given ones are not
    changed.

    See `JointFineTuner` (which also keeps the history) and `FineTuneConfig` for the arguments.
    """
    config = FineTuneConfig(epochs=epochs, batch_size=batch_size, lr=lr, warmup=warmup,
                            fvu_coefficient=fvu_coefficient, seed=seed)
    return JointFineTuner(lm, transcoders, tokens, config, checkpoint_dir=checkpoint_dir,
                          checkpoint_every=checkpoint_every, resume=resume, callback=callback,
                          progress=progress).fit()
