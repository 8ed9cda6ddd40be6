"""The greater-than circuit, causally: ablating the latents an attribution graph credits moves the
target more than ablating matched random latents (tcwidgets.tutorials.greater_than)."""

import random

import pytest
import torch

from tcwidgets.tutorials import circuit_transcoders
from tcwidgets.tutorials.greater_than import Ablate, causal_check, digit_ids, greater_target, metrics


def test_the_metrics_match_a_hand_computation(lm):
    digits = digit_ids(lm)
    assert [lm.tokenizer.decode([i]) for i in digits] == [str(d) for d in range(10)]
    logits = torch.zeros(1, 2, len(lm.tokenizer))
    logits[0, -1, digits] = torch.arange(10, dtype=torch.float32)  # digit d has logit d
    probs, diffs = metrics(logits, [3], digits)
    p = torch.softmax(logits[0, -1].double(), -1)[digits]
    assert probs[0] == pytest.approx(float(p[4:].sum() - p[:3].sum()))
    assert diffs[0] == pytest.approx((4 + 5 + 6 + 7 + 8 + 9) / 6 - (0 + 1 + 2) / 3)
    target = greater_target(3)
    assert (target.token, target.minus) == (["4", "5", "6", "7", "8", "9"], ["0", "1", "2"])


def test_ablate_zeroes_exactly_the_chosen_latents():
    latents = torch.rand(1, 4, 6) + 0.1
    edited = Ablate([(2, 5, 1), (2, 0, 3), (7, 1, 1)])(2, latents)
    expected = latents.clone()
    expected[0, 1, 5] = expected[0, 3, 0] = 0
    assert torch.equal(edited, expected)
    assert Ablate([(7, 1, 1)])(2, latents) is latents


@pytest.mark.slow
def test_top_path_latents_move_the_target_more_than_matched_random_latents(lm):
    """On every-layer transcoders (trained once, cached): for each prompt, zeroing the graph's most
    credited latents lowers the logit difference, by more than zeroing as many latents of the same
    layers and positions with similar activations does."""
    transcoders = circuit_transcoders(lm, "all", n_tokens=12_288)
    rng = random.Random(0)
    checks = [causal_check(lm, transcoders, year, n_ablate=10, n_random=5, rng=rng) for year in (32, 45, 53)]
    for check in checks:
        # the controls are what they claim: same layers and positions, not the ablated latents
        for control in check.controls:
            assert [(layer, p) for layer, _, p in control] == [(layer, p) for layer, _, p in check.ablated]
            assert not set(control) & set(check.ablated)
        assert check.ablated and check.top_logit_change < 0, check
        assert check.top_logit_change < check.random_logit_change - 0.25 * check.target_value, check


def test_circuit_transcoders_name_a_bad_layer_request(lm):
    with pytest.raises(ValueError, match='"all", a layer number or a list'):
        circuit_transcoders(lm, "every")
