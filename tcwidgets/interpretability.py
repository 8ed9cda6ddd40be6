"""Interpretability scores: how well an explanation of a latent predicts where it fires on held-out text.

Paulo, Shabalin & Belrose (2025) compared transcoders and SAEs with explanations written by a
language model and scored by one (*detection*: shown the explanation and a mix of contexts, does
the judge tell which make the latent fire?). `interpretability_scores` measures the same thing,
offline by default:

1. An *explainer* turns a latent's `LatentStats` (its top and quantile-sampled examples from
   `analyze_features`) into an `Explanation`: a text and a predictor.
2. On held-out tokens the latent's activations are computed; ``per_quantile`` activating contexts
   are drawn from each of ``quantiles`` activation quantiles (weak firings count as much as
   strong ones) and as many non-activating contexts uniformly from the rest. A context is the
   window of text that ends at the scored token (the latent cannot see later tokens).
3. The predictor says, from the explanation alone, which contexts make the latent fire at their
   last token. The *detection score* is the balanced accuracy: (recall on the activating contexts
   + specificity on the non-activating ones) / 2; 0.5 is chance, 1 perfect.

The default explainer, `TokenExplainer`, needs no language model: the explanation is a set of
tokens, and a context is predicted to fire when its last token is one of them. `OpenAIExplainer`
asks any OpenAI-compatible chat endpoint for the explanation and the detection judgements, as
the paper does; any function ``(latent_stats, stats) -> Explanation`` works too.
"""

from __future__ import annotations

import functools
import json
import math
import re
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .corpus import bos_id
from .evaluation import finite_or_none, html_table
from .features import FeatureStats, LatentStats
from .splicing import traced_input

__all__ = ["Explanation", "HeldOutContext", "InterpretabilityScores", "LatentScore", "OpenAIExplainer",
           "TokenExplainer", "detection_score", "interpretability_scores"]


@dataclass(frozen=True)
class HeldOutContext:
    """A held-out window of text that ends at the scored token.

    ``context``/``position``: where the scored token is in the held-out token contexts;
    ``tokens``/``strings``: token ids and their display strings, the scored token last;
    ``activation``: the latent's activation there (0: it does not fire); ``quantile``: the
    activation quantile group it was drawn from (``None`` for a non-activating context).
    """

    context: int
    position: int
    tokens: tuple[int, ...]
    strings: tuple[str, ...]
    activation: float
    quantile: int | None = None

    @property
    def fires(self) -> bool:
        return self.activation > 0

    def marked(self) -> str:
        """The text with the scored token between ``<<`` and ``>>``."""
        return "".join(self.strings[:-1]) + f"<<{self.strings[-1]}>>"


#: ``predict(contexts) -> one bool per context``: does the latent fire at each context's last token?
Predictor = Callable[[Sequence[HeldOutContext]], Sequence[bool]]


@dataclass(frozen=True)
class Explanation:
    """An explanation of a latent: its ``text`` and a ``predict`` function that applies it."""

    text: str
    predict: Predictor


#: ``explainer(latent_stats, stats) -> Explanation``.
Explainer = Callable[[LatentStats, FeatureStats], Explanation]


@dataclass(frozen=True)
class LatentScore:
    """One latent's detection score (``score``, the balanced accuracy) and how it came about."""

    latent: int
    explanation: str
    score: float
    recall: float
    specificity: float
    n_activating: int
    n_non_activating: int
    contexts: tuple[HeldOutContext, ...] = field(repr=False, default=())
    predictions: tuple[bool, ...] = field(repr=False, default=())

    def to_dict(self) -> dict[str, Any]:
        """The scores and the explanation (not the contexts), JSON-serialisable (NaN as ``None``)."""
        return {"latent": self.latent, "explanation": self.explanation,
                **{name: finite_or_none(getattr(self, name)) for name in ("score", "recall", "specificity")},
                "n_activating": self.n_activating, "n_non_activating": self.n_non_activating}


def detection_score(latent: int, explanation: Explanation, contexts: Sequence[HeldOutContext]) -> LatentScore:
    """Score ``explanation`` on ``contexts``: balanced accuracy of its predictions against whether
    the latent fires at each context's last token. NaN when there are no activating (or no
    non-activating) contexts to score."""
    predictions = tuple(bool(p) for p in explanation.predict(contexts))
    if len(predictions) != len(contexts):
        raise ValueError(f"The explanation of latent {latent} predicted {len(predictions)} values for "
                         f"{len(contexts)} contexts: its predictor must return one per context.")
    fires = np.array([context.fires for context in contexts], dtype=bool)
    predicted = np.array(predictions, dtype=bool)
    recall = float(predicted[fires].mean()) if fires.any() else math.nan
    specificity = float((~predicted[~fires]).mean()) if (~fires).any() else math.nan
    return LatentScore(latent, explanation.text, (recall + specificity) / 2, recall, specificity,
                       int(fires.sum()), int((~fires).sum()), tuple(contexts), predictions)


class InterpretabilityScores:
    """The result of `interpretability_scores`: a `LatentScore` per scored latent.

    ``scores[i]`` is latent ``i``'s `LatentScore` (``scores[i].score``, ``.explanation``);
    ``scores.get(i)`` is ``None`` for a latent that was not scored (for a dashboard); ``mean`` is
    the mean detection score over the latents that have one.
    """

    def __init__(self, latents: dict[int, LatentScore], *, model: str, transcoder: dict[str, Any],
                 explainer: str) -> None:
        self.latents, self.model, self.transcoder, self.explainer = latents, model, transcoder, explainer

    def __getitem__(self, latent: int) -> LatentScore:
        if latent not in self.latents:
            raise KeyError(f"Latent {latent} was not scored; pass latents=[...] to interpretability_scores "
                           f"to score it ({len(self.latents)} latents were scored).")
        return self.latents[latent]

    def get(self, latent: int) -> LatentScore | None:
        return self.latents.get(latent)

    def __iter__(self) -> Iterator[int]:
        return iter(self.latents)

    def __len__(self) -> int:
        return len(self.latents)

    @property
    def mean(self) -> float:
        """Mean detection score over the latents with one (NaN when none has)."""
        values = [s.score for s in self.latents.values() if not math.isnan(s.score)]
        return float(np.mean(values)) if values else math.nan

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable summary: model, transcoder config, explainer, mean and per-latent rows."""
        return {"model": self.model, "transcoder": self.transcoder, "explainer": self.explainer,
                "mean": finite_or_none(self.mean), "latents": [s.to_dict() for s in self.latents.values()]}

    def _summary(self) -> str:
        site = self.transcoder.get("site", {})
        return (f"{self.model}, layer {site.get('layer')} {self.transcoder.get('kind')}: mean detection score "
                f"{self.mean:.3f} over {len(self)} latents ({self.explainer})")

    def _rows(self) -> list[list[str]]:
        return [[str(s.latent), f"{s.score:.3f}", f"{s.recall:.2f}", f"{s.specificity:.2f}",
                 f"{s.n_activating}/{s.n_non_activating}", s.explanation] for s in self.latents.values()]

    _HEADER = ("latent", "score", "recall", "specificity", "contexts (fire/not)", "explanation")

    def __repr__(self) -> str:
        lines = [f"InterpretabilityScores({self._summary()})"]
        lines += ["  ".join(row[:-1]) + "  " + row[-1][:80] for row in [list(self._HEADER), *self._rows()[:20]]]
        if len(self) > 20:
            lines.append(f"... {len(self) - 20} more latents")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        return html_table(self._summary(), self._HEADER, self._rows())


# -- the default explainer -------------------------------------------------------------------------------

class TokenExplainer:
    """The default explainer: a set of tokens, no language model needed.

    Candidates are the tokens at the centre of the latent's quantile-sampled and top examples. A
    token is kept when its share of those examples exceeds its share of the analysed tokens
    where the latent does not fire (its expected contribution to the balanced accuracy is then
    positive), up to ``max_tokens`` of them, most frequent first. A context is predicted to fire
    when its last token is one of them.
    """

    def __init__(self, max_tokens: int = 12) -> None:
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens={max_tokens!r} must be a positive integer.")
        self.max_tokens = max_tokens

    def __repr__(self) -> str:
        return f"TokenExplainer(max_tokens={self.max_tokens})"

    def __call__(self, latent: LatentStats, stats: FeatureStats) -> Explanation:
        examples = [e for group in latent.quantiles for e in group.examples] + list(latent.top)
        if not examples:
            return Explanation("never fires in the analysed text", _predict_tokens(frozenset()))
        centres = Counter(int(e.tokens[e.center]) for e in examples)
        analysed = _token_counts(stats)
        not_firing = max(stats.n_tokens - latent.count, 1)
        chosen = []
        for token, count in centres.most_common():
            share = count / len(examples)
            others = max(int(analysed.get(token, 0)) - share * latent.count, 0.0)
            if share > others / not_firing:
                chosen.append(token)
            if len(chosen) == self.max_tokens:
                break
        text = ("fires on the tokens " + ", ".join(json.dumps(stats.vocab[t]) for t in chosen)) if chosen \
            else "fires on no token more often than elsewhere"
        return Explanation(text, _predict_tokens(frozenset(chosen)))


def _predict_tokens(tokens: frozenset[int]) -> Predictor:
    return functools.partial(_last_token_in, tokens)


def _last_token_in(tokens: frozenset[int], contexts: Sequence[HeldOutContext]) -> list[bool]:
    return [context.tokens[-1] in tokens for context in contexts]


@functools.lru_cache(maxsize=8)
def _token_counts(stats: FeatureStats) -> Counter:
    """How often each token id occurs in the analysed text of ``stats`` (cached per stats)."""
    ids, counts = np.unique(np.asarray(stats.tokens).reshape(-1), return_counts=True)
    return Counter(dict(zip(ids.tolist(), counts.tolist())))


# -- an OpenAI-compatible chat endpoint ------------------------------------------------------------------

_EXPLAIN_PROMPT = (
    "You explain latents of a sparse dictionary trained on a language model's activations. You are shown "
    "text excerpts (JSON strings) where the latent fires; the token it fires on is marked <<like this>>, "
    "followed by the activation. Answer with one short phrase that says what the latent detects, nothing else.")
_DETECT_PROMPT = (
    "A latent of a language model is explained as: {explanation}\n"
    "For each numbered excerpt (a JSON string) below, say whether the latent fires on the marked <<token>>, the last "
    "token of the excerpt. Answer with a JSON list of {n} numbers, 1 (fires) or 0 (does not), in order, "
    "nothing else.")


class OpenAIExplainer:
    """An explainer backed by an OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, llama.cpp's
    server, Ollama, ...): one request writes the explanation from the latent's top examples, one per
    latent makes the detection judgements. Uses only the standard library.

    Args:
        base_url: the API root, e.g. ``"http://127.0.0.1:8000/v1"``; requests go to
            ``base_url + "/chat/completions"``.
        model: the model name the endpoint serves.
        api_key: sent as a bearer token when given.
        n_examples: top examples shown per explanation.
        timeout: seconds per request.
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None, *, n_examples: int = 10,
                 timeout: float = 60.0) -> None:
        if not re.match(r"https?://", base_url):
            raise ValueError(f"base_url={base_url!r} must start with http:// or https://, e.g. "
                             "'http://127.0.0.1:8000/v1'.")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key, self.n_examples, self.timeout = model, api_key, n_examples, timeout

    def __repr__(self) -> str:
        return f"OpenAIExplainer({self.url!r}, model={self.model!r})"

    def __call__(self, latent: LatentStats, stats: FeatureStats) -> Explanation:
        excerpts = []
        for example in latent.top[:self.n_examples]:
            ids = [int(t) for t in example.tokens[:example.center + 1]]
            window = HeldOutContext(example.context, example.position, tuple(ids),
                                    tuple(stats.vocab[t] for t in ids), example.value)
            excerpts.append(f"{json.dumps(window.marked())} ({example.value:.2f})")
        if not excerpts:
            return Explanation("never fires in the analysed text", _predict_tokens(frozenset()))
        text = self.chat([{"role": "system", "content": _EXPLAIN_PROMPT},
                          {"role": "user", "content": "\n".join(f"{i + 1}. {e}" for i, e in enumerate(excerpts))}])
        return Explanation(text.strip(), functools.partial(self.detect, text.strip()))

    def detect(self, explanation: str, contexts: Sequence[HeldOutContext]) -> list[bool]:
        """Ask the endpoint which ``contexts`` make a latent explained by ``explanation`` fire."""
        listing = "\n".join(f"{i + 1}. {json.dumps(context.marked())}" for i, context in enumerate(contexts))
        answer = self.chat([{"role": "system", "content": _DETECT_PROMPT.format(explanation=explanation,
                                                                               n=len(contexts))},
                            {"role": "user", "content": listing}])
        found = re.search(r"\[[^\[\]]*\]", answer)
        try:
            values = json.loads(found.group(0)) if found else None
        except json.JSONDecodeError:
            values = None
        if not isinstance(values, list) or len(values) != len(contexts) or any(v not in (0, 1) for v in values):
            raise ValueError(f"{self.model} at {self.url} did not answer with a JSON list of {len(contexts)} 0/1 "
                             f"values but {answer[:200]!r}; use a model that follows instructions better.")
        return [bool(v) for v in values]

    def chat(self, messages: list[dict[str, str]]) -> str:
        """One chat-completions request (temperature 0); returns the reply's text."""
        body = json.dumps({"model": self.model, "messages": messages, "temperature": 0}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                reply = json.loads(response.read())
        except urllib.error.HTTPError as error:
            raise ConnectionError(f"{self.url} answered HTTP {error.code}: {error.read()[:200]!r}; check "
                                  "base_url, model and api_key.") from error
        except (urllib.error.URLError, TimeoutError) as error:
            raise ConnectionError(f"Could not reach {self.url} ({error}): is the server running?") from error
        except json.JSONDecodeError as error:
            raise ValueError(f"{self.url} did not answer with JSON ({error}): is it an OpenAI-compatible "
                             "chat-completions endpoint?") from error
        try:
            return reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError) as error:
            raise ValueError(f"{self.url} answered without choices[0].message.content ({str(reply)[:200]}): is "
                             "it an OpenAI-compatible chat-completions endpoint?") from error


# -- held-out contexts --------------------------------------------------------------------------------------

@torch.no_grad()
def _held_out_activations(lm: Any, transcoder: torch.nn.Module, tokens: torch.Tensor, latents: np.ndarray,
                          include: torch.Tensor, batch_size: int,
                          progress: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where the chosen latents fire on ``tokens`` (positions in ``include`` only): flat token index,
    column in ``latents`` and activation of every firing, sorted by column then token."""
    columns = torch.as_tensor(latents)
    found: list[torch.Tensor] = []
    training = transcoder.training
    transcoder.eval()
    try:
        for start in tqdm(range(0, len(tokens), batch_size), desc="held-out activations", disable=not progress,
                          leave=False):
            batch = tokens[start:start + batch_size]
            z = transcoder.encode(traced_input(lm, transcoder, batch)).float().cpu()[..., columns]
            z *= include[start:start + batch_size, :, None]
            context, position, column = z.nonzero(as_tuple=True)
            flat = (start + context) * tokens.shape[1] + position
            found.append(torch.stack([column.double(), flat.double(), z[context, position, column].double()]))
    finally:
        transcoder.train(training)
    column, flat, value = torch.cat(found, 1).numpy()
    order = np.lexsort((flat, column))
    return flat[order].astype(np.int64), column[order].astype(np.int64), value[order]


def _draw_contexts(flat: np.ndarray, values: np.ndarray, eligible: np.ndarray, *, quantiles: int,
                   per_quantile: int, n_non_activating: int, rng: np.random.Generator) -> list[tuple[int, float, int | None]]:
    """(flat token, activation, quantile) of the scored positions of one latent: ``per_quantile``
    firings drawn from each activation quantile, then ``n_non_activating`` eligible non-firings."""
    drawn: list[tuple[int, float, int | None]] = []
    order = np.argsort(values, kind="stable")
    for group, ranks in enumerate(np.array_split(order, quantiles)):
        for i in rng.choice(ranks, size=min(per_quantile, len(ranks)), replace=False):
            drawn.append((int(flat[i]), float(values[i]), group))
    candidates = rng.choice(eligible, size=min(len(eligible), 4 * n_non_activating + 64), replace=False)
    quiet = candidates[~np.isin(candidates, flat)]
    if len(quiet) < n_non_activating:  # a latent that fires almost everywhere: look at every position
        quiet = rng.permutation(np.setdiff1d(eligible, flat))
    drawn += [(int(i), 0.0, None) for i in quiet[:n_non_activating]]
    return drawn


def interpretability_scores(
    stats: FeatureStats,
    *,
    lm: Any,
    tokens: torch.Tensor,
    transcoder: torch.nn.Module,
    explainer: Explainer | None = None,
    latents: Sequence[int] | None = None,
    quantiles: int = 4,
    per_quantile: int = 5,
    n_non_activating: int | None = None,
    context: int | None = None,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = True,
) -> InterpretabilityScores:
    """Per latent, an explanation (from ``stats``) and its detection score on held-out ``tokens``.

    Args:
        stats: `analyze_features` of ``transcoder`` on training text (the explainer's only input).
        lm: the model.
        tokens: held-out ``[n_contexts, context]`` token ids (e.g. ``load_corpus(..., split="test")``).
        transcoder: the transcoder ``stats`` describe (checked by fingerprint).
        explainer: ``explainer(latent_stats, stats) -> Explanation``; default `TokenExplainer()`;
            `OpenAIExplainer` asks a chat endpoint.
        latents: which latents to score; default every latent that fired in ``stats``.
        quantiles, per_quantile: activating contexts drawn per activation quantile of the
            latent's held-out firings (all of them when it fires less often).
        n_non_activating: non-activating contexts per latent; default ``quantiles × per_quantile``.
        context: tokens of text per context, the scored one last; default the left window of
            ``stats`` plus one.
        batch_size: held-out contexts per forward pass.
        seed: the drawn contexts depend only on it.
        progress: show progress bars.
    """
    stats.check_transcoder(transcoder, lm.name)
    explainer = TokenExplainer() if explainer is None else explainer
    if not callable(explainer):
        raise TypeError(f"explainer must be a function (latent_stats, stats) -> Explanation, got "
                        f"{type(explainer).__name__}.")
    for name, value in (("quantiles", quantiles), ("per_quantile", per_quantile), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer.")
    n_non_activating = quantiles * per_quantile if n_non_activating is None else n_non_activating
    context = stats.meta["settings"]["window"][0] + 1 if context is None else context
    if latents is None:
        latents = np.flatnonzero(stats.count > 0)
    latents = np.ascontiguousarray(latents, dtype=np.int64).reshape(-1)  # stats.order() gives a reversed view
    if latents.size and (latents.min() < 0 or latents.max() >= stats.n_latents):
        raise IndexError(f"latents must lie in 0..{stats.n_latents - 1}, the stats' latents.")
    tokens = lm.check_tokens(tokens)
    include = torch.ones_like(tokens, dtype=torch.bool)
    bos = bos_id(lm.tokenizer)
    if stats.meta["settings"]["exclude_bos"] and bos is not None:
        include = tokens != bos
    eligible = np.flatnonzero(include.reshape(-1).numpy())
    flat, column, value = _held_out_activations(lm, transcoder, tokens, latents, include, batch_size, progress)
    bounds = np.searchsorted(column, np.arange(len(latents) + 1))
    token_rows = tokens.numpy()
    width = tokens.shape[1]

    def held_out(index: int, activation: float, quantile: int | None) -> HeldOutContext:
        row, position = divmod(index, width)
        ids = tuple(int(t) for t in token_rows[row, max(0, position - context + 1):position + 1])
        return HeldOutContext(row, position, ids, tuple(stats.vocab[t] for t in ids), activation, quantile)

    scored = {}
    for i, latent in enumerate(tqdm(latents.tolist(), desc="scoring latents", disable=not progress, leave=False)):
        rng = np.random.default_rng([seed, latent])
        lo, hi = bounds[i], bounds[i + 1]
        drawn = _draw_contexts(flat[lo:hi], value[lo:hi], eligible, quantiles=quantiles, per_quantile=per_quantile,
                               n_non_activating=n_non_activating, rng=rng)
        contexts = [held_out(*drawn[j]) for j in rng.permutation(len(drawn))]  # activating ones not first
        explanation = explainer(stats.latent(latent), stats)
        if not isinstance(explanation, Explanation):
            raise TypeError(f"The explainer returned {type(explanation).__name__} for latent {latent}; it must "
                            "return tcwidgets.Explanation(text, predict).")
        scored[latent] = detection_score(latent, explanation, contexts)
    return InterpretabilityScores(scored, model=lm.name, transcoder=stats.transcoder,
                                  explainer=getattr(explainer, "__name__", repr(explainer)))
