"""Files: every file kind either reads back exactly what was written or raises the package's own error
(seeded fuzzing: truncations and bit flips), identities that cannot be confused, a lock around
collection, manifest paths confined to their folder."""

import copy
import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

import tcwidgets as tcw
from tcwidgets import files
from tcwidgets.activations import ActivationStore, StoreError
from tcwidgets.features import FORMAT as STATS_FORMAT, FeatureStats
from tcwidgets.files import FileFormatError
from tcwidgets.models import fingerprint
from tcwidgets.training import Trainer, TrainingConfig
from tcwidgets.transcoder import Transcoder, TranscoderConfig

TRIALS = 120


def damage(folder: Path, rng: random.Random) -> str:
    """Truncate one file of ``folder`` (at a random length) or flip 1 to 8 random bits in it; returns
    what was done."""
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != ".lock")
    path = rng.choice(paths)
    data = bytearray(path.read_bytes())
    if rng.random() < 0.3 or not data:
        size = rng.randrange(len(data)) if data else 0
        path.write_bytes(bytes(data[:size]))
        return f"{path.relative_to(folder)} truncated to {size} bytes"
    flips = [rng.randrange(8 * len(data)) for _ in range(rng.randint(1, 8))]
    for bit in flips:
        data[bit // 8] ^= 1 << (bit % 8)
    path.write_bytes(bytes(data))
    return f"{path.relative_to(folder)} bits {flips} flipped"


def fuzz(pristine: Path, tmp_path: Path, read, seed: int) -> dict[str, int]:
    """Damage copies of ``pristine`` ``TRIALS`` times; ``read(folder)`` must raise a `FileFormatError`
    or return what ``read(pristine)`` returns. Returns how the trials ended."""
    expected = read(pristine)
    rng = random.Random(seed)
    outcomes = {"refused": 0, "identical": 0}
    for trial in range(TRIALS):
        folder = tmp_path / f"trial-{trial}"
        shutil.copytree(pristine, folder)
        what = damage(folder, rng)
        try:
            got = read(folder)
        except FileFormatError:
            outcomes["refused"] += 1
        except Exception as error:  # anything else is a failure: raw errors must not escape
            raise AssertionError(f"trial {trial} ({what}): {type(error).__name__}: {error}") from error
        else:
            assert equal(got, expected), f"trial {trial} ({what}) returned other data without an error"
            outcomes["identical"] += 1
        shutil.rmtree(folder)
    assert outcomes["refused"] > TRIALS // 2  # most damage must be caught, not only harmless flips
    return outcomes


def equal(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True)
    return type(a) is type(b) and a == b


# ---- activation stores ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_store(lm, tmp_path_factory) -> ActivationStore:
    tokens = torch.randint(0, 49152, (4, 6), generator=torch.Generator().manual_seed(1))
    return tcw.collect_activations(lm, [1, 2], tokens, out=tmp_path_factory.mktemp("store"), batch_size=2,
                                   dtype="bfloat16", progress=False)


def read_store(folder: Path) -> dict:
    store = ActivationStore.open(folder)
    return {"manifest": store.manifest, "tokens": store.tokens, "identity": store.identity,
            **{f"layer {layer}": store.layer(layer) for layer in store.layers},
            **{f"stats {layer}": asdict(store.stats(layer)) for layer in store.layers}}


def test_fuzzed_stores_are_refused_or_read_exactly(tiny_store, tmp_path):
    print(fuzz(tiny_store.root, tmp_path, read_store, seed=1))


def test_a_flipped_byte_in_a_shard_is_found_on_read_and_by_verify(tiny_store, tmp_path):
    shutil.copytree(tiny_store.root, tmp_path / "store")
    shard = tmp_path / "store" / "shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-40:-24] = bytes(16)  # 16 bytes of tensor data
    shard.write_bytes(bytes(data))
    store = ActivationStore.open(tmp_path / "store")  # opening reads headers only
    with pytest.raises(StoreError, match="shard-00000.safetensors is corrupted: its bytes do not match the checksum"):
        store.layer(1)
    with pytest.raises(StoreError, match="shard-00000.safetensors is corrupted"):
        ActivationStore.open(tmp_path / "store").verify()


def edit_manifest(folder: Path, edit, *, reseal: bool = True) -> None:
    """Change a store's manifest: as an editor that recomputes the seal would, or (``reseal=False``) by hand."""
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    if reseal:
        files.write_manifest(path, manifest)
    else:
        path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("change", [100, -6, -18])
def test_a_manifest_whose_token_count_disagrees_with_the_shards_is_refused(lm, tiny_store, tmp_path, change):
    shutil.copytree(tiny_store.root, tmp_path / "store")
    edit_manifest(tmp_path / "store", lambda m: m.update(n_tokens=m["n_tokens"] + change), reseal=False)
    with pytest.raises(StoreError, match="manifest.json was edited or corrupted"):
        ActivationStore.open(tmp_path / "store")
    edit_manifest(tmp_path / "store", lambda m: None)
    with pytest.raises(StoreError, match=f"inconsistent: its shards hold 24 tokens, its manifest says "
                                         f"n_tokens={24 + change}"):
        ActivationStore.open(tmp_path / "store")
    with pytest.raises(StoreError, match="inconsistent"):  # the same request does not return the tampered store
        tcw.collect_activations(lm, [1, 2], tiny_store.tokens, out=tmp_path / "store", batch_size=2,
                                dtype="bfloat16", progress=False)


def test_a_manifest_cannot_name_files_outside_the_store(tiny_store, tmp_path):
    shutil.copytree(tiny_store.root, tmp_path / "store")
    shutil.copy(tiny_store.root / "shard-00000.safetensors", tmp_path / "outside.safetensors")
    edit_manifest(tmp_path / "store", lambda m: m["shards"][0].update(file="../outside.safetensors"))
    with pytest.raises(StoreError, match="names the file '../outside.safetensors', which is outside its folder"):
        ActivationStore.open(tmp_path / "store")


def test_a_store_written_before_checksums_still_opens(lm, tiny_store, tmp_path):
    """Version 1 stores (no checksums, fingerprint or seal), like the tutorials' cache of earlier
    versions, open and read the same values, and the same request returns them."""
    shutil.copytree(tiny_store.root, tmp_path / "store")

    def version_1(manifest):
        manifest.update(version=1)
        for key in ("sha256", "model_fingerprint", "tokens"):
            manifest.pop(key)
        for entry in manifest["shards"]:
            entry.pop("sha256")
    edit_manifest(tmp_path / "store", version_1, reseal=False)
    old = ActivationStore.open(tmp_path / "store")
    assert old.identity["model_fingerprint"] is None
    for a, b in zip(old.layer(2), tiny_store.layer(2)):
        assert torch.equal(a, b)
    assert torch.equal(old.tokens, tiny_store.tokens)
    old.verify()
    again = tcw.collect_activations(lm, [1, 2], tiny_store.tokens, out=tmp_path / "store", batch_size=2,
                                    dtype="bfloat16", progress=False)
    assert again.manifest["version"] == 1  # returned as it is, not collected again


# ---- identities ----------------------------------------------------------------------------------------------

def tiny_llama(lm, seed: int):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=lm.config.vocab_size, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2)
    return tcw.load_model(transformers.LlamaForCausalLM(config), tokenizer=lm.tokenizer)


def test_a_model_is_known_by_its_weights_not_only_its_name(lm, tmp_path):
    first, second = tiny_llama(lm, 0), tiny_llama(lm, 1)
    assert first.name == second.name == "LlamaForCausalLM"
    assert fingerprint(first) != fingerprint(second)
    assert fingerprint(first) == fingerprint(tiny_llama(lm, 0))  # the same weights in another object
    tokens = torch.randint(0, 49152, (2, 4))
    tcw.collect_activations(first, [1], tokens, out=tmp_path, progress=False)
    with pytest.raises(StoreError, match="other model weights \\(the same name, different parameters\\)"):
        tcw.collect_activations(second, [1], tokens, out=tmp_path, progress=False)


# ---- the lock --------------------------------------------------------------------------------------------------

COLLECT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import torch
    import tcwidgets as tcw
    lm = tcw.load_model()
    tokens = torch.randint(0, 49152, (8, 16), generator=torch.Generator().manual_seed(0))
    out, me = Path(sys.argv[1]), sys.argv[2]
    (out.parent / f"ready-{me}").touch()
    while not (out.parent / "go").exists():
        time.sleep(0.005)
    store = tcw.collect_activations(lm, [3], tokens, out=out, batch_size=2, progress=False)
    torch.save(store.layer(3)[1], out.parent / f"result-{me}.pt")
""")


def test_two_processes_starting_the_same_store_take_turns(tmp_path):
    out = tmp_path / "store"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    processes = [subprocess.Popen([sys.executable, "-c", COLLECT, str(out), name], env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for name in ("a", "b")]
    try:
        start = time.monotonic()
        while not all((tmp_path / f"ready-{name}").exists() for name in ("a", "b")):  # both loaded the model
            assert all(p.poll() is None for p in processes), [p.communicate() for p in processes]
            assert time.monotonic() - start < 300
            time.sleep(0.01)
        (tmp_path / "go").touch()
        results = [p.communicate(timeout=300) for p in processes]
    finally:
        for p in processes:
            p.kill()
    assert all(p.returncode == 0 for p in processes), results
    waited = [name for name, (_, stderr) in zip("ab", results) if "Waiting for another process" in stderr]
    assert len(waited) == 1, results  # one collected, the other waited, then read the finished store
    a, b = (torch.load(tmp_path / f"result-{name}.pt") for name in "ab")
    assert torch.equal(a, b)
    store = ActivationStore.open(out)
    store.verify()
    assert len(store.manifest["shards"]) == store.manifest["n_shards"]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".") and p.name != ".lock") == []


# ---- transcoders ---------------------------------------------------------------------------------------------

def test_fuzzed_transcoders_are_refused_or_read_exactly(tmp_path):
    torch.manual_seed(0)
    tc = Transcoder(TranscoderConfig(d_in=8, d_out=8, n_latents=16, kind="skip", activation="jumprelu",
                                     site={"model": "m", "layer": 1}))
    tc.save(tmp_path / "pristine")

    def read(folder):
        loaded = Transcoder.load(folder)
        return {"config": loaded.config.to_dict(), "weights": dict(loaded.state_dict())}
    print(fuzz(tmp_path / "pristine", tmp_path, read, seed=2))


def test_one_flipped_bit_in_transcoder_weights_is_refused(tmp_path):
    Transcoder(TranscoderConfig(d_in=8, d_out=8, n_latents=16, k=4)).save(tmp_path)
    weights = tmp_path / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(tcw.transcoder.TranscoderFileError, match="weights.safetensors is corrupted"):
        Transcoder.load(tmp_path)


def test_a_transcoder_saved_before_checksums_still_loads(tmp_path):
    tc = Transcoder(TranscoderConfig(d_in=8, d_out=8, n_latents=16, k=4, schema_version=1))
    tc.save(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["weights"], config["sha256"]
    (tmp_path / "config.json").write_text(json.dumps(config))  # as version 1 wrote it
    loaded = Transcoder.load(tmp_path)
    assert loaded.config == tc.config
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), tc.state_dict().values()))


# ---- feature statistics ---------------------------------------------------------------------------------------

def test_fuzzed_feature_stats_are_refused_or_read_exactly(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"count": rng.integers(0, 9, 6), "max": rng.random(6, dtype=np.float32),
              "top_index": rng.integers(-1, 20, (6, 3)).astype(np.int64), "tokens": rng.integers(0, 9, (2, 10), dtype=np.int32)}
    meta = {"format": STATS_FORMAT, "version": 2, "model": "m", "n_latents": 6, "n_tokens": 20,
            "fingerprint": "f" * 64, "transcoder": {}, "settings": {"window": [2, 1]}}
    FeatureStats(meta, arrays, vocab=[f"tok{i}" for i in range(9)]).save(tmp_path / "pristine")

    def read(folder):
        stats = FeatureStats.load(folder)
        return {"meta": stats.meta, "vocab": stats.vocab, **{name: np.array(stats._arrays[name]) for name in arrays}}
    print(fuzz(tmp_path / "pristine", tmp_path, read, seed=3))


# ---- training checkpoints ---------------------------------------------------------------------------------------

def test_fuzzed_checkpoints_are_refused_or_resume_exactly(tiny_store, tmp_path):
    config = TrainingConfig(n_latents=16, k=4, batch_size=6)
    trainer = Trainer(tiny_store, 1, config, checkpoint_dir=tmp_path / "pristine", checkpoint_every=2, progress=False)
    trainer.fit()
    start = Trainer(tiny_store, 1, config, progress=False).transcoder  # skips the initialisation in each trial

    def read(folder):
        resumed = Trainer(tiny_store, 1, config, transcoder=copy.deepcopy(start), checkpoint_dir=folder,
                          progress=False)
        return {"step": resumed.step, "history": resumed.history, "weights": dict(resumed.transcoder.state_dict()),
                "optimizer": resumed.optimizer.state_dict()["state"], "fired": resumed.tokens_since_fired}
    print(fuzz(tmp_path / "pristine", tmp_path, read, seed=4))
