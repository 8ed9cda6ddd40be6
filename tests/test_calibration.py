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
