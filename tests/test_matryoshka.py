"""Matryoshka training (nested prefixes of the latents): each prefix's FVU against a dense float64
reference, training and exact resume, and the settings it refuses."""

import pytest
import torch

import tcwidgets as tcw
from tcwidgets.training import Trainer, TrainingConfig, reconstruction_metrics
from tcwidgets.transcoder import Transcoder

SMALL = dict(n_latents=512, k=16, batch_size=128)


class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def store(lm, tmp_path_factory):
    tokens = tcw.load_corpus("python-docs", lm, context=32, n_tokens=64 * 32)
    return tcw.collect_activations(lm, [1], tokens, out=tmp_path_factory.mktemp("matryoshka"), progress=False)


def dense_prefix_fvu(tc: Transcoder, x: torch.Tensor, y: torch.Tensor, m: int | None) -> float:
    """FVU in float64 with every latent but the chosen ones among the first ``m`` zeroed."""
    c = tc.config
    source = y if c.kind == "sae" else x
    pre = (source.double() * c.input_scale) @ tc.W_enc.detach().double().T + tc.b_enc.detach().double()
    if c.activation == "topk":
        top = pre.topk(c.k, dim=1)
        z = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())
    else:  # batchtopk: the k x tokens largest pre-activations of the batch
        flat = pre.flatten()
        chosen = flat.topk(c.k * len(pre)).indices
        z = torch.zeros_like(flat).index_put((chosen,), flat[chosen].relu()).view_as(pre)
    if m is not None:
        z[:, m:] = 0
    out = z @ tc.W_dec.detach().double() + tc.b_dec.detach().double()
    if c.kind == "skip":
        out = out + (source.double() * c.input_scale) @ tc.W_skip.detach().double().T
    error = y.double() - out / c.output_scale
    return float(error.square().sum() / (y.double() - y.double().mean(0)).square().sum())


@pytest.mark.parametrize("kind, activation", [("transcoder", "topk"), ("skip", "batchtopk"), ("sae", "topk")])
def test_each_prefix_fvu_equals_a_dense_computation_with_the_other_latents_zeroed(store, kind, activation):
    config = TrainingConfig(**SMALL, kind=kind, activation=activation, matryoshka=(32, 128, 512),
                            auxk_coefficient=0)
    trainer = Trainer(store, 1, config, low_precision=False, progress=False)
    # train a little, so the weights are not the initial ones: 12 steps, as a skip transcoder starts at its
    # least-squares fit and its latents, on the small residual, need them before more latents do better
    for x, y in store.batches(1, 128, epochs=1):
        trainer.train_batch(x, y)
        if trainer.step == 12:
            break
    x, y = next(store.batches(1, 128, seed=9))
    source = y if kind == "sae" else x
    variance = (y - y.mean(0)).square().sum()
    result = trainer.objective(source, y, variance, torch.zeros(0, dtype=torch.long), 0.0)

    assert set(result.prefix_fvus) == {32, 128}, "the whole width (512) is the plain FVU, counted once"
    for m, fvu in result.prefix_fvus.items():
        assert float(fvu.detach()) == pytest.approx(dense_prefix_fvu(trainer.transcoder, x, y, m), rel=1e-4)
    assert float(result.fvu.detach()) == pytest.approx(dense_prefix_fvu(trainer.transcoder, x, y, None), rel=1e-4)
    assert float(result.loss.detach()) == pytest.approx(float(result.fvu.detach()) + sum(float(v.detach()) for v in result.prefix_fvus.values()),
                                               rel=1e-6)
    assert result.prefix_fvus[32] > result.prefix_fvus[128] > result.fvu


def test_matryoshka_training_teaches_the_first_prefix_to_reconstruct_and_resumes_bit_for_bit(store, tmp_path):
    config = TrainingConfig(**SMALL, epochs=2, matryoshka=(64, 256), dead_window=512)
    reference = Trainer(store, 1, config, log_every=4, progress=False)
    tc = reference.fit()
    first, last = reference.history[0], reference.history[-1]
    assert {"fvu_64", "fvu_256"} <= set(last)
    assert last["fvu_64"] < first["fvu_64"] and last["fvu_64"] > last["fvu_256"] > last["fvu"]
    plain = Trainer(store, 1, TrainingConfig(**SMALL, epochs=2, dead_window=512), progress=False).fit()
    x, y = store.layer(1)
    nested, flat = (dense_prefix_fvu(t, x, y, 64) for t in (tc, plain))
    assert nested < 0.97 * flat, "the first 64 latents of a Matryoshka run reconstruct better than a plain run's"
    assert reconstruction_metrics(tc, store)["fvu"] < 1.5 * reconstruction_metrics(plain, store)["fvu"]

    def interrupt(trainer, record):
        if trainer.step == 20:
            raise Interrupted

    with pytest.raises(Interrupted):
        Trainer(store, 1, config, checkpoint_dir=tmp_path, checkpoint_every=8, log_every=4, callback=interrupt,
                progress=False).fit()
    resumed = Trainer(store, 1, config, checkpoint_dir=tmp_path, checkpoint_every=8, log_every=4, progress=False)
    assert resumed.step == 16 and resumed.config.matryoshka == (64, 256)
    result = resumed.fit()
    for name, value in tc.state_dict().items():
        assert torch.equal(result.state_dict()[name], value), name
    assert resumed.history == reference.history
    with pytest.raises(ValueError, match="other settings.*matryoshka: checkpoint \\(64, 256\\), now None"):
        Trainer(store, 1, TrainingConfig(**SMALL, epochs=2, dead_window=512), checkpoint_dir=tmp_path, progress=False)


@pytest.mark.parametrize("options, message", [
    (dict(activation="relu", matryoshka=(64,)), "needs activation='topk' or 'batchtopk'"),
    (dict(matryoshka=(256, 64)), "strictly increasing"),
    (dict(matryoshka=(64, 64)), "strictly increasing"),
    (dict(matryoshka=()), "positive integers"),
    (dict(matryoshka=(0, 64)), "positive integers"),
    (dict(n_latents=512, matryoshka=(64, 1024)), "cannot be wider than n_latents=512"),
])
def test_bad_matryoshka_settings_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        TrainingConfig(**options)


def test_a_prefix_wider_than_the_default_width_is_refused(store):
    with pytest.raises(ValueError, match="cannot be wider than n_latents=4608"):  # 8 x 576
        Trainer(store, 1, TrainingConfig(matryoshka=(128, 5000)), progress=False)
