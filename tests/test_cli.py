"""The command line, run as a user runs it: a separate process."""

import subprocess
import sys

import torch

import tcwidgets as tcw


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tcwidgets.cli", *args], capture_output=True, text=True, timeout=600)


def test_collect_writes_a_store_equal_to_the_api(tmp_path, lm):
    done = run_cli("collect", "--layers", "2,4", "--tokens", "256", "--context", "32", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "256 tokens of layers [2, 4] of smollm2-135m" in done.stdout
    store = tcw.ActivationStore.open(tmp_path, model="smollm2-135m", layers=[2, 4])
    tokens = tcw.load_corpus("python-docs", lm, context=32, n_tokens=256)
    assert torch.equal(store.tokens, tokens)
    expected = tcw.collect_activations(lm, [4], tokens, progress=False)
    torch.testing.assert_close(store.layer(4)[1], expected.layer(4)[1], rtol=0, atol=1e-5)


def test_bad_arguments_give_a_message_not_a_traceback(tmp_path):
    done = run_cli("collect", "--layers", "40", "--tokens", "256", "--out", str(tmp_path))
    assert done.returncode == 2
    assert "Layer 40 is out of range" in done.stderr and "Traceback" not in done.stderr
    done = run_cli("collect", "--layers", "six", "--out", str(tmp_path))
    assert done.returncode == 2 and "comma-separated integers" in done.stderr
