"""The command line, run as a user runs it: a separate process."""

import subprocess
import sys

import pytest
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


def test_train_then_evaluate_from_the_command_line(tmp_path, lm):
    import json

    tokens = tcw.load_corpus("python-docs", lm, context=32, n_tokens=64 * 32)
    tcw.collect_activations(lm, [3], tokens, out=tmp_path / "acts", progress=False)
    done = run_cli("train", "--acts", str(tmp_path / "acts"), "--out", str(tmp_path / "tc"), "--latents", "256",
                   "--k", "8", "--batch-size", "256")
    assert done.returncode == 0, done.stderr
    tc = tcw.Transcoder.load(tmp_path / "tc")
    assert (tc.n_latents, tc.config.k, tc.config.site["layer"], tc.config.site["model"]) == (256, 8, 3, "smollm2-135m")

    done = run_cli("evaluate", str(tmp_path / "tc"), "--tokens", "64", "--context", "32",
                   "--json", str(tmp_path / "metrics.json"))
    assert done.returncode == 0, done.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    held_out = tcw.load_corpus("python-docs", lm, context=32, n_tokens=64, split="test")
    expected = tcw.evaluate(lm, {3: tc}, held_out, progress=False)
    assert str(round(expected[3].fvu, 4)) in done.stdout
    assert tcw.Metrics.from_dict(metrics)[3].ce_spliced == pytest.approx(expected[3].ce_spliced, rel=1e-5)


def test_torchrun_shares_the_layers_out_between_ranks(tmp_path, lm):
    """Under torchrun each rank trains its own layers; every layer ends up trained once, as alone."""
    tokens = tcw.load_corpus("python-docs", lm, context=32, n_tokens=16 * 32)
    store = tcw.collect_activations(lm, [2, 5], tokens, out=tmp_path / "acts", progress=False)
    options = ["--latents", "128", "--k", "8", "--batch-size", "128"]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "tcwidgets.cli",
                           "train", "--acts", str(tmp_path / "acts"), "--out", str(tmp_path / "tc"), *options],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "rank 0 of 2: layers [2]" in done.stdout and "rank 1 of 2: layers [5]" in done.stdout
    for layer in (2, 5):
        tc = tcw.Transcoder.load(tmp_path / "tc" / f"layer-{layer}")
        alone = tcw.train_transcoder(store, layer, n_latents=128, k=8, batch_size=128, progress=False)
        assert tc.config.site["layer"] == layer
        for name, tensor in alone.state_dict().items():
            torch.testing.assert_close(tc.state_dict()[name], tensor, rtol=1e-4, atol=1e-5)
