"""The four measurements of docs/science.md, one sub-command each; each prints its Markdown table.

    python bench/science.py finetune   [--layers 3 6 9] [--finetune-contexts 16] [--lr 1e-3] [--eval-contexts 8] [--clt]
    python bench/science.py absorption [--layer 6] [--matryoshka 64 256 1024] [--words 1000] [--letters s c p m l]
    python bench/science.py scores     [--layer 6] [--score-latents 300]
    python bench/science.py shuffle    [--layer 6] [--budgets 1 2]
    common: [--tokens 30000] [--latents 2304] [--k 32] [--out DIR]

All on the default model (SmolLM2-135M) and the default corpus (the Python reference manual):
training activations of ``--tokens`` tokens of the train split, held-out numbers on the test split.
Transcoders come from the tutorials' cache (``tcwidgets.tutorials.transcoders``, keyed by every
setting), so a second run of a table only re-measures. ``--out DIR`` also writes the numbers as JSON.

- ``finetune``: per-layer TopK transcoders, spliced in all at once, before and after
  `finetune_transcoders` on the same training tokens: CE recovered and KL with all of them in place,
  and each layer's own FVU (on clean inputs) before and after. ``--clt``: the same for one cross-layer
  transcoder on those layers (``--latents`` per layer, `tut.cross_layer_transcoder`) instead; its JSON
  goes to ``science-finetune-clt.json``.
- ``absorption``: notebook 08's first-letter task for several letters, on a plain TopK transcoder and
  a Matryoshka one of the same width and k (so the same L0): each letter's probe, the best
  first-letter latent (its F1), and the absorption rate with the threshold calibrated on control
  words (notebook 08, section 5), averaged over the letters; held-out FVU.
- ``scores``: transcoder, skip transcoder and SAE at the same k: mean detection score
  (`interpretability_scores`, `TokenExplainer`) of a random sample of latents on held-out text.
- ``shuffle``: the same layer trained with globally shuffled, context-order and document-order batches
  (`TrainingConfig.shuffle`) at the same learning-rate schedule, for 1, 2, ... epochs; held-out FVU
  of each, and the tokens the unshuffled orders need to reach the shuffled run's one-epoch FVU
  (interpolated in log tokens between budgets).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import tcwidgets as tcw
from tcwidgets import tutorials as tut
from tcwidgets.training import reconstruction_metrics

CORPUS = "python-docs"


def held_out_tokens(lm: Any, n_contexts: int) -> torch.Tensor:
    return tcw.load_corpus(CORPUS, lm, split="test")[:n_contexts]


def held_out_store(lm: Any, layers: list[int], n_tokens: int) -> tcw.ActivationStore:
    return tut.activations(lm, layers, split="test", n_tokens=n_tokens)


def table(header: list[str], rows: list[list[Any]]) -> str:
    cells = [[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row] for row in rows]
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(row) + " |" for row in cells])


# ---- (1) joint fine-tuning ------------------------------------------------------------------------------


def finetune(lm: Any, args: argparse.Namespace) -> dict[str, Any]:
    layers = sorted(args.layers)
    size = dict(n_tokens=args.tokens, n_latents=args.latents, k=args.k, epochs=1)
    before = tut.cross_layer_transcoder(lm, layers, **size) if args.clt else tut.transcoders(lm, layers, **size)
    train = tcw.load_corpus(CORPUS, lm, n_tokens=args.tokens)[:args.finetune_contexts]
    test = held_out_tokens(lm, args.eval_contexts)
    start = time.perf_counter()
    tuner = tcw.JointFineTuner(lm, before, train, tcw.FineTuneConfig(
        batch_size=args.batch_contexts, lr=args.lr, fvu_coefficient=args.fvu_coefficient), log_every=1)
    after = tuner.fit()
    seconds = time.perf_counter() - start
    if args.clt:  # as {layer: view}; each layer's FVU then sums the writes into it
        before, after = before.views(), after.views()
    measured = all_at_once(lm, {"before": before, "after": after}, test, layers)
    b, a = measured["before"], measured["after"]
    rows = [[f"layer {layer}", b["fvu"][layer], a["fvu"][layer], a["fvu"][layer] - b["fvu"][layer]] for layer in layers]
    print(f"\nfine-tuning: {len(train)} contexts of {train.shape[1]}, {args.batch_contexts} per step, lr {args.lr}, "
          f"{seconds:.0f} s; its history (kl, fvu): "
          + ", ".join(f"{r['kl']:.3f}/{r['fvu']:.3f}" for r in tuner.history))
    print(f"held-out: {len(test)} contexts of {test.shape[1]}; clean CE {measured['ce_clean']:.4f}, all "
          f"{len(layers)} MLPs zero-ablated {measured['ce_zero']:.4f}\n")
    what = "a cross-layer transcoder on layers" if args.clt else "layers"
    print(table([f"{what} {', '.join(map(str, layers))} all at once", "CE", "CE recovered", "KL"],
                [[name, m["ce"], m["ce_recovered"], m["kl"]] for name, m in (("trained alone", b), ("fine-tuned", a))]))
    print()
    print(table(["each layer's own FVU (clean inputs)", "trained alone", "fine-tuned", "cost"], rows))
    return {**measured, "seconds": seconds, "history": tuner.history}


@torch.no_grad()
def all_at_once(lm: Any, variants: dict[str, dict[int, tcw.Transcoder]], tokens: torch.Tensor,
                layers: list[int], batch_size: int = 4) -> dict[str, Any]:
    """CE, CE recovered and KL with every layer's transcoder spliced in at once, and each layer's FVU
    on the clean run's MLP inputs (`tcw.evaluate`'s definitions; the clean and zero-ablated runs
    are shared by the variants, and the single-layer runs left out, to save forward passes)."""
    from tcwidgets.evaluation import ReconstructionStats, _losses
    from tcwidgets.splicing import run_transcoder

    ce = dict.fromkeys(["clean", "zero", *variants], 0.0)
    kl = dict.fromkeys(variants, 0.0)
    fvu = {name: {layer: ReconstructionStats(tcs[layer].n_latents) for layer in layers} for name, tcs in variants.items()}
    for begin in range(0, len(tokens), batch_size):
        batch = tokens[begin:begin + batch_size]
        targets = batch[:, 1:]
        clean = tcw.splice(lm, {}, batch, save_mlp=layers, batch_size=len(batch), progress=False)
        loss, _, clean_log_probs = _losses(clean.logits, targets, None)
        ce["clean"] += loss
        ce["zero"] += _losses(tcw.splice(lm, {}, batch, zero_ablate=layers, batch_size=len(batch),
                                         progress=False).logits, targets, None)[0]
        for name, tcs in variants.items():
            loss, divergence, _ = _losses(tcw.splice(lm, tcs, batch, batch_size=len(batch), progress=False).logits,
                                          targets, clean_log_probs)
            ce[name] += loss
            kl[name] += divergence
            for layer in layers:
                x, y = clean.mlp[layer]
                fvu[name][layer].add(*run_transcoder(tcs[layer], x, y), y)
        print(f"evaluated {begin + len(batch)} of {len(tokens)} contexts", flush=True)
    n = tokens.shape[0] * (tokens.shape[1] - 1)
    clean_ce, zero_ce = ce["clean"] / n, ce["zero"] / n
    return {"ce_clean": clean_ce, "ce_zero": zero_ce, **{name: {
        "ce": ce[name] / n, "kl": kl[name] / n, "ce_recovered": (zero_ce - ce[name] / n) / (zero_ce - clean_ce),
        "fvu": {layer: fvu[name][layer].metrics()["fvu"] for layer in layers}} for name in variants}}


# ---- (2) absorption: plain TopK vs Matryoshka --------------------------------------------------------------


def word_prompts(lm: Any, n_words: int, seed: int = 0) -> tuple[list[str], torch.Tensor]:
    """Notebook 08's task: single-token words (a space and 3+ lowercase letters), each after a
    spelling prefix; the word is the last token."""
    tokenizer = lm.tokenizer
    words = sorted((text[1:], index) for text, index in tokenizer.get_vocab().items()
                   if text.startswith("Ġ") and re.fullmatch(r"[a-z]{3,}", text[1:]))
    random.Random(seed).shuffle(words)
    words = words[:n_words]
    prefix = [tokenizer.bos_token_id] + tokenizer.encode(
        "cat is spelled C-A-T. dog is spelled D-O-G. sun is spelled S-U-N. map is spelled M-A-P.")
    return [w for w, _ in words], torch.tensor([prefix + [index] for _, index in words])


def word_inputs(lm: Any, layer: int, tokens: torch.Tensor) -> torch.Tensor:
    """The layer's MLP inputs at each prompt's last token (model units)."""
    parts = []
    for start in range(0, len(tokens), 200):
        chunk = tcw.collect_activations(lm, [layer], tokens[start:start + 200], out=None, progress=False)
        x, _ = chunk.layer(layer)
        parts.append(x.view(-1, tokens.shape[1], lm.d_model)[:, -1])
    return torch.cat(parts)


def train_probe(x: torch.Tensor, y: torch.Tensor, steps: int = 500, lr: float = 1e-2,
                weight_decay: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Notebook 08's logistic-regression probe (Adam, full batch, positives up-weighted)."""
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.Adam([w, b], lr=lr)
    pos_weight = (1 - y.mean()) / y.mean()
    for _ in range(steps):
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x @ w + b, y, pos_weight=pos_weight) + weight_decay * w.square().sum()
        loss.backward()
        optimizer.step()
    return w.detach(), b.detach()


def absorption_of(tc: tcw.Transcoder, inputs: torch.Tensor, scaled: torch.Tensor, is_letter: torch.Tensor,
                  probe: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
    """Notebook 08, sections 4-5: the best first-letter latent by F1, and the share of probe-confident
    letter words where it is silent and an active latent reads the probe direction more than 95% of
    control words' best latents do (the calibrated absorption rate)."""
    with torch.no_grad():
        latents = tc.encode(inputs)
    fires = latents > 0
    w, b = probe
    alignment = F.normalize(tc.W_enc.detach(), dim=1) @ (w / w.norm())
    hits = (fires & is_letter[:, None]).sum(0).float()
    precision, recall = hits / fires.sum(0).clamp_min(1), hits / is_letter.sum()
    f1 = 2 * precision * recall / (precision + recall).clamp_min(1e-9)
    main = int(f1.argmax())
    probability = torch.sigmoid(scaled @ w + b)
    confident = is_letter & (probability > 0.5)
    silent = confident & ~fires[:, main]
    control = ~is_letter & (probability <= 0.5) & ~fires[:, main]
    best = torch.where(fires, alignment, torch.tensor(-1.0)).max(1).values  # best-aligned active latent
    tau = torch.quantile(best[control], 0.95)
    return {"main_f1": float(f1[main]), "main_recall": float(recall[main]),
            "silent": float(silent.sum() / confident.sum().clamp_min(1)),
            "absorption": float((silent & (best > tau)).sum() / confident.sum().clamp_min(1))}


def absorption(lm: Any, args: argparse.Namespace) -> dict[str, Any]:
    variants = {
        "TopK": {},
        f"Matryoshka {tuple(args.matryoshka)}": {"matryoshka": tuple(args.matryoshka)},
    }
    tcs = {name: tut.transcoders(lm, args.layer, n_tokens=args.tokens, n_latents=args.latents, k=args.k, epochs=1,
                                 **options)[args.layer] for name, options in variants.items()}
    test = held_out_store(lm, [args.layer], args.eval_tokens)
    words, tokens = word_prompts(lm, args.words)
    inputs = word_inputs(lm, args.layer, tokens)
    scaled = inputs * (lm.d_model ** 0.5 / inputs.norm(dim=-1).mean())
    train = torch.arange(len(words)) < int(0.7 * len(words))
    results: dict[str, dict[str, Any]] = {}
    for letter in args.letters:
        is_letter = torch.tensor([w[0] == letter for w in words])
        probe = train_probe(scaled[train], is_letter[train].float())
        probe_f1 = _f1((scaled[~train] @ probe[0] + probe[1] > 0), is_letter[~train])
        for name, tc in tcs.items():
            results.setdefault(name, {})[letter] = {"probe_f1": probe_f1,
                                                    **absorption_of(tc, inputs, scaled, is_letter, probe)}
    rows = []
    for name, tc in tcs.items():
        m = reconstruction_metrics(tc, test)
        per_letter = results[name]
        mean = {key: float(np.mean([r[key] for r in per_letter.values()])) for key in next(iter(per_letter.values()))}
        results[name]["mean"], results[name]["held_out"] = mean, m
        rows.append([name, m["fvu"], m["l0"], m["dead_fraction"], mean["main_f1"], mean["main_recall"],
                     mean["silent"], mean["absorption"]])
    print(f"\nletters {', '.join(args.letters)}; {len(words)} words; held-out probe F1 "
          + ", ".join(f"{letter}: {results['TopK'][letter]['probe_f1']:.2f}" for letter in args.letters))
    print(table(["layer %d, %d latents, k=%d" % (args.layer, args.latents, args.k), "held-out FVU", "L0", "dead",
                 "best latent F1", "its recall", "silent on confident words", "absorption (calibrated)"], rows))
    print("\nper letter (absorption, best-latent F1):")
    print(table(["", *args.letters], [[name, *(f"{results[name][c]['absorption']:.3f} / {results[name][c]['main_f1']:.2f}"
                                              for c in args.letters)] for name in tcs]))
    return results


def _f1(predicted: torch.Tensor, actual: torch.Tensor) -> float:
    tp = float((predicted & actual).sum())
    precision, recall = tp / max(1.0, float(predicted.sum())), tp / max(1.0, float(actual.sum()))
    return 2 * precision * recall / max(1e-9, precision + recall)


# ---- (3) interpretability scores of the three kinds ------------------------------------------------------


def scores(lm: Any, args: argparse.Namespace) -> dict[str, Any]:
    store = tut.activations(lm, [args.layer], n_tokens=args.tokens)
    test_store = held_out_store(lm, [args.layer], args.eval_tokens)
    held_out = held_out_tokens(lm, args.score_contexts)
    results, rows = {}, []
    for kind in ("transcoder", "skip", "sae"):
        tc = tut.transcoders(lm, args.layer, n_tokens=args.tokens, n_latents=args.latents, k=args.k, kind=kind,
                             epochs=1)[args.layer]
        stats = tcw.analyze_features(lm, tc, store)
        firing = np.flatnonzero(stats.count > 0)
        picked = np.sort(np.random.default_rng(0).choice(firing, min(args.score_latents, len(firing)), replace=False))
        scored = tcw.interpretability_scores(stats, lm=lm, tokens=held_out, transcoder=tc, latents=picked)
        values = np.array([s.score for s in scored.latents.values() if not math.isnan(s.score)])
        m = reconstruction_metrics(tc, test_store)
        results[kind] = {"mean": float(values.mean()), "sem": float(values.std(ddof=1) / math.sqrt(len(values))),
                         "n": len(values), "held_out": m, "scores": scored.to_dict()["latents"]}
        rows.append([kind, m["fvu"], m["l0"], m["dead_fraction"], results[kind]["mean"], results[kind]["sem"],
                     len(values), float(np.median(values))])
    print(table([f"layer {args.layer}, {args.latents} latents, k={args.k}", "held-out FVU", "L0", "dead",
                 "mean detection score", "± s.e.", "latents scored", "median"], rows))
    return results


# ---- (4) shuffled vs unshuffled batches --------------------------------------------------------------------


def shuffle(lm: Any, args: argparse.Namespace) -> dict[str, Any]:
    store = tut.activations(lm, [args.layer], n_tokens=args.tokens)
    test_store = held_out_store(lm, [args.layer], args.eval_tokens)
    fvu: dict[str, dict[int, float]] = {}
    for order in ("global", "context", "document"):
        for epochs in args.budgets:
            tc = tcw.train_transcoder(store, args.layer, n_latents=args.latents, k=args.k, epochs=epochs,
                                      shuffle=order, batch_size=args.batch_size, seed=args.seed)
            fvu.setdefault(order, {})[epochs] = reconstruction_metrics(tc, test_store)["fvu"]
            print(f"{order} {epochs} epochs: held-out FVU {fvu[order][epochs]:.4f}", flush=True)
    target = fvu["global"][min(args.budgets)]
    tokens = {epochs: epochs * store.n_tokens for epochs in args.budgets}
    rows = []
    for order, by_budget in fvu.items():
        needed = _tokens_to_reach(target, [(tokens[e], by_budget[e]) for e in sorted(by_budget)])
        ratio = needed / tokens[min(args.budgets)] if needed else None
        rows.append([order, *(by_budget[e] for e in args.budgets),
                     f"{needed:,.0f}" if needed else f"> {tokens[max(args.budgets)]:,}",
                     f"{ratio:.2f}x" if ratio else f"> {max(args.budgets) / min(args.budgets):.0f}x"])
    print(f"\nbatch size {args.batch_size or tcw.training.default_batch_size(store.n_tokens)} tokens "
          f"(contexts of {store.manifest['context']}); the shuffled run's {tokens[min(args.budgets)]:,}-token FVU: "
          f"{target:.4f}")
    print(table(["order", *(f"FVU after {tokens[e]:,} tokens" for e in args.budgets),
                 "tokens to reach shuffled FVU", "× the shuffled run's"], rows))
    return {"fvu": fvu, "target": target}


def _tokens_to_reach(target: float, curve: list[tuple[int, float]]) -> float | None:
    """The first token budget at which the FVU falls to ``target``, interpolated in log tokens
    between measured budgets; None when no budget reaches it."""
    for (t0, f0), (t1, f1) in zip([(curve[0][0], math.inf), *curve], curve):
        if f1 <= target:
            if math.isinf(f0):
                return float(t1)
            share = (f0 - target) / (f0 - f1)
            return math.exp(math.log(t0) + share * (math.log(t1) - math.log(t0)))
    return None


# ---- command line --------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("table", choices=("finetune", "absorption", "scores", "shuffle"))
    parser.add_argument("--layer", type=int, default=6)
    parser.add_argument("--layers", type=int, nargs="+", default=[3, 6, 9])
    parser.add_argument("--tokens", type=int, default=30_000, help="training tokens")
    parser.add_argument("--latents", type=int, default=2304)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--eval-contexts", type=int, default=8, help="held-out contexts for CE/KL (finetune)")
    parser.add_argument("--score-contexts", type=int, default=32, help="held-out contexts for the scores")
    parser.add_argument("--eval-tokens", type=int, default=16_384, help="held-out tokens for the FVU")
    parser.add_argument("--finetune-contexts", type=int, default=16, help="training contexts the fine-tuning sees")
    parser.add_argument("--batch-contexts", type=int, default=2, help="contexts per fine-tuning step")
    parser.add_argument("--lr", type=float, default=1e-3, help="fine-tuning learning rate")
    parser.add_argument("--fvu-coefficient", type=float, default=1.0)
    parser.add_argument("--clt", action="store_true", help="fine-tune one cross-layer transcoder (finetune)")
    parser.add_argument("--matryoshka", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--words", type=int, default=1000)
    parser.add_argument("--letters", nargs="+", default=["s", "c", "p", "m", "l"])
    parser.add_argument("--score-latents", type=int, default=300)
    parser.add_argument("--budgets", type=int, nargs="+", default=[1, 2], help="epochs of each run (shuffle)")
    parser.add_argument("--batch-size", type=int, help="tokens per step (shuffle; default the trainer's)")
    parser.add_argument("--seed", type=int, default=0, help="initialisation and batch order (shuffle)")
    parser.add_argument("--out", type=Path, help="also write the numbers as JSON here")
    args = parser.parse_args()
    torch.manual_seed(0)
    lm = tcw.load_model()
    start = time.perf_counter()
    print(f"{args.table}: {vars(args)}")
    result = globals()[args.table](lm, args)
    print(f"\n{time.perf_counter() - start:.0f} s on {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        name = f"science-{args.table}{'-clt' if args.clt else ''}.json"
        (args.out / name).write_text(json.dumps({"settings": settings, "result": result},
                                                                        indent=1, default=str))


if __name__ == "__main__":
    main()
