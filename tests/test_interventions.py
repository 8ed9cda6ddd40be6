"""run_with_edits against independent computations on the real default model.

The reference is the un-wrapped PyTorch module (``lm._module``) with plain forward hooks on the
MLPs that change the output by hand (activation × decoder row, computed from ``tc.encode`` and
``tc.W_dec``), never tcwidgets' splicing code. Transcoders are randomly initialised, with non-unit
input and output scales so that model units and latent units differ.
"""

import pytest
import torch

from tcwidgets.interventions import Edit, encode_prompt, run_with_edits, start_session
from tcwidgets.models import resolve
from tcwidgets.splicing import splice
from tcwidgets.transcoder import Transcoder, TranscoderConfig

ATOL = 1e-4  # on logits (magnitudes ~10-30)
PROMPT = "The quick brown fox jumps over the lazy dog because it"


def make_tc(lm, layer, kind="transcoder", n_latents=128, seed=0):
    torch.manual_seed(seed)
    tc = Transcoder(TranscoderConfig(d_in=lm.d_model, d_out=lm.d_model, n_latents=n_latents, kind=kind, k=12,
                                     input_scale=0.5, output_scale=2.0, site={"model": lm.name, "layer": layer}))
    with torch.no_grad():
        tc.b_enc.normal_(0, 0.5)
        if kind == "skip":
            tc.W_skip.normal_(0, 0.02)
    return tc.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def tcs(lm):
    return {3: make_tc(lm, 3, seed=3), 6: make_tc(lm, 6, seed=6)}


@pytest.fixture(scope="module")
def tokens(lm):
    return encode_prompt(lm, PROMPT)


def reference(lm, tokens, changes):
    """Logits of the plain module with ``changes[layer](x, y) -> new y`` on those MLPs' outputs."""
    handles = []
    for layer, change in changes.items():
        def hook(module, args, output, change=change):
            return change(args[0], output)
        handles.append(resolve(lm._module, lm.sites.mlp_path(layer)).register_forward_hook(hook))
    try:
        with torch.no_grad():
            return lm._module(tokens).logits
    finally:
        for handle in handles:
            handle.remove()


def site(tc, x, y):
    return y if tc.config.kind == "sae" else x


def row(tc, latent):
    """The latent's decoder row in model units."""
    return tc.W_dec[latent] / tc.config.output_scale


def clean_latents(lm, tokens, tcs):
    """Each transcoder's latents on the clean model's MLP activations."""
    seen = {}

    def record(layer, tc):
        def change(x, y):
            seen[layer] = tc.encode(site(tc, x, y))
            return y
        return change
    reference(lm, tokens, {layer: record(layer, tc) for layer, tc in tcs.items()})
    return seen


def busiest(tc, lm, tokens, layer):
    """The latent with the largest total activation over the prompt (so edits change something)."""
    return int(clean_latents(lm, tokens, {layer: tc})[layer][0].sum(0).argmax())


def set_latent(tc, latent, new, positions=None):
    """A hook change: the latent's activation ``a`` becomes ``new(a)`` at ``positions`` (all if None)."""
    def change(x, y):
        a = tc.encode(site(tc, x, y))[..., latent]
        delta = new(a) - a
        if positions is not None:
            mask = torch.zeros_like(delta)
            mask[:, positions] = 1
            delta = delta * mask
        return y + delta[..., None] * row(tc, latent)
    return change


def close(a, b):
    return torch.allclose(a, b, atol=ATOL, rtol=0)


def test_no_edit_and_unit_scale_leave_the_model_unchanged(lm, tcs, tokens):
    clean = reference(lm, tokens, {})
    assert close(run_with_edits(lm, tcs, PROMPT).logits, clean)
    unit = [Edit(layer, latent, scale=1.0) for layer in tcs for latent in (0, 5, 77)]
    result = run_with_edits(lm, tcs, PROMPT, unit)
    assert close(result.logits, clean)
    assert torch.equal(result.tokens, tokens) and result.prompt_length == tokens.shape[1]


@pytest.mark.parametrize("kind", ["transcoder", "skip", "sae"])
def test_zeroing_subtracts_activation_times_decoder_row(lm, tokens, kind):
    tc = make_tc(lm, 6, kind=kind)
    latent = busiest(tc, lm, tokens, 6)
    expected = reference(lm, tokens, {6: set_latent(tc, latent, torch.zeros_like)})
    got = run_with_edits(lm, {6: tc}, tokens, [Edit(6, latent, scale=0.0)]).logits
    assert close(got, expected)
    assert not close(got, reference(lm, tokens, {})), "the edit must change something for the test to mean anything"


def test_scale_and_clamp(lm, tcs, tokens):
    tc = tcs[6]
    latent = busiest(tc, lm, tokens, 6)
    expected = reference(lm, tokens, {6: set_latent(tc, latent, lambda a: -1.5 * a)})
    assert close(run_with_edits(lm, tcs, PROMPT, [Edit(6, latent, scale=-1.5)]).logits, expected)
    expected = reference(lm, tokens, {6: set_latent(tc, latent, lambda a: torch.full_like(a, 7.0))})
    assert close(run_with_edits(lm, tcs, PROMPT, [Edit(6, latent, clamp=7.0)]).logits, expected)


def test_steering_adds_exactly_alpha_times_decoder_row(lm, tcs, tokens):
    tc, latent, alpha = tcs[6], 11, 25.0
    expected = reference(lm, tokens, {6: lambda x, y: y + alpha * row(tc, latent)})
    assert close(run_with_edits(lm, tcs, PROMPT, [Edit(6, latent, steer=alpha)]).logits, expected)
    # the same in replace mode: the reconstruction plus alpha × row
    expected = reference(lm, tokens, {3: lambda x, y: tcs[3](x).output,
                                      6: lambda x, y: tc(x).output + alpha * row(tc, latent)})
    assert close(run_with_edits(lm, tcs, PROMPT, [Edit(6, latent, steer=alpha)], replace=True).logits, expected)


def test_two_layers_edited_at_once(lm, tcs, tokens):
    l3, l6 = busiest(tcs[3], lm, tokens, 3), busiest(tcs[6], lm, tokens, 6)
    expected = reference(lm, tokens, {3: set_latent(tcs[3], l3, torch.zeros_like),
                                      6: set_latent(tcs[6], l6, lambda a: a + 4.0)})
    got = run_with_edits(lm, tcs, PROMPT, [Edit(3, l3, scale=0.0), Edit(6, l6, steer=4.0)]).logits
    assert close(got, expected)


def test_edits_of_one_latent_apply_in_order(lm, tcs, tokens):
    tc = tcs[6]
    latent = busiest(tc, lm, tokens, 6)
    expected = reference(lm, tokens, {6: set_latent(tc, latent, lambda a: torch.full_like(a, 3.0) * 2)})
    assert close(run_with_edits(lm, tcs, PROMPT, [Edit(6, latent, clamp=3.0), Edit(6, latent, scale=2.0)]).logits,
                 expected)


def test_positions_restrict_the_edit(lm, tcs, tokens):
    tc = tcs[6]
    latent = busiest(tc, lm, tokens, 6)
    n = tokens.shape[1]
    expected = reference(lm, tokens, {6: set_latent(tc, latent, lambda a: a * 3, positions=[4, n - 1])})
    got = run_with_edits(lm, tcs, PROMPT, [Edit(6, latent, scale=3.0)], positions=[4, -1]).logits
    assert close(got, expected)
    clean = reference(lm, tokens, {})
    assert close(got[:, :4], clean[:, :4])  # causal: earlier positions untouched
    assert not close(got[:, 4], clean[:, 4])
    single = run_with_edits(lm, tcs, PROMPT, [Edit(6, latent, scale=3.0)], positions=n - 1).logits
    assert close(single[:, :-1], clean[:, :-1]) and not close(single[:, -1], clean[:, -1])


def test_an_edit_from_position_p_reruns_only_positions_from_p(lm, tcs, tokens):
    """A PromptSession keeps the prompt's clean run: edits at the last token run one token's forward
    pass, from the edited layer on (the layers before it are skipped: they compute what they did)."""
    lengths, clean = {0: [], 6: []}, reference(lm, tokens, {})
    hooks = [resolve(lm._module, lm.sites.mlp_path(layer)).register_forward_hook(
        lambda module, args, output, layer=layer: lengths[layer].append(args[0].shape[1])) for layer in lengths]
    try:
        session = start_session(lm, tcs, PROMPT)
        assert lengths == {0: [tokens.shape[1]], 6: [tokens.shape[1]]}  # one pass: logits, latents, cache
        assert session.residuals[6].shape == (1, tokens.shape[1], lm.d_model)
        for runs in lengths.values():
            runs.clear()
        assert close(run_with_edits(lm, tcs, session).logits, clean)
        assert lengths == {0: [], 6: []}  # no edit: the clean logits, no run
        got = run_with_edits(lm, tcs, session, [Edit(6, 4, steer=9.0)], positions=[-1]).logits
        assert lengths == {0: [], 6: [1]}
        lengths[6].clear()
        run_with_edits(lm, tcs, session, [Edit(6, 4, steer=9.0)], positions=[3, -1])
        assert lengths == {0: [], 6: [tokens.shape[1] - 3]}
        lengths[6].clear()
        run_with_edits(lm, tcs, PROMPT, [Edit(6, 4, steer=9.0)], positions=[-1])
        assert lengths == {0: [tokens.shape[1]], 6: [tokens.shape[1]]}  # no session: the whole prompt
    finally:
        for hook in hooks:
            hook.remove()
    again = run_with_edits(lm, tcs, session, [Edit(6, 4, steer=9.0)], positions=[-1]).logits
    assert torch.equal(again, got), "the session's cache is not changed by the runs that use it"
    latents = run_with_edits(lm, tcs, session, save_latents=True).latents
    expected = clean_latents(lm, tokens, tcs)  # by plain forward hooks
    for layer in tcs:
        assert torch.equal(latents[layer], session.latents[layer])
        assert close(session.latents[layer], expected[layer])
    with pytest.raises(ValueError, match="another model"):
        run_with_edits(object(), tcs, session)
    expected = reference(lm, tokens, {6: set_latent(tcs[6], 4, lambda a: a + 9.0, positions=[tokens.shape[1] - 1])})
    assert close(got, expected)


def test_replace_mode_equals_the_reconstruction(lm, tcs, tokens):
    expected = reference(lm, tokens, {layer: lambda x, y, tc=tc: tc(x).output for layer, tc in tcs.items()})
    assert close(run_with_edits(lm, tcs, PROMPT, replace=True).logits, expected)
    latent = busiest(tcs[6], lm, tokens, 6)
    tc = tcs[6]

    def zeroed(x):
        return tc.encode(x).index_fill(-1, torch.tensor([latent]), 0)
    expected = reference(lm, tokens, {3: lambda x, y: tcs[3](x).output, 6: lambda x, y: tc.decode(zeroed(x), x)})
    assert close(run_with_edits(lm, tcs, PROMPT, [Edit(6, latent, scale=0.0)], replace=True).logits, expected)


def test_remote_local_gives_the_same_logits(lm, tcs, tokens):
    latent = busiest(tcs[6], lm, tokens, 6)
    edits = [Edit(6, latent, scale=0.0), Edit(3, 2, steer=5.0)]
    local = run_with_edits(lm, tcs, PROMPT, edits, positions=[-1, 2])
    remote = run_with_edits(lm, tcs, PROMPT, edits, positions=[-1, 2], remote="local")
    assert close(local.logits, remote.logits)


def test_save_latents_returns_the_unedited_latents(lm, tcs, tokens):
    seen = clean_latents(lm, tokens, tcs)
    result = run_with_edits(lm, tcs, PROMPT, [Edit(3, 0, clamp=9.0)], save_latents=True)
    assert set(result.latents) == {3, 6}
    assert torch.allclose(result.latents[3], seen[3], atol=1e-5)  # layer 3 runs before its own edit
    assert result.latents[6].shape == (1, tokens.shape[1], tcs[6].n_latents)


def test_greedy_generation_matches_a_hand_loop(lm, tcs, tokens):
    tc, alpha = tcs[6], 30.0
    ids = tokens
    for _ in range(4):
        logits = reference(lm, ids, {6: lambda x, y: y + alpha * row(tc, 9)})
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
    steps = []
    result = run_with_edits(lm, tcs, PROMPT, [Edit(6, 9, steer=alpha)], generate=4,
                            on_step=lambda done, total: steps.append((done, total)))
    assert torch.equal(result.tokens, ids)
    assert torch.equal(result.continuation, ids[:, tokens.shape[1]:])
    assert result.logits.shape[1] == tokens.shape[1]
    assert steps == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_sampling_is_seeded_and_batches_work(lm, tcs, tokens):
    batch = torch.cat([tokens, tokens.flip(1)])
    torch.manual_seed(1)
    first = run_with_edits(lm, tcs, batch, [Edit(6, 1, scale=0.0)], generate=2, sample=True)
    torch.manual_seed(1)
    second = run_with_edits(lm, tcs, batch, [Edit(6, 1, scale=0.0)], generate=2, sample=True)
    assert first.tokens.shape == (2, tokens.shape[1] + 2) and torch.equal(first.tokens, second.tokens)
    assert close(first.logits[1:], reference(lm, batch[1:], {6: set_latent(tcs[6], 1, torch.zeros_like)}))


def test_on_step_can_stop_generation(lm, tcs):
    class Stop(Exception):
        pass

    def stop(done, total):
        if done == 2:
            raise Stop
    with pytest.raises(Stop):
        run_with_edits(lm, tcs, PROMPT, generate=5, on_step=stop)


def test_prompts_start_with_bos(lm, tokens):
    assert tokens[0, 0].item() == lm.tokenizer.bos_token_id
    assert tokens[0, 1:].tolist() == lm.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("arguments, message", [
    (dict(layer=6, latent=1), "exactly one of scale=, clamp= or steer="),
    (dict(layer=6, latent=1, scale=0.0, steer=1.0), "got scale and steer"),
    (dict(layer=6, latent=-1, scale=0.0), "latent=-1"),
    (dict(layer=6.0, latent=1, scale=0.0), "layer=6.0"),
    (dict(layer=6, latent=1, clamp=float("nan")), "finite"),
    (dict(layer=6, latent=1, scale="0"), "finite"),
])
def test_edit_validation(arguments, message):
    with pytest.raises(ValueError, match=message):
        Edit(**arguments)


def test_edit_is_frozen_and_normalised():
    edit = Edit(layer=6, latent=3, scale=0)
    assert (edit.kind, edit.value, edit.scale) == ("scale", 0.0, 0.0) and isinstance(edit.scale, float)
    assert repr(edit) == "Edit(layer=6, latent=3, scale=0.0)"
    with pytest.raises(AttributeError):
        edit.latent = 4


def test_a_transcoder_that_turns_nan_is_refused(lm):
    """Transcoders are checked for NaN once per change of their weights, not once per run."""
    tc = make_tc(lm, 6)
    run_with_edits(lm, {6: tc}, PROMPT, [Edit(6, 0, scale=0.0)])
    with torch.no_grad():
        tc.W_enc[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite values in W_enc"):
        run_with_edits(lm, {6: tc}, PROMPT, [Edit(6, 0, scale=0.0)])


def test_bad_input_errors(lm, tcs):
    with pytest.raises(ValueError, match=r"Latent 128 is out of range: the layer-6 transcoder has 128 latents"):
        run_with_edits(lm, tcs, PROMPT, [Edit(6, 128, scale=0.0)])
    with pytest.raises(ValueError, match=r"Layer 5 has no transcoder here \(transcoders are given for layers: 3, 6\)"):
        run_with_edits(lm, tcs, PROMPT, [Edit(5, 0, scale=0.0)])
    with pytest.raises(ValueError, match="The prompt is empty"):
        run_with_edits(lm, tcs, "  \n", [])
    with pytest.raises(ValueError, match=f"reads at most {lm.max_context}"):
        run_with_edits(lm, tcs, "hello " * (lm.max_context + 1))
    with pytest.raises(ValueError, match="Position 40 is outside the prompt's"):
        run_with_edits(lm, tcs, PROMPT, [Edit(6, 0, scale=0.0)], positions=[40])
    with pytest.raises(ValueError, match="generate=-1"):
        run_with_edits(lm, tcs, PROMPT, generate=-1)
    with pytest.raises(TypeError, match="tcwidgets.Edit"):
        run_with_edits(lm, tcs, PROMPT, [(6, 0, 0.0)])
    with pytest.raises(IndexError, match=f"{lm.n_layers} layers"):
        run_with_edits(lm, {lm.n_layers: make_tc(lm, lm.n_layers)}, PROMPT)


def test_a_run_that_skips_early_layers_refuses_a_spliced_layer_among_them(lm, tcs, tokens):
    with pytest.raises(ValueError, match="layer 3 is spliced, ablated or saved"):
        splice(lm, tcs, tokens, mode="error", progress=False, start_at=(6, torch.zeros(1, tokens.shape[1], lm.d_model)))
