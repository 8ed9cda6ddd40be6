"""The latent choice's precision is measured once per machine and shape, then read from the cache."""

import json

import torch

from tcwidgets.calibration import fastest_latent_choice
from tcwidgets.transcoder import Transcoder, TranscoderConfig


def test_measured_once_then_read_from_the_cache(tmp_path):
    tc = Transcoder(TranscoderConfig(64, 64, 256, k=8))
    choice = fastest_latent_choice(tc, 128, cache=tmp_path)
    path = tmp_path / "calibration.json"
    (key, entry), = json.loads(path.read_text()).items()
    assert "128x64x256" in key and f"torch {torch.__version__}" in key
    seconds = entry["seconds"]
    assert set(seconds) == {"float32", "bfloat16", "int8"}  # every precision this CPU runs, int8 for TopK
    assert entry["choice"] == choice == min(seconds, key=seconds.get)
    # the cached answer is the one used: change it and ask again
    other = next(name for name in seconds if name != choice)
    path.write_text(json.dumps({key: dict(entry, choice=other)}))
    assert fastest_latent_choice(tc, 128, cache=tmp_path) == other
    # another shape is measured and added
    fastest_latent_choice(tc, 256, cache=tmp_path)
    assert len(json.loads(path.read_text())) == 2


def test_int8_is_a_candidate_for_topk_only_and_entries_of_earlier_rules_are_measured_again(tmp_path):
    tc = Transcoder(TranscoderConfig(32, 32, 64, k=4, activation="batchtopk"))
    fastest_latent_choice(tc, 64, cache=tmp_path)
    path = tmp_path / "calibration.json"
    (key, entry), = json.loads(path.read_text()).items()
    assert set(entry["seconds"]) == {"float32", "bfloat16"}
    path.write_text(json.dumps({key: {"low_precision": True, "seconds": {}}}))  # before int8 was a candidate
    assert fastest_latent_choice(tc, 64, cache=tmp_path) in ("float32", "bfloat16")
    assert "choice" in json.loads(path.read_text())[key]
    # a choice timed by wall clock (before CPU seconds) is measured again
    path.write_text(json.dumps({key: {"choice": "bfloat16", "seconds": {"bfloat16": 0.0, "float32": 1.0}}}))
    fastest_latent_choice(tc, 64, cache=tmp_path)
    entry = json.loads(path.read_text())[key]
    assert entry["clock"] == "cpu" and entry["seconds"]["bfloat16"] > 0


def test_an_unreadable_cache_is_measured_again(tmp_path):
    (tmp_path / "calibration.json").write_text("{not json")
    assert fastest_latent_choice(Transcoder(TranscoderConfig(32, 32, 64, k=4)), 64, cache=tmp_path) in (
        "float32", "bfloat16", "int8")
    assert len(json.loads((tmp_path / "calibration.json").read_text())) == 1


def test_a_kernel_isa_limit_is_measured_separately(tmp_path, monkeypatch):
    """ONEDNN_MAX_CPU_ISA and the like change what the kernels can use on the same CPU (an AVX2-only
    run on an AVX512-BF16 machine): the cached unrestricted answer must not be reused."""
    tc = Transcoder(TranscoderConfig(32, 32, 64, k=4))
    fastest_latent_choice(tc, 64, cache=tmp_path)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    fastest_latent_choice(tc, 64, cache=tmp_path)
    keys = list(json.loads((tmp_path / "calibration.json").read_text()))
    assert len(keys) == 2 and "ONEDNN_MAX_CPU_ISA=AVX2" in keys[1] and "ONEDNN" not in keys[0]
    assert all(f"kernels {torch.backends.cpu.get_cpu_capability()}" in key for key in keys)
