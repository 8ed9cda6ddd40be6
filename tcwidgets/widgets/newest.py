"""`NewestWins`: run a widget's model work on a worker thread, newest request first.

A widget asks for work faster than the model answers (a slider dragged). Only the newest request
matters: a request still waiting when a newer one comes is dropped without running; the running one
is told at its next step (`Ticket.check` raises `Superseded`) and stops; and an outcome is handed
back only while its request is still the newest one. Outcomes go through ``deliver``, which a widget
points at its kernel's event loop, so traits are changed on the kernel's thread only.
"""

from __future__ import annotations

import asyncio
import threading
import traceback
from collections.abc import Callable
from typing import Any, Generic, TypeVar

Result = TypeVar("Result")
Deliver = Callable[[Callable[[], None]], None]


class Superseded(Exception):
    """A newer request (or a cancel) made the running job pointless."""


class Ticket:
    """One submitted request, as its job sees it."""

    def __init__(self, runner: NewestWins, number: int, deliver: Deliver) -> None:
        self._runner, self.number, self._deliver = runner, number, deliver

    @property
    def current(self) -> bool:
        """Is this still the newest request (not superseded, cancelled or closed)?"""
        return self._runner._is_current(self.number)

    def check(self) -> None:
        """Raise `Superseded` unless this is still the newest request: call it between steps."""
        if not self.current:
            raise Superseded

    def deliver(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` through this request's ``deliver``, if this is still the newest request
        then (progress reports, outcomes)."""
        def if_current() -> None:
            if self.current:
                callback()
        self._deliver(if_current)


class NewestWins(Generic[Result]):
    """One worker thread that runs only the newest of the jobs submitted to it.

    ``submit(job, done, failed)``: ``job(ticket)`` runs on the worker and returns a result; then
    ``done(result)`` (or ``failed(error)`` if it raised) is called through ``deliver``, unless a
    newer job was submitted (or `cancel` called) in the meantime. ``deliver(callback)`` must call
    ``callback`` soon, on the thread that owns the state (`kernel_deliver`).
    """

    def __init__(self, deliver: Deliver, name: str = "NewestWins") -> None:
        self._deliver = deliver
        self._lock = threading.Condition()
        self._newest = 0  # the number of the newest request; older ones are superseded
        self._waiting: tuple[Ticket, Callable, Callable, Callable] | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[Ticket], Result], done: Callable[[Result], None],
               failed: Callable[[Exception], None], deliver: Deliver | None = None) -> Ticket:
        """Run ``job`` as the newest request, superseding any other; its progress and outcome go
        through ``deliver`` (default: the runner's)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("This runner is closed.")
            self._newest += 1
            ticket = Ticket(self, self._newest, deliver or self._deliver)
            self._waiting = (ticket, job, done, failed)
            self._lock.notify()
        return ticket

    def cancel(self) -> None:
        """Supersede every request: the waiting one never runs, the running one stops at its next check."""
        with self._lock:
            self._newest += 1
            self._waiting = None

    def close(self) -> None:
        """Cancel and let the worker thread end."""
        with self._lock:
            self._closed = True
            self._newest += 1
            self._waiting = None
            self._lock.notify()

    def _is_current(self, number: int) -> bool:
        with self._lock:
            return number == self._newest and not self._closed

    def _loop(self) -> None:
        while True:
            with self._lock:
                while self._waiting is None and not self._closed:
                    self._lock.wait()
                if self._closed:
                    return
                ticket, job, done, failed = self._waiting
                self._waiting = None
            try:
                result = job(ticket)
            except Superseded:
                continue
            except Exception as error:  # handed to `failed`: the runner keeps running
                ticket.deliver(lambda error=error, failed=failed: failed(error))
            else:
                ticket.deliver(lambda result=result, done=done: done(result))


def kernel_deliver() -> Deliver:
    """A ``deliver`` onto the event loop of the Jupyter kernel thread calling it (where widget
    messages are handled and traits may be set). That is the kernel's main thread for code in a
    cell, and a subshell's thread for widget messages when the front-end sends comms over subshells
    (JupyterLab ≥ 4.4 does): results then return to the thread that handles the widget's messages,
    which is not blocked by a running cell. Outside a kernel (a script, a test, a front-end without
    an IPython kernel) there is no kernel thread to return to, and callbacks run at once on the
    calling thread. Any other running asyncio loop is not taken for the kernel's: it may be pumped
    only now and then (Playwright's sync API keeps one "running")."""
    try:
        from IPython import get_ipython
    except ImportError:
        return _call_now
    kernel = getattr(get_ipython(), "kernel", None)
    if kernel is None:
        return _call_now
    try:
        return asyncio.get_running_loop().call_soon_threadsafe
    except RuntimeError:  # a kernel thread without a running loop: the kernel's main loop
        loop = getattr(kernel, "io_loop", None)
        return loop.add_callback if loop is not None else _call_now


def _call_now(callback: Callable[[], Any]) -> None:
    """Call ``callback``; report what it raises as an event loop would, and carry on."""
    try:
        callback()
    except Exception:
        traceback.print_exc()
