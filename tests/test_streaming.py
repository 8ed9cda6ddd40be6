"""Streaming training: activations computed by the model as training consumes them, through a
bounded shuffle buffer, against store-based training on the same tokens."""

import pytest
import torch

import tcwidgets as tcw
from tcwidgets.streaming import ActivationStream, train_streaming
from tcwidgets.training import Trainer, TrainingConfig, _take, reconstruction_metrics, train_transcoder

SMALL = dict(n_latents=512, k=16, batch_size=128, epochs=2)


@pytest.fixture(scope="module")
def tokens(lm):
    return tcw.load_corpus("python-docs", lm, context=32, n_tokens=64 * 32)


@pytest.fixture(scope="module")
def store(lm, tokens):
    return tcw.collect_activations(lm, [1], tokens, progress=False)


@pytest.fixture(scope="module")
def test_store(lm):
    tokens = tcw.load_corpus("python-docs", lm, context=32, n_tokens=32 * 32, split="test")
    return tcw.collect_activations(lm, [1], tokens, progress=False)


def test_every_token_is_handed_out_once_per_epoch_and_batches_are_mixed(lm, tokens, store):
    stream = ActivationStream(lm, [1], tokens, buffer_tokens=512, forward_batch=8)
    batches = list(stream.batches(1, 128, seed=3))
    assert len(batches) == stream.n_batches(128) == len(tokens) * 32 // 128
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    x_store, y_store = store.layer(1)
    # the same rows as the store's (the model's own activations), each once, in another order
    for mine, theirs in ((x, x_store), (y, y_store)):
        assert torch.allclose(mine.sum(0), theirs.sum(0), rtol=1e-4, atol=1e-3)
        assert torch.allclose(mine.norm(dim=1).sort().values, theirs.norm(dim=1).sort().values, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(x[:128], x_store[:128])
    # a batch mixes many contexts: its rows' nearest store rows are spread over the corpus
    nearest = torch.cdist(x[:128], x_store).argmin(1) // 32
    assert len(nearest.unique()) > 16
    assert torch.equal(torch.cat([b[0] for b in stream.batches(1, 128, seed=3)]), x)  # deterministic


def test_streaming_matches_store_based_training_on_the_same_tokens(lm, tokens, store, test_store):
    streamed = train_streaming(lm, 1, tokens, buffer_tokens=1024, progress=False, **SMALL)
    stored = train_transcoder(store, 1, progress=False, **SMALL)
    a, b = reconstruction_metrics(streamed, test_store), reconstruction_metrics(stored, test_store)
    # no worse than 2% (measured: 0.114 streamed, 0.119 from the store; the batches and the
    # initialisation sample differ, the tokens are the same)
    assert a["fvu"] <= 1.02 * b["fvu"], (a, b)
    assert a["dead_fraction"] <= b["dead_fraction"] + 0.02
    assert streamed.config.site == stored.config.site


def test_streaming_resumes_bit_for_bit(lm, tokens, tmp_path):
    options = dict(buffer_tokens=512, progress=False, **SMALL)
    whole = train_streaming(lm, [1], tokens, **options)[1]
    # an interrupted run: 5 steps, then a checkpoint
    stream = ActivationStream(lm, [1], tokens, buffer_tokens=512, sample_tokens=16384, sample_seed=1)
    trainer = Trainer(stream, 1, TrainingConfig(**SMALL), progress=False, checkpoint_dir=tmp_path / "layer-1")
    for x, y in _take(stream.batches(1, SMALL["batch_size"], seed=0, epochs=2), 5):
        trainer.train_batch(x, y)
    trainer.save_checkpoint()
    resumed = train_streaming(lm, [1], tokens, checkpoint_dir=tmp_path, **options)[1]
    for name, value in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name


def test_streaming_refuses_data_parallel_splits_and_unknown_layers(lm, tokens):
    stream = ActivationStream(lm, [1], tokens)
    with pytest.raises(ValueError, match="data-parallel"):
        next(stream.batches(1, 128, part=(0, 2)))
    with pytest.raises(KeyError, match="not streamed"):
        stream.sites(3)
