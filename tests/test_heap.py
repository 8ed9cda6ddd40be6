"""heap.retained: freed tensors' memory is reused instead of faulted in afresh every time."""

import resource

import pytest
import torch

from tcwidgets import heap


def faults_allocating(n: int = 10) -> int:
    """Page faults of ``n`` rounds of three 16 MB tensors written in full, then freed (as a
    training step's temporaries are)."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        blocks = [torch.ones(4 << 20) for _ in range(3)]
        del blocks
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(heap._LIBC is None, reason="glibc only")
def test_retained_memory_is_reused_and_released_after():
    outside = faults_allocating()
    with heap.retained(), heap.retained():  # nested uses are fine
        faults_allocating(1)
        inside = faults_allocating()
    after = faults_allocating()
    assert outside > 10 * 6000  # the blocks' pages faulted in afresh each round (4 kB pages)
    assert inside < outside / 10
    assert after > 10 * 6000  # glibc's behaviour is back
