"""Joint fine-tuning: it lowers the all-layers KL that `evaluate` measures on held-out text, leaves the
given transcoders alone, and resumes from a checkpoint bit for bit; per-layer transcoders and a
cross-layer transcoder, the latter also against plain forward hooks that splice it by hand in float64."""

import json

import pytest
import torch

import tcwidgets as tcw
from tcwidgets.features import transcoder_fingerprint
from tcwidgets.files import FileFormatError

from test_crosslayer import hooked_logits, weights

LAYERS = [2, 5]
SETTINGS = dict(batch_size=4, lr=1e-3)


@pytest.fixture(scope="module")
def store(lm):
    return tcw.collect_activations(lm, LAYERS, tcw.load_corpus("python-docs", lm, context=64, n_tokens=32 * 64),
                                   progress=False)


@pytest.fixture(scope="module")
def setup(lm, store):
    """Two small transcoders trained alone on a few thousand tokens, plus training and held-out contexts."""
    train = tcw.load_corpus("python-docs", lm, context=32, n_tokens=32 * 32)
    held_out = tcw.load_corpus("python-docs", lm, context=32, n_tokens=8 * 32, split="test")
    transcoders = tcw.train_transcoder(store, LAYERS, n_latents=256, k=8, progress=False)
    return transcoders, train, held_out


@pytest.fixture(scope="module")
def tuned(setup, lm, tmp_path_factory):
    transcoders, train, _ = setup
    fingerprints = {layer: transcoder_fingerprint(tc) for layer, tc in transcoders.items()}
    tuner = tcw.JointFineTuner(lm, transcoders, train, tcw.FineTuneConfig(**SETTINGS), log_every=1,
                               checkpoint_dir=tmp_path_factory.mktemp("full"), checkpoint_every=2, progress=False)
    result = tuner.fit()
    return tuner, result, fingerprints


def test_finetuning_lowers_the_all_layers_kl(setup, tuned, lm):
    transcoders, _, held_out = setup
    tuner, result, fingerprints = tuned
    before = tcw.evaluate(lm, transcoders, held_out, progress=False)
    after = tcw.evaluate(lm, result, held_out, progress=False)
    assert after.kl_all < 0.95 * before.kl_all, (before.kl_all, after.kl_all)  # measured: 0.847 -> 0.781
    assert after.ce_all_spliced < before.ce_all_spliced, (before.ce_all_spliced, after.ce_all_spliced)
    print(f"held-out KL, all layers spliced: {before.kl_all:.4f} -> {after.kl_all:.4f}; CE "
          f"{before.ce_all_spliced:.4f} -> {after.ce_all_spliced:.4f} (clean {before.ce_clean:.4f}); FVU "
          f"{before.fvu} -> {after.fvu}")
    # the given transcoders are untouched; new objects come back, decoder rows still unit norm
    assert {layer: transcoder_fingerprint(tc) for layer, tc in transcoders.items()} == fingerprints
    assert all(result[layer] is not transcoders[layer] for layer in LAYERS) and list(result) == LAYERS
    for tc in result.values():
        torch.testing.assert_close(tc.W_dec.norm(dim=1), torch.ones(tc.n_latents))
    assert len(tuner.history) == tuner.total_steps == 8
    assert {"kl", "fvu", "loss", "fvu_2", "fvu_5", "l0_2", "l0_5", "lr"} <= set(tuner.history[0])
    assert all(0 < record[f"l0_{layer}"] <= 8 for record in tuner.history for layer in LAYERS)  # TopK, k=8


class Interrupt(Exception):
    pass


def interrupted_and_resumed(lm, transcoders, train, options) -> tcw.JointFineTuner:
    """A run stopped after step 3 (its last checkpoint: step 2), then a tuner resumed from it."""

    def stop_at_three(tuner, record):
        if record["step"] == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        tcw.JointFineTuner(lm, transcoders, train, tcw.FineTuneConfig(**SETTINGS), callback=stop_at_three,
                           **options).fit()
    assert [p.name for p in options["checkpoint_dir"].iterdir()] == ["step-00000002"]
    resumed = tcw.JointFineTuner(lm, transcoders, train, tcw.FineTuneConfig(**SETTINGS), **options)
    assert resumed.step == 2
    return resumed


def test_resume_is_bit_for_bit(setup, tuned, lm, tmp_path):
    transcoders, train, _ = setup
    full, result, _ = tuned
    options = dict(log_every=1, checkpoint_dir=tmp_path, checkpoint_every=2, progress=False)
    resumed = interrupted_and_resumed(lm, transcoders, train, options)
    again = resumed.fit()
    for layer in LAYERS:
        for name, value in result[layer].state_dict().items():
            assert torch.equal(again[layer].state_dict()[name], value), (layer, name)
    assert resumed.history == full.history

    # another run's checkpoint is refused; a corrupted one is named
    with pytest.raises(ValueError, match="another run's checkpoint.*lr"):
        tcw.JointFineTuner(lm, transcoders, train, tcw.FineTuneConfig(**{**SETTINGS, "lr": 5e-4}), **options)
    with pytest.raises(ValueError, match="another run's checkpoint.*tokens"):
        tcw.JointFineTuner(lm, transcoders, train[1:], tcw.FineTuneConfig(**SETTINGS), **options)
    state = tmp_path / "step-00000008" / "state.safetensors"
    state.write_bytes(state.read_bytes()[:-4] + b"xxxx")
    with pytest.raises(FileFormatError, match="corrupted"):
        tcw.JointFineTuner(lm, transcoders, train, tcw.FineTuneConfig(**SETTINGS), **options)
    manifest = json.loads((tmp_path / "step-00000008" / "finetune.json").read_text())
    assert manifest["format"] == "tcwidgets.finetune-checkpoint" and manifest["step"] == 8


def test_bad_arguments(setup, lm):
    transcoders, train, _ = setup
    with pytest.raises(ValueError, match="batch_size=64 contexts is more than the 32"):
        tcw.finetune_transcoders(lm, transcoders, train, batch_size=64, progress=False)
    with pytest.raises(ValueError, match="fvu_coefficient"):
        tcw.FineTuneConfig(fvu_coefficient=-1)
    with pytest.raises(ValueError, match="No transcoders"):
        tcw.finetune_transcoders(lm, {}, train, progress=False)


# ---- a cross-layer transcoder ---------------------------------------------------------------------------


def hooked_kl(lm, clt, tokens, mlp=None) -> float:
    """Next-token KL(clean || every CLT layer replaced by plain forward hooks, in float64), the mean
    over positions ``0 .. context-2``; ``mlp`` as `hooked_logits`'."""
    with torch.no_grad():
        clean = torch.log_softmax(lm._module(tokens).logits[:, :-1].double(), -1)
    spliced = torch.log_softmax(hooked_logits(lm, clt, tokens, spliced=clt.layers, mlp=mlp)[:, :-1].double(), -1)
    return float((clean.exp() * (clean - spliced)).sum(-1).mean())


@pytest.fixture(scope="module")
def clt_tuned(setup, store, lm, tmp_path_factory):
    _, train, _ = setup
    clt = tcw.train_clt(store, LAYERS, n_latents=256, k=8, progress=False)
    before = weights(clt)
    tuner = tcw.JointFineTuner(lm, clt, train, tcw.FineTuneConfig(**SETTINGS), log_every=1,
                               checkpoint_dir=tmp_path_factory.mktemp("clt"), checkpoint_every=2, progress=False)
    return clt, before, tuner, tuner.fit()


def test_finetuning_a_cross_layer_transcoder_lowers_the_all_layers_kl(setup, clt_tuned, lm):
    _, _, held_out = setup
    clt, before, tuner, result = clt_tuned
    kl_before, kl_after = hooked_kl(lm, clt, held_out), hooked_kl(lm, result, held_out)
    assert kl_after < 0.95 * kl_before, (kl_before, kl_after)
    assert tcw.evaluate(lm, result, held_out, progress=False).kl_all == pytest.approx(kl_after, rel=1e-3)
    print(f"held-out KL, every layer of the CLT spliced (forward hooks): {kl_before:.4f} -> {kl_after:.4f}")
    # a new CLT comes back, the given one untouched; decoders still unit norm, the cross-layer writes trained
    assert isinstance(result, tcw.CrossLayerTranscoder) and result is not clt and result.layers == LAYERS
    assert all(torch.equal(value, before[name]) for name, value in weights(clt).items())
    assert not torch.equal(result.W_dec_0[:, 1].detach(), clt.W_dec_0[:, 1].detach())
    for i in range(len(LAYERS)):
        torch.testing.assert_close(getattr(result, f"W_dec_{i}").detach().flatten(1).norm(dim=1), torch.ones(256))
    assert len(tuner.history) == tuner.total_steps == 8
    assert all(0 < record[f"l0_{layer}"] <= 8 for record in tuner.history for layer in LAYERS)  # TopK, k=8


def test_the_cross_layer_loss_terms_equal_a_hooked_float64_computation(setup, clt_tuned, lm):
    """The first step's KL and each layer's FVU (the MLP's output in the spliced run against the sum of
    the writes into that layer) from forward hooks splicing in the starting CLT by hand."""
    _, train, _ = setup
    clt, _, tuner, _ = clt_tuned
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))  # epoch 0's order, seed 0
    mlp = {}
    kl = hooked_kl(lm, clt, train[order[:SETTINGS["batch_size"]]], mlp)
    record = tuner.history[0]
    assert record["kl"] == pytest.approx(kl, rel=1e-3)
    fvus = []
    for layer in LAYERS:
        _, y, reconstruction = (t.reshape(-1, lm.d_model) for t in mlp[layer])
        fvus.append(float((y - reconstruction).square().sum() / (y - y.mean(0)).square().sum()))
        assert record[f"fvu_{layer}"] == pytest.approx(fvus[-1], rel=1e-4), layer
    assert record["loss"] == pytest.approx(kl + sum(fvus), rel=1e-4)  # fvu_coefficient=1


def test_a_cross_layer_transcoder_resumes_bit_for_bit(setup, clt_tuned, lm, tmp_path):
    _, train, _ = setup
    clt, _, full, result = clt_tuned
    options = dict(log_every=1, checkpoint_dir=tmp_path, checkpoint_every=2, progress=False)
    resumed = interrupted_and_resumed(lm, clt, train, options)
    again, expected = weights(resumed.fit()), weights(result)
    assert all(torch.equal(value, expected[name]) for name, value in again.items())
    assert resumed.history == full.history
    with pytest.raises(ValueError, match="another run's checkpoint.*transcoders"):  # the fine-tuned CLT is another
        tcw.JointFineTuner(lm, result, train, tcw.FineTuneConfig(**SETTINGS), **options)


def test_layers_of_a_cross_layer_transcoder_are_refused_with_the_fix(setup, clt_tuned, lm):
    _, train, _ = setup
    clt = clt_tuned[0]
    with pytest.raises(ValueError, match="layers of a cross-layer transcoder.*pass the CrossLayerTranscoder itself"):
        tcw.finetune_transcoders(lm, clt.views(), train, progress=False)
    with pytest.raises(ValueError, match="batch_size=64 contexts is more than the 32"):
        tcw.finetune_transcoders(lm, clt, train, batch_size=64, progress=False)
