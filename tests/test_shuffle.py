"""The three batch orders of `ActivationStore.batches` on a tiny store: global, context, document."""

import pytest
import torch

import tcwidgets as tcw
from tcwidgets.training import Trainer, TrainingConfig

CONTEXT = 32


@pytest.fixture(scope="module")
def store(lm, tmp_path_factory):
    tokens = tcw.load_corpus("python-docs", lm, context=CONTEXT, n_tokens=24 * CONTEXT)
    return tcw.collect_activations(lm, [2], tokens, out=tmp_path_factory.mktemp("shuffle"), progress=False)


def positions(store, batches) -> list[list[int]]:
    """Each batch's rows as their indices in the stored order (found by value; every context's BOS
    row is the same, so those take any free BOS index, which the tests below never rely on)."""
    x_all, y_all = store.layer(2)
    rows_of: dict[tuple, list[int]] = {}
    for i, row in enumerate(x_all):
        rows_of.setdefault(tuple(row[:8].tolist()), []).append(i)
    found = []
    for x, y in batches:
        index = [rows_of[tuple(row[:8].tolist())].pop() for row in x]
        assert torch.equal(y, y_all[index]), "inputs and outputs stay paired"
        found.append(index)
    return found


def contexts_of(index: list[int]) -> dict[int, set[int]]:
    """Non-BOS positions of each context a batch's rows come from."""
    held: dict[int, set[int]] = {}
    for i in index:
        if i % CONTEXT:
            held.setdefault(i // CONTEXT, set()).add(i % CONTEXT)
    return held


def test_global_batches_mix_tokens_of_many_contexts(store):
    batches = positions(store, store.batches(2, 128, shuffle="global", seed=3))
    assert sorted(i for b in batches for i in b) == list(range(store.n_tokens))
    assert all(len(contexts_of(b)) > 12 for b in batches), "128 random tokens of 24 contexts span most of them"
    assert [x for x, _ in store.batches(2, 128, shuffle=True, seed=3)][0].equal(
        next(store.batches(2, 128, shuffle="global", seed=3))[0]), "shuffle=True is 'global'"


def test_context_batches_hold_whole_contexts_in_a_shuffled_order(store):
    per_epoch = store.n_tokens // 128
    epochs = [positions(store, store.batches(2, 128, shuffle="context", seed=3, epochs=epoch + 1,
                                             start=epoch * per_epoch)) for epoch in (0, 1)]
    for batches in epochs:
        order = []
        for index in batches:
            held = contexts_of(index)
            assert len(held) == 128 // CONTEXT, "a batch is the tokens of 4 whole contexts"
            assert all(p == set(range(1, CONTEXT)) for p in held.values())
            order.extend(sorted(held))
        assert sorted(order) == list(range(24)), "each context once per epoch"
        assert order != sorted(order)
    assert epochs[0] != epochs[1], "each epoch has its own order"


def test_document_batches_follow_the_stored_order_every_epoch(store):
    x_all, _ = store.layer(2)
    batches = [x for x, _ in store.batches(2, 100, shuffle="document", epochs=2)]
    per_epoch = store.n_tokens // 100
    for i, x in enumerate(batches):
        begin = (i % per_epoch) * 100
        assert torch.equal(x, x_all[begin:begin + 100])
    assert [x for x, _ in store.batches(2, 100, shuffle=False)][3].equal(batches[3]), "shuffle=False is 'document'"


def test_an_unknown_order_is_refused_and_the_trainer_records_its_order(store):
    with pytest.raises(ValueError, match="shuffle='sequential': choose one of 'global', 'context', 'document'"):
        next(store.batches(2, 128, shuffle="sequential"))
    with pytest.raises(ValueError, match="shuffle='sorted'"):
        TrainingConfig(shuffle="sorted")
    trainer = Trainer(store, 2, TrainingConfig(n_latents=256, k=8, batch_size=128, shuffle="context"),
                      progress=False)
    seen = []
    original = trainer.train_batch

    def record_batch(x, y):
        seen.append(x.clone())
        return original(x, y)

    trainer.train_batch = record_batch
    trainer.fit()
    expected = [x for x, _ in store.batches(2, 128, shuffle="context", seed=0)]
    assert len(seen) == len(expected) and all(a.equal(b) for a, b in zip(seen, expected))
