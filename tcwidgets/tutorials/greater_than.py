"""The greater-than task of the circuits tutorial and case study, and its causal check.

After *"The war lasted from the year 17YY to the year 17"* the next token is the end year's tens
digit, which should not be smaller than YY's tens digit t. The target of an attribution is the mean
logit of the digits above t minus the mean logit of those below (`greater_target`). The causal check
(`causal_check`) zeroes the latents a graph credits most and, as a control, latents matched to them
(same layer and position, similar activation), with every transcoder spliced in and its error kept.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..circuits import LogitTarget, attribute
from ..interventions import encode_prompt
from ..progress import delayed_bar
from ..splicing import splice

__all__ = ["Ablate", "CausalCheck", "TEMPLATE", "causal_check", "digit_ids", "greater_target", "metrics", "prompts",
           "year_sentences"]

TEMPLATE = "The war lasted from the year 17{:02d} to the year 17"


def year_sentences(n_documents: int = 400, seed: int = 1) -> list[str]:
    """Short documents of sentences about spans of years (lives, reigns, buildings, companies...),
    so that transcoders see years in text; none uses `TEMPLATE`."""
    rng = random.Random(seed)
    names = ["Anna", "Johann", "Marie", "Pedro", "Elif", "Tomas", "Grace", "Ibrahim", "Lena", "Oscar"]
    things = ["cathedral", "bridge", "library", "canal", "railway", "observatory", "harbour", "palace"]
    templates = [
        "{name} lived from {a} to {b}.", "The {thing} was built between {a} and {b}.",
        "From {a} until {b}, the company was based in the old town.", "The dynasty ruled from {a} to {b}.",
        "{name} served as mayor from {a} to {b}, and again in {c}.", "The treaty, signed in {a}, lasted until {b}.",
        "The records cover the years {a} to {b}.", "The museum holds paintings dated {a} to {b}.",
        "In {a} the firm was founded; it closed in {b}.", "Prices rose steadily from {a} through {b}.",
        "The {thing} stayed open from {a} to {b}.", "{name} studied there between {a} and {b}.",
        "The census of {a} counted more people than that of {c}.", "Between {a} and {b} the river flooded twice.",
    ]
    documents = []
    for _ in range(n_documents):
        sentences = []
        for _ in range(rng.randint(3, 7)):
            a = rng.randint(1000, 2020)
            b = min(a + rng.randint(1, 60), 2024)
            sentences.append(rng.choice(templates).format(name=rng.choice(names), thing=rng.choice(things),
                                                          a=a, b=b, c=rng.randint(1000, 2024)))
        documents.append(" ".join(sentences))
    return documents


def digit_ids(lm: Any) -> list[int]:
    """The token ids of the digits 0–9 (one token each in the default model's vocabulary)."""
    ids = [lm.tokenizer(str(d), add_special_tokens=False)["input_ids"] for d in range(10)]
    if not all(len(i) == 1 for i in ids):
        raise ValueError(f"{lm.name}'s tokenizer does not give each digit one token: the task needs it.")
    return [i[0] for i in ids]


def greater_target(t: int) -> LogitTarget:
    """Mean logit of the tens digits larger than ``t`` minus that of the smaller ones."""
    return LogitTarget([str(d) for d in range(t + 1, 10)], minus=[str(d) for d in range(t)])


def prompts(lm: Any, years: list[int]) -> torch.Tensor:
    """``[len(years), n]`` token ids of `TEMPLATE` for start years 17YY (``years`` holds the YY)."""
    return torch.cat([encode_prompt(lm, TEMPLATE.format(y)) for y in years])


def metrics(logits: torch.Tensor, tens: list[int], digits: list[int]) -> tuple[list[float], list[float]]:
    """Per prompt: P(larger tens digit) − P(smaller) and mean logit(larger) − mean logit(smaller)."""
    probs, diffs = [], []
    for row, t in zip(logits[:, -1].double(), tens, strict=True):
        p, logit = row.softmax(-1)[digits], row[digits]
        probs.append(float(p[t + 1:].sum() - p[:t].sum()))
        diffs.append(float(logit[t + 1:].mean() - logit[:t].mean()))
    return probs, diffs


class Ablate:
    """``edit(layer, latents)`` for `splice`: zero chosen (layer, latent, position) triples of row 0."""

    def __init__(self, triples: list[tuple[int, int, int]]) -> None:
        self.by_layer: dict[int, list[tuple[int, int]]] = {}
        for layer, latent, position in triples:
            self.by_layer.setdefault(layer, []).append((latent, position))

    def __call__(self, layer: int, latents: torch.Tensor) -> torch.Tensor:
        if layer not in self.by_layer:
            return latents
        edited = latents.clone()
        for latent, position in self.by_layer[layer]:
            edited[0, position, latent] = 0
        return edited


@dataclass
class CausalCheck:
    """One prompt's causal check: the ablated latents, the metrics' changes and the prediction."""

    year: int
    target_value: float
    ablated: list[tuple[int, int, int]]  # (layer, latent, position), largest attribution first
    controls: list[list[tuple[int, int, int]]]  # matched random sets, one per draw
    predicted_logit_change: float  # minus the ablated latents' attributions (frozen attention and norms)
    top_logit_change: float
    random_logit_change: float  # mean over the control sets
    top_prob_change: float
    random_prob_change: float
    graph_nodes: int


def causal_check(lm: Any, transcoders: Mapping[int, Any], year: int, *, n_ablate: int = 10, n_random: int = 5,
                 nearest: int = 3, rng: random.Random | None = None, depth: int = 3, top_k: int = 12,
                 threshold: float = 0.01, progress: bool = True) -> CausalCheck:
    """Attribute the greater-than target on start year 17``year``, zero the graph's latents with the
    largest positive attribution (at most ``n_ablate``), and zero ``n_random`` matched control sets:
    for each ablated latent, one drawn among the ``nearest`` other latents active in the same layer at
    the same position whose activations are closest to its own. Changes are against the prompt with
    every transcoder spliced in and its error term kept. ``progress`` shows a bar over the runs when they take more than a moment."""
    rng = rng or random.Random(0)
    t = year // 10
    tokens = prompts(lm, [year])
    digits = digit_ids(lm)
    bar = delayed_bar(total=3 + n_random, desc=f"causal check 17{year}", unit="run", disable=not progress)
    graph = attribute(lm, transcoders, tokens[0], greater_target(t), depth=depth, top_k=top_k, threshold=threshold)
    top = sorted((n for n in graph.nodes.values() if n.kind == "latent" and n.attribution > 0),
                 key=lambda n: -n.attribution)[:n_ablate]
    chosen = [(n.layer, n.latent, n.position) for n in top]
    target_value, graph_nodes = graph.target_value, len(graph.nodes)
    del graph  # its frozen run is the largest allocation here, and the runs below do not need it
    bar.update()
    clean = splice(lm, transcoders, tokens, mode="error", save_latents=True, progress=False)
    probs, diffs = metrics(clean.logits, [t], digits)
    bar.update()

    def matched(layer: int, latent: int, position: int) -> tuple[int, int, int]:
        row = clean.latents[layer][0, position]
        others = [int(j) for j in torch.nonzero(row).flatten() if (layer, int(j), position) not in chosen]
        if not others:
            raise ValueError(f"no other latent of layer {layer} is active at position {position}: no control")
        others.sort(key=lambda j: abs(float(row[j]) - float(row[latent])))
        return layer, rng.choice(others[:nearest]), position

    controls = [[matched(*triple) for triple in chosen] for _ in range(n_random)]
    changes: dict[str, tuple[list[float], list[float]]] = {}
    for name, sets in (("top", [chosen]), ("random", controls)):
        changes[name] = ([], [])
        for triples in sets:
            logits = splice(lm, transcoders, tokens, mode="error", edit=Ablate(triples), progress=False).logits
            p, logit = metrics(logits, [t], digits)
            changes[name][0].append(p[0] - probs[0])
            changes[name][1].append(logit[0] - diffs[0])
            bar.update()
    bar.close()
    return CausalCheck(year=1700 + year, target_value=target_value, ablated=chosen, controls=controls,
                       predicted_logit_change=-sum(n.attribution for n in top),
                       top_logit_change=changes["top"][1][0], random_logit_change=statistics.mean(changes["random"][1]),
                       top_prob_change=changes["top"][0][0], random_prob_change=statistics.mean(changes["random"][0]),
                       graph_nodes=graph_nodes)
