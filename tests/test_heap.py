"""heap.retained: freed tensors' memory is reused instead of faulted in afresh every time."""

import json
import subprocess
import sys
import textwrap

import pytest

from tcwidgets import heap

# in a fresh process: glibc's thresholds adapt to what a process has allocated before
SCRIPT = textwrap.dedent("""
    import json, resource, torch
    from tcwidgets import heap

    def faults(n=10):
        # rounds of three 16 MB tensors written in full, then freed (as a training step's temporaries)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(n):
            blocks = [torch.ones(4 << 20) for _ in range(3)]
            del blocks
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    outside = faults()
    with heap.retained(), heap.retained():  # nested uses are fine
        faults(1)
        inside = faults()
    print(json.dumps({"outside": outside, "inside": inside, "after": faults()}))
""")


@pytest.mark.skipif(heap._LIBC is None, reason="glibc only")
def test_retained_memory_is_reused_and_released_after():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    faults = json.loads(result.stdout)
    # 30 blocks of 16 MB: ~120,000 faults with 4 kB pages, fewer when the kernel uses huge pages
    assert faults["outside"] > 10_000, faults
    assert faults["inside"] < faults["outside"] / 10, faults
    assert faults["after"] > 10_000, faults  # glibc's behaviour is back
