"""Splicing and evaluation against independent computations on the real default model.

The reference is always the un-wrapped PyTorch module (``lm._module``) with plain forward hooks on
the MLPs, and metrics computed by hand (``F.cross_entropy``, float64 sums) — never tcwidgets'
own code paths. Transcoders are randomly initialised: exactness does not need trained ones.
"""

import importlib.machinery
import json
import math
import sys

import matplotlib.figure
import pytest
import torch
import torch.nn.functional as F

from tcwidgets.evaluation import LAYER_METRICS, Metrics, evaluate, plot_frontier
from tcwidgets.models import resolve
from tcwidgets.splicing import check_transcoders, splice, spliced_logits
from tcwidgets.transcoder import Transcoder, TranscoderConfig

ATOL = 1e-4  # on logits (magnitudes ~10-30)


def make_tc(lm, layer, kind="transcoder", activation="topk", n_latents=256, seed=0):
    """A randomly initialised transcoder for ``lm``'s layer ``layer`` (skip path random too)."""
    torch.manual_seed(seed)
    tc = Transcoder(TranscoderConfig(d_in=lm.d_model, d_out=lm.d_model, n_latents=n_latents, kind=kind,
                                     activation=activation, k=16, site={"model": lm.name, "layer": layer}))
    with torch.no_grad():
        tc.b_enc.normal_(0, 0.5)  # random-init latents fire on some tokens and not others
        if kind == "skip":
            tc.W_skip.normal_(0, 0.02)
    return tc.eval().requires_grad_(False)


def hooked(lm, tokens, replace):
    """Logits of the plain module with ``replace[layer](x, y)`` as that layer's MLP output.

    Also returns every hooked layer's clean-run ``(x, y)`` as it entered/left the MLP.
    """
    seen, handles = {}, []
    for layer, function in replace.items():
        def hook(module, args, output, layer=layer, function=function):
            seen[layer] = (args[0], output)
            return function(args[0], output)
        handles.append(resolve(lm._module, lm.sites.mlp_path(layer)).register_forward_hook(hook))
    try:
        with torch.no_grad():
            return lm._module(tokens).logits, seen
    finally:
        for handle in handles:
            handle.remove()


def by_transcoder(tc):
    """A hook function: the transcoder's output from its site (an SAE reads the MLP output)."""
    return lambda x, y: tc(y if tc.config.kind == "sae" else x).output


def keep(x, y):
    return y


def zeros(x, y):
    return torch.zeros_like(y)


def cross_entropy(logits, tokens):
    return float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)))


def kl(clean, spliced):
    p = torch.log_softmax(clean[:, :-1].double(), -1)
    q = torch.log_softmax(spliced[:, :-1].double(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


@pytest.fixture
def server_without_tcwidgets(monkeypatch):
    """``remote="local"`` as on a real NDIF server: tcwidgets cannot be imported there.

    nnsight's simulation hides local modules and paths while it unpacks the request, but an
    editable install's import hook would still find tcwidgets; hide that too, so only code that
    was shipped by value can run.
    """
    from nnsight.intervention.backends.local import LocalSimulationBackend

    hide, restore = LocalSimulationBackend._hide_local_modules, LocalSimulationBackend._restore

    def finds_tcwidgets(finder):
        if finder is importlib.machinery.PathFinder or not hasattr(finder, "find_spec"):
            return False
        try:
            return finder.find_spec("tcwidgets", None) is not None
        except Exception:
            return False

    def hide_all(self):
        hidden = hide(self)
        hidden["finders"] = [(i, f) for i, f in enumerate(sys.meta_path) if finds_tcwidgets(f)]
        for _, finder in hidden["finders"]:
            sys.meta_path.remove(finder)
        return hidden

    def restore_all(self, hidden):
        for index, finder in hidden.pop("finders"):
            sys.meta_path.insert(index, finder)
        restore(self, hidden)

    monkeypatch.setattr(LocalSimulationBackend, "_hide_local_modules", hide_all)
    monkeypatch.setattr(LocalSimulationBackend, "_restore", restore_all)


# -- splicing ---------------------------------------------------------------------------------

@pytest.mark.parametrize("remote", [False, "local"])
def test_error_term_reproduces_clean_logits(lm, contexts, remote, server_without_tcwidgets):
    tcs = {4: make_tc(lm, 4, "skip", "relu"), 6: make_tc(lm, 6), 9: make_tc(lm, 9, "sae", "jumprelu")}
    clean, seen = hooked(lm, contexts, {6: keep})
    run = splice(lm, tcs, contexts, mode="error", edit=lambda layer, latents: latents.clone(),
                 save_latents=True, batch_size=3, remote=remote, progress=False)
    assert (run.logits - clean).abs().max() < ATOL
    assert run.latents[6].shape == (*contexts.shape, 256)
    # the latents are the transcoder's, on the clean run's MLP inputs
    assert torch.allclose(run.latents[6], tcs[6].encode(seen[6][0]), atol=1e-5)


def test_replace_remote_local_matches_local(lm, contexts, server_without_tcwidgets):
    tcs = {6: make_tc(lm, 6, "skip"), 9: make_tc(lm, 9, "sae")}
    local = spliced_logits(lm, tcs, contexts, progress=False)
    shipped = spliced_logits(lm, tcs, contexts, remote="local", progress=False)
    assert (local - shipped).abs().max() < ATOL


def test_replace_matches_forward_hook(lm, contexts):
    tc6 = make_tc(lm, 6)
    expected, _ = hooked(lm, contexts, {6: by_transcoder(tc6)})
    assert (spliced_logits(lm, tc6, contexts, progress=False) - expected).abs().max() < ATOL

    tc4, tc9 = make_tc(lm, 4, "skip", "relu"), make_tc(lm, 9, "sae", "jumprelu")
    expected, _ = hooked(lm, contexts, {4: by_transcoder(tc4), 9: by_transcoder(tc9)})
    got = spliced_logits(lm, {9: tc9, 4: tc4}, contexts, progress=False)
    assert (got - expected).abs().max() < ATOL


def test_error_mode_edit_keeps_unedited_error_term(lm, contexts):
    tc = make_tc(lm, 6, "skip", "relu")
    keep_first = torch.zeros(tc.n_latents)
    keep_first[:10] = 1

    def edit(layer, latents):
        assert layer == 6
        return latents * keep_first

    def by_hand(x, y):
        latents, reconstruction = tc(x)
        return y - reconstruction + tc.decode(edit(6, latents), x)

    expected, _ = hooked(lm, contexts, {6: by_hand})
    got = spliced_logits(lm, {6: tc}, contexts, mode="error", edit=edit, progress=False)
    assert (got - expected).abs().max() < ATOL
    replaced = spliced_logits(lm, {6: tc}, contexts, edit=edit, progress=False)
    expected, _ = hooked(lm, contexts, {6: lambda x, y: tc.decode(edit(6, tc.encode(x)), x)})
    assert (replaced - expected).abs().max() < ATOL


def test_zero_ablation_matches_hook(lm, contexts):
    expected, _ = hooked(lm, contexts, {3: zeros, 7: zeros})
    got = spliced_logits(lm, {}, contexts, zero_ablate=[7, 3], progress=False)
    assert (got - expected).abs().max() < ATOL


# -- evaluation -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def evaluated(lm, contexts):
    tcs = {6: make_tc(lm, 6), 8: make_tc(lm, 8, "skip", "relu", seed=1)}
    return tcs, evaluate(lm, tcs, contexts, batch_size=2, progress=False, label="random")


def test_evaluate_matches_hand_computation(lm, contexts, evaluated):
    tcs, m = evaluated
    clean, seen = hooked(lm, contexts, {6: keep, 8: keep})
    assert m.ce_clean == pytest.approx(cross_entropy(clean, contexts), rel=1e-5)
    # Hugging Face's own loss uses the same positions
    with torch.no_grad():
        assert m.ce_clean == pytest.approx(float(lm._module(contexts, labels=contexts).loss), rel=1e-5)

    zero = {}
    for layer, tc in tcs.items():
        x, y = (v.reshape(-1, v.shape[-1]).double() for v in seen[layer])
        latents, reconstruction = tc(seen[layer][0])
        reconstruction = reconstruction.reshape(y.shape).double()
        fvu = float(((y - reconstruction) ** 2).sum() / ((y - y.mean(0)) ** 2).sum())
        fires = latents.reshape(-1, tc.n_latents) != 0
        spliced, _ = hooked(lm, contexts, {layer: by_transcoder(tc)})
        zeroed, _ = hooked(lm, contexts, {layer: zeros})
        ce, zero[layer] = cross_entropy(spliced, contexts), cross_entropy(zeroed, contexts)
        got = m[layer]
        assert got.fvu == pytest.approx(fvu, rel=1e-5)
        assert got["mse"] == pytest.approx(float(((y - reconstruction) ** 2).mean()), rel=1e-5)
        assert got.l0 == pytest.approx(float(fires.sum(1).double().mean()))
        assert got.dead_fraction == pytest.approx(1 - float(fires.any(0).double().mean()))
        assert 0 < got.dead_fraction < 1  # the test exercises both
        assert got.ce_spliced == pytest.approx(ce, rel=1e-5)
        assert got.ce_zero_ablated == pytest.approx(zero[layer], rel=1e-5)
        assert got.ce_recovered == pytest.approx((zero[layer] - ce) / (zero[layer] - m.ce_clean), abs=1e-4)
        assert got.kl == pytest.approx(kl(clean, spliced), rel=1e-4, abs=1e-6)
        assert got.ce_clean == m.ce_clean

    both, _ = hooked(lm, contexts, {layer: by_transcoder(tc) for layer, tc in tcs.items()})
    both_zero, _ = hooked(lm, contexts, {6: zeros, 8: zeros})
    assert m.ce_all_spliced == pytest.approx(cross_entropy(both, contexts), rel=1e-5)
    assert m.ce_all_zero_ablated == pytest.approx(cross_entropy(both_zero, contexts), rel=1e-5)
    assert m.kl_all == pytest.approx(kl(clean, both), rel=1e-4)


def test_single_transcoder_uses_its_layer_and_agrees(lm, contexts, evaluated):
    tcs, m = evaluated
    single = evaluate(lm, tcs[6], contexts[:2], progress=False)
    assert list(single) == [6]
    assert single.ce_all_spliced == single[6].ce_spliced and single.kl_all == single[6].kl


def test_metrics_access_serialisation_and_display(evaluated):
    _, m = evaluated
    assert set(m.fvu) == {6, 8} and m.fvu[6] == m[6].fvu == m[6]["fvu"]
    assert list(m[8].keys()) == list(LAYER_METRICS)
    data = json.loads(json.dumps(m.to_dict()))
    assert Metrics.from_dict(data) == m
    assert data["transcoders"]["8"]["kind"] == "skip" and data["label"] == "random"
    assert "CE recovered" in repr(m) and repr(m).count("\n") == 3  # summary, header, 2 layers
    assert "<table>" in m._repr_html_()
    with pytest.raises(KeyError, match="evaluated layers"):
        m[7]


def test_metrics_non_finite_values_serialise_as_null(evaluated):
    _, m = evaluated
    data = m.to_dict()
    data["layers"]["6"]["ce_recovered"] = None
    assert math.isnan(Metrics.from_dict(json.loads(json.dumps(data)))[6].ce_recovered)


def test_plot_frontier(evaluated):
    _, m = evaluated
    other = m.to_dict() | {"label": "other"}
    figure = plot_frontier([m, other, {"l0": 3.0, "fvu": 0.5, "label": "point"}], x="l0", y="fvu")
    assert isinstance(figure, matplotlib.figure.Figure)
    lines = figure.axes[0].get_lines()
    assert sorted(line.get_label() for line in lines) == [
        "other (layer 6)", "other (layer 8)", "point", "random (layer 6)", "random (layer 8)"]
    grouped = plot_frontier([m, other], y="mse", label="kind")  # group by a config field
    assert sorted(line.get_label() for line in grouped.axes[0].get_lines()) == [
        "skip (layer 8)", "transcoder (layer 6)"]
    assert all(len(line.get_xdata()) == 2 for line in grouped.axes[0].get_lines())
    with pytest.raises(KeyError, match="no 'fvu'"):
        plot_frontier([{"l0": 1.0}])


# -- bad input --------------------------------------------------------------------------------

def test_transcoder_for_a_layer_the_model_does_not_have(lm, contexts):
    with pytest.raises(IndexError, match="30 layers"):
        evaluate(lm, make_tc(lm, 30), contexts, progress=False)
    with pytest.raises(ValueError, match="trained on layer 6"):
        splice(lm, {5: make_tc(lm, 6)}, contexts)


def test_transcoder_for_another_model(lm, contexts):
    tc = Transcoder(TranscoderConfig(d_in=768, d_out=768, n_latents=64, site={"model": "gpt2", "layer": 6}))
    with pytest.raises(ValueError, match=r"768 dimensions but smollm2-135m's MLPs have 576.*'gpt2'"):
        evaluate(lm, tc, contexts, progress=False)


def test_transcoder_with_nan_weights(lm, contexts):
    tc = make_tc(lm, 6)
    with torch.no_grad():
        tc.W_dec[3, 5] = math.nan
    with pytest.raises(ValueError, match="NaN or infinite values in W_dec"):
        spliced_logits(lm, tc, contexts)


def test_tokens_out_of_vocabulary(lm, contexts):
    bad = contexts.clone()
    bad[0, 5] = lm.config.vocab_size
    with pytest.raises(ValueError, match="outside smollm2-135m's vocabulary"):
        evaluate(lm, make_tc(lm, 6), bad, progress=False)
    with pytest.raises(ValueError, match="tensor of token ids"):
        spliced_logits(lm, {}, contexts.float())


def test_bad_splice_arguments(lm, contexts):
    tc = make_tc(lm, 6)
    with pytest.raises(ValueError, match="both zero-ablated and spliced"):
        splice(lm, tc, contexts, zero_ablate=[6])
    with pytest.raises(ValueError, match="mode='both'"):
        splice(lm, tc, contexts, mode="both")
    with pytest.raises(ValueError, match="must return a tensor of the latents' shape"):
        splice(lm, tc, contexts[:1], edit=lambda layer, latents: latents[..., :3], progress=False)


def test_single_transcoder_check_returns_layer_map(lm):
    tc = make_tc(lm, 6)
    assert check_transcoders(lm, tc) == {6: tc}
    with pytest.warns(UserWarning, match="trained on 'other-model'"):
        tc.config.site["model"] = "other-model"
        check_transcoders(lm, tc)
    with pytest.warns(UserWarning, match="training mode"):
        check_transcoders(lm, make_tc(lm, 6, activation="batchtopk").train())
