"""Transcoders that write after Gemma's post-MLP norm (Gemma Scope's ``hook_mlp_out``): loaded from a
Gemma Scope ``params.npz`` and spliced, evaluated, analysed and attributed on a tiny random Gemma 2, each
checked against plain PyTorch forward hooks on the Hugging Face model and a float64 computation from the
file's arrays."""

import numpy as np
import pytest
import torch
import transformers

import tcwidgets as tcw
from tcwidgets.circuits import LatentTarget, LogitTarget, attribute
from tcwidgets.splicing import traced_input, writes_after_norm

from test_circuits import model_value
from test_circuits import _one_thread  # noqa: F401 (fixture: one torch thread)

D, N, LAYER = 64, 96, 1
PROMPT = "The cat 17 sat on 42 mats"


@pytest.fixture(scope="module")
def gemma(lm):
    """A tiny random Gemma 2 (random norm weights, soft-capping) with the default tokenizer."""
    torch.manual_seed(3)
    config = transformers.Gemma2Config(vocab_size=49152, hidden_size=D, intermediate_size=128, num_hidden_layers=3,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                       final_logit_softcapping=5.0, attn_logit_softcapping=20.0)
    module = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if "norm" in name:
                parameter.normal_(0, 0.3)
    return tcw.load_model(module, tokenizer=lm.tokenizer)


@pytest.fixture(scope="module")
def gemma_scope(tmp_path_factory):
    """A Gemma Scope transcoder file for layer 1 (JumpReLU, params.npz), its arrays and the loaded transcoder."""
    rng = np.random.default_rng(0)
    folder = tmp_path_factory.mktemp("hub") / "gemma-scope-2b-pt-transcoders" / f"layer_{LAYER}" / "width_96" / "l0_9"
    folder.mkdir(parents=True)
    arrays = {"W_enc": rng.standard_normal((D, N)).astype(np.float32) * 0.3,
              "b_enc": rng.standard_normal(N).astype(np.float32) * 0.2,
              "W_dec": rng.standard_normal((N, D)).astype(np.float32) * 0.3,
              "b_dec": rng.standard_normal(D).astype(np.float32) * 0.2,
              "threshold": np.abs(rng.standard_normal(N)).astype(np.float32) * 0.3}
    np.savez(folder / "params.npz", **arrays)
    (tc,) = tcw.load_transcoders(folder).values()
    return {name: torch.from_numpy(a).double() for name, a in arrays.items()}, tc


def gemma_scope_forward(w, x):
    """Gemma Scope's JumpReLU transcoder in float64: ``relu(pre) · (pre > θ)``, then the decoder."""
    pre = x.double() @ w["W_enc"] + w["b_enc"]
    z = torch.relu(pre) * (pre > w["threshold"])
    return z, z @ w["W_dec"] + w["b_dec"]


def hooked_logits(lm, tokens, w, *, after_norm=True):
    """The model's logits with layer 1's post-MLP norm output (or, ``after_norm=False``, its MLP output)
    replaced by the transcoder's, through forward hooks on the Hugging Face modules."""
    block = lm._module.model.layers[LAYER]
    seen = {}
    hooks = [block.mlp.register_forward_pre_hook(lambda module, args: seen.update(x=args[0]))]
    target = block.post_feedforward_layernorm if after_norm else block.mlp
    hooks.append(target.register_forward_hook(lambda module, args, out: gemma_scope_forward(w, seen["x"])[1].to(out.dtype)))
    try:
        with torch.no_grad():
            return lm._module(tokens).logits
    finally:
        for hook in hooks:
            hook.remove()


def test_a_gemma_scope_transcoder_replaces_the_post_norm_output(gemma, gemma_scope):
    w, tc = gemma_scope
    assert tc.config.site["output"] == f"blocks.{LAYER}.hook_mlp_out" and writes_after_norm(gemma, tc)
    tokens = torch.tensor(gemma.tokenizer([PROMPT, "Numbers: 3 4 5 6 7 8"], padding=True)["input_ids"])
    with pytest.warns(UserWarning, match="used anyway"):  # its site names google/gemma-2-2b, same sizes
        spliced = tcw.splice(gemma, {LAYER: tc}, tokens, progress=False)
    expected = hooked_logits(gemma, tokens, w)
    torch.testing.assert_close(spliced.logits, expected, rtol=0, atol=1e-4)
    before_norm = hooked_logits(gemma, tokens, w, after_norm=False)
    assert (spliced.logits - before_norm).abs().max() > 1e-2  # where it writes matters

    # "error" mode: unedited, the clean model; a latent edit moves the post-norm output by its decoder row
    with pytest.warns(UserWarning, match="used anyway"):
        clean = tcw.splice(gemma, {}, tokens, save_mlp=[LAYER], after_norm=[LAYER], progress=False)
        same = tcw.splice(gemma, {LAYER: tc}, tokens, mode="error", progress=False)
    torch.testing.assert_close(same.logits, clean.logits, rtol=0, atol=1e-5)
    x, post_norm = clean.mlp[LAYER]
    block = gemma._module.model.layers[LAYER]
    with torch.no_grad():
        torch.testing.assert_close(post_norm, block.post_feedforward_layernorm(block.mlp(x)), rtol=0, atol=1e-6)


def test_evaluate_measures_the_post_norm_reconstruction(gemma, gemma_scope):
    w, tc = gemma_scope
    tokens = torch.tensor(gemma.tokenizer([PROMPT, "Numbers: 3 4 5 6 7 8"], padding=True)["input_ids"])
    with pytest.warns(UserWarning, match="used anyway"):
        metrics = tcw.evaluate(gemma, {LAYER: tc}, tokens, progress=False)
    block = gemma._module.model.layers[LAYER]
    seen = {}
    hooks = [block.mlp.register_forward_pre_hook(lambda module, args: seen.update(x=args[0])),
             block.post_feedforward_layernorm.register_forward_hook(lambda module, args, out: seen.update(y=out))]
    with torch.no_grad():
        gemma._module(tokens)
    for hook in hooks:
        hook.remove()
    z, reconstruction = gemma_scope_forward(w, seen["x"].flatten(0, 1))
    y = seen["y"].flatten(0, 1).double()
    fvu = float((y - reconstruction).square().sum() / (y - y.mean(0)).square().sum())
    assert metrics.layers[LAYER].fvu == pytest.approx(fvu, rel=1e-4)
    assert metrics.layers[LAYER].l0 == pytest.approx(float((z > 0).sum(1).double().mean()), rel=1e-6)
    assert metrics.layers[LAYER].kl == pytest.approx(_kl(gemma, tokens, hooked_logits(gemma, tokens, w)), rel=1e-3)


def _kl(lm, tokens, logits):
    with torch.no_grad():
        clean = torch.log_softmax(lm._module(tokens).logits[:, :-1].double(), -1)
    spliced = torch.log_softmax(logits[:, :-1].double(), -1)
    return float((clean.exp() * (clean - spliced)).sum(-1).mean())


def test_an_sae_after_the_norm_reads_the_norm_output(gemma, gemma_scope, tmp_path):
    _, tc = gemma_scope
    sae = tcw.Transcoder(tcw.TranscoderConfig(d_in=D, d_out=D, n_latents=N, kind="sae", activation="relu",
                                              site={"model": gemma.name, "layer": LAYER, "input": "blocks.1.hook_mlp_out",
                                                    "output": "blocks.1.hook_mlp_out"}))
    tokens = torch.tensor(gemma.tokenizer([PROMPT])["input_ids"])
    block = gemma._module.model.layers[LAYER]
    seen = {}
    hook = block.post_feedforward_layernorm.register_forward_hook(lambda module, args, out: seen.update(y=out))
    with torch.no_grad():
        gemma._module(tokens)
    hook.remove()
    torch.testing.assert_close(traced_input(gemma, sae, tokens), seen["y"], rtol=0, atol=1e-6)
    store = tcw.collect_activations(gemma, [LAYER], tokens, out=tmp_path / "store", progress=False)
    with pytest.raises(ValueError, match="pass tokens instead of the store"):
        tcw.analyze_features(gemma, sae, store, progress=False)


def test_attribution_through_a_post_norm_transcoder_is_exact(gemma, gemma_scope):
    """The replay writes the transcoder after the norm: the replayed logits match the model (else
    attribute raises), contributions sum to each target, and a latent's value is the model's."""
    w, tc = gemma_scope
    with pytest.warns(UserWarning, match="used anyway"):
        transcoders = tcw.splicing.check_transcoders(gemma, {LAYER: tc})
    for target in (LogitTarget("3", minus="1"), LatentTarget(LAYER, int(tc.W_enc.norm(dim=1).argmax()), -1)):
        graph = attribute(gemma, transcoders, PROMPT, target, depth=1, top_k=None, threshold=0)
        assert sum(e.weight for e in graph.predecessors(graph.target_id)) == pytest.approx(graph.target_value, abs=1e-10)
        adjacency = graph.adjacency()
        rows = torch.isfinite(adjacency.values)
        assert torch.allclose((adjacency.matrix.sum(1) + adjacency.bias)[rows], adjacency.values[rows], atol=1e-9)
        if isinstance(target, LatentTarget):
            assert graph.target_value == pytest.approx(model_value(gemma, transcoders, graph), abs=1e-4)
    # What the replay writes at that layer is the post-norm output, with nothing in between: the error
    # node is the norm's output (a forward hook) minus the file's reconstruction (float64), at every
    # position after BOS (folded: its error holds its latents' writes too).
    assert graph._run.folded == (0,)
    frozen = graph._run.layers[LAYER]
    assert frozen.mlp_gain is None
    block, seen = gemma._module.model.layers[LAYER], {}
    hooks = [block.mlp.register_forward_pre_hook(lambda module, args: seen.update(x=args[0])),
             block.post_feedforward_layernorm.register_forward_hook(lambda module, args, out: seen.update(y=out))]
    with torch.no_grad():
        gemma._module(torch.tensor([graph.tokens]))
    for hook in hooks:
        hook.remove()
    post_norm = seen["y"][0].double()
    torch.testing.assert_close(frozen.mlp_out, post_norm, rtol=0, atol=1e-5)
    torch.testing.assert_close(frozen.error[1:], (post_norm - gemma_scope_forward(w, seen["x"][0])[1])[1:],
                               rtol=0, atol=1e-4)


def test_residual_stream_saes_are_refused(gemma):
    sae = tcw.Transcoder(tcw.TranscoderConfig(d_in=D, d_out=D, n_latents=N, kind="sae", activation="relu",
                                              site={"model": gemma.name, "layer": LAYER, "input": "blocks.1.hook_resid_post",
                                                    "output": "blocks.1.hook_resid_post"}))
    with pytest.raises(ValueError, match="not an MLP site"):
        tcw.splice(gemma, sae, torch.tensor([[1, 2, 3]]), progress=False)
