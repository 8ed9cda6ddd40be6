"""Cross-layer transcoders: the module against a dense float64 computation, files, training (learning,
exact resume, bad input), and splice / evaluate / run_with_edits against plain PyTorch forward hooks
on a tiny random Llama that do the replacement by hand."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
import yaml
from safetensors.torch import load_file, save_file

import tcwidgets as tcw
from tcwidgets.crosslayer import CrossLayerConfig, CrossLayerFileError, CrossLayerTranscoder
from tcwidgets.crosslayer_training import CrossLayerTrainer, reconstruction_metrics
from tcwidgets.interventions import encode_prompt
from tcwidgets.models import resolve
from tcwidgets.training import CheckpointError, TrainingConfig

SMALL = dict(n_latents=64, k=4, batch_size=64)


class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def tiny(lm):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=lm.config.vocab_size, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=2,
                                      max_position_embeddings=64)
    return tcw.load_model(transformers.LlamaForCausalLM(config).eval(), tokenizer=lm.tokenizer)


@pytest.fixture(scope="module")
def tokens(lm):
    return tcw.load_corpus("python-docs", lm, context=16, n_tokens=32 * 16)


@pytest.fixture(scope="module")
def store(tiny, tokens, tmp_path_factory):
    return tcw.collect_activations(tiny, [0, 1, 2], tokens, out=tmp_path_factory.mktemp("clt"), progress=False)


def random_clt(tiny, layers, activation="topk", seed=0) -> CrossLayerTranscoder:
    """A CLT with every weight random (cross-layer writes, biases, scales, thresholds included)."""
    torch.manual_seed(seed)
    n = len(layers)
    clt = CrossLayerTranscoder(CrossLayerConfig(
        d_model=tiny.d_model, n_latents=24, layers=layers, activation=activation, k=5,
        input_scales=torch.rand(n).add(0.5).tolist(), output_scales=torch.rand(n).add(0.5).tolist(),
        model=tiny.name, sites=[tiny.sites.mlp_sites(layer) for layer in layers]))
    with torch.no_grad():
        for parameter in clt.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.3)
        if activation == "jumprelu":
            clt.log_threshold.copy_(torch.rand_like(clt.log_threshold).mul(0.5).log())
    return clt.eval().requires_grad_(False)


def reference_latents(clt, layer, x):
    """Layer ``layer``'s latents in float64, straight from the formula."""
    c, i = clt.config, clt.layers.index(layer)
    pre = (x.double() * c.input_scales[i]) @ clt.W_enc[i].double().T + clt.b_enc[i].double()
    if c.activation == "relu":
        return pre.clamp_min(0)
    if c.activation == "jumprelu":
        return pre * (pre > clt.log_threshold[i].double().exp())
    kept = pre.topk(c.k, dim=-1).indices
    return torch.zeros_like(pre).scatter(-1, kept, pre.gather(-1, kept).clamp_min(0))


def reference_output(clt, layer, latents):
    """The output at ``layer`` in float64: the writes of every CLT layer up to it."""
    c, j = clt.config, clt.layers.index(layer)
    out = clt.b_dec[j].double()
    for i in range(j + 1):
        out = out + latents[clt.layers[i]] @ getattr(clt, f"W_dec_{i}")[:, j - i].double()
    return out / c.output_scales[j]


def hooked_logits(tiny, clt, tokens, *, spliced, mode="replace", edit=None, mlp=None):
    """Logits with the CLT's replacement done by plain forward hooks on the HF modules, in float64: every
    CLT layer's latents from its MLP input; the layers in ``spliced`` get the reconstruction (``"replace"``)
    or ``y + edited − unedited reconstruction`` (``"error"``); ``edit(layer, latents)`` edits latents.
    ``mlp``, a dict, receives each CLT layer's ``(input, output, reconstruction)`` of this run in float64."""
    clean, edited = {}, {}

    def hook(module, args, output, layer):
        clean[layer] = reference_latents(clt, layer, args[0])
        if mlp is not None:
            mlp[layer] = (args[0].double(), output.double(), reference_output(clt, layer, clean))
        edited[layer] = edit(layer, clean[layer]) if edit is not None else clean[layer]
        if layer not in spliced:
            return None
        new = reference_output(clt, layer, edited)
        if mode == "error":
            new = output.double() + new - reference_output(clt, layer, clean)
        return new.to(output.dtype)

    handles = [resolve(tiny._module, tiny.sites.mlp_path(layer)).register_forward_hook(
        lambda module, args, output, layer=layer: hook(module, args, output, layer)) for layer in clt.layers]
    try:
        with torch.no_grad():
            return tiny._module(tokens).logits
    finally:
        for handle in handles:
            handle.remove()


# ---- the module ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["topk", "jumprelu", "relu"])
def test_forward_equals_a_dense_float64_computation(tiny, activation):
    clt = random_clt(tiny, [0, 2, 3], activation)
    xs = [torch.randn(7, tiny.d_model) for _ in clt.layers]
    latents, outputs = clt(xs)
    expected = {layer: reference_latents(clt, layer, x) for layer, x in zip(clt.layers, xs)}
    for layer, z, output in zip(clt.layers, latents, outputs):
        torch.testing.assert_close(z.double(), expected[layer], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(output.double(), reference_output(clt, layer, expected), rtol=1e-5, atol=1e-5)
        assert (z != 0).sum(-1).max() <= (5 if activation == "topk" else 24)
    assert clt.decoder(0, 3).shape == (24, tiny.d_model) and torch.equal(clt.decoder(2, 3), clt.W_dec_1[:, 1])
    with pytest.raises(ValueError, match=r"layer 3's latents write to layers \[3\], not to 0"):
        clt.decoder(3, 0)
    with pytest.raises(ValueError, match=r"pass the latents of layers \[0\] too"):
        clt.decode(2, {2: latents[1]})


def test_files_round_trip_exactly_and_damage_is_refused(tiny, tmp_path):
    clt = random_clt(tiny, [1, 3], "jumprelu")
    clt.save(tmp_path / "clt")
    assert sorted(p.name for p in (tmp_path / "clt").iterdir()) == ["crosslayer.json", "weights.safetensors"]
    again = CrossLayerTranscoder.load(tmp_path / "clt")
    assert again.config == clt.config
    for name, value in clt.state_dict().items():
        assert torch.equal(again.state_dict()[name], value), name
    weights = tmp_path / "clt" / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(CrossLayerFileError, match="weights.safetensors is corrupted.*re-save or re-train"):
        CrossLayerTranscoder.load(tmp_path / "clt")
    with pytest.raises(CrossLayerFileError, match="crosslayer.json is missing"):
        CrossLayerTranscoder.load(tmp_path)


def test_bad_configurations_are_refused():
    with pytest.raises(ValueError, match=r"layers=\[2, 1\]: name each layer once, in ascending order"):
        CrossLayerConfig(d_model=8, n_latents=16, layers=[2, 1])
    with pytest.raises(ValueError, match="k=32 is larger than n_latents=16"):
        CrossLayerConfig(d_model=8, n_latents=16, layers=[0, 1])
    with pytest.raises(ValueError, match="input_scales has 1 entries for 2 layers"):
        CrossLayerConfig(d_model=8, n_latents=16, layers=[0, 1], k=4, input_scales=[1.0])
    with pytest.raises(ValueError, match="activation='batchtopk' is not one of"):
        CrossLayerConfig(d_model=8, n_latents=16, layers=[0], k=4, activation="batchtopk")


# ---- splicing, evaluation, edits ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["replace", "error"])
def test_splice_equals_forward_hooks_that_replace_by_hand(tiny, tokens, mode):
    clt = random_clt(tiny, [0, 1, 3], "jumprelu")
    batch = tokens[:3]
    spliced = tcw.splice(tiny, clt, batch, mode=mode, save_latents=True, progress=False)
    expected = hooked_logits(tiny, clt, batch, spliced=clt.layers, mode=mode)
    torch.testing.assert_close(spliced.logits.double(), expected.double(), rtol=1e-4, atol=1e-4)
    if mode == "error":  # unedited, the error terms give back the clean model exactly
        torch.testing.assert_close(spliced.logits, tcw.splice(tiny, {}, batch, progress=False).logits,
                                   rtol=1e-5, atol=1e-5)
    x0 = tcw.splice(tiny, {}, batch, save_mlp=[0], progress=False).mlp[0][0]
    torch.testing.assert_close(spliced.latents[0].double(), reference_latents(clt, 0, x0), rtol=1e-4, atol=1e-5)

    # one layer spliced alone: the writes into it still sum the latents of the layers below
    alone = tcw.splice(tiny, {3: clt.views()[3]}, batch, mode=mode, progress=False).logits
    torch.testing.assert_close(alone.double(), hooked_logits(tiny, clt, batch, spliced=[3], mode=mode).double(),
                               rtol=1e-4, atol=1e-4)

    # an edit of layer-0 latents reaches every later layer's output
    def edit(layer, latents):
        return latents * 2 if layer == 0 else latents

    edited = tcw.splice(tiny, clt, batch, mode=mode, edit=edit, progress=False).logits
    torch.testing.assert_close(edited.double(), hooked_logits(tiny, clt, batch, spliced=clt.layers, mode=mode,
                                                              edit=edit).double(), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(edited, spliced.logits, atol=1e-3)


def test_evaluate_gives_per_layer_fvu_and_all_layers_loss_of_the_hooked_replacement(tiny, tokens):
    clt = random_clt(tiny, [0, 2], "relu")
    batch = tokens[:4]
    metrics = tcw.evaluate(tiny, clt, batch, progress=False)
    assert list(metrics) == [0, 2]
    clean = tcw.splice(tiny, {}, batch, save_mlp=[0, 2], progress=False).mlp
    latents = {layer: reference_latents(clt, layer, clean[layer][0]) for layer in clt.layers}
    for layer in clt.layers:
        y = clean[layer][1].double().reshape(-1, tiny.d_model)
        error = (y - reference_output(clt, layer, latents).reshape(y.shape)).square().sum()
        fvu = float(error / (y - y.mean(0)).square().sum())
        assert metrics[layer].fvu == pytest.approx(fvu, rel=1e-4)
        assert metrics[layer].l0 == pytest.approx(float((latents[layer] != 0).sum(-1).double().mean()))

    def cross_entropy(logits):
        return float(F.cross_entropy(logits[:, :-1].double().flatten(0, 1), batch[:, 1:].flatten()))

    assert metrics.ce_all_spliced == pytest.approx(
        cross_entropy(hooked_logits(tiny, clt, batch, spliced=clt.layers)), rel=1e-4)
    assert metrics[2].ce_spliced == pytest.approx(cross_entropy(hooked_logits(tiny, clt, batch, spliced=[2])), rel=1e-4)
    assert metrics.transcoders[2]["site"]["layer"] == 2


def test_run_with_edits_on_a_cross_layer_transcoder_changes_every_later_layer(tiny, tokens):
    clt = random_clt(tiny, [0, 1, 2], "relu", seed=1)
    prompt = tokens[:1, :10]
    latents = tcw.run_with_edits(tiny, clt, prompt, save_latents=True).latents
    latent = int(latents[0][0, -1].argmax())
    result = tcw.run_with_edits(tiny, clt, prompt, [tcw.Edit(layer=0, latent=latent, scale=0.0)], positions=-1)

    def edit(layer, z):
        if layer != 0:
            return z
        z = z.clone()
        z[:, -1, latent] = 0
        return z

    expected = hooked_logits(tiny, clt, prompt, spliced=clt.layers, mode="error", edit=edit)
    torch.testing.assert_close(result.logits.double(), expected.double(), rtol=1e-4, atol=1e-4)
    only_layer_0 = hooked_logits(tiny, clt, prompt, spliced=[0], mode="error", edit=edit)
    assert not torch.allclose(result.logits, only_layer_0.float(), atol=1e-4)  # the later writes count


# ---- training ---------------------------------------------------------------------------------------


def weights(module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in module.state_dict().items()}


def test_a_cross_layer_transcoder_learns_writes_across_layers_and_keeps_latents_alive(store):
    records = []
    trainer = CrossLayerTrainer(store, [0, 1, 2], TrainingConfig(**SMALL, epochs=4, lr=3e-3), log_every=4,
                                progress=False, callback=lambda trainer, record: records.append(record))
    before = reconstruction_metrics(trainer.transcoder, store)
    clt = trainer.fit()
    assert isinstance(clt, tcw.CrossLayerTranscoder) and not clt.training
    assert clt.layers == [0, 1, 2] and clt.config.sites[1] == store.sites(1)
    assert [record["step"] for record in records] == [4, 8, 12, 16, 20, 24, 28, 32]
    assert records[-1]["l0"] == pytest.approx(4, abs=0.5)
    after = reconstruction_metrics(clt, store)
    for layer in clt.layers:
        assert after[layer]["fvu"] < 0.85 * before[layer]["fvu"] and after[layer]["dead_fraction"] < 0.2, after
    assert float(clt.W_dec_0[:, 1:].detach().norm()) > 0.1  # it learnt to write to later layers
    for i in range(3):  # unit-norm decoders over all the layers each latent writes to
        torch.testing.assert_close(getattr(clt, f"W_dec_{i}").flatten(1).norm(dim=1), torch.ones(64))
    x, y = zip(*(store.layer(layer) for layer in clt.layers))
    with torch.no_grad():
        outputs = clt(list(x))[1]
    fvu = float((y[2] - outputs[2]).square().sum() / (y[2] - y[2].mean(0)).square().sum())
    assert after[2]["fvu"] == pytest.approx(fvu, rel=1e-4)
    figure = trainer.plot_history()
    assert len(figure.axes) == 4


@pytest.mark.parametrize("activation", ["jumprelu", "relu"])
def test_dense_activations_train(store, activation):
    clt = tcw.train_clt(store, [1, 2], n_latents=64, batch_size=64, activation=activation, progress=False)
    assert clt.config.activation == activation
    assert all(m["fvu"] < 0.9 for m in reconstruction_metrics(clt, store).values())


def test_two_threads_train_bit_for_bit_like_one(store):
    """As the per-layer trainer's: the step's memory-bound kernels run on one thread, the dense
    latent choice on both, split over its outputs; the caller's thread count is back afterwards."""
    threads = torch.get_num_threads()
    try:
        runs = {}
        for n in (1, 2):
            torch.set_num_threads(n)
            runs[n] = weights(CrossLayerTrainer(store, [0, 2], TrainingConfig(**SMALL, epochs=1),
                                                progress=False).fit())
            assert torch.get_num_threads() == n
    finally:
        torch.set_num_threads(threads)
    for name, value in runs[1].items():
        assert torch.equal(runs[2][name], value), name


def test_resume_after_an_interruption_ends_bit_for_bit_equal(store, tmp_path):
    config = TrainingConfig(**SMALL, epochs=2, dead_window=64)  # 16 steps; AuxK active
    reference = CrossLayerTrainer(store, [0, 2], config, log_every=2, progress=False)
    expected = weights(reference.fit())

    def interrupt(trainer, record):
        if trainer.step == 12:
            raise Interrupted

    first = CrossLayerTrainer(store, [0, 2], config, checkpoint_dir=tmp_path, checkpoint_every=5, log_every=2,
                              callback=interrupt, progress=False)
    with pytest.raises(Interrupted):
        first.fit()
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000010"]
    resumed = CrossLayerTrainer(store, [0, 2], config, checkpoint_dir=tmp_path, checkpoint_every=5, log_every=2,
                                progress=False)
    assert resumed.step == 10
    assert any("auxk" in record and record["dead_fraction"] > 0 for record in resumed.history)
    result = weights(resumed.fit())
    for name in expected:
        assert torch.equal(result[name], expected[name]), name
    assert resumed.history == reference.history
    assert torch.equal(resumed.tokens_since_fired, reference.tokens_since_fired)
    assert CrossLayerTranscoder.load(tmp_path / "step-00000016" / "transcoder").config == resumed.transcoder.config

    with pytest.raises(CheckpointError, match="other settings.*k: checkpoint 4, now 8.*resume=False"):
        CrossLayerTrainer(store, [0, 2], TrainingConfig(**{**SMALL, "k": 8}), checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(CheckpointError, match=r"another store \(layer: checkpoint \[0, 2\], now \[0, 1\]"):
        CrossLayerTrainer(store, [0, 1], config, checkpoint_dir=tmp_path, progress=False)


def test_bad_input_is_refused_with_the_fix(store):
    with pytest.raises(tcw.LayerNotInStoreError, match="Layer 3 is not in this store"):
        tcw.train_clt(store, [0, 3], **SMALL)
    with pytest.raises(ValueError, match=r"layers=\[1, 0\]: name each layer once, in ascending order"):
        tcw.train_clt(store, [1, 0], **SMALL)
    with pytest.raises(ValueError, match="layers is empty"):
        tcw.train_clt(store, [], **SMALL)
    with pytest.raises(ValueError, match="kind='sae'.*train_transcoder"):
        tcw.train_clt(store, [0, 1], **SMALL, kind="sae")
    with pytest.raises(ValueError, match="activation='batchtopk'"):
        tcw.train_clt(store, [0, 1], **SMALL, activation="batchtopk")
    with pytest.raises(ValueError, match="k=128 is larger than n_latents=64"):
        tcw.train_clt(store, [0, 1], **{**SMALL, "k": 128})
    with pytest.raises(ValueError, match="larger than the store"):
        tcw.train_clt(store, [0, 1], **{**SMALL, "batch_size": 10**6})
    with pytest.raises(ValueError, match=r"matryoshka=\(16, 32\): nested prefixes are for per-layer"):
        tcw.train_clt(store, [0, 1], **SMALL, matryoshka=(16, 32))


def test_the_batch_order_is_the_configured_one(store):
    """shuffle= reaches the store's batches: the stored order and a global shuffle train differently,
    and the same order twice trains identically."""
    runs = {order: tcw.train_clt(store, [0, 1], **SMALL, shuffle=order, progress=False) for order in ("document", "global")}
    again = tcw.train_clt(store, [0, 1], **SMALL, shuffle="document", progress=False)
    assert all(torch.equal(a, b) for a, b in zip(runs["document"].state_dict().values(), again.state_dict().values()))
    assert not torch.equal(runs["document"].state_dict()["W_enc"], runs["global"].state_dict()["W_enc"])


# ---- circuit-tracer's cross-layer transcoder files ------------------------------------------------------
# (bench/crosslayer_interop.py checks the same against circuit-tracer's own load_clt)


def circuit_tracer_clt_forward(folder, n_layers, xs):
    """CrossLayerTranscoder.encode / compute_reconstruction of circuit-tracer 0.5.0, from its files, in
    float64: per layer ``pre = x W_encᵀ + b_enc``, JumpReLU ``pre · (pre > θ)`` (ReLU without θ), and
    at layer j ``Σ_{i ≤ j} z_i W_dec_i[:, j - i] + b_dec_j``."""
    encoders = [{name.removesuffix(f"_{i}"): t.double() for name, t in
                 load_file(folder / f"W_enc_{i}.safetensors").items()} for i in range(n_layers)]
    decoders = [load_file(folder / f"W_dec_{i}.safetensors")[f"W_dec_{i}"].double() for i in range(n_layers)]
    latents = []
    for e, x in zip(encoders, xs):
        pre = x.double() @ e["W_enc"].T + e["b_enc"]
        latents.append(pre * (pre > e["threshold"]) if "threshold" in e else pre.clamp_min(0))
    outputs = [encoders[j]["b_dec"] + sum(latents[i] @ decoders[i][:, j - i] for i in range(j + 1))
               for j in range(n_layers)]
    return latents, outputs


def write_circuit_tracer_clt_by_hand(folder, n_layers, d, n, threshold: bool):
    torch.manual_seed(3)
    folder.mkdir()
    for i in range(n_layers):
        encoder = {f"W_enc_{i}": torch.randn(n, d) * 0.5, f"b_enc_{i}": torch.randn(n) * 0.2,
                   f"b_dec_{i}": torch.randn(d) * 0.2}
        if threshold:
            encoder[f"threshold_{i}"] = torch.rand(n) * 0.3
        save_file(encoder, folder / f"W_enc_{i}.safetensors")
        save_file({f"W_dec_{i}": torch.randn(n, n_layers - i, d) * 0.3}, folder / f"W_dec_{i}.safetensors")
    (folder / "config.yaml").write_text(yaml.safe_dump({
        "model_kind": "cross_layer_transcoder", "model_name": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "feature_input_hook": "hook_resid_mid", "feature_output_hook": "hook_mlp_out"}))


@pytest.mark.parametrize("threshold", [True, False])
def test_circuit_tracer_clt_files_load_and_compute_what_circuit_tracer_does(tmp_path, threshold):
    write_circuit_tracer_clt_by_hand(tmp_path / "clt", 3, 12, 20, threshold)
    with pytest.warns(UserWarning, match="reads 'hook_resid_mid'.*before the pre-MLP norm.*does not compute"):
        clt = tcw.load_transcoders(tmp_path / "clt")
    assert isinstance(clt, CrossLayerTranscoder) and clt.layers == [0, 1, 2]
    assert clt.config.activation == ("jumprelu" if threshold else "relu")
    assert clt.views()[1].config.site == {"model": "smollm2-135m", "layer": 1, "input": "hook_resid_mid",
                                          "output": "hook_mlp_out"}
    xs = [torch.randn(9, 12) for _ in range(3)]
    expected_latents, expected_outputs = circuit_tracer_clt_forward(tmp_path / "clt", 3, xs)
    with torch.no_grad():
        latents, outputs = clt(xs)
    for ours, theirs in zip([*latents, *outputs], [*expected_latents, *expected_outputs]):
        torch.testing.assert_close(ours.double(), theirs, rtol=1e-5, atol=1e-5)
    with pytest.raises(tcw.TranscoderFormatError, match="loads whole: leave out layers="):
        tcw.load_transcoders(tmp_path / "clt", layers=[1])  # refused before reading the files: no warning


def test_saved_for_circuit_tracer_it_computes_the_same_and_reads_back(tiny, tmp_path):
    clt = random_clt(tiny, [1, 3], "jumprelu")
    clt.save(tmp_path / "ct", format="circuit-tracer", n_layers=5)
    config = yaml.safe_load((tmp_path / "ct" / "config.yaml").read_text())
    assert config["model_kind"] == "cross_layer_transcoder" and config["feature_input_hook"] == "mlp.hook_in"
    xs = [torch.randn(9, tiny.d_model) for _ in range(5)]
    latents, outputs = circuit_tracer_clt_forward(tmp_path / "ct", 5, xs)
    with torch.no_grad():
        ours_latents, ours_outputs = clt([xs[1], xs[3]])
    for ours, theirs in zip([*ours_latents, *ours_outputs], [latents[1], latents[3], outputs[1], outputs[3]]):
        torch.testing.assert_close(ours.double(), theirs, rtol=1e-4, atol=1e-4)
    for padding in (0, 2, 4):  # the layers it does not span: no latents, nothing written
        assert not latents[padding].any() and not outputs[padding].any()
    again = tcw.load_transcoders(tmp_path / "ct")
    assert again.layers == [1, 3]
    with torch.no_grad():
        for ours, theirs in zip(again([xs[1], xs[3]])[1], ours_outputs):
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    clt.save(tmp_path / "ours")
    assert torch.equal(tcw.load_transcoders(tmp_path / "ours").W_dec_0, clt.W_dec_0)
    with pytest.raises(tcw.UnrepresentableError, match="no TopK"):
        random_clt(tiny, [0, 1]).save(tmp_path / "topk", format="circuit-tracer")


# ---- features, dashboard, sliders -------------------------------------------------------------------------


def test_analyze_features_and_the_widgets_take_a_cross_layer_transcoder(tiny, tokens):
    clt = random_clt(tiny, [0, 2], "relu")
    view = clt.views()[2]
    stats = tcw.analyze_features(tiny, view, tokens[:4], top_k=2, progress=False)
    x = tcw.splice(tiny, {}, tokens[:4], save_mlp=[2], progress=False).mlp[2][0]
    latents = reference_latents(clt, 2, x)[:, 1:].flatten(0, 1)  # BOS positions are left out
    np.testing.assert_allclose(stats.max, latents.max(0).values.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(stats.count, (latents > 0).sum(0).numpy())
    # logit effects read the latent's summed writes into layer 2 (and later: none here) in model units
    summed = clt.W_dec_1[:, 0].double() / clt.config.output_scales[1]
    torch.testing.assert_close(view.W_dec.double() / view.config.output_scale, summed)
    first = clt.views()[0]
    writes = (clt.W_dec_0[:, 0].double() / clt.config.output_scales[0]
              + clt.W_dec_0[:, 1].double() / clt.config.output_scales[1])
    torch.testing.assert_close(first.W_dec.double() / first.config.output_scale, writes)
    tcw.FeatureDashboard(stats)

    sliders = tcw.AblationSliders(tiny, clt, prompt="def add(a, b):")
    assert sorted(sliders.transcoders) == [0, 2] and not sliders._problems


# ---- attribution ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("layers", [[0, 1, 2, 3], [0, 2]])
def test_attribution_through_a_cross_layer_transcoder_is_exact(tiny, layers, tmp_path):
    from test_circuits import assert_exact
    from test_circuits_graph import adjacency_row, folded

    clt = random_clt(tiny, layers, "relu", seed=2)
    prompt = "It lasted from 1732 to 17"
    tokens = encode_prompt(tiny, prompt)  # as attribute reads it
    logits = tcw.splice(tiny, {}, tokens, progress=False).logits[0, -1].double()
    x = tcw.splice(tiny, {}, tokens, save_mlp=[layers[-1]], progress=False).mlp[layers[-1]][0][0]
    latent = int(reference_latents(clt, layers[-1], x)[5].argmax())
    for target, value in [(tcw.LogitTarget("3", minus="1"), float(logits[tiny.tokenizer("3")["input_ids"][-1]]
                                                                    - logits[tiny.tokenizer("1")["input_ids"][-1]])),
                          (tcw.LatentTarget(layers[-1], latent, 5), None)]:
        graph = tcw.attribute(tiny, clt, prompt, target, depth=1, top_k=None, threshold=0)
        direct = graph.predecessors(graph.target_id)
        assert sum(e.weight for e in direct) == pytest.approx(graph.target_value, abs=1e-9)
        if value is not None:
            assert graph.target_value == pytest.approx(value, abs=1e-4)
        else:
            pre = reference_latents(clt, layers[-1], x)  # activated; the target is the pre-activation
            assert graph.target_value == pytest.approx(float(pre[5, latent]), abs=1e-4)
        sources = {graph.nodes[e.source].layer for e in direct if graph.nodes[e.source].kind == "latent"}
        assert sources and sources <= set(layers)
        assert_exact(tcw.attribute(tiny, clt, prompt, target, depth=3, top_k=3, threshold=0))
    # the full graph: every row sums to its value, and the target's row is the exact decomposition
    graph = tcw.attribute(tiny, clt, "a b c", tcw.LogitTarget("3", minus="1"), depth=0)
    adjacency = graph.adjacency()
    rows = torch.isfinite(adjacency.values)
    assert torch.allclose((adjacency.matrix.sum(1) + adjacency.bias)[rows], adjacency.values[rows], atol=1e-9)
    expected, got = folded(graph, graph.target_id), adjacency_row(graph, graph.target_id)
    for key, weight in expected.items():
        assert got.get(key, 0.0) == pytest.approx(weight, abs=1e-10), key
    replacement, completeness = graph.scores()
    assert 0 <= replacement <= 1 and 0 <= completeness <= 1
    if layers == [0, 2]:  # the circuit view and circuit-tracer's graph files take it; views need their sources
        with pytest.raises(tcw.CircuitError, match=r"sums the writes of layers \[0, 2\]: pass it whole"):
            tcw.attribute(tiny, {2: clt.views()[2]}, prompt, tcw.LogitTarget("3"), depth=0)
        from tcwidgets.widgets.circuit_view import CircuitView

        graph = tcw.attribute(tiny, clt, prompt, tcw.LogitTarget("3", minus="1"), depth=2, top_k=6, threshold=0)
        view = CircuitView(graph, threshold=0.0)
        latent = next(n for n in graph.nodes.values() if n.kind == "latent" and n.layer == 0)
        sent = []
        view.send = sent.append
        view._on_message(None, {"type": "summary", "request": "r1", "id": latent.node_id}, [])
        assert sent[-1]["summary"]["kind"] == "latent" and len(sent[-1]["summary"]["promoted"]) == 5
        graph.save(tmp_path / "graph", format="circuit-tracer")
        assert (tmp_path / "graph").is_dir() and any((tmp_path / "graph").iterdir())


# ---- the tutorials' cached cross-layer transcoder ---------------------------------------------------------


def tiny_llama(lm):
    """A 3-layer, 32-wide random Llama with the default model's tokenizer (seeded)."""
    torch.manual_seed(0)
    return tcw.load_model(transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=lm.config.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128)).eval(), tokenizer=lm.tokenizer)


def test_circuit_clt_is_trained_once_on_every_layer_then_read_from_the_cache(lm, tmp_path, monkeypatch):
    from tcwidgets.tutorials import cache

    tiny = tiny_llama(lm)
    monkeypatch.setenv("TCWIDGETS_CACHE", str(tmp_path))
    clt = cache.circuit_clt(tiny, n_tokens=384, n_latents=16, k=2, epochs=1)
    assert clt.layers == list(range(tiny.n_layers)) and clt.n_latents == 16 and clt.config.k == 2
    (folder,) = (tmp_path / "tutorials" / "circuit-clt").iterdir()
    assert [path.name for path in folder.iterdir()] == ["clt"]  # the store and the checkpoints are gone

    def train_again(*args, **kwargs):
        raise AssertionError("circuit_clt trained again instead of reading its cache")

    monkeypatch.setattr(cache, "train_clt", train_again)
    again = cache.circuit_clt(tiny, n_tokens=384, n_latents=16, k=2, epochs=1)
    saved, read = weights(clt), weights(again)
    assert saved.keys() == read.keys() and all(torch.equal(saved[name], read[name]) for name in saved)


def test_cross_layer_transcoder_is_train_clt_on_the_cached_store_then_read_from_the_cache(lm, tmp_path, monkeypatch):
    from tcwidgets.tutorials import cache

    tiny = tiny_llama(lm)
    monkeypatch.setenv("TCWIDGETS_CACHE", str(tmp_path))
    size = dict(n_tokens=384, n_latents=16, k=2, epochs=1)
    clt = cache.cross_layer_transcoder(tiny, [2, 0], **size)
    (folder,) = (tmp_path / "tutorials" / "crosslayer").iterdir()
    assert not (folder / "checkpoints").exists()
    independent = tcw.train_clt(cache.activations(tiny, [0, 2], n_tokens=384), [0, 2], n_latents=16, k=2, epochs=1)
    trained, expected = weights(clt), weights(independent)
    assert clt.layers == [0, 2] and trained.keys() == expected.keys()
    assert all(torch.equal(trained[name], expected[name]) for name in trained)  # checkpointing changed nothing

    def train_again(*args, **kwargs):
        raise AssertionError("cross_layer_transcoder trained again instead of reading its cache")

    monkeypatch.setattr(cache, "train_clt", train_again)
    read = weights(cache.cross_layer_transcoder(tiny, [0, 2], **size))
    assert all(torch.equal(trained[name], read[name]) for name in trained)
