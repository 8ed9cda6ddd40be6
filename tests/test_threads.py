"""`tcwidgets.threads`: one thread inside `serial`, the caller's threads back inside `parallel`."""

import pytest
import torch

from tcwidgets import threads


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_serial_runs_on_one_thread_and_parallel_inside_it_on_the_callers(two_threads):
    with threads.parallel():  # outside serial: as is
        assert torch.get_num_threads() == 2
    with threads.serial():
        assert torch.get_num_threads() == 1
        with threads.serial():  # nested
            assert torch.get_num_threads() == 1
            with threads.parallel():
                assert torch.get_num_threads() == 2
                with threads.parallel():
                    assert torch.get_num_threads() == 2
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with threads.serial(enabled=False):
        assert torch.get_num_threads() == 2


def test_the_thread_count_is_restored_after_an_error(two_threads):
    with pytest.raises(KeyError):
        with threads.serial():
            with threads.parallel():
                raise KeyError("boom")
    assert torch.get_num_threads() == 2
    with threads.parallel():  # no serial left active
        assert torch.get_num_threads() == 2
