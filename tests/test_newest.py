"""NewestWins: only the newest request runs to the end and is delivered, on the delivering thread."""

import threading
import time

import pytest

from tcwidgets.widgets.newest import NewestWins, Superseded, kernel_deliver


class Inbox:
    """A ``deliver`` that queues callbacks for the test's thread to run (as a kernel's loop would)."""

    def __init__(self) -> None:
        self.callbacks, self.lock = [], threading.Lock()

    def __call__(self, callback) -> None:
        with self.lock:
            self.callbacks.append(callback)

    def drain(self, until, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not until():
            assert time.monotonic() < deadline, "nothing delivered in time"
            with self.lock:
                callbacks, self.callbacks = self.callbacks, []
            for callback in callbacks:
                callback()
            time.sleep(0.005)


@pytest.fixture
def inbox():
    return Inbox()


@pytest.fixture
def runner(inbox):
    runner = NewestWins(inbox)
    yield runner
    runner.close()


def blocking_job(started: threading.Event, release: threading.Event, ran: list, name: str):
    def job(ticket):
        ran.append(name)
        started.set()
        while not release.wait(0.005):
            ticket.check()  # between steps
        ticket.check()
        return name
    return job


def test_a_burst_runs_the_first_and_the_last_and_delivers_only_the_last(runner, inbox):
    started, release, ran, done, failed = threading.Event(), threading.Event(), [], [], []
    runner.submit(blocking_job(started, release, ran, "first"), done.append, failed.append)
    assert started.wait(5)
    for name in ("b", "c", "d", "last"):  # b, c and d are superseded while waiting: never run
        runner.submit(lambda ticket, name=name: ran.append(name) or name, done.append, failed.append)
    release.set()
    inbox.drain(lambda: done)
    time.sleep(0.05)
    inbox.drain(lambda: True)
    assert ran == ["first", "last"] and done == ["last"] and not failed


def test_the_running_job_stops_at_its_next_check_when_superseded(runner, inbox):
    started, release, ran, done, stopped = threading.Event(), threading.Event(), [], [], threading.Event()

    def job(ticket):
        started.set()
        try:
            while True:
                ticket.check()
                time.sleep(0.005)
        except Superseded:
            stopped.set()
            raise
    runner.submit(job, done.append, done.append)
    assert started.wait(5)
    runner.submit(lambda ticket: "newer", done.append, done.append)
    assert stopped.wait(5)
    inbox.drain(lambda: done)
    assert done == ["newer"]


def test_cancel_stops_the_running_job_and_delivers_nothing(runner, inbox):
    started, release, ran, done = threading.Event(), threading.Event(), [], []
    runner.submit(blocking_job(started, release, ran, "first"), done.append, done.append)
    assert started.wait(5)
    runner.cancel()
    time.sleep(0.1)
    inbox.drain(lambda: True)
    assert done == [] and ran == ["first"]
    runner.submit(lambda ticket: "after", done.append, done.append)  # still works after a cancel
    inbox.drain(lambda: done)
    assert done == ["after"]


def test_an_outcome_is_dropped_when_a_newer_request_comes_before_it_is_delivered(runner, inbox):
    done = []
    runner.submit(lambda ticket: "old", done.append, done.append)
    deadline = time.monotonic() + 5
    while not inbox.callbacks:  # computed and queued, not yet delivered
        assert time.monotonic() < deadline
        time.sleep(0.005)
    runner.submit(lambda ticket: "new", done.append, done.append)
    inbox.drain(lambda: done)
    time.sleep(0.05)
    inbox.drain(lambda: True)
    assert done == ["new"]


def test_a_failure_goes_to_failed_on_the_delivering_thread(runner, inbox):
    failed, threads = [], []

    def job(ticket):
        raise ValueError("bad prompt")
    runner.submit(job, lambda result: None, lambda error: (failed.append(error), threads.append(threading.get_ident())))
    inbox.drain(lambda: failed)
    assert isinstance(failed[0], ValueError) and str(failed[0]) == "bad prompt"
    assert threads == [threading.get_ident()]


def test_progress_is_delivered_only_while_current(runner, inbox):
    reports, done = [], []
    gate = threading.Event()

    def job(ticket):
        ticket.deliver(lambda: reports.append("step 1"))
        gate.wait(5)
        ticket.deliver(lambda: reports.append("step 2"))  # superseded by then: dropped
        return "x"
    runner.submit(job, done.append, done.append)
    inbox.drain(lambda: reports)
    runner.cancel()
    gate.set()
    time.sleep(0.1)
    inbox.drain(lambda: True)
    assert reports == ["step 1"] and done == []


def test_close_ends_the_thread_and_refuses_new_work(inbox):
    runner = NewestWins(inbox)
    runner.close()
    runner._thread.join(5)
    assert not runner._thread.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        runner.submit(lambda ticket: 1, print, print)


def test_outside_a_kernel_callbacks_run_at_once():
    calls = []
    kernel_deliver()(lambda: calls.append(1))
    assert calls == [1]


def test_outside_a_kernel_a_running_event_loop_is_not_taken_for_the_kernels():
    """Playwright's sync API, for one, keeps an asyncio loop "running" that it pumps only now and then."""
    import asyncio

    async def main():
        calls = []
        kernel_deliver()(lambda: calls.append(threading.get_ident()))
        return calls

    found = []  # in a thread of its own: this test process may hold Playwright's loop in the main thread
    thread = threading.Thread(target=lambda: found.append((asyncio.run(main()), threading.get_ident())))
    thread.start()
    thread.join(10)
    (calls, ident), = found
    assert calls == [ident]


def test_in_a_jupyter_kernel_results_arrive_on_the_kernels_thread(tmp_path):
    """What widgets rely on: code in a cell sees the kernel's running event loop, and a worker's
    callbacks run on the kernel's main thread, where traits may be set."""
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "import threading\nfrom tcwidgets.widgets.newest import NewestWins, kernel_deliver\n"
        "seen = []\nrunner = NewestWins(kernel_deliver())\n"
        "runner.submit(lambda ticket: threading.current_thread().name, lambda worker: seen.append((worker, "
        "threading.current_thread().name)), print)"),
        nbformat.v4.new_code_cell("import time\nfor _ in range(100):\n    if seen: break\n    time.sleep(0.05)\n"
                                  "print(seen)")])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    NotebookClient(notebook, kernel_name="python3", timeout=60, resources={"metadata": {"path": str(tmp_path)}}).execute()
    assert notebook.cells[1].outputs[0]["text"].strip() == "[('NewestWins', 'MainThread')]"


def test_in_a_kernel_subshell_results_arrive_on_the_subshells_thread():
    """JupyterLab ≥ 4.4 sends widget messages over a kernel subshell, handled on a thread of its own
    while the main thread may run a cell: what the subshell submits is delivered there, not to the
    main thread."""
    from jupyter_client.manager import start_new_kernel

    manager, client = start_new_kernel(kernel_name="python3")
    try:
        create = client.session.msg("create_subshell_request", {})
        client.control_channel.send(create)
        subshell = None
        deadline = time.monotonic() + 30
        while subshell is None and time.monotonic() < deadline:
            message = client.get_control_msg(timeout=30)
            if message["msg_type"] == "create_subshell_reply" and message["parent_header"].get("msg_id") == create["header"]["msg_id"]:
                subshell = message["content"]["subshell_id"]
        code = ("import threading, time\nfrom tcwidgets.widgets.newest import NewestWins, kernel_deliver\n"
                "seen = []\nrunner = NewestWins(kernel_deliver())\n"
                "runner.submit(lambda ticket: 1, lambda _: seen.append(threading.current_thread().name), print,"
                " kernel_deliver())\n")
        request = client.session.msg("execute_request", {"code": code, "silent": False, "store_history": False,
                                                         "user_expressions": {}, "allow_stdin": False})
        request["header"]["subshell_id"] = subshell
        client.shell_channel.send(request)
        while True:  # the reply comes once the subshell's cell ran
            message = client.get_shell_msg(timeout=30)
            if message["parent_header"].get("msg_id") == request["header"]["msg_id"]:
                assert message["content"]["status"] == "ok", message["content"]
                break
        printed = []
        seen = client.execute_interactive("for _ in range(100):\n    if seen: break\n    time.sleep(0.05)\n"
                                          "print(seen, threading.current_thread().name)", timeout=30,
                                          output_hook=printed.append)
        assert seen["content"]["status"] == "ok"
        text = "".join(m["content"].get("text", "") for m in printed if m["msg_type"] == "stream")
        assert text.strip() == f"['subshell-{subshell}'] MainThread"
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)

