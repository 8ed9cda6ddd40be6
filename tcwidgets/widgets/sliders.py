"""`AblationSliders`: edit transcoder latents on a prompt and watch the next-token predictions move.

Python owns the model and the state; the page draws it and asks for changes. Public synced state:
``prompt``, ``position``, ``scope``, ``sliders`` (the edit of every latent the user touched or
added), ``selected``, ``pinned``, ``continuation`` and ``error``; Python -> page only: ``_context``
(the prompt's tokens, the transcoders' widths), ``_rows`` (the latents listed at the position),
``_result`` (bars, pinned tokens' log-probabilities, continuations) and ``_status``. The page never
sets a trait; it sends messages that Python validates and applies (failures go to ``error``):

    {type: "set", request, values: {prompt?, position?, scope?, sliders?, pinned?, continuation?}}
    {type: "add", request, layer, latent}      list another latent
    {type: "select", layer, latent}            the latent being looked at
    {type: "cancel"}                           abandon the running computation

Model work runs in one worker thread per widget, and the newest state wins: a change only raises a
flag, the worker computes the state as it is when it starts, and drops a result that a newer
change has superseded (a generation stops at its next step). ``_result["request"]`` names the page
request it answers, so a page also ignores answers older than its latest request. The clean run of
the prompt (its logits and every transcoder's latents) is cached, and so is its key/value cache (by
`run_with_edits`): a slider change reruns the tokens from the edited position on (none when no
slider edits anything), a position change runs nothing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import anywidget
import torch
import traitlets

from ..interventions import EDIT_KINDS, Edit, check_edits, check_positions, encode_prompt, run_with_edits
from ..splicing import check_transcoders
from .assets import css, esm

IDENTITY = {"scale": 1.0, "steer": 0.0}  # slider values that change nothing (a clamp always does)
MAX_CONTINUATION = 64


class _Superseded(Exception):
    """A newer change (or a cancel) made the running computation pointless."""


class _Prompt(NamedTuple):
    """The cached clean run of the current prompt."""

    version: int
    tokens: torch.Tensor  # [1, length]
    log_probs: torch.Tensor  # [vocab] next-token log-probabilities after the last token
    latents: dict[int, torch.Tensor]  # {layer: [length, n_latents]}, unedited


def _usable(lm: Any, transcoders: Mapping[int, Any] | Any) -> tuple[dict[int, Any], list[str]]:
    """The transcoders that fit ``lm``, and a message for each one that does not."""
    if not isinstance(transcoders, Mapping):
        transcoders = {transcoders.config.site["layer"]: transcoders}
    usable, problems = {}, []
    for layer, tc in transcoders.items():
        try:
            usable.update(check_transcoders(lm, {layer: tc}))
        except (ValueError, IndexError) as error:
            problems.append(f"Transcoder for layer {layer!r} left out: {error}")
    return dict(sorted(usable.items())), problems


class AblationSliders(anywidget.AnyWidget):
    """Ablate and steer transcoder latents on a prompt, live: the tokens (pick a position), the
    latents most active there with a slider each (multiply, clamp or steer; add others by layer
    and id), and the next-token probabilities after the prompt before vs after the edits, the
    change in log-probability of pinned tokens, and optionally the continuation before vs after.

    Args:
        lm: a model from `load_model`.
        transcoders: ``{layer: transcoder}`` (or one transcoder); any that does not fit ``lm`` is
            left out with a message in the widget.
        prompt: the text (editable in the widget; BOS is prepended as in `encode_prompt`).
        features: latents to list from the start, as ``(layer, latent)`` pairs or `Edit`\\ s (which
            also set their slider).
        pinned: tokens whose log-probability change is shown, e.g. ``[" Paris", " London"]``.
        position: the token to edit at (default: the last; negative counts from the end).
        scope: ``"token"`` edits at ``position`` only, ``"all"`` at every token.
        continuation: also generate this many tokens before vs after (0: off).
        top_latents: how many of the most active latents at the position are listed.
        top_tokens: how many next tokens are shown as bars.
        remote: run on NDIF (``True``) or through its request path (``"local"``); default: the
            model's setting.

    With ``w = AblationSliders(...)``, ``w.edits`` and ``w.edit_positions`` reproduce the page in
    code: ``tcw.run_with_edits(lm, tcs, w.prompt, w.edits, positions=w.edit_positions)``.
    ``w.selected`` is the ``(layer, latent)`` last clicked, focused or added; a `FeatureDashboard`
    of the layer-6 transcoder follows it with::

        dash = tcw.FeatureDashboard(stats6)
        w.observe(lambda change: change.new[0] == 6 and setattr(dash, "feature", change.new[1]), "selected")
    """

    _esm = esm("sliders")
    _css = css("sliders")

    prompt = traitlets.Unicode("").tag(sync=True)
    position = traitlets.Int(0).tag(sync=True)
    scope = traitlets.Enum(("token", "all"), "token").tag(sync=True)
    sliders = traitlets.List(traitlets.Dict()).tag(sync=True)
    selected = traitlets.Tuple(traitlets.Int(), traitlets.Int(), default_value=(-1, -1)).tag(sync=True)
    pinned = traitlets.List(traitlets.Unicode()).tag(sync=True)
    continuation = traitlets.Int(0).tag(sync=True)
    error = traitlets.Unicode("").tag(sync=True)
    _context = traitlets.Dict().tag(sync=True)
    _rows = traitlets.List().tag(sync=True)
    _result = traitlets.Dict().tag(sync=True)
    _status = traitlets.Unicode("").tag(sync=True)

    _SETTABLE = ("prompt", "position", "scope", "sliders", "selected", "pinned", "continuation")  # by the page

    def __init__(self, lm: Any, transcoders: Mapping[int, Any] | Any, prompt: str = "", *,
                 features: Iterable[tuple[int, int] | Edit] | None = None, pinned: Iterable[str] = (),
                 position: int = -1, scope: str = "token", continuation: int = 0, top_latents: int = 8,
                 top_tokens: int = 10, remote: bool | str | None = None, **kwargs: Any) -> None:
        self.lm, self.remote = lm, remote
        self.transcoders, self._problems = _usable(lm, transcoders)
        self.top_latents, self.top_tokens = top_latents, top_tokens
        self._prompt: _Prompt | None = None
        self._version = 0
        self._continuations: dict[tuple[int, int], str] = {}  # (prompt version, n) -> clean continuation
        self._wanted = threading.Condition()
        self._need_prompt = self._need_run = self._cancelled = self._closed = False
        self._thread: threading.Thread | None = None
        self._working: int | None = None  # the thread computing, whose own changes ask for nothing
        self._start_position = position
        self._request = ""  # the page request that the next result answers
        self._input_error = self._run_error = ""
        super().__init__(**kwargs)
        self.on_msg(self._on_message)
        sliders, problems = [], []
        for feature in features or ():
            try:
                sliders.append(self._entry(feature))
            except (ValueError, TypeError) as error:
                problems.append(f"Feature {feature!r} left out: {error}")
        self._problems += problems
        self._show_error()
        with self.hold_trait_notifications():
            self.sliders, self.pinned, self.scope, self.continuation = sliders, list(pinned), scope, continuation
        self.prompt = prompt
        self._work()  # the first state synchronously: the widget is complete when displayed
        self._thread = threading.Thread(target=self._loop, name="AblationSliders", daemon=True)
        self._thread.start()

    # -- what the page shows, in code ---------------------------------------------------------------------
    @property
    def edits(self) -> list[Edit]:
        """The sliders' edits (those that change something), in order."""
        return [Edit(s["layer"], s["latent"], **{s["kind"]: s["value"]}) for s in self.sliders
                if IDENTITY.get(s["kind"]) != s["value"]]

    @property
    def edit_positions(self) -> list[int] | None:
        """Where the edits apply: ``[position]``, or ``None`` (every token) with ``scope="all"``."""
        return None if self.scope == "all" else [self.position]

    def close(self) -> None:
        with self._wanted:
            self._closed = True
            self._wanted.notify()
        super().close()

    # -- validation ---------------------------------------------------------------------------------------
    def _entry(self, feature: tuple[int, int] | Edit) -> dict[str, Any]:
        """A ``sliders`` entry for a ``(layer, latent)`` pair or an `Edit`, checked."""
        edit = feature if isinstance(feature, Edit) else Edit(*feature, scale=1.0)
        check_edits(self.transcoders, [edit])
        return {"layer": edit.layer, "latent": edit.latent, "kind": edit.kind, "value": edit.value}

    def _invalid(self, message: str) -> traitlets.TraitError:
        self._input_error = message
        self._show_error()
        return traitlets.TraitError(message)

    @traitlets.validate("sliders")
    def _check_sliders(self, proposal: dict) -> list[dict]:
        entries, seen = [], set()
        for entry in proposal["value"]:
            try:
                if entry["kind"] not in EDIT_KINDS:
                    raise ValueError(f"its kind must be one of {EDIT_KINDS}.")
                checked = self._entry(Edit(entry["layer"], entry["latent"], **{entry["kind"]: entry["value"]}))
            except (KeyError, TypeError, ValueError) as error:
                raise self._invalid(f"Bad slider {entry!r}: {error}") from None
            key = (checked["layer"], checked["latent"])
            if key in seen:
                raise self._invalid(f"Latent {key[1]} of layer {key[0]} has two sliders: keep one.")
            seen.add(key)
            entries.append(checked)
        return entries

    @traitlets.validate("position")
    def _check_position(self, proposal: dict) -> int:
        length = self._length()
        if not length:  # no prompt yet: checked when it comes
            return proposal["value"]
        try:
            return check_positions(proposal["value"], length)[0]
        except ValueError as error:
            raise self._invalid(str(error)) from None

    @traitlets.validate("selected")
    def _check_selected(self, proposal: dict) -> tuple[int, int]:
        layer, latent = proposal["value"]
        if (layer, latent) != (-1, -1):
            try:
                self._entry((layer, latent))
            except ValueError as error:
                raise self._invalid(str(error)) from None
        return layer, latent

    @traitlets.validate("pinned")
    def _check_pinned(self, proposal: dict) -> list[str]:
        pinned = list(dict.fromkeys(proposal["value"]))
        for text in pinned:
            if not self.lm.tokenizer(text, add_special_tokens=False)["input_ids"]:
                raise self._invalid(f"Cannot pin {text!r}: it is no token. Type a word, e.g. ' Paris'.")
        return pinned

    @traitlets.validate("continuation")
    def _check_continuation(self, proposal: dict) -> int:
        if not 0 <= proposal["value"] <= MAX_CONTINUATION:
            raise self._invalid(f"continuation={proposal['value']}: generate 0 to {MAX_CONTINUATION} tokens.")
        return proposal["value"]

    def _length(self) -> int:
        return self._prompt.tokens.shape[1] if self._prompt is not None else 0

    def _show_error(self) -> None:
        """Show the problems found at construction (they stay), then the last bad input (until the next
        good one), then the last computation's failure (until one succeeds)."""
        self.error = "\n".join(m for m in (*self._problems, self._input_error, self._run_error) if m)

    # -- changes ------------------------------------------------------------------------------------------
    @traitlets.observe("prompt")
    def _on_prompt(self, change: dict) -> None:
        self._changed(prompt=True)

    @traitlets.observe("position", "sliders")
    def _on_rows(self, change: dict) -> None:
        self._rows = self._rows_at()
        self._changed()

    @traitlets.observe("scope", "pinned", "continuation")
    def _on_output(self, change: dict) -> None:
        self._changed()

    @traitlets.observe("selected")
    def _on_selected(self, change: dict) -> None:
        key = tuple(change["new"])
        if key != (-1, -1) and key not in self._listed() | {(s["layer"], s["latent"]) for s in self.sliders}:
            self.sliders = [*self.sliders, self._entry(key)]

    def _changed(self, prompt: bool = False) -> None:
        """A good change (the worker's own aside): forget the last bad input, ask for the new state."""
        if threading.get_ident() == self._working:
            return
        if self._input_error:
            self._input_error = ""
            self._show_error()
        self._schedule(prompt)

    def _schedule(self, prompt: bool = False) -> None:
        with self._wanted:
            self._need_prompt |= prompt
            self._need_run = True
            self._status = "loading" if self._need_prompt else "running"
            self._wanted.notify()

    def _on_message(self, _: Any, content: dict, buffers: list) -> None:
        kind = content.get("type")
        if kind in ("set", "add"):
            # The state first, then the request it answers, under the worker's lock: a run labelled
            # with a request has read that request's state (or a newer one), never an older one.
            with self._wanted:
                if kind == "set":
                    self._apply(content.get("values") or {})
                else:
                    self._add(content.get("layer"), content.get("latent"))
                self._request = str(content.get("request", ""))
                self._schedule()  # every request is answered, changed or not
        elif kind == "select":
            self._apply({"selected": (content.get("layer"), content.get("latent"))})
        elif kind == "cancel":
            with self._wanted:
                self._cancelled = True
                self._status = ""

    def _apply(self, values: dict[str, Any]) -> None:
        """Set traits as the page asks; what is refused is shown in ``error``, not raised."""
        refused = []
        for name, value in values.items():
            try:
                if name not in self._SETTABLE:
                    raise traitlets.TraitError(f"The page cannot set {name!r}.")
                setattr(self, name, value)
            except traitlets.TraitError as error:
                refused.append(str(error))
        if refused:
            self._input_error = "\n".join(refused)
            self._show_error()

    def _add(self, layer: Any, latent: Any) -> None:
        """List another latent (with a slider at 1×) and select it."""
        try:
            layer, latent = int(layer), int(latent)
        except (TypeError, ValueError):
            self._input_error = "To add a latent, give its layer and its number (a whole number)."
            self._show_error()
            return
        try:
            entry = self._entry((layer, latent))
        except ValueError as error:
            self._input_error = f"Cannot add that latent: {error}"
            self._show_error()
            return
        key = (entry["layer"], entry["latent"])
        if all((s["layer"], s["latent"]) != key for s in self.sliders):
            self.sliders = [*self.sliders, entry]
        self.selected = key

    # -- the worker ---------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wanted:
                while not (self._need_prompt or self._need_run or self._closed):
                    self._wanted.wait()
                if self._closed:
                    return
            self._work()

    def _work(self) -> None:
        """Compute the current state: the prompt's clean run if it changed, then the edited run."""
        with self._wanted:
            prompt, self._need_prompt, self._need_run, self._cancelled = self._need_prompt, False, False, False
            request, self._working = self._request, threading.get_ident()
        try:
            loaded = prompt or self._prompt is None
            if loaded:
                self._load_prompt()
            self._run(request)
            if loaded and not (self.lm.remote if self.remote is None else self.remote):
                self._idle()  # the page is up to date; what follows only prepares the next edits
                # an unedited local run keeps the prompt's key/value cache: the edits to come then
                # rerun only the tokens from the edited position on (see interventions)
                run_with_edits(self.lm, self.transcoders, self._prompt.tokens, on_step=self._check)
            failure = ""
        except _Superseded:
            failure = self._run_error
        except Exception as error:  # shown in the widget, which keeps working
            failure = str(error) if isinstance(error, (ValueError, IndexError)) else f"{type(error).__name__}: {error}"
        if failure != self._run_error:
            self._run_error = failure
            self._show_error()
        self._working = None
        self._idle()

    def _idle(self) -> None:
        """Clear the busy status unless more work is waiting."""
        with self._wanted:
            if not (self._need_prompt or self._need_run):
                self._status = ""

    def _check(self, done: int = 0, total: int = 0) -> None:
        """Stop if a newer change or a cancel came in; otherwise report progress."""
        with self._wanted:
            if self._need_prompt or self._need_run or self._cancelled or self._closed:
                raise _Superseded
            if total > 1:
                self._status = f"generating {done}/{total}"

    def _load_prompt(self) -> None:
        """Tokenise the prompt, run it clean once and cache its logits and latents."""
        self._prompt = None
        try:
            tokens = encode_prompt(self.lm, self.prompt)
        except ValueError:
            with self.hold_sync():
                self._context, self._rows, self._result = {}, [], {}
            raise
        clean = run_with_edits(self.lm, self.transcoders, tokens, save_latents=True, remote=self.remote,
                               on_step=self._check)
        self._check()
        length, old = tokens.shape[1], dict(self._context)
        if old and self.position != len(old["tokens"]) - 1 and self.position < length:
            position = self.position  # keep a chosen position; follow the last token otherwise
        else:
            position = self._start_position % length if -length <= self._start_position < length else length - 1
        self._start_position = -1
        self._version += 1
        self._prompt = _Prompt(self._version, tokens, torch.log_softmax(clean.logits[0, -1].double(), -1),
                               {layer: z[0] for layer, z in clean.latents.items()})
        with self.hold_sync():
            self._context = {"version": self._version, "tokens": self._strings(tokens[0].tolist()),
                             "layers": [[layer, tc.n_latents] for layer, tc in self.transcoders.items()],
                             "remote": bool(self.lm.remote if self.remote is None else self.remote)}
            self.position = position
            self._rows = self._rows_at()
            if tuple(self.selected) == (-1, -1) and self._rows:
                self.selected = (self._rows[0]["layer"], self._rows[0]["latent"])

    def _strings(self, ids: list[int]) -> list[str]:
        return self.lm.tokenizer.batch_decode([[i] for i in ids])

    def _listed(self) -> set[tuple[int, int]]:
        return {(row["layer"], row["latent"]) for row in self._rows}

    def _rows_at(self) -> list[dict[str, Any]]:
        """The most active latents at the position (all layers), then the other latents with a slider."""
        prompt, position = self._prompt, self.position
        if prompt is None or position >= prompt.tokens.shape[1]:
            return []
        active = []
        for layer, latents in prompt.latents.items():
            values, ids = latents[position].topk(min(self.top_latents, latents.shape[1]))
            active += [(float(v), layer, int(i)) for v, i in zip(values, ids) if v > 0]
        top = [(layer, latent) for _, layer, latent in sorted(active, reverse=True)[:self.top_latents]]
        others = [key for key in ((s["layer"], s["latent"]) for s in self.sliders) if key not in top]
        return [{"layer": layer, "latent": latent, "act": _round(prompt.latents[layer][position, latent]),
                 "max": _round(prompt.latents[layer][:, latent].max()), "active": (layer, latent) in top}
                for layer, latent in top + others]

    def _run(self, request: str) -> None:
        """The edited run answering page ``request``: bars and pinned tokens first, then the
        continuations if asked for."""
        prompt, edits, positions = self._prompt, self.edits, self.edit_positions
        model_ms = 0.0
        after = prompt.log_probs
        if edits:
            start = time.perf_counter()
            result = run_with_edits(self.lm, self.transcoders, prompt.tokens, edits, positions=positions,
                                    remote=self.remote, on_step=self._check)
            model_ms = 1000 * (time.perf_counter() - start)
            after = torch.log_softmax(result.logits[0, -1].double(), -1)
        self._check()
        self._result = {"request": request, "version": prompt.version, "edits": len(edits),
                        "model_ms": round(model_ms, 1), "top": self._top(prompt.log_probs, after),
                        "pinned": self._pinned(prompt.log_probs, after), "continuation": None}
        n = self.continuation
        if n:
            clean = self._continuations.get((prompt.version, n))
            if clean is None:
                clean = self._continue(prompt, [], None, n)
                self._continuations = {(prompt.version, n): clean}
            edited = self._continue(prompt, edits, positions, n) if edits else clean
            self._check()
            self._result = {**self._result, "continuation": {"before": clean, "after": edited}}

    def _continue(self, prompt: _Prompt, edits: list[Edit], positions: list[int] | None, n: int) -> str:
        result = run_with_edits(self.lm, self.transcoders, prompt.tokens, edits, positions=positions, generate=n,
                                remote=self.remote, on_step=self._check)
        return self.lm.tokenizer.decode(result.continuation[0])

    def _top(self, before: torch.Tensor, after: torch.Tensor) -> list[dict[str, Any]]:
        """The most likely next tokens before or after, by the larger of the two probabilities."""
        k = min(self.top_tokens, len(before))
        ids = set(before.topk(k).indices.tolist()) | set(after.topk(k).indices.tolist())
        best = torch.maximum(before, after)
        ids = sorted(ids, key=lambda i: -float(best[i]))[:k]
        return [{"id": i, "token": text, "before": float(before[i].exp()), "after": float(after[i].exp())}
                for i, text in zip(ids, self._strings(ids))]

    def _pinned(self, before: torch.Tensor, after: torch.Tensor) -> list[dict[str, Any]]:
        """Log-probabilities of each pinned text's first token."""
        rows = []
        for text in self.pinned:
            ids = self.lm.tokenizer(text, add_special_tokens=False)["input_ids"]
            rows.append({"text": text, "id": ids[0], "token": self._strings(ids[:1])[0], "parts": len(ids),
                         "before": float(before[ids[0]]), "after": float(after[ids[0]])})
        return rows


def _round(value: torch.Tensor) -> float:
    return float(f"{float(value):.4g}")
