"""How much of a circuit its transcoders explain: the table of docs/circuits.md.

    python bench/circuit_scores.py [--sets late-4 every-layer every-layer-skip ...] [--extra NAME=FOLDER ...]
                                   [--out FILE]

For each set of transcoders, on the greater-than prompts of the case study (`tutorials.greater_than`)
and on a few general prompts: circuit-tracer's replacement and completeness scores of the prompt's
full attribution graph (`CircuitGraph.scores`, mean over the prompts of each group), and, on held-out
documentation, the cross-entropy recovered with every transcoder of the set spliced in at once
(`tcw.evaluate(...).ce_recovered_all`) and the set's total L0 (the latents active per token, summed
over its layers).

Sets (all trained by `tutorials.circuit_transcoders`: documentation plus year sentences, 2 × d_model
latents, cached in ``$TCWIDGETS_CACHE/tutorials/circuit-transcoders``):

- ``late-4``: layers 26–29, k=32 (today's tutorial layers; total L0 128);
- ``every-layer``: all 30 layers, k=8 (notebook 07's set; total L0 240);
- ``every-layer-k4``: all 30 layers, k=4 (total L0 120, matched to late-4);
- ``every-layer-skip``, ``every-layer-skip-k4``: skip transcoders (``kind="skip"``, an affine skip
  path W_skip·x beside the latents) on all 30 layers, k=8 and k=4; the attribution folds the skip
  path into the edges like an attention head, so what it carries is not error;
- ``every-layer-skip-wide``: the same at k=8 with 4 × d_model latents (``width``: latents per d_model);
- ``every-layer-skip-e8``, ``every-layer-skip-e16``: ``every-layer-skip`` trained for 8 and 16 epochs
  instead of 2 (the same tokens, 4 and 8 times the steps);
- ``clt-k4``, ``clt-k8``: one cross-layer transcoder on all 30 layers (`tutorials.circuit_clt`, the same
  tokens, 2 × d_model latents per layer), k=4 and k=8 per layer (total L0 120 and 240, matched to
  late-4 and every-layer).

``--extra NAME=FOLDER`` adds a set read with `tcw.load_transcoders` (e.g. a cross-layer transcoder
saved elsewhere: ``--extra clt=path/to/clt``); anything `tcw.attribute` and
`tcw.evaluate` take works. The fast setting (``TCWIDGETS_TUTORIAL_FAST=1``) trains the sets on
fewer tokens, as the notebooks do.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import tcwidgets as tcw
from tcwidgets.circuits import LogitTarget
from tcwidgets.tutorials import circuit_clt, circuit_transcoders
from tcwidgets.tutorials.greater_than import TEMPLATE, greater_target

SETS = {
    "late-4": {"layers": [26, 27, 28, 29], "k": 32},
    "every-layer": {"layers": "all", "k": 8},
    "every-layer-k4": {"layers": "all", "k": 4},
    "every-layer-skip": {"layers": "all", "k": 8, "kind": "skip"},
    "every-layer-skip-k4": {"layers": "all", "k": 4, "kind": "skip"},
    "every-layer-skip-wide": {"layers": "all", "k": 8, "kind": "skip", "width": 4},
    "every-layer-skip-e8": {"layers": "all", "k": 8, "kind": "skip", "epochs": 8},
    "every-layer-skip-e16": {"layers": "all", "k": 8, "kind": "skip", "epochs": 16},
    "clt-k4": {"clt": True, "k": 4},
    "clt-k8": {"clt": True, "k": 8},
}
GREATER_THAN_YEARS = [32, 45, 61]
GENERAL = [("The capital of France is", " Paris"), ("One, two, three, four,", " five"),
           ("The opposite of hot is", " cold")]


def prompt_groups() -> dict[str, list[tuple[str, LogitTarget]]]:
    """The prompts and their targets: the greater-than logit difference, and one answer's logit."""
    return {"greater-than": [(TEMPLATE.format(y), greater_target(y // 10)) for y in GREATER_THAN_YEARS],
            "general": [(prompt, LogitTarget(answer)) for prompt, answer in GENERAL]}


def all_layers_losses(lm: Any, transcoders: Any, tokens: torch.Tensor) -> dict:
    """`tcw.evaluate`'s all-layers numbers (``ce_clean``, ``ce_all_spliced``, ``ce_all_zero_ablated``,
    ``ce_recovered_all``, ``kl_all``) and per-layer ``fvu`` and ``l0`` (with ``total_l0`` and
    ``mean_fvu``) from its three all-layers passes alone, with its own loss functions and
    reconstruction sums; `evaluate` also runs two passes per layer (62 for 30 layers), for the
    per-layer CE."""
    from tcwidgets.evaluation import ReconstructionStats, _losses, _recovered
    from tcwidgets.splicing import check_transcoders, run_transcoder, splice, writes_after_norm

    transcoders = check_transcoders(lm, transcoders)
    targets, layers = tokens[:, 1:], sorted(transcoders)
    after_norm = [layer for layer in layers if writes_after_norm(lm, transcoders[layer])]
    stats = {layer: ReconstructionStats(transcoders[layer].n_latents) for layer in layers}
    with torch.no_grad():
        clean_run = splice(lm, {}, tokens, save_mlp=layers, after_norm=after_norm, progress=False)
        ce_clean, _, clean = _losses(clean_run.logits, targets, None)
        for layer in layers:
            x, y = clean_run.mlp[layer]
            stats[layer].add(*run_transcoder(transcoders[layer], x, y), y)
        del clean_run
        ce_spliced, kl, _ = _losses(splice(lm, transcoders, tokens, progress=False).logits, targets, clean)
        ce_zero, _, _ = _losses(splice(lm, {}, tokens, zero_ablate=layers, progress=False).logits, targets, clean)
    n = targets.numel()
    fvu = {layer: stats[layer].metrics()["fvu"] for layer in layers}
    l0 = {layer: stats[layer].metrics()["l0"] for layer in layers}
    return {"ce_clean": ce_clean / n, "ce_all_spliced": ce_spliced / n, "ce_all_zero_ablated": ce_zero / n,
            "ce_recovered_all": _recovered(ce_clean / n, ce_spliced / n, ce_zero / n), "kl_all": kl / n,
            "fvu": fvu, "mean_fvu": statistics.mean(fvu.values()), "l0": l0, "total_l0": sum(l0.values())}


def measure(lm: Any, name: str, transcoders: Any, test_tokens: torch.Tensor, quick: bool = False,
            scores: bool = True) -> dict:
    """One set's row: mean scores per prompt group, all-layers CE recovered, total L0 and mean FVU
    (``quick``: `all_layers_losses` instead of `tcw.evaluate`, so no per-layer CE)."""
    row: dict = {"set": name}
    for group, items in prompt_groups().items() if scores else ():
        found = []
        for prompt, target in items:
            start = time.perf_counter()
            found.append(tcw.attribute(lm, transcoders, prompt, target, depth=0).scores())
            print(f"  {name} / {prompt!r}: replacement {found[-1].replacement:.3f}, completeness "
                  f"{found[-1].completeness:.3f} ({time.perf_counter() - start:.1f} s)", flush=True)
        row[group] = {"replacement": statistics.mean(s.replacement for s in found),
                      "completeness": statistics.mean(s.completeness for s in found),
                      "per_prompt": [s._asdict() for s in found]}
    if quick:
        row.update(all_layers_losses(lm, transcoders, test_tokens), layers=sorted(transcoders))
        return row
    metrics = tcw.evaluate(lm, transcoders, test_tokens, label=name)
    row.update(ce_recovered_all=metrics.ce_recovered_all, kl_all=metrics.kl_all, ce_clean=metrics.ce_clean,
               ce_all_spliced=metrics.ce_all_spliced, total_l0=sum(metrics.l0.values()),
               mean_fvu=statistics.mean(metrics.fvu.values()), fvu=metrics.fvu, layers=sorted(metrics.layers))
    return row


def table(rows: list[dict]) -> str:
    """The rows as the markdown table of docs/circuits.md."""
    lines = ["| transcoders | layers | total L0 | greater-than: replacement | completeness | general: replacement "
             "| completeness | CE recovered (all layers) | mean FVU |", "|---" * 9 + "|"]
    for r in rows:
        cells = [f"{r[key]:{spec}}" if key in r else "—" for key, spec in (("total_l0", ".0f"), ("mean_fvu", ".3f"))]
        scores = [f"{r[group][score]:.3f}" if group in r else "—" for group in prompt_groups()
                  for score in ("replacement", "completeness")]
        lines.append(f"| {r['set']} | {len(r['layers'])} | {cells[0]} | {' | '.join(scores)} "
                     f"| {r['ce_recovered_all']:.3f} | {cells[1]} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="*", default=list(SETS), choices=list(SETS))
    parser.add_argument("--extra", nargs="*", default=[], metavar="NAME=FOLDER",
                        help="more sets read with tcw.load_transcoders (e.g. a cross-layer transcoder)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/tcw-circuit-scores.json"))
    parser.add_argument("--quick", action="store_true",
                        help="only the all-layers losses and per-layer FVU and L0 (3 passes) instead of "
                             "tcw.evaluate (2 per layer + 3)")
    parser.add_argument("--no-scores", action="store_true", help="skip the prompts' scores")
    args = parser.parse_args()
    extra = dict(item.split("=", 1) for item in args.extra)
    lm = tcw.load_model()
    test_tokens = tcw.load_corpus("python-docs", lm, context=128, n_tokens=128 * 8, split="test")
    rows = []
    for name in [*args.sets, *extra]:
        start = time.perf_counter()
        if name in extra:
            transcoders = tcw.load_transcoders(extra[name])
        elif SETS[name].get("clt"):
            transcoders = circuit_clt(lm, k=SETS[name]["k"])
        else:
            options = {"kind": SETS[name]["kind"]} if "kind" in SETS[name] else {}
            width = SETS[name].get("width", 2)
            transcoders = circuit_transcoders(lm, SETS[name]["layers"], k=SETS[name]["k"],
                                              n_latents=width * lm.d_model, epochs=SETS[name].get("epochs"),
                                              **options)
        print(f"{name}: transcoders ready in {time.perf_counter() - start:.0f} s", flush=True)
        rows.append(measure(lm, name, transcoders, test_tokens, quick=args.quick, scores=not args.no_scores))
        args.out.write_text(json.dumps({"torch_threads": torch.get_num_threads(), "rows": rows}, indent=1))
    print(table(rows))
    print(f"full results: {args.out}")


if __name__ == "__main__":
    main()
