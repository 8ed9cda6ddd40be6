"""ActivationStore: on-disk format, resume, shuffled batches, statistics and bad input."""

import json

import numpy as np
import pytest
import torch

import tcwidgets as tcw
from tcwidgets import activations
from tcwidgets.activations import LayerNotInStoreError, StoreError

from stores import rewrite_shard


@pytest.fixture(scope="module")
def tokens(lm):
    return tcw.load_corpus("python-docs", lm, context=32, n_tokens=24 * 32)


@pytest.fixture(scope="module")
def small_shards():
    """Shards of 4 contexts (at batch_size=2), so a small collection spans several files."""
    saved = activations.SHARD_BYTES
    activations.SHARD_BYTES = 4 * 32 * 2 * 2 * 576 * 4
    yield
    activations.SHARD_BYTES = saved


@pytest.fixture(scope="module")
def store(lm, tokens, tmp_path_factory, small_shards):
    return tcw.collect_activations(lm, [1, 3], tokens, out=tmp_path_factory.mktemp("acts"), batch_size=2,
                                   progress=False)


def test_disk_store_equals_memory_store_and_manifest_describes_it(lm, tokens, store):
    memory = tcw.collect_activations(lm, [1, 3], tokens, progress=False)
    for layer in (1, 3):
        for a, b in zip(store.layer(layer), memory.layer(layer)):
            assert torch.equal(a, b)
    manifest = json.loads((store.root / "manifest.json").read_text())
    assert manifest["model"] == "smollm2-135m" and manifest["layers"] == [1, 3]
    assert manifest["n_tokens"] == tokens.numel() == store.n_tokens and manifest["dtype"] == "float32"
    assert manifest["sites"]["3"] == {"input": "model.layers.3.mlp.input", "output": "model.layers.3.mlp.output"}
    assert len(manifest["shards"]) == 6 and manifest["complete"]
    assert torch.equal(store.tokens, tokens)


def test_statistics_equal_a_direct_computation(store):
    for layer in (1, 3):
        x, y = store.layer(layer)
        stats = store.stats(layer)
        torch.testing.assert_close(stats.in_mean, x.double().mean(0).float())
        torch.testing.assert_close(stats.out_mean, y.double().mean(0).float())
        assert stats.in_norm == pytest.approx(x.double().norm(dim=1).mean().item(), rel=1e-9)
        assert stats.out_norm == pytest.approx(y.double().norm(dim=1).mean().item(), rel=1e-9)


def test_batches_visit_every_row_once_per_epoch_in_a_shuffled_deterministic_order(store):
    x_all, y_all = store.layer(3)
    rows_of: dict[tuple, list[int]] = {}  # identical rows (every context's BOS position) share a key
    for i, row in enumerate(x_all):
        rows_of.setdefault(tuple(row[:8].tolist()), []).append(i)
    seen = []
    for x, y in store.batches(3, batch_size=64, seed=5):
        index = [rows_of[tuple(row[:8].tolist())].pop() for row in x]
        assert torch.equal(y, y_all[index]), "inputs and outputs stay paired"
        seen.extend(index)
    assert sorted(seen) == list(range(store.n_tokens))
    assert seen != sorted(seen)
    assert max(seen[:64]) - min(seen[:64]) > store.n_tokens // 2, "a batch mixes rows from across shards"
    again = [x for x, _ in store.batches(3, batch_size=64, seed=5)]
    other = [x for x, _ in store.batches(3, batch_size=64, seed=6)]
    assert all(torch.equal(a, b) for a, (b, _) in zip(again, store.batches(3, batch_size=64, seed=5)))
    assert not torch.equal(again[0], other[0])


def test_start_skips_batches_exactly_across_epochs(store):
    full = [x for x, _ in store.batches(1, batch_size=100, epochs=3, seed=2)]
    assert len(full) == store.n_batches(100, epochs=3) == 3 * (store.n_tokens // 100)
    resumed = [x for x, _ in store.batches(1, batch_size=100, epochs=3, seed=2, start=10)]
    assert len(resumed) == len(full) - 10
    assert all(torch.equal(a, b) for a, b in zip(full[10:], resumed))
    assert not torch.equal(full[0], full[len(full) // 3]), "each epoch has its own permutation"


def test_unshuffled_batches_are_in_corpus_order(store):
    x_all, _ = store.layer(1)
    x, _ = next(store.batches(1, batch_size=50, shuffle=False, start=3))
    assert torch.equal(x, x_all[150:200])


def _row_finder(store, layer, rows):
    """Look up a batch's rows by value among ``rows`` of the full store (each found once)."""
    x_all, y_all = store.layer(layer)
    rows_of: dict[tuple, list[int]] = {}
    for i in rows:
        rows_of.setdefault(tuple(x_all[i, :8].tolist()), []).append(i)

    def find(x, y):
        index = [rows_of[tuple(row[:8].tolist())].pop() for row in x]  # KeyError: a row not among ``rows``
        assert torch.equal(y, y_all[index]), "inputs and outputs stay paired"
        return index
    return find


@pytest.mark.parametrize("shuffle", ["global", "context", "document"])
def test_a_view_without_position_0_hands_out_every_other_row_once_per_epoch(store, shuffle):
    view = store.without_positions()
    kept = [i for i in range(store.n_tokens) if i % 32]
    assert view.n_tokens == len(kept) == 24 * 31 and store.n_tokens == 24 * 32
    assert view.n_batches(62, epochs=2) == 24
    batches = list(view.batches(3, batch_size=62, shuffle=shuffle, seed=4, epochs=2))
    assert len(batches) == 24
    for epoch in (batches[:12], batches[12:]):
        find = _row_finder(store, 3, kept)  # position-0 rows are not in it: handing one out fails
        seen = [i for x, y in epoch for i in find(x, y)]
        assert sorted(seen) == kept
    resumed = list(view.batches(3, batch_size=62, shuffle=shuffle, seed=4, epochs=2, start=15))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches[15:], resumed))
    x, y = view.sample(3, 100, seed=1)
    _row_finder(store, 3, kept)(x, y)


def test_a_view_without_positions_reads_and_counts_only_the_rows_it_keeps(store):
    view = store.without_positions([0]).without_positions([5])
    assert view.left_out == (0, 5) and view.n_tokens == 24 * 30
    keep = torch.tensor([i % 32 not in (0, 5) for i in range(store.n_tokens)])
    for layer in (1, 3):
        x_all, y_all = store.layer(layer)
        x, y = view.layer(layer)
        assert torch.equal(x, x_all[keep]) and torch.equal(y, y_all[keep])
        stats = view.stats(layer)
        torch.testing.assert_close(stats.in_mean, x.double().mean(0).float())
        torch.testing.assert_close(stats.out_mean, y.double().mean(0).float())
        assert stats.in_norm == pytest.approx(x.double().norm(dim=1).mean().item(), rel=1e-6)
        assert stats.out_norm == pytest.approx(y.double().norm(dim=1).mean().item(), rel=1e-6)
    assert view.identity["positions_left_out"] == [0, 5] and store.identity["positions_left_out"] == []
    assert "without positions [0, 5]" in repr(view)
    tc = tcw.train_transcoder(view, 3, n_latents=64, k=4, batch_size=120, progress=False)
    assert tc.config.input_scale == pytest.approx(576 ** 0.5 / view.stats(3).in_norm)
    for bad in ([32], [-1], range(32)):
        with pytest.raises(ValueError, match="positions"):
            store.without_positions(bad)


def test_interrupted_collection_resumes_without_duplicates(lm, tokens, store, tmp_path, small_shards, monkeypatch):
    real, calls = activations.trace_mlp, []

    def interrupted_after_five(*args):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(activations, "trace_mlp", interrupted_after_five)
    with pytest.raises(KeyboardInterrupt):
        tcw.collect_activations(lm, [1, 3], tokens, out=tmp_path, batch_size=2, progress=False)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert not manifest["complete"] and [s["start"] for s in manifest["shards"]] == [0, 128]
    assert not list(tmp_path.glob("*.tmp")), "no half-written file is left behind"
    with pytest.raises(StoreError, match="interrupted.*resume"):
        tcw.ActivationStore.open(tmp_path)

    calls.clear()
    monkeypatch.setattr(activations, "trace_mlp", lambda *args: (calls.append(1), real(*args))[1])
    resumed = tcw.collect_activations(lm, [1, 3], tokens, out=tmp_path, batch_size=2, progress=False)
    assert len(calls) == 8, "only the four missing shards (two batches each) are traced again"
    assert [s["start"] for s in resumed.manifest["shards"]] == [0, 128, 256, 384, 512, 640]
    for layer in (1, 3):
        for a, b in zip(resumed.layer(layer), store.layer(layer)):
            assert torch.equal(a, b)
    calls.clear()
    tcw.collect_activations(lm, [1, 3], tokens, out=tmp_path, batch_size=2, progress=False)
    assert not calls, "a complete store is reopened, not collected again"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_storage(lm, dtype):
    tokens = torch.randint(0, 49152, (2, 8))
    half = tcw.collect_activations(lm, [2], tokens, dtype=dtype, progress=False)
    full = tcw.collect_activations(lm, [2], tokens, progress=False)
    x_half, y_half = half.layer(2)
    assert x_half.dtype == torch.float32
    torch.testing.assert_close(x_half, full.layer(2)[0].to(getattr(torch, dtype)).float(), rtol=0, atol=0)


def test_half_precision_on_disk_maps_back(lm, tmp_path):
    tokens = torch.randint(0, 49152, (2, 8))
    disk = tcw.collect_activations(lm, [2], tokens, dtype="bfloat16", out=tmp_path, progress=False)
    memory = tcw.collect_activations(lm, [2], tokens, dtype="bfloat16", progress=False)
    assert torch.equal(disk.layer(2)[1], memory.layer(2)[1])
    assert next(disk.batches(2, batch_size=4))[0].dtype == torch.float32


def test_truncated_or_corrupted_shards_give_a_clear_error(lm, tmp_path):
    tokens = torch.randint(0, 49152, (4, 8))
    store = tcw.collect_activations(lm, [2], tokens, out=tmp_path, progress=False)
    shard = store.root / store.manifest["shards"][0]["file"]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreError, match="shard-00000.safetensors is truncated or corrupted.*collect_activations"):
        tcw.ActivationStore.open(tmp_path)
    shard.write_bytes(b"\xff" * 16 + data[16:])
    with pytest.raises(StoreError, match="truncated or corrupted"):
        tcw.ActivationStore.open(tmp_path)
    shard.unlink()
    with pytest.raises(StoreError, match="missing"):
        tcw.ActivationStore.open(tmp_path)


def test_non_finite_values_are_found_by_verify(lm, tmp_path):
    tokens = torch.randint(0, 49152, (2, 8))
    store = tcw.collect_activations(lm, [2], tokens, out=tmp_path, progress=False)
    store.verify()
    rewrite_shard(tmp_path, lambda tensors: tensors["2.output"].view(-1)[5 * 576 + 7].fill_(float("nan")))
    with pytest.raises(StoreError, match="shard-00000.safetensors \\(layer 2\\) holds a non-finite output value "
                                         "\\(nan\\) at token 5"):
        tcw.ActivationStore.open(tmp_path).verify()


def test_a_store_that_does_not_match_the_request(lm, tokens, store):
    with pytest.raises(StoreError, match="layers: stored \\[1, 3\\], asked \\[2\\].*another out="):
        tcw.collect_activations(lm, [2], tokens, out=store.root, progress=False)
    with pytest.raises(StoreError, match="different tokens"):
        tcw.collect_activations(lm, [1, 3], tokens.flip(0), out=store.root, batch_size=2, progress=False)
    with pytest.raises(LayerNotInStoreError, match="Layer 7 is not in this store \\(it holds layers \\[1, 3\\]"):
        store.layer(7)
    with pytest.raises(KeyError):
        next(store.batches(7))
    with pytest.raises(StoreError, match="holds activations of 'smollm2-135m', not 'gpt2'"):
        tcw.ActivationStore.open(store.root, model="gpt2")
    with pytest.raises(StoreError, match="not an activation store"):
        tcw.ActivationStore.open(store.root / "nowhere")


def test_bad_collection_requests(lm):
    with pytest.raises(ValueError, match="non-empty \\[n_contexts, context\\]"):
        tcw.collect_activations(lm, [1], torch.zeros(0, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="longer than smollm2-135m allows \\(8192\\)"):
        tcw.collect_activations(lm, [1], torch.zeros(1, 9000, dtype=torch.long))
    with pytest.raises(ValueError, match="outside smollm2-135m's vocabulary"):
        tcw.collect_activations(lm, [1], torch.full((1, 8), 60_000))
    with pytest.raises(ValueError, match="layers is empty"):
        tcw.collect_activations(lm, [], torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="dtype='int8'"):
        tcw.collect_activations(lm, [1], torch.zeros(1, 8, dtype=torch.long), dtype="int8")
