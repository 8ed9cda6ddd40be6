"""The bfloat16 latent choice is measured once per machine and shape, then read from the cache."""

import json

import torch

from tcwidgets.calibration import low_precision_pays
from tcwidgets.transcoder import Transcoder, TranscoderConfig


def test_measured_once_then_read_from_the_cache(tmp_path):
    tc = Transcoder(TranscoderConfig(64, 64, 256, k=8))
    choice = low_precision_pays(tc, 128, cache=tmp_path)
    path = tmp_path / "calibration.json"
    (key, entry), = json.loads(path.read_text()).items()
    assert "128x64x256" in key and f"torch {torch.__version__}" in key
    assert entry["low_precision"] == choice == (entry["seconds"]["bfloat16"] < entry["seconds"]["float32"])
    # the cached answer is the one used: flip it and ask again
    path.write_text(json.dumps({key: dict(entry, low_precision=not choice)}))
    assert low_precision_pays(tc, 128, cache=tmp_path) is (not choice)
    # another shape is measured and added
    low_precision_pays(tc, 256, cache=tmp_path)
    assert len(json.loads(path.read_text())) == 2


def test_an_unreadable_cache_is_measured_again(tmp_path):
    (tmp_path / "calibration.json").write_text("{not json")
    assert low_precision_pays(Transcoder(TranscoderConfig(32, 32, 64, k=4)), 64, cache=tmp_path) in (True, False)
    assert len(json.loads((tmp_path / "calibration.json").read_text())) == 1


def test_a_kernel_isa_limit_is_measured_separately(tmp_path, monkeypatch):
    """ONEDNN_MAX_CPU_ISA and the like change what the kernels can use on the same CPU (an AVX2-only
    run on an AVX512-BF16 machine): the cached unrestricted answer must not be reused."""
    tc = Transcoder(TranscoderConfig(32, 32, 64, k=4))
    low_precision_pays(tc, 64, cache=tmp_path)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    low_precision_pays(tc, 64, cache=tmp_path)
    keys = list(json.loads((tmp_path / "calibration.json").read_text()))
    assert len(keys) == 2 and "ONEDNN_MAX_CPU_ISA=AVX2" in keys[1] and "ONEDNN" not in keys[0]
    assert all(f"kernels {torch.backends.cpu.get_cpu_capability()}" in key for key in keys)
