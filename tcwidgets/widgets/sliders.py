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

Model work runs on a worker thread (`NewestWins`), and the newest state wins: each change takes a
snapshot of the state on the kernel's thread and submits it; a snapshot still waiting when a newer
one comes never runs, a running one stops at its next step, and results are applied to the traits
on the kernel thread that submitted it (through its event loop: the thread that handles the
widget's messages), only while they answer the newest state. The trait changes that one page
message makes reach the page as one message.
``_result["request"]`` names the page request it answers, so a page also ignores answers older than
its latest request. The prompt's clean run is a `PromptSession` kept by the widget: a slider change
reruns the tokens from the edited position on (none when no slider edits anything), a position
change with no edit runs nothing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, NamedTuple

import anywidget
import torch
import traitlets

from ..crosslayer import CrossLayerTranscoder
from ..interventions import (EDIT_KINDS, Edit, PromptSession, check_edits, check_positions, run_with_edits,
                             start_session)
from ..splicing import check_transcoders
from .assets import css, esm
from .messages import whole
from .newest import NewestWins, Ticket, kernel_deliver

IDENTITY = {"scale": 1.0, "steer": 0.0}  # slider values that change nothing (a clamp always does)
MAX_CONTINUATION = 64
MAX_EDIT = 1e6  # slider values beyond this are refused (they only make the model's numbers overflow)
MAX_PINNED = 1_000  # characters of a pinned text


class _Snapshot(NamedTuple):
    """What to compute, taken on the kernel's thread when a change is submitted."""

    request: str  # the page request answered
    prompt: str
    session: PromptSession | None  # the current prompt's clean run (None: start one for ``prompt``)
    version: int  # the session's version, or the next one for a new session
    position: int  # the position to edit (resolved for a new session by `_Snapshot.position_in`)
    keep_position: bool  # a new session keeps ``position`` if it fits (else: ``start_position``)
    start_position: int
    scope: str
    edits: list[Edit]
    pinned: list[str]
    continuation: int
    clean_continuation: str | None  # already known for this session and length

    def position_in(self, length: int) -> int:
        if self.keep_position and self.position < length:
            return self.position
        start = self.start_position
        return start % length if -length <= start < length else length - 1


class _Outcome(NamedTuple):
    """A finished computation, applied on the kernel's thread."""

    session: PromptSession
    version: int
    position: int
    result: dict[str, Any]
    clean_continuation: str | None


class _Inline:
    """A `Ticket` stand-in for the first state, computed while the widget is built."""

    current = True

    def check(self) -> None:
        pass

    def deliver(self, callback: Any) -> None:
        callback()


def _usable(lm: Any, transcoders: Mapping[int, Any] | Any) -> tuple[dict[int, Any], list[str]]:
    """The transcoders that fit ``lm``, and a message for each one that does not."""
    if isinstance(transcoders, CrossLayerTranscoder):
        transcoders = transcoders.views()
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
        self._session: PromptSession | None = None  # the clean run of `prompt`
        self._session_prompt = ""  # the text it is of
        self._version = 0
        self._clean_continuation: tuple[PromptSession, int, str] | None = None
        self._runner: NewestWins | None = None
        self._holding = 0  # > 0: changes are collected, then submitted once (`_collected`)
        self._pending = False  # a change was collected
        self._applying: int | None = None  # the thread applying a result: its trait changes ask for nothing
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
        with self._collected(submit=False):
            with self.hold_trait_notifications():
                self.sliders, self.pinned, self.scope, self.continuation = sliders, list(pinned), scope, continuation
            self.prompt = prompt
        # the first state synchronously: the widget is complete when displayed
        snapshot = self._snapshot()
        try:
            self._done(snapshot, self._compute(snapshot, _Inline()))
        except Exception as error:  # shown in the widget
            self._failed(snapshot, error)
        self._runner = NewestWins(kernel_deliver(), name="AblationSliders")

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
        if self._runner is not None:
            self._runner.close()
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
                entry = dict(entry)
                if entry["kind"] not in EDIT_KINDS:
                    raise ValueError(f"its kind must be one of {EDIT_KINDS}.")
                checked = self._entry(Edit(entry["layer"], entry["latent"], **{entry["kind"]: entry["value"]}))
                if abs(checked["value"]) > MAX_EDIT:
                    raise ValueError(f"its value must be within ±{MAX_EDIT:g}.")
            except (KeyError, TypeError, ValueError) as error:
                raise self._invalid(f"Bad slider {entry!r:.200}: {error}") from None
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
            if len(text) > MAX_PINNED:
                raise self._invalid(f"Cannot pin a text of {len(text)} characters: pin a word, e.g. ' Paris'.")
            if not self.lm.tokenizer(text, add_special_tokens=False)["input_ids"]:
                raise self._invalid(f"Cannot pin {text!r}: it is no token. Type a word, e.g. ' Paris'.")
        return pinned

    @traitlets.validate("continuation")
    def _check_continuation(self, proposal: dict) -> int:
        if not 0 <= proposal["value"] <= MAX_CONTINUATION:
            raise self._invalid(f"continuation={proposal['value']}: generate 0 to {MAX_CONTINUATION} tokens.")
        return proposal["value"]

    def _length(self) -> int:
        return self._session.length if self._session is not None else 0

    def _show_error(self) -> None:
        """Show the problems found at construction (they stay), then the last bad input (until the next
        good one), then the last computation's failure (until one succeeds)."""
        self.error = "\n".join(m for m in (*self._problems, self._input_error, self._run_error) if m)

    # -- changes (on the kernel's thread) -------------------------------------------------------------------
    @traitlets.observe("prompt")
    def _on_prompt(self, change: dict) -> None:
        self._changed()

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

    def _changed(self) -> None:
        """A good change (not one of ours): forget the last bad input, ask for the new state."""
        if self._applying == threading.get_ident():
            return
        if self._input_error:
            self._input_error = ""
            self._show_error()
        if self._holding:
            self._pending = True
        else:
            self._submit()

    @contextmanager
    def _collected(self, submit: bool = True) -> Iterator[None]:
        """Collect the changes made inside, then submit once (always, with ``submit``: every page
        request is answered, changed or not)."""
        self._holding += 1
        try:
            yield
        finally:
            self._holding -= 1
            pending, self._pending = self._pending, False
            if not self._holding and self._runner is not None and (submit or pending):
                self._submit()

    def _submit(self) -> None:
        """Compute the state as it is now, on the worker; superseded by any later change."""
        snapshot = self._snapshot()
        self._status = "loading" if snapshot.session is None else "running"
        self._runner.submit(lambda ticket: self._compute(snapshot, ticket),
                            lambda outcome: self._done(snapshot, outcome),
                            lambda error: self._failed(snapshot, error), kernel_deliver())

    def _snapshot(self) -> _Snapshot:
        session = self._session if self._session is not None and self._session_prompt == self.prompt else None
        context_tokens = self._context.get("tokens") or []
        keep = bool(context_tokens) and self.position != len(context_tokens) - 1
        known = self._clean_continuation
        clean = known[2] if known and known[0] is session and known[1] == self.continuation else None
        return _Snapshot(self._request, self.prompt, session, self._version + (session is None), self.position,
                         keep, self._start_position, self.scope, self.edits, list(self.pinned), self.continuation,
                         clean)

    # -- messages from the page (on the kernel's thread) -------------------------------------------------------
    def _on_message(self, _: Any, content: Any, buffers: list) -> None:
        """Apply a page message. A malformed one is named in ``error`` and answered with ``{"type":
        "error", request, message}`` (a "set" or "add" also by the run that follows), never raised.
        What it changes goes to the page as one message."""
        with self.hold_sync():
            self._handle(content)

    def _handle(self, content: Any) -> None:
        try:
            if not isinstance(content, dict):
                raise ValueError(f"a message must be an object, not {type(content).__name__}")
            kind = content.get("type")
            if kind in ("set", "add"):
                request = content.get("request", "")
                with self._collected():
                    self._request = request if isinstance(request, str) else str(request)[:100]
                    self._input_error = ""  # this request's own problems (if any) replace the last ones
                    if kind == "set":
                        values = content.get("values", {})
                        if not isinstance(values, dict):
                            raise ValueError(f"'values' must be an object of trait values, not {values!r:.100}")
                        self._apply(values)
                    else:
                        self._add(content.get("layer"), content.get("latent"))
                    self._show_error()
            elif kind == "select":
                if not self._apply({"selected": (content.get("layer"), content.get("latent"))}):
                    self._reply_error(None)
            elif kind == "cancel":
                if self._runner is not None:
                    self._runner.cancel()
                self._status = ""
            else:
                raise ValueError(f"unknown message type {kind!r:.100}: expected 'set', 'add', 'select' or 'cancel'")
        except Exception as error:  # a page (or anyone on the comm) sent something malformed
            self._input_error = f"Ignored a malformed message from the page: {error}"
            self._show_error()
            self._reply_error(content.get("request") if isinstance(content, dict) else None)

    def _reply_error(self, request: Any) -> None:
        self.send({"type": "error", "request": request if isinstance(request, str) else None, "message": self.error})

    def _apply(self, values: dict[str, Any]) -> bool:
        """Set traits as the page asks; what is refused is shown in ``error``, not raised. Returns
        whether all was applied."""
        refused = []
        for name, value in values.items():
            try:
                if name not in self._SETTABLE:
                    raise traitlets.TraitError(f"The page cannot set {name!r:.100}.")
                setattr(self, name, value)
            except (traitlets.TraitError, TypeError, ValueError, KeyError, OverflowError) as error:
                refused.append(str(error))
        if refused:
            self._input_error = "\n".join(refused)
            self._show_error()
        return not refused

    def _add(self, layer: Any, latent: Any) -> None:
        """List another latent (with a slider at 1×) and select it."""
        try:
            layer, latent = whole(layer), whole(latent)
        except ValueError:
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

    # -- the computation (on the worker thread: reads its snapshot only, sets no trait) --------------------
    def _compute(self, snapshot: _Snapshot, ticket: Ticket | _Inline) -> _Outcome:
        """The prompt's clean run if it is new, then the edited run: bars and pinned tokens (delivered at
        once when a continuation follows), then the continuations if asked for."""
        remote = self.lm.remote if self.remote is None else self.remote
        session, version, position = snapshot.session, snapshot.version, snapshot.position
        if session is None:
            session = start_session(self.lm, self.transcoders, snapshot.prompt, remote=remote)
            ticket.check()
            position = snapshot.position_in(session.length)
        positions = None if snapshot.scope == "all" else [position]
        edits = snapshot.edits
        before = torch.log_softmax(session.logits[0, -1].double(), -1)
        after, model_ms = before, 0.0
        if edits:
            start = time.perf_counter()
            result = run_with_edits(self.lm, self.transcoders, session, edits, positions=positions,
                                    on_step=lambda done, total: ticket.check())
            model_ms = 1000 * (time.perf_counter() - start)
            after = torch.log_softmax(result.logits[0, -1].double(), -1)
        ticket.check()
        bars = {"request": snapshot.request, "version": version, "edits": len(edits), "model_ms": round(model_ms, 1),
                "top": self._top(before, after), "pinned": self._pinned(snapshot.pinned, before, after),
                "continuation": None}
        n, clean = snapshot.continuation, snapshot.clean_continuation
        if not n:
            return _Outcome(session, version, position, bars, None)
        ticket.deliver(lambda: self._show_bars(bars))

        def step(done: int, total: int) -> None:
            ticket.check()
            ticket.deliver(lambda: setattr(self, "_status", f"generating {done}/{total}"))
        if clean is None:
            clean = self._continue(session, [], None, n, step)
        edited = self._continue(session, edits, positions, n, step) if edits else clean
        ticket.check()
        return _Outcome(session, version, position, {**bars, "continuation": {"before": clean, "after": edited}}, clean)

    def _continue(self, session: PromptSession, edits: list[Edit], positions: list[int] | None, n: int,
                  step: Any) -> str:
        result = run_with_edits(self.lm, self.transcoders, session, edits, positions=positions, generate=n,
                                on_step=step)
        return self.lm.tokenizer.decode(result.continuation[0])

    # -- results (on the kernel's thread, only while they answer the newest state) -------------------------
    @contextmanager
    def _own_changes(self) -> Iterator[None]:
        self._applying = threading.get_ident()
        try:
            with self.hold_sync():
                yield
        finally:
            self._applying = None

    def _show_bars(self, bars: dict[str, Any]) -> None:
        self._result = bars

    def _done(self, snapshot: _Snapshot, outcome: _Outcome) -> None:
        with self._own_changes():
            if outcome.session is not self._session:
                self._session, self._session_prompt, self._version = outcome.session, snapshot.prompt, outcome.version
                self._start_position = -1
                self._context = {"version": outcome.version, "tokens": self._strings(outcome.session.tokens[0].tolist()),
                                 "layers": [[layer, tc.n_latents] for layer, tc in self.transcoders.items()],
                                 "remote": bool(outcome.session.remote)}
                self.position = outcome.position
                self._rows = self._rows_at()
                if tuple(self.selected) == (-1, -1) and self._rows:
                    self.selected = (self._rows[0]["layer"], self._rows[0]["latent"])
            if outcome.clean_continuation is not None:
                self._clean_continuation = (outcome.session, snapshot.continuation, outcome.clean_continuation)
            self._result = outcome.result
            if self._run_error:
                self._run_error = ""
                self._show_error()
            self._status = ""

    def _failed(self, snapshot: _Snapshot, error: Exception) -> None:
        with self._own_changes():
            if snapshot.session is None:  # the prompt itself failed: nothing of the old one is shown
                self._session, self._session_prompt = None, ""
                self._context, self._rows, self._result = {}, [], {}
            self._result = {**self._result, "request": snapshot.request}  # answered (the last bars stay)
            self._run_error = str(error) if isinstance(error, (ValueError, IndexError)) else f"{type(error).__name__}: {error}"
            self._show_error()
            self._status = ""

    def _strings(self, ids: list[int]) -> list[str]:
        return self.lm.tokenizer.batch_decode([[i] for i in ids])

    def _listed(self) -> set[tuple[int, int]]:
        return {(row["layer"], row["latent"]) for row in self._rows}

    def _rows_at(self) -> list[dict[str, Any]]:
        """The most active latents at the position (all layers), then the other latents with a slider."""
        session, position = self._session, self.position
        if session is None or position >= session.length:
            return []
        latents = {layer: z[0] for layer, z in session.latents.items()}
        active = []
        for layer, values in latents.items():
            top, ids = values[position].topk(min(self.top_latents, values.shape[1]))
            active += [(float(v), layer, int(i)) for v, i in zip(top, ids) if v > 0]
        top = [(layer, latent) for _, layer, latent in sorted(active, reverse=True)[:self.top_latents]]
        others = [key for key in ((s["layer"], s["latent"]) for s in self.sliders) if key not in top]
        return [{"layer": layer, "latent": latent, "act": _round(latents[layer][position, latent]),
                 "max": _round(latents[layer][:, latent].max()), "active": (layer, latent) in top}
                for layer, latent in top + others]

    def _top(self, before: torch.Tensor, after: torch.Tensor) -> list[dict[str, Any]]:
        """The most likely next tokens before or after, by the larger of the two probabilities."""
        k = min(self.top_tokens, len(before))
        ids = set(before.topk(k).indices.tolist()) | set(after.topk(k).indices.tolist())
        best = torch.maximum(before, after)
        ids = sorted(ids, key=lambda i: -float(best[i]))[:k]
        return [{"id": i, "token": text, "before": float(before[i].exp()), "after": float(after[i].exp())}
                for i, text in zip(ids, self._strings(ids))]

    def _pinned(self, pinned: list[str], before: torch.Tensor, after: torch.Tensor) -> list[dict[str, Any]]:
        """Log-probabilities of each pinned text's first token."""
        rows = []
        for text in pinned:
            ids = self.lm.tokenizer(text, add_special_tokens=False)["input_ids"]
            rows.append({"text": text, "id": ids[0], "token": self._strings(ids[:1])[0], "parts": len(ids),
                         "before": float(before[ids[0]]), "after": float(after[ids[0]])})
        return rows


def _round(value: torch.Tensor) -> float:
    return float(f"{float(value):.4g}")
