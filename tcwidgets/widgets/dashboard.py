"""`FeatureDashboard`: inspect a transcoder's latents one at a time.

Python holds the `FeatureStats` and answers the page: the synced trait ``_latent`` carries only the
current latent's payload (`latent_payload`), and the sortable list and the token search are
request/response custom messages (``{"type": "list", ...}``). The page sends ``{"type": "select"}``
to change latent; Python validates it and sets ``feature``, so user code and other widgets that set
or observe ``feature`` see exactly what the page shows.
"""

from __future__ import annotations

import os
from typing import Any

import anywidget
import numpy as np
import torch
import traitlets

from ..features import SORT_KEYS, Example, FeatureStats, FeatureStatsError
from ..interpretability import InterpretabilityScores
from .assets import css, esm
from .messages import whole

LIST_PAGE = 50  # rows per page of the latent list
MAX_QUERY = 200  # characters of a token search


def _round(value: float) -> float:
    """Four significant digits: enough to read, a third of the bytes."""
    return float(f"{value:.4g}")


def _example(stats: FeatureStats, example: Example) -> dict[str, Any]:
    return {"tokens": [stats.vocab[i] for i in example.tokens.tolist()],
            "acts": [_round(a) for a in example.acts.tolist()],
            "center": example.center, "value": _round(example.value),
            "context": example.context, "position": example.position}


def _tokens(stats: FeatureStats, pairs: list[tuple[int, float]] | None) -> list[list] | None:
    return None if pairs is None else [[stats.vocab[i], _round(v)] for i, v in pairs]


def latent_payload(stats: FeatureStats, index: int,
                   scores: InterpretabilityScores | None = None) -> dict[str, Any]:
    """What the page needs to draw latent ``index``: JSON values only, token strings decoded;
    ``score`` is its `LatentScore` as a dict (``None`` when it was not scored)."""
    latent = stats.latent(index)
    score = scores.get(index) if scores is not None else None
    counts = latent.histogram_counts
    used = int(np.flatnonzero(counts)[-1]) + 1 if counts.any() else 0
    return {
        "index": latent.index, "n_latents": stats.n_latents, "count": latent.count, "n_tokens": latent.n_tokens,
        "density": latent.density, "mean": _round(latent.mean_active), "max": _round(latent.max),
        "histogram": {"width": float(latent.histogram_edges[1]), "counts": counts[:used].tolist()},
        "top": [_example(stats, e) for e in latent.top],
        "quantiles": [{"low": g.low, "high": g.high, "min": _round(g.min) if g.examples else None,
                       "max": _round(g.max) if g.examples else None,
                       "examples": [_example(stats, e) for e in g.examples]} for g in latent.quantiles],
        "sample_size": latent.sample_size,
        "promoted": _tokens(stats, latent.promoted), "suppressed": _tokens(stats, latent.suppressed),
        "embedding": _tokens(stats, latent.embedding),
        "score": None if score is None else score.to_dict(),
    }


def _check_scores(scores: InterpretabilityScores | None, stats: FeatureStats) -> InterpretabilityScores | None:
    """``scores``, or an error when they are not `InterpretabilityScores` of the same model and transcoder."""
    if scores is None:
        return None
    if not isinstance(scores, InterpretabilityScores):
        raise TypeError(f"scores must be the InterpretabilityScores of tcw.interpretability_scores(stats, ...), "
                        f"not {type(scores).__name__}")
    if (scores.model, scores.transcoder) != (stats.model, stats.transcoder):
        site = scores.transcoder.get("site", {})
        raise ValueError(f"these scores are of another transcoder ({scores.model}, layer {site.get('layer')}, "
                         f"{scores.transcoder.get('kind')}, {scores.transcoder.get('n_latents')} latents): score "
                         f"these stats with tcw.interpretability_scores(stats, ...)")
    return scores


class FeatureDashboard(anywidget.AnyWidget):
    """Browse the latents of `FeatureStats`: examples shaded by activation, quantile groups, a
    histogram, logit effects and embedding tokens, and each latent's interpretability score.

    Args:
        stats: `FeatureStats`, or the folder they were saved to.
        feature: the latent to show first (default: the first that ever fires).
        transcoder: when given, refuse stats computed for a different transcoder.
        scores: `interpretability_scores` of these stats: each scored latent shows its
            explanation and detection score (recall, specificity) beside its activations.

    ``feature`` is synced both ways: ``dash.feature = 12`` changes the page, clicks and keys
    (←/→, j/k) change ``dash.feature``, and ``dash.observe(fn, "feature")`` sees both.
    """

    _esm = esm("dashboard")
    _css = css("dashboard")

    feature = traitlets.Int(0).tag(sync=True)
    n_latents = traitlets.Int(0, read_only=True).tag(sync=True)
    error = traitlets.Unicode("").tag(sync=True)
    _latent = traitlets.Dict().tag(sync=True)

    def __init__(self, stats: FeatureStats | str | os.PathLike, feature: int | None = None, *,
                 transcoder: torch.nn.Module | None = None, scores: InterpretabilityScores | None = None,
                 **kwargs: Any) -> None:
        self.stats = stats if isinstance(stats, FeatureStats) else FeatureStats.load(stats)
        if transcoder is not None:
            self.stats.check_transcoder(transcoder)
        self.scores = _check_scores(scores, self.stats)
        super().__init__(**kwargs)
        self.set_trait("n_latents", self.stats.n_latents)
        self.on_msg(self._on_message)
        if feature is None:
            firing = np.flatnonzero(self.stats.count)
            feature = int(firing[0]) if firing.size else 0
        self.feature = feature
        if self._latent.get("index") != self.feature:  # the trait's default: no change, no observer call
            self._show(self.feature)

    @traitlets.validate("feature")
    def _check_feature(self, proposal: dict) -> int:
        value = proposal["value"]
        if not 0 <= value < self.stats.n_latents:
            self.error = (f"Latent {value} is out of range: these stats have {self.stats.n_latents} latents, "
                          f"numbered 0 to {self.stats.n_latents - 1}.")
            raise traitlets.TraitError(self.error)
        return value

    @traitlets.observe("feature")
    def _on_feature(self, change: dict) -> None:
        self._show(change["new"])

    def _show(self, index: int) -> None:
        try:
            payload = latent_payload(self.stats, index, self.scores)
        except (FeatureStatsError, OSError) as error:
            self.error = str(error)
            raise
        with self.hold_sync():
            self.error = ""
            self._latent = payload

    # -- messages from the page ----------------------------------------------------------------------
    def _on_message(self, _: Any, content: Any, buffers: list) -> None:
        """Answer a page message. A malformed one (or a latent out of range) is named in ``error``
        and answered with ``{"type": "error", request, message}``, never raised."""
        request = content.get("request") if isinstance(content, dict) else None
        try:
            if not isinstance(content, dict):
                raise ValueError(f"a message must be an object, not {type(content).__name__}")
            kind = content.get("type")
            if kind == "select":
                feature = content.get("feature")
                try:
                    number = whole(feature)
                except ValueError:
                    raise ValueError(f"cannot show latent {feature!r:.100}: give a whole number") from None
                self.feature = number
                self.error = ""  # shown (or already shown): an earlier problem is over
            elif kind == "list":
                query, sort = content.get("query", ""), content.get("sort", "density")
                descending, offset = content.get("descending", True), content.get("offset", 0)
                if not isinstance(query, str) or not isinstance(sort, str) or not isinstance(descending, bool):
                    raise ValueError("a list request needs query and sort as text and descending as true or false")
                self.send({"type": "list", "request": request, **self.rows(query, sort, descending, whole(offset))})
            else:
                raise ValueError(f"unknown message type {kind!r:.100}: expected 'select' or 'list'")
        except traitlets.TraitError:
            self._reply_error(request)  # the validator named the problem in `error`
        except Exception as error:  # a page (or anyone on the comm) sent something malformed
            self.error = f"Ignored a malformed message from the page: {error}"
            self._reply_error(request)

    def _reply_error(self, request: Any) -> None:
        self.send({"type": "error", "request": request if isinstance(request, str) else None, "message": self.error})

    def rows(self, query: str = "", sort: str = "density", descending: bool = True,
             offset: int = 0) -> dict[str, Any]:
        """One page of the latent list: all latents sorted by ``sort``, or the results of a token
        search when ``query`` is not empty. Rows are ``[latent, density, max, hits]``."""
        if len(query) > MAX_QUERY:
            raise ValueError(f"the search has {len(query)} characters: search for at most {MAX_QUERY}")
        if query.strip():
            found = self.stats.search(query)
            order, hits = [i for i, _ in found], [h for _, h in found]
        else:
            order, hits = self.stats.order(sort if sort in SORT_KEYS else "density", descending), None
        offset = max(0, min(offset, max(len(order) - 1, 0)))
        page = np.asarray(order[offset:offset + LIST_PAGE], dtype=np.int64)
        density, maximum = self.stats.density[page], self.stats.max[page]
        rows = [[int(i), float(density[n]), _round(float(maximum[n])), hits[offset + n] if hits else None]
                for n, i in enumerate(page)]
        return {"rows": rows, "total": len(order), "offset": offset, "limit": LIST_PAGE, "query": query.strip()}
