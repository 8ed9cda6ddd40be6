"""load_transcoders and save(format=...): files in each peer's documented layout, built by hand here,
read and compared with an independent numpy computation of the peer's forward pass; our exports read
back the same way; bad inputs. (bench/interop.py checks against the peers' own loaders.)"""

import json

import numpy as np
import pytest
import torch
import yaml
from safetensors.numpy import load_file as load_numpy, save_file as save_numpy

import tcwidgets as tcw
from tcwidgets.interop import TranscoderFormatError, UnrepresentableError

D, N = 12, 30
RNG = np.random.default_rng(0)


def rand(*shape, scale=0.5):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


X = rand(40, D, scale=1.0)


def relu(a):
    return np.maximum(a, 0)


def topk_relu(pre, k):
    """sparsify / SAELens TopK: keep the k largest pre-activations of each row, then ReLU."""
    out = np.zeros_like(pre)
    idx = np.argsort(-pre, axis=1)[:, :k]
    np.put_along_axis(out, idx, relu(np.take_along_axis(pre, idx, axis=1)), axis=1)
    return out


def assert_same(tc, latents, output, x=X):
    with torch.no_grad():
        got = tc(torch.from_numpy(x))
    np.testing.assert_allclose(got.latents.numpy(), latents, rtol=0, atol=1e-5)
    np.testing.assert_allclose(got.output.numpy(), output, rtol=0, atol=1e-5)


# ---- sparsify ------------------------------------------------------------------------------------


def write_sparsify(folder, *, transcode, skip=False, k=4):
    weights = {"encoder.weight": rand(N, D), "encoder.bias": rand(N), "W_dec": rand(N, D), "b_dec": rand(D)}
    if skip:
        weights["W_skip"] = rand(D, D)
    folder.mkdir(parents=True)
    save_numpy(weights, folder / "sae.safetensors")
    (folder / "cfg.json").write_text(json.dumps({"activation": "topk", "expansion_factor": 32, "normalize_decoder": True,
                                                 "num_latents": N, "k": k, "multi_topk": False,
                                                 "skip_connection": skip, "transcode": transcode, "d_in": D}))
    return weights


def sparsify_forward(w, x, *, transcode, k=4):
    z = topk_relu((x if transcode else x - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"], k)
    y = z @ w["W_dec"] + w["b_dec"]
    return z, y + x @ w["W_skip"].T if "W_skip" in w else y


@pytest.mark.parametrize("transcode,skip", [(True, False), (True, True), (False, False)])
def test_sparsify_coders_compute_what_sparsify_does(tmp_path, transcode, skip):
    w = write_sparsify(tmp_path / "layers.2.mlp", transcode=transcode, skip=skip)
    w5 = write_sparsify(tmp_path / "layers.5.mlp", transcode=transcode, skip=skip)
    (tmp_path / "config.json").write_text(json.dumps({"model": "HuggingFaceTB/SmolLM2-135M-Instruct"}))
    loaded = tcw.load_transcoders(tmp_path)
    assert sorted(loaded) == [2, 5]
    tc = loaded[2]
    assert (tc.config.kind, tc.config.activation, tc.config.k) == ("skip" if skip else "transcoder" if transcode else "sae",
                                                                   "topk", 4)
    assert tc.config.site["model"] == "smollm2-135m" and tc.config.site["layer"] == 2
    assert_same(tc, *sparsify_forward(w, X, transcode=transcode))
    assert_same(loaded[5], *sparsify_forward(w5, X, transcode=transcode))
    assert list(tcw.load_transcoders(tmp_path, layers=[5])) == [5]
    assert list(tcw.load_transcoders(tmp_path / "layers.5.mlp")) == [5]


# ---- SAELens --------------------------------------------------------------------------------------


def write_saelens(folder, architecture, *, d_out=D, apply_b_dec=False, k=None, rescale=False, log_threshold=False,
                  hook="blocks.3.ln2.hook_normalized"):
    weights = {"W_enc": rand(D, N), "b_enc": rand(N), "W_dec": rand(N, d_out), "b_dec": rand(d_out)}
    if "jumprelu" in architecture:
        threshold = np.abs(rand(N)) + 0.05
        weights["log_threshold" if log_threshold else "threshold"] = np.log(threshold) if log_threshold else threshold
    if "skip" in architecture:
        weights["W_skip"] = rand(d_out, D)
    cfg = {"architecture": architecture, "d_in": D, "d_sae": N, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": apply_b_dec, "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"model_name": "gpt2", "hook_name": hook, "hook_name_out": "blocks.3.hook_mlp_out",
                        "sae_lens_version": "6.54.0"}}
    if "transcoder" in architecture:
        cfg["d_out"] = d_out
    if k is not None:
        cfg["k"], cfg["rescale_acts_by_decoder_norm"] = k, rescale
    folder.mkdir(parents=True)
    save_numpy(weights, folder / "sae_weights.safetensors")
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return weights


def saelens_forward(w, x, architecture, *, apply_b_dec=False, k=None, rescale=False):
    """SAELens' encode/decode (StandardSAE, JumpReLUSAE, TopKSAE, Transcoder and subclasses)."""
    pre = (x - w["b_dec"] if apply_b_dec else x) @ w["W_enc"] + w["b_enc"]
    norms = np.linalg.norm(w["W_dec"], axis=1)
    if rescale:
        pre = pre * norms
    if k is not None:
        z = topk_relu(pre, k)
    elif "jumprelu" in architecture:
        threshold = w["threshold"] if "threshold" in w else np.exp(w["log_threshold"])
        z = relu(pre) * (pre > threshold)
    else:
        z = relu(pre)
    y = (z / norms if rescale else z) @ w["W_dec"] + w["b_dec"]
    return z, y + x @ w["W_skip"].T if "W_skip" in w else y


@pytest.mark.parametrize("architecture,options", [
    ("standard", {"apply_b_dec": True}), ("jumprelu", {"log_threshold": True}), ("topk", {"k": 5, "rescale": True}),
    ("transcoder", {}), ("skip_transcoder", {}), ("jumprelu_transcoder", {}), ("jumprelu_skip_transcoder", {}),
])
def test_saelens_saes_and_transcoders_compute_what_saelens_does(tmp_path, architecture, options):
    hook = "blocks.3.ln2.hook_normalized" if "transcoder" in architecture else "blocks.3.hook_mlp_out"
    w = write_saelens(tmp_path / "sae", architecture, hook=hook, **options)
    (tc,) = tcw.load_transcoders(tmp_path / "sae").values()
    expected_kind = "skip" if "skip" in architecture else "transcoder" if "transcoder" in architecture else "sae"
    assert tc.config.kind == expected_kind
    assert tc.config.site == {"model": "gpt2", "layer": 3, "input": hook, "output": "blocks.3.hook_mlp_out"}
    options.pop("log_threshold", None)
    assert_same(tc, *saelens_forward(w, X, architecture, **options))


def test_gemma_scope_params_npz_without_pickles(tmp_path):
    folder = tmp_path / "gemma-scope-2b-pt-transcoders" / "layer_4" / "width_16k" / "average_l0_50"
    folder.mkdir(parents=True)
    w = {"W_enc": rand(D, N), "b_enc": rand(N), "W_dec": rand(N, D), "b_dec": rand(D), "threshold": np.abs(rand(N))}
    np.savez(folder / "params.npz", **w)
    for source in (tmp_path / "gemma-scope-2b-pt-transcoders", folder, folder / "params.npz"):
        (tc,) = tcw.load_transcoders(source).values()
        assert (tc.config.kind, tc.config.activation) == ("transcoder", "jumprelu")
        assert tc.config.site == {"model": "google/gemma-2-2b", "layer": 4, "input": "blocks.4.ln2.hook_normalized",
                                  "output": "blocks.4.hook_mlp_out"}
        assert_same(tc, *saelens_forward(w, X, "jumprelu"))
    np.savez(folder / "params.npz", W_enc=np.array([{"a": 1}], dtype=object))
    with pytest.raises(TranscoderFormatError, match="without pickles"):
        tcw.load_transcoders(folder)


# ---- circuit-tracer ---------------------------------------------------------------------------------


def write_transcoder_set(folder, layers):
    folder.mkdir(parents=True)
    weights = {}
    for layer in range(layers):
        w = {"W_enc": rand(N, D), "W_dec": rand(N, D), "b_enc": rand(N), "b_dec": rand(D)}
        if layer == 1:
            w["activation_function.threshold"] = np.abs(rand(N))
        if layer == 2:  # a zero transcoder padding the set
            w = {name: np.zeros_like(a) for name, a in w.items()}
        save_numpy(w, folder / f"layer_{layer}.safetensors")
        weights[layer] = w
    (folder / "config.yaml").write_text(yaml.safe_dump({
        "model_name": "google/gemma-3-270m", "model_kind": "transcoder_set", "feature_input_hook": "mlp.hook_in",
        "feature_output_hook": "hook_mlp_out", "transcoders": [f"layer_{i}.safetensors" for i in range(layers)]}))
    return weights


def circuit_tracer_forward(w, x):
    """SingleLayerTranscoder.encode/decode: F.linear(x, W_enc, b_enc), JumpReLU or ReLU, acts @ W_dec + b_dec."""
    pre = x @ w["W_enc"].T + w["b_enc"]
    z = pre * (pre > w["activation_function.threshold"]) if "activation_function.threshold" in w else relu(pre)
    return z, z @ w["W_dec"] + w["b_dec"]


def test_circuit_tracer_set_computes_what_circuit_tracer_does(tmp_path):
    weights = write_transcoder_set(tmp_path / "set", 3)
    loaded = tcw.load_transcoders(tmp_path / "set")
    assert sorted(loaded) == [0, 1]  # the zero transcoder of layer 2 only pads the set
    assert loaded[1].config.activation == "jumprelu" and loaded[0].config.activation == "relu"
    assert loaded[0].config.site == {"model": "gemma3-270m", "layer": 0, "input": "mlp.hook_in", "output": "hook_mlp_out"}
    for layer in (0, 1):
        assert_same(loaded[layer], *circuit_tracer_forward(weights[layer], X))
    with pytest.raises(TranscoderFormatError, match=r"no layers \[7\]"):
        tcw.load_transcoders(tmp_path / "set", layers=[7])


# ---- our exports, read as each peer reads them ----------------------------------------------------------


def our_transcoder(kind, activation, layer=3):
    config = tcw.TranscoderConfig(d_in=D, d_out=D, n_latents=N, kind=kind, activation=activation,
                                  k=4 if activation in ("topk", "batchtopk") else None, input_scale=1.7,
                                  output_scale=0.6, site={"model": "smollm2-135m", "layer": layer,
                                                          "input": f"model.layers.{layer}.mlp.input",
                                                          "output": f"model.layers.{layer}.mlp.output"})
    tc = tcw.Transcoder(config)
    with torch.no_grad():
        for parameter in tc.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)
        if activation == "jumprelu":
            tc.log_threshold.copy_(torch.randn(N) * 0.3 - 1.5)
        if activation == "batchtopk":
            tc.threshold.fill_(0.2)
    return tc.eval()


def ours(tc, x=X):
    with torch.no_grad():
        out = tc(torch.from_numpy(x))
    return out.latents.numpy(), out.output.numpy()


@pytest.mark.parametrize("kind", ["transcoder", "skip", "sae"])
def test_sparsify_export_is_what_sparsify_computes(tmp_path, kind):
    tc = our_transcoder(kind, "topk")
    tc.save(tmp_path, format="sparsify")
    folder = tmp_path / "layers.3.mlp"
    cfg = json.loads((folder / "cfg.json").read_text())
    assert (cfg["k"], cfg["num_latents"], cfg["d_in"], cfg["transcode"], cfg["skip_connection"]) == \
        (4, N, D, kind != "sae", kind == "skip")
    w = load_numpy(folder / "sae.safetensors")
    assert set(w) == {"encoder.weight", "encoder.bias", "W_dec", "b_dec"} | ({"W_skip"} if kind == "skip" else set())
    z, y = sparsify_forward(w, X, transcode=cfg["transcode"])
    np.testing.assert_allclose(z, ours(tc)[0], atol=1e-5)
    np.testing.assert_allclose(y, ours(tc)[1], atol=1e-5)
    assert json.loads((tmp_path / "config.json").read_text())["model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert_same(tcw.load_transcoders(tmp_path)[3], *ours(tc))


@pytest.mark.parametrize("kind,activation,architecture", [
    ("sae", "relu", "standard"), ("sae", "topk", "topk"), ("sae", "jumprelu", "jumprelu"),
    ("transcoder", "relu", "transcoder"), ("transcoder", "batchtopk", "jumprelu_transcoder"),
    ("skip", "jumprelu", "jumprelu_skip_transcoder"), ("skip", "relu", "skip_transcoder"),
])
def test_saelens_export_is_what_saelens_computes(tmp_path, kind, activation, architecture):
    tc = our_transcoder(kind, activation)
    tc.save(tmp_path, format="saelens")
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == architecture and cfg["apply_b_dec_to_input"] is False
    assert cfg["metadata"]["model_name"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert int(cfg["metadata"]["sae_lens_version"].split(".")[0]) >= 6  # read as a 6.x file, not converted
    w = load_numpy(tmp_path / "sae_weights.safetensors")
    assert w["W_enc"].shape == (D, N) and w["W_dec"].shape == (N, D)
    z, y = saelens_forward(w, X, architecture, k=cfg.get("k"))
    np.testing.assert_allclose(z, ours(tc)[0], atol=1e-5)
    np.testing.assert_allclose(y, ours(tc)[1], atol=1e-5)
    loaded = tcw.load_transcoders(tmp_path)[3]
    assert_same(loaded, *ours(tc))
    assert loaded.config.site["output"] == tc.config.site["output"]
    assert loaded.config.site["input"] == tc.config.site["output" if kind == "sae" else "input"]


def test_circuit_tracer_export_pads_the_set_and_is_what_circuit_tracer_computes(tmp_path):
    relu_tc, jump_tc = our_transcoder("transcoder", "relu", layer=1), our_transcoder("transcoder", "batchtopk", layer=3)
    tcw.save_transcoders({1: relu_tc, 3: jump_tc}, tmp_path, format="circuit-tracer", n_layers=5)
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert config["model_kind"] == "transcoder_set" and config["model_name"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert (config["feature_input_hook"], config["feature_output_hook"]) == ("mlp.hook_in", "mlp.hook_out")
    assert config["transcoders"] == [f"layer_{i}.safetensors" for i in range(5)]
    for layer in (0, 2, 4):
        padding = load_numpy(tmp_path / f"layer_{layer}.safetensors")
        assert padding["W_enc"].shape == (N, D) and not any(a.any() for a in padding.values())
    for layer, tc in ((1, relu_tc), (3, jump_tc)):
        z, y = circuit_tracer_forward(load_numpy(tmp_path / f"layer_{layer}.safetensors"), X)
        np.testing.assert_allclose(z, ours(tc)[0], atol=1e-5)
        np.testing.assert_allclose(y, ours(tc)[1], atol=1e-5)
    loaded = tcw.load_transcoders(tmp_path)
    assert sorted(loaded) == [1, 3]
    assert_same(loaded[3], *ours(jump_tc))


def test_tcwidgets_sets_round_trip(tmp_path):
    originals = {layer: our_transcoder("skip", "jumprelu", layer=layer) for layer in (0, 2)}
    tcw.save_transcoders(originals, tmp_path)
    loaded = tcw.load_transcoders(tmp_path)
    assert sorted(loaded) == [0, 2] and loaded[2].config.site == originals[2].config.site
    assert_same(loaded[2], *ours(originals[2]))


def test_loaded_transcoders_splice_like_the_originals(tmp_path, lm, contexts):
    config = tcw.TranscoderConfig(d_in=lm.d_model, d_out=lm.d_model, n_latents=64, kind="transcoder",
                                  activation="jumprelu", input_scale=0.5, output_scale=2.0,
                                  site={"model": lm.name, "layer": 4, **lm.sites.mlp_sites(4)})
    tc = tcw.Transcoder(config).eval()
    tc.save(tmp_path / "ct", format="circuit-tracer", n_layers=lm.n_layers)
    tc.save(tmp_path / "sl", format="saelens")
    expected = tcw.splice(lm, tc, contexts[:2], progress=False).logits
    for folder in ("ct", "sl"):
        loaded = tcw.load_transcoders(tmp_path / folder)
        assert list(loaded) == [4] and loaded[4].config.site["model"] == lm.name
        torch.testing.assert_close(tcw.splice(lm, loaded, contexts[:2], progress=False).logits, expected,
                                   rtol=1e-4, atol=1e-4)


# ---- bad inputs -----------------------------------------------------------------------------------------


def test_exports_a_format_cannot_hold_are_refused(tmp_path):
    with pytest.raises(UnrepresentableError, match="no TopK.*keeps negative values"):
        our_transcoder("transcoder", "topk").save(tmp_path / "a", format="circuit-tracer")
    with pytest.raises(UnrepresentableError, match="SAELens has no TopK transcoder"):
        our_transcoder("skip", "topk").save(tmp_path / "b", format="saelens")
    with pytest.raises(UnrepresentableError, match="sparsify has only TopK"):
        our_transcoder("transcoder", "relu").save(tmp_path / "c", format="sparsify")
    with pytest.raises(UnrepresentableError, match="not SAEs"):
        our_transcoder("sae", "relu").save(tmp_path / "d", format="circuit-tracer")
    with pytest.raises(ValueError, match="format='onnx' is not one of"):
        our_transcoder("sae", "relu").save(tmp_path / "e", format="onnx")
    assert not any((tmp_path / name).exists() for name in "abcd")


def test_pickles_are_refused_with_why_and_what_to_do(tmp_path):
    torch.save({"W_enc": torch.zeros(2, 2)}, tmp_path / "transcoder.pt")
    for source in (tmp_path, tmp_path / "transcoder.pt"):
        with pytest.raises(TranscoderFormatError, match="pickled checkpoint.*never unpickles.*safetensors"):
            tcw.load_transcoders(source)


def test_unknown_folders_list_the_formats(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(TranscoderFormatError, match="tcwidgets.*sparsify.*SAELens.*params.npz.*circuit-tracer"):
        tcw.load_transcoders(tmp_path)
    with pytest.raises(TranscoderFormatError, match="neither a local folder nor a Hugging Face"):
        tcw.load_transcoders("no such folder!")


def test_saelens_features_without_an_exact_equivalent_are_refused(tmp_path):
    write_saelens(tmp_path / "norm", "standard")
    cfg = json.loads((tmp_path / "norm" / "cfg.json").read_text())
    (tmp_path / "norm" / "cfg.json").write_text(json.dumps({**cfg, "normalize_activations": "layer_norm"}))
    with pytest.raises(TranscoderFormatError, match="normalize_activations='layer_norm'.*per token"):
        tcw.load_transcoders(tmp_path / "norm")
    write_saelens(tmp_path / "gated", "standard")
    (tmp_path / "gated" / "cfg.json").write_text(json.dumps({**cfg, "architecture": "gated"}))
    with pytest.raises(TranscoderFormatError, match="'gated' has no exact equivalent.*readable: standard"):
        tcw.load_transcoders(tmp_path / "gated")


def test_negative_circuit_tracer_thresholds_are_refused(tmp_path):
    """circuit-tracer's JumpReLU has no ReLU: a negative threshold lets negative activations through."""
    write_transcoder_set(tmp_path / "set", 2)
    w = load_numpy(tmp_path / "set" / "layer_1.safetensors")
    w["activation_function.threshold"][:3] = -0.1
    save_numpy(w, tmp_path / "set" / "layer_1.safetensors")
    with pytest.raises(TranscoderFormatError, match="3 JumpReLU thresholds are negative"):
        tcw.load_transcoders(tmp_path / "set")


def test_cross_layer_transcoders_without_their_files_and_ambiguous_folders_are_refused(tmp_path):
    write_transcoder_set(tmp_path / "clt", 2)
    config = yaml.safe_load((tmp_path / "clt" / "config.yaml").read_text())
    (tmp_path / "clt" / "config.yaml").write_text(yaml.safe_dump({**config, "model_kind": "cross_layer_transcoder"}))
    with pytest.raises(TranscoderFormatError, match="cross-layer transcoder, but there is no W_enc_0.safetensors"):
        tcw.load_transcoders(tmp_path / "clt")
    for width in ("width_16k", "width_65k"):
        folder = tmp_path / "scope" / "layer_4" / width
        folder.mkdir(parents=True)
        np.savez(folder / "params.npz", W_enc=rand(D, N), b_enc=rand(N), W_dec=rand(N, D), b_dec=rand(D),
                 threshold=rand(N))
    with pytest.raises(TranscoderFormatError, match="2 transcoders for layer 4.*pass the folder"):
        tcw.load_transcoders(tmp_path / "scope")
    write_sparsify(tmp_path / "mixed" / "layers.1.mlp", transcode=True)
    write_saelens(tmp_path / "mixed" / "other", "transcoder")
    with pytest.raises(TranscoderFormatError, match="mixes formats"):
        tcw.load_transcoders(tmp_path / "mixed")


def test_hub_repositories_download_only_the_wanted_layers(tmp_path, monkeypatch):
    """The hub is unreachable here: a local folder stands in for a repository, served through the two
    huggingface_hub calls load_transcoders makes, which records every file downloaded."""
    import huggingface_hub

    repo = tmp_path / "repo"
    weights = {layer: write_sparsify(repo / "sub" / f"layers.{layer}.mlp", transcode=True) for layer in (1, 4, 7)}
    (repo / "README.md").write_text("a sparsify release")
    downloaded = []

    def list_repo_files(self, repo_id, revision=None):
        assert (repo_id, revision) == ("someone/skip-transcoders", "v2")
        return sorted(path.relative_to(repo).as_posix() for path in repo.rglob("*") if path.is_file())

    def hf_hub_download(repo_id, filename, revision=None):
        downloaded.append(filename)
        return str(repo / filename)

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", list_repo_files)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    loaded = tcw.load_transcoders("someone/skip-transcoders/sub@v2", layers=[4])
    assert list(loaded) == [4]
    assert sorted(downloaded) == ["sub/layers.4.mlp/cfg.json", "sub/layers.4.mlp/sae.safetensors"]
    assert_same(loaded[4], *sparsify_forward(weights[4], X, transcode=True))


def test_an_unreachable_hub_says_what_to_do():
    """conftest sets HF_HUB_OFFLINE=1: huggingface_hub itself refuses to list the repository."""
    with pytest.raises(TranscoderFormatError, match="could not be listed.*HF_HUB_OFFLINE.*pass their folder"):
        tcw.load_transcoders("google/gemma-scope-2b-pt-transcoders")
