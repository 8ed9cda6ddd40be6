"""The Transcoder module: activations, the sparse path, model units, files.

Every check compares against an independent computation written out here.
"""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from tcwidgets import files

from tcwidgets.transcoder import (
    SCHEMA_VERSION,
    Transcoder,
    TranscoderConfig,
    TranscoderFileError,
    jumprelu,
    step,
)

D_IN, D_OUT, N = 12, 10, 48


def make(kind="transcoder", activation="topk", k=4, d_in=D_IN, d_out=D_OUT, n=N, **extra):
    """A transcoder with random (not unit-scale) weights and biases, so every term matters."""
    if kind == "sae":
        d_out = d_in
    config = TranscoderConfig(d_in=d_in, d_out=d_out, n_latents=n, kind=kind, activation=activation, k=k,
                              input_scale=1.7, output_scale=0.3, **extra)
    tc = Transcoder(config)
    with torch.no_grad():
        for p in tc.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
        tc.normalize_decoder()
    return tc


def reference(tc, x, mask=None, params=None):
    """Dense forward written from the definition, in float64: z = act(W_enc·x̃ + b_enc),
    ŷ = (W_dec·z + b_dec + W_skip·x̃) / output_scale. ``mask`` picks the kept latents (TopK);
    ``params`` replaces the module's parameters (float64 copies by default)."""
    c = tc.config
    p = params or {name: t.detach().double() for name, t in tc.named_parameters()}
    xs = x.double() * c.input_scale
    pre = xs @ p["W_enc"].T + p["b_enc"]
    z = torch.relu(pre) if mask is None else torch.relu(pre) * mask
    out = z @ p["W_dec"] + p["b_dec"]
    if c.kind == "skip":
        out = out + xs @ p["W_skip"].T
    return pre, z, out / c.output_scale


# ---- activations ------------------------------------------------------------------------------


def test_topk_keeps_exactly_k_latents_per_token_and_the_largest_ones():
    tc = make(k=5)
    with torch.no_grad():
        tc.b_enc.fill_(3.0)  # all pre-activations positive: every kept latent is non-zero
    x = torch.randn(64, D_IN)
    z = tc.encode(x)
    assert ((z != 0).sum(-1) == 5).all()
    pre = reference(tc, x)[0]
    largest = pre.argsort(dim=-1, descending=True)[:, :5]
    for row in range(64):
        assert set(z[row].nonzero().flatten().tolist()) == set(largest[row].tolist())


def test_topk_drops_negative_pre_activations():
    tc = make(k=8)
    with torch.no_grad():
        tc.b_enc.fill_(-100.0)
    assert (tc.encode(torch.randn(8, D_IN)) == 0).all()


def test_batchtopk_keeps_k_times_batch_latents_in_total():
    tc = make(activation="batchtopk", k=3).train()
    with torch.no_grad():
        tc.b_enc.fill_(3.0)
    x = torch.randn(40, D_IN)
    z = tc.encode(x)
    assert int((z != 0).sum()) == 3 * 40
    per_token = (z != 0).sum(-1)
    assert per_token.min() != per_token.max()  # a batch budget, not k per token
    pre = reference(tc, x)[0].flatten()
    kept = set(pre.argsort(descending=True)[: 3 * 40].tolist())
    assert set(z.flatten().nonzero().flatten().tolist()) == kept


def test_batchtopk_inference_uses_one_calibrated_threshold():
    tc = make(activation="batchtopk", k=3)
    with torch.no_grad():
        tc.b_enc.fill_(1.0)
    tc.eval()
    x = torch.randn(200, D_IN)
    with pytest.raises(RuntimeError, match="calibrate_threshold"):
        tc.encode(x)
    threshold = tc.calibrate_threshold(x.split(50))
    expected = torch.stack([reference(tc, b)[0].flatten().sort(descending=True).values[3 * 50 - 1]
                            for b in x.split(50)]).mean()
    assert threshold == pytest.approx(float(expected), rel=1e-5)
    z = tc.encode(x)
    pre = reference(tc, x)[0].float()
    assert torch.equal(z != 0, pre > threshold)
    assert (z != 0).sum(-1).float().mean() == pytest.approx(3, rel=0.25)


def test_jumprelu_gradients_follow_the_straight_through_definition():
    torch.manual_seed(1)
    eps = 0.3
    pre = (torch.randn(50, 7) * 0.5 + 0.4).requires_grad_()
    theta = torch.full((7,), 0.4).requires_grad_()
    upstream = torch.randn(50, 7)
    (jumprelu(pre, theta, eps) * upstream).sum().backward()

    with torch.no_grad():
        p, t = pre.detach(), theta.detach()
        active = (p > t).float()
        near = ((p - t).abs() < eps / 2).float()  # rectangle((pre - θ) / ε)
        assert torch.allclose(pre.grad, active * upstream)
        assert torch.allclose(theta.grad, (-(t / eps) * near * upstream).sum(0), atol=1e-6)
        assert near.sum() > 20  # the check covers many points inside the window

    pre.grad, theta.grad = None, None
    (step(pre, theta, eps) * upstream).sum().backward()
    assert torch.equal(pre.grad, torch.zeros_like(pre))
    assert torch.allclose(theta.grad, (-(1 / eps) * near * upstream).sum(0), atol=1e-5)


def test_jumprelu_forward_zeroes_below_threshold():
    tc = make(activation="jumprelu")
    with torch.no_grad():
        tc.log_threshold.fill_(math.log(0.5))
    x = torch.randn(30, D_IN)
    pre = reference(tc, x)[0].float()
    assert torch.allclose(tc.encode(x), torch.where(pre > 0.5, pre, 0.0), atol=1e-5)


# ---- the model-unit contract and the sparse path -------------------------------------------------


@pytest.mark.parametrize("kind", ["transcoder", "skip", "sae"])
@pytest.mark.parametrize("activation", ["relu", "topk"])
def test_forward_matches_definition_in_model_units(kind, activation):
    tc = make(kind=kind, activation=activation, k=N)  # k = n_latents: TopK keeps every positive latent
    x = torch.randn(20, tc.d_in)
    latents, output = tc(x)
    _, z, out = reference(tc, x)
    assert torch.allclose(latents.double(), z, atol=1e-5)
    assert torch.allclose(output.double(), out, atol=1e-4)
    assert latents.shape == (20, tc.n_latents) and output.shape == (20, tc.d_out)


def test_skip_transcoder_decode_needs_x():
    tc = make(kind="skip")
    with pytest.raises(ValueError, match="pass the MLP input x"):
        tc.decode(tc.encode(torch.randn(3, D_IN)))


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
@pytest.mark.parametrize("kind", ["transcoder", "skip"])
def test_sparse_path_matches_dense_reference_loss_and_gradients(activation, kind):
    tc = make(kind=kind, activation=activation, k=6).train()
    x = torch.randn(32, D_IN, requires_grad=True)
    y = torch.randn(32, D_OUT)

    encoding = tc.encode_sparse(x)
    y_hat = tc.decode_sparse(encoding.latents, x)
    loss = (y - y_hat).square().sum() / (y - y.mean(0)).square().sum()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in tc.named_parameters()}

    # independent float64 reference: choose the kept latents from the float64 pre-activations
    params = {name: p.detach().double().requires_grad_() for name, p in tc.named_parameters()}
    x64 = x.detach().double().requires_grad_()
    pre = reference(tc, x64)[0].detach()
    if activation == "topk":
        mask = torch.zeros_like(pre).scatter(1, pre.topk(6, dim=1).indices, 1.0)
    else:
        mask = torch.zeros_like(pre).flatten().index_fill(0, pre.flatten().topk(6 * 32).indices, 1.0).view_as(pre)
    out = reference(tc, x64, mask, params)[2]
    y64 = y.double()
    ref_loss = (y64 - out).square().sum() / (y64 - y64.mean(0)).square().sum()
    ref_grads = torch.autograd.grad(ref_loss, [*params.values(), x64])

    assert float(loss.detach()) == pytest.approx(float(ref_loss), rel=1e-5)
    for (name, g), ref in zip(grads.items(), ref_grads):
        assert torch.allclose(g.double(), ref, rtol=1e-4, atol=1e-6), name
    assert torch.allclose(x.grad.double(), ref_grads[-1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("activation, choice", [("topk", "bfloat16"), ("batchtopk", "bfloat16"), ("topk", "int8")])
def test_low_precision_choice_keeps_full_precision_values_and_gradients(activation, choice):
    """With ``low_precision`` the latents are chosen from a bfloat16 or int8 product, but their
    values (and the gradients) are those of the float32 encoder at the chosen pairs."""
    tc = make(activation=activation, k=6).train()
    x, y = torch.randn(40, D_IN), torch.randn(40, D_OUT)
    encoding = tc.encode_sparse(x, low_precision=choice)
    assert encoding.pre.dtype == torch.bfloat16
    latents = encoding.latents
    rows = latents.rows
    pre64 = reference(tc, x.double())[0].detach()
    assert torch.allclose(latents.values.double(), pre64[rows, latents.indices].relu(), rtol=1e-5, atol=1e-6)
    loss = (y - tc.decode_sparse(latents)).square().sum()
    loss.backward()
    # float64 reference of the same choice: a dense mask of the chosen pairs
    params = {name: p.detach().double().requires_grad_() for name, p in tc.named_parameters()}
    mask = torch.zeros_like(pre64).index_put((rows, latents.indices), torch.tensor(1.0, dtype=torch.float64))
    out = reference(tc, x.double(), mask, params)[2]
    ref_grads = torch.autograd.grad((y.double() - out).square().sum(), list(params.values()))
    for (name, p), ref in zip(tc.named_parameters(), ref_grads):
        assert torch.allclose(p.grad.double(), ref, rtol=1e-4, atol=1e-5), name


def test_int8_choice_picks_the_exact_top_k():
    """The int8 product only proposes k + INT8_MARGIN candidates per token; their float32
    pre-activations pick the k: on inputs whose top k stand clear of the rest by more than the
    int8 error (random Gaussian ones, here), the chosen latents are the float64 top k, even with an
    outlier input channel (which coarsens the per-token int8 scale of the others)."""
    from tcwidgets.transcoder import INT8_MARGIN

    tc = make(k=8, d_in=64, n=512)
    x = torch.randn(256, 64)
    x[:, 3] *= 20  # an outlier channel, as in language-model activations
    assert INT8_MARGIN > 0
    latents = tc.encode_sparse(x, low_precision="int8").latents
    pre64 = reference(tc, x.double())[0]
    expected = pre64.topk(8, dim=1).indices.sort(1).values
    assert torch.equal(latents.indices.view(256, 8).sort(1).values, expected)
    assert torch.allclose(latents.values.double(), pre64.gather(1, latents.indices.view(256, 8)).flatten().relu(),
                          rtol=1e-5, atol=1e-5)


def test_low_precision_names_are_checked():
    tc = make(k=4)
    with pytest.raises(ValueError, match="low_precision='fp8'.*float32, bfloat16, int8"):
        tc.encode_sparse(torch.randn(4, D_IN), low_precision="fp8")
    with pytest.raises(ValueError, match="int8 latent choice is for TopK only"):
        make(activation="batchtopk").encode_sparse(torch.randn(4, D_IN), low_precision="int8")


def test_sparse_latents_match_dense_encoding():
    tc = make(k=7)
    x = torch.randn(9, D_IN)
    latents = tc.encode_sparse(x).latents
    assert latents.indices.shape == (9 * 7,)
    assert torch.equal(latents.offsets, torch.arange(0, 63, 7))
    assert torch.allclose(latents.to_dense(N), tc.encode(x))
    assert torch.allclose(tc.decode_sparse(latents), tc.decode(tc.encode(x)), atol=1e-6)


def test_sparse_decode_with_unit_rows_projects_the_decoder_gradient():
    """``decode_sparse(..., unit_rows=True)`` leaves W_dec's gradient projected (each row's
    component along the row removed), summed over two decodes into the same weight: the float64
    dense gradient, projected by hand."""
    tc = make(k=6).train()
    tc.normalize_decoder()
    x, y = torch.randn(40, D_IN), torch.randn(40, D_OUT)
    latents = tc.encode_sparse(x).latents
    aux = tc.latents_at(x, latents.rows, (latents.indices + 1) % N, tc.pre_activations(x).detach())
    loss = (y - tc.decode_sparse(latents, unit_rows=True)).square().sum() + tc.decode_sparse(
        aux, bias=False, unit_rows=True).square().sum()
    loss.backward()
    w = tc.W_dec.detach().double()
    dense = [z.to_dense(N).detach().double() for z in (latents, aux)]
    error = y.double() - (dense[0] @ w + tc.b_dec.detach().double()) / tc.config.output_scale
    fit = dense[1] @ w / tc.config.output_scale
    grad = (dense[0].t() @ (-2 * error) + dense[1].t() @ (2 * fit)) / tc.config.output_scale
    projected = grad - (grad * w).sum(1, keepdim=True) * w
    assert torch.allclose(tc.W_dec.grad.double(), projected, rtol=1e-4, atol=1e-5)
    assert ((tc.W_dec.grad * tc.W_dec).sum(1).abs() <= 1e-5 * tc.W_dec.grad.norm(dim=1)).all()


def test_decoder_gradient_projection_and_normalisation():
    tc = make()
    tc.W_dec.grad = torch.randn_like(tc.W_dec)
    tc.project_decoder_grad()
    assert (tc.W_dec.grad * tc.W_dec).sum(1).abs().max() < 1e-5
    with torch.no_grad():
        tc.W_dec.mul_(torch.rand(N, 1) * 3)
    tc.normalize_decoder()
    assert torch.allclose(tc.W_dec.norm(dim=1), torch.ones(N))


# ---- configuration errors -------------------------------------------------------------------------


def test_k_larger_than_n_latents_is_refused():
    with pytest.raises(ValueError, match="k=64 is larger than n_latents=48"):
        TranscoderConfig(d_in=D_IN, d_out=D_OUT, n_latents=48, k=64)


@pytest.mark.parametrize("changes, message", [
    ({"kind": "autoencoder"}, "kind='autoencoder' is not one of"),
    ({"activation": "gelu"}, "activation='gelu' is not one of"),
    ({"kind": "sae"}, "d_in must equal d_out"),
    ({"input_scale": float("nan")}, "input_scale must be a positive finite number"),
])
def test_invalid_configs_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        TranscoderConfig(**{"d_in": D_IN, "d_out": D_OUT, "n_latents": N, **changes})


# ---- files ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, activation", [("transcoder", "topk"), ("skip", "jumprelu"),
                                              ("sae", "relu"), ("transcoder", "batchtopk")])
def test_save_load_round_trip_gives_identical_outputs(tmp_path, kind, activation):
    tc = make(kind=kind, activation=activation)
    tc.config.site = {"model": "smollm2-135m", "layer": 6, "input": "model.layers.6.mlp.input",
                      "output": "model.layers.6.mlp.output"}
    x = torch.randn(16, tc.d_in)
    if activation == "batchtopk":
        tc.calibrate_threshold([x])
    tc.eval()
    tc.save(tmp_path / "tc")
    assert sorted(p.name for p in (tmp_path / "tc").iterdir()) == ["config.json", "weights.safetensors"]
    loaded = Transcoder.load(tmp_path / "tc", device="cpu")
    assert loaded.config == tc.config
    for (name, a), (_, b) in zip(tc.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    loaded.eval()
    assert torch.equal(loaded(x).output, tc(x).output)
    assert torch.equal(loaded(x).latents, tc(x).latents)


def test_config_json_is_plain_and_versioned(tmp_path):
    make().save(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["schema_version"] == SCHEMA_VERSION
    assert data["input_scale"] == 1.7 and data["k"] == 4


def test_newer_schema_asks_to_upgrade(tmp_path):
    make().save(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data["schema_version"] = SCHEMA_VERSION + 1
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(TranscoderFileError, match="newer tcwidgets.*pip install -U tcwidgets"):
        Transcoder.load(tmp_path)


def test_truncated_weights_give_a_clear_error(tmp_path):
    make().save(tmp_path)
    weights = tmp_path / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(TranscoderFileError, match=r"weights\.safetensors is truncated or corrupted.*re-save or re-train"):
        Transcoder.load(tmp_path)
    weights.write_bytes(b"\x00" * 7)
    with pytest.raises(ValueError, match="truncated or corrupted"):
        Transcoder.load(tmp_path)


def test_weights_that_do_not_match_the_config_are_refused(tmp_path):
    make().save(tmp_path)
    tensors = load_file(tmp_path / "weights.safetensors")
    tensors["W_enc"] = tensors["W_enc"][:-1]
    save_file(tensors, tmp_path / "weights.safetensors")
    with pytest.raises(TranscoderFileError, match=r"weights\.safetensors is corrupted: its bytes do not match"):
        Transcoder.load(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())  # recorded as if saved so
    record = files.save_tensors(tmp_path / "weights.safetensors", tensors)
    files.write_manifest(tmp_path / "config.json", {**config, "weights": record})
    with pytest.raises(TranscoderFileError, match=r"W_enc: expected \(48, 12\), found \(47, 12\)"):
        Transcoder.load(tmp_path)


def test_missing_or_invalid_config(tmp_path):
    with pytest.raises(TranscoderFileError, match="config.json not found"):
        Transcoder.load(tmp_path)
    make().save(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(TranscoderFileError, match="config.json is unreadable or corrupted"):
        Transcoder.load(tmp_path)


def test_save_replaces_files_atomically_and_leaves_no_temporary_files(tmp_path):
    make().save(tmp_path)
    second = make()
    second.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "weights.safetensors"]
    assert torch.equal(Transcoder.load(tmp_path).W_enc, second.W_enc)


def test_the_top_k_of_wide_rows_in_two_rounds_is_a_top_k():
    """Wide rows take their top k from the groups of largest maxima (`_grouped_topk_indices`): the
    chosen values are those of a plain top-k, row by row, with ties (few distinct values), with
    a row's k largest all in one group, and in int16 words as in float32."""
    from tcwidgets.transcoder import TOPK_GROUPS, _grouped_topk_indices, _topk_indices

    g = torch.Generator().manual_seed(0)
    width, k = 64 * TOPK_GROUPS, 16
    distinct = torch.randn(300, width, generator=g)
    tied = torch.randint(-20, 20, (300, width), generator=g).float()
    clustered = torch.randn(300, width, generator=g)
    clustered[:, 3::width // TOPK_GROUPS] += 10  # one group holds each row's largest values
    for values in (distinct, tied, clustered, distinct.bfloat16().view(torch.int16)):
        chosen = _grouped_topk_indices(values, k)
        assert chosen.shape == (300, k) and all(len(row.unique()) == k for row in chosen)
        expected = values.double().topk(k, dim=1).values.sort(1).values
        assert torch.equal(values.gather(1, chosen).double().sort(1).values, expected)
    assert torch.equal(_topk_indices(distinct, k).sort(1).values, distinct.topk(k, dim=1).indices.sort(1).values)


def test_the_bfloat16_top_k_takes_the_largest_positive_values():
    """The TopK choice from bfloat16 values compares their 16-bit words: the k largest values of a
    float64 sort where a row has k positive ones; every positive one (the rest negative) where it
    has fewer."""
    from tcwidgets.transcoder import _topk_indices

    g = torch.Generator().manual_seed(0)
    words = torch.randperm(2**15 - 2**7, generator=g)[:64 * 200].view(64, 200).to(torch.int16)  # finite, distinct
    words[::2, 50:] |= -(2**15)  # every other row: 50 positive values, the rest negative
    values = words.view(torch.bfloat16)
    values[1, 0], values[3, 0] = 0.0, -0.0
    for k in (1, 8, 50, 60):
        chosen = _topk_indices(values, k).sort(1).values
        assert chosen.shape == (64, k) and all(len(row.unique()) == k for row in chosen)
        expected = values.double().topk(k, dim=1).indices.sort(1).values
        if k <= 50:  # every row has k positive values or more
            assert torch.equal(chosen, expected)
        else:  # rows with 50 positive values (columns 0-49) get all of them
            assert torch.equal(chosen[1::2], expected[1::2])
            assert torch.equal(chosen[::2, :50], torch.arange(50).expand(32, 50))
