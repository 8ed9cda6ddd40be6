"""load_corpus: sources, packing, determinism and document-level held-out splits."""

import json

import pytest
import torch

import tcwidgets as tcw
from tcwidgets.corpus import CorpusFileError, EmptyCorpusError, pack, python_docs


WORDS = ("apple banana cherry river mountain window garden silver yellow orange purple engine planet "
         "doctor teacher window bottle pencil market castle forest island rocket spider summer winter "
         "animal button candle dragon finger hammer jacket ladder magnet needle pillow rabbit saddle "
         "tunnel velvet wagon anchor basket carpet desert feather guitar helmet kettle lemon "
         "mirror oyster parrot quartz ribbon shovel tomato violin walnut").split()


def marked_documents(n: int) -> list[str]:
    """Documents that repeat one word each (a single token), so a token tells its document."""
    words = list(dict.fromkeys(WORDS))
    return [" " + " ".join([words[i]] * (20 + 7 * (i % 5))) for i in range(n)]


def documents_in(tokens: torch.Tensor, tokenizer) -> set[int]:
    return set(tokens.unique().tolist()) - {tokenizer.bos_token_id}


def test_default_corpus_is_the_python_reference_topics(lm):
    tokens = tcw.load_corpus("python-docs", lm, context=128, n_tokens=100_000)
    assert tokens.shape == (781, 128) and tokens.dtype == torch.long
    assert (tokens[:, 0] == lm.tokenizer.bos_token_id).all()
    assert not (tokens[:, 1] == lm.tokenizer.bos_token_id).any(), "no context starts with two BOS tokens"
    text = lm.tokenizer.decode(tokens[0])
    assert any(text[len("<|im_start|>"):].startswith(doc[:40]) for doc in python_docs())


def test_same_seed_same_contexts_other_seed_other_order(lm):
    a = tcw.load_corpus("python-docs", lm, n_tokens=20_000, seed=1)
    b = tcw.load_corpus("python-docs", lm, n_tokens=20_000, seed=1)
    c = tcw.load_corpus("python-docs", lm, n_tokens=20_000, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_train_and_test_never_share_a_document(lm):
    docs = marked_documents(55)
    for seed in range(3):
        train = tcw.load_corpus(docs, lm, context=16, seed=seed, test_fraction=0.2)
        test = tcw.load_corpus(docs, lm, context=16, seed=seed, split="test", test_fraction=0.2)
        train_docs, test_docs = documents_in(train, lm.tokenizer), documents_in(test, lm.tokenizer)
        assert train_docs and test_docs and not train_docs & test_docs
        assert 0.1 < test.numel() / (train.numel() + test.numel()) < 0.3


def test_held_out_split_of_the_default_corpus_is_about_a_tenth(lm):
    train = tcw.load_corpus("python-docs", lm)
    test = tcw.load_corpus("python-docs", lm, split="test")
    assert 0.07 < test.numel() / (train.numel() + test.numel()) <= 0.11
    assert train.numel() >= 100_000, "the default 100k-token training run fits in the train split"


def test_packing_by_hand():
    # documents [5, 6, 7], [8, 9] with BOS 1 and contexts of 3: stream 1 5 6 7 1 8 9
    tokens = pack([[5, 6, 7], [8, 9]], context=3, bos=1)
    assert tokens.tolist() == [[1, 5, 6], [1, 7, 1], [1, 8, 9]]
    assert pack([[5, 6, 7], [8, 9]], context=2, bos=None).tolist() == [[5, 6], [7, 8]]


def test_local_files_and_iterables_give_the_same_contexts(lm, tmp_path):
    docs = marked_documents(10)
    (tmp_path / "corpus.jsonl").write_text("\n".join(json.dumps({"body": d}) for d in docs))
    folder = tmp_path / "texts"
    folder.mkdir()
    for i, doc in enumerate(docs):
        (folder / f"{i:02d}.txt").write_text(doc)
    expected = tcw.load_corpus(docs, lm, context=16, split="all")
    assert torch.equal(tcw.load_corpus(tmp_path / "corpus.jsonl", lm, context=16, split="all", column="body"), expected)
    assert torch.equal(tcw.load_corpus(folder, lm, context=16, split="all"), expected)
    with pytest.raises(KeyError, match="no column 'text'.*column="):
        tcw.load_corpus(tmp_path / "corpus.jsonl", lm, context=16)


def test_datasets_streaming_path(lm, tmp_path):
    """A dataset name goes through `datasets` streaming; the packaged json builder works offline."""
    docs = marked_documents(10)
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    streamed = tcw.load_corpus("json", lm, context=16, split="all", dataset_kwargs={"data_files": str(tmp_path / "data.jsonl")})
    assert torch.equal(streamed, tcw.load_corpus(docs, lm, context=16, split="all"))


def test_n_tokens_rounds_down_to_whole_contexts_and_warns_when_short(lm):
    assert tcw.load_corpus("python-docs", lm, context=100, n_tokens=1_050).shape == (10, 100)
    with pytest.warns(UserWarning, match="fewer than the"):
        tokens = tcw.load_corpus(marked_documents(5), lm, context=8, n_tokens=10_000, split="all")
    assert 0 < tokens.numel() < 10_000


def test_bad_input(lm, tmp_path):
    with pytest.raises(EmptyCorpusError, match="contains no text"):
        tcw.load_corpus([], lm)
    with pytest.raises(EmptyCorpusError, match="contains no text"):
        tcw.load_corpus(["", "   "], lm)
    with pytest.raises(EmptyCorpusError, match="fewer than one context"):
        tcw.load_corpus(["just a few words"], lm, context=128, split="all")
    with pytest.raises(ValueError, match="longer than the model allows \\(8192"):
        tcw.load_corpus("python-docs", lm, context=10_000)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tcw.load_corpus(tmp_path / "missing.txt", lm)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        tcw.load_corpus("python-docs")
    with pytest.raises(TypeError, match="must yield strings"):
        tcw.load_corpus([1, 2, 3], lm)


@pytest.mark.parametrize("content, message", [
    (b'{"text": "fine"}\n{"text": broken}\n', r"bad\.jsonl:2 is not valid JSON \(Expecting value at column 10\)"),
    (b'{"text": "fine"}\n\n"just a string"\n', r"bad\.jsonl:3 holds a JSON string, not an object"),
    (b'{"text": 12345}\n', r"bad\.jsonl:1: its 'text' is a JSON number \(12345\), not a string"),
    (b'{"text": "caf\xe9"}\n', r"bad\.jsonl:1 is not UTF-8 text \(byte 13: b'\\xe9\"}\\n'\).*iconv"),
])
def test_bad_jsonl_lines_are_named_by_file_and_line(lm, tmp_path, content, message):
    (tmp_path / "bad.jsonl").write_bytes(content)
    with pytest.raises(CorpusFileError, match=message):
        tcw.load_corpus(tmp_path / "bad.jsonl", lm, context=8)


def test_a_text_file_that_is_not_utf8_is_named(lm, tmp_path):
    (tmp_path / "latin1.txt").write_bytes("déjà vu".encode("latin-1"))
    with pytest.raises(CorpusFileError, match=r"latin1\.txt is not UTF-8 text \(byte 1"):
        tcw.load_corpus(tmp_path, lm, context=8)
