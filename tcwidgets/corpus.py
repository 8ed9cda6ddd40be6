"""Text sources -> fixed-length token contexts.

`load_corpus` reads documents from the embedded default (``"python-docs"``: the reference-manual
topics every CPython ships in ``pydoc_data.topics``; ``"python-docs+docstrings"`` adds the standard
library's docstrings), a Hugging Face dataset (streamed), local ``.txt`` / ``.jsonl`` files, or an
iterable of strings. Documents are split into train and test by document, tokenised, each preceded
by the BOS token where the tokenizer has one, and packed into ``[n_contexts, context]`` contexts
that each start with BOS.
"""

from __future__ import annotations

import ast
import json
import os
import random
import sysconfig
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from .files import FileFormatError

DEFAULT_CORPUS = "python-docs"
EMBEDDED_CORPORA = ("python-docs", "python-docs+docstrings")


class EmptyCorpusError(ValueError):
    """The source produced no text (or too little for one context)."""


def python_docs() -> list[str]:
    """The reference-manual topics of the standard library's ``pydoc_data.topics``, in key order."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def stdlib_docstrings() -> list[str]:
    """Module, class and function docstrings of the standard library, one document per module.

    Read with ``ast`` from the source files, so nothing is imported.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    documents = []
    for path in sorted(root.rglob("*.py")):
        if any(part in {"site-packages", "test", "tests", "idle_test"} for part in path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
        texts = [doc for node in nodes if (doc := ast.get_docstring(node))]
        if texts:
            documents.append("\n\n".join(texts))
    return documents


class CorpusFileError(FileFormatError):
    """A local corpus file cannot be read: not UTF-8 text, or a .jsonl line that is not a JSON object
    with a string in the chosen column."""


def _read_local(path: Path, column: str) -> Iterator[str]:
    files = sorted(p for p in path.rglob("*") if p.suffix in {".txt", ".jsonl"}) if path.is_dir() else [path]
    for file in files:
        if file.suffix == ".jsonl":
            with file.open("rb") as lines:
                for number, line in enumerate(lines, 1):
                    if line.strip():
                        yield _jsonl_text(file, number, line, column)
        elif file.suffix == ".txt":
            yield _decode(file, file.read_bytes())
        else:
            raise ValueError(f"Cannot read {file}: local corpora are .txt files (one document each), "
                             ".jsonl files (one document per line) or folders of them.")


def _decode(file: Path, data: bytes, number: int | None = None) -> str:
    where = f"{file}:{number}" if number is not None else str(file)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise CorpusFileError(f"{where} is not UTF-8 text (byte {error.start}: {data[error.start:error.start + 4]!r}); "
                              "convert the file to UTF-8, e.g. with iconv -t UTF-8.") from error


def _jsonl_text(file: Path, number: int, line: bytes, column: str) -> str:
    """The ``column`` string of line ``number`` of a .jsonl file."""
    where = f"{file}:{number}"
    try:
        record = json.loads(_decode(file, line, number))
    except json.JSONDecodeError as error:
        raise CorpusFileError(f"{where} is not valid JSON ({error.msg} at column {error.colno}); each line of a "
                              '.jsonl corpus holds one JSON object such as {"text": "..."}.') from error
    if not isinstance(record, dict):
        raise CorpusFileError(f"{where} holds a JSON {_json_kind(record)}, not an object; each line of a "
                              '.jsonl corpus holds one JSON object such as {"text": "..."}.')
    if column not in record:
        raise KeyError(f"{where} has no column {column!r} (it has {sorted(record)}); pass column= to load_corpus.")
    if not isinstance(record[column], str):
        raise CorpusFileError(f"{where}: its {column!r} is a JSON {_json_kind(record[column])} "
                              f"({json.dumps(record[column])[:40]}), not a string of text.")
    return record[column]


def _json_kind(value: Any) -> str:
    return {str: "string", list: "array", dict: "object", int: "number", float: "number",
            bool: "boolean"}.get(type(value), "null")


def _read_dataset(name: str, column: str, split: str, dataset_kwargs: dict) -> Iterator[str]:
    import datasets

    stream = datasets.load_dataset(name, split=split, streaming=True, **dataset_kwargs)
    for record in stream:
        if column not in record:
            raise KeyError(f"Dataset {name!r} has no column {column!r} (it has {sorted(record)}); "
                           "pass column= to load_corpus.")
        yield record[column]


def read_documents(source: str | os.PathLike | Iterable[str], *, column: str = "text",
                   dataset_split: str = "train", dataset_kwargs: dict | None = None) -> Iterator[str]:
    """Yield the raw text documents of a source (see `load_corpus`)."""
    if isinstance(source, (str, os.PathLike)):
        name = str(source)
        if name == "python-docs":
            yield from python_docs()
        elif name == "python-docs+docstrings":
            yield from python_docs()
            yield from stdlib_docstrings()
        elif Path(name).exists():
            yield from _read_local(Path(name), column)
        elif name.endswith((".txt", ".jsonl")):
            raise FileNotFoundError(f"Corpus file {name!r} does not exist.")
        else:
            yield from _read_dataset(name, column, dataset_split, dataset_kwargs or {})
    else:
        for document in source:
            if not isinstance(document, str):
                raise TypeError(f"An iterable corpus must yield strings, got {type(document).__name__}.")
            yield document


def bos_id(tokenizer: Any) -> int | None:
    """The token that starts every context and document: BOS when the tokenizer has one."""
    return tokenizer.bos_token_id


def _tokenize(documents: Iterable[str], tokenizer: Any, budget: int | None) -> list[list[int]]:
    """Tokenise documents until ``budget`` tokens (if given) are reached."""
    encoded, total = [], 0
    bar = tqdm(desc="tokenizing", unit="tok", total=budget, leave=False)
    batch: list[str] = []

    def flush() -> None:
        nonlocal total
        if not batch:
            return
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            if ids:
                encoded.append(ids)
                total += len(ids)
                bar.update(len(ids))
        batch.clear()

    for document in documents:
        if document and document.strip():
            batch.append(document)
        if len(batch) == 64:
            flush()
            if budget is not None and total >= budget:
                break
    flush()
    bar.close()
    return encoded


def split_documents(documents: list[list[int]], test_fraction: float, seed: int) -> tuple[list, list]:
    """Shuffle documents with ``seed`` and assign whole documents to (train, test).

    Test takes documents, in shuffled order, while it stays within ``test_fraction`` of all tokens
    (and always at least one document when there are two or more).
    """
    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    target = test_fraction * sum(map(len, documents))
    train, test, test_tokens = [], [], 0
    for index in order:
        document = documents[index]
        if test_fraction > 0 and len(documents) > 1 and (not test or test_tokens + len(document) <= target) \
                and len(test) < len(documents) - 1:
            test.append(document)
            test_tokens += len(document)
        else:
            train.append(document)
    return train, test


def pack(documents: list[list[int]], context: int, bos: int | None) -> torch.Tensor:
    """Concatenate documents (each preceded by ``bos``) and cut ``[n, context]`` contexts.

    With a BOS token every context starts with one: a context that begins at a document start uses
    the document's own, any other gets one prepended. The incomplete tail is dropped.
    """
    stream = [t for document in documents for t in ([bos] if bos is not None else []) + document]
    contexts, position = [], 0
    while True:
        prefix = [] if bos is None or stream[position: position + 1] == [bos] else [bos]
        end = position + context - len(prefix)
        if end > len(stream):
            break
        contexts.append(prefix + stream[position:end])
        position = end
    return torch.tensor(contexts, dtype=torch.long).view(len(contexts), context)


def load_corpus(
    source: str | os.PathLike | Iterable[str] = DEFAULT_CORPUS,
    tokenizer: Any = None,
    *,
    context: int = 128,
    n_tokens: int | None = None,
    seed: int = 0,
    split: Literal["train", "test", "all"] = "train",
    test_fraction: float = 0.1,
    column: str = "text",
    dataset_split: str = "train",
    dataset_kwargs: dict | None = None,
) -> torch.Tensor:
    """Token contexts ``[n_contexts, context]`` (int64) from a text source.

    Args:
        source: ``"python-docs"`` (default), ``"python-docs+docstrings"``, a Hugging Face dataset
            name (streamed; ``column`` names the text field, ``dataset_kwargs`` go to
            ``datasets.load_dataset``), a ``.txt`` / ``.jsonl`` file or folder, or an iterable of
            strings.
        tokenizer: a Hugging Face tokenizer, or a model from `load_model` (its tokenizer is used
            and ``context`` is checked against its maximum).
        context: tokens per context, BOS included.
        n_tokens: how many tokens to return (rounded down to whole contexts); all when ``None``.
        seed: document order and the train/test assignment depend only on it.
        split: ``"train"``, ``"test"`` (held-out documents, never shared with train) or ``"all"``.
        test_fraction: the share of tokens whose documents go to the test split.
    """
    if tokenizer is None:
        raise ValueError("load_corpus needs a tokenizer: load_corpus(source, lm.tokenizer) or load_corpus(source, lm).")
    max_context = getattr(tokenizer, "max_context", None)
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    if max_context is None and getattr(tokenizer, "model_max_length", 0) < 10**9:
        max_context = tokenizer.model_max_length
    if context < 2:
        raise ValueError(f"context={context} is too short: contexts need at least 2 tokens.")
    if max_context is not None and context > max_context:
        raise ValueError(f"context={context} is longer than the model allows ({max_context} tokens); "
                         f"pass context <= {max_context}.")
    if split not in ("train", "test", "all"):
        raise ValueError(f"split={split!r}: choose 'train', 'test' or 'all'.")
    if not 0 <= test_fraction < 1:
        raise ValueError(f"test_fraction={test_fraction} must be in [0, 1).")

    # A streamed source is read only as far as the request needs (with room for the test split).
    budget = None
    if n_tokens is not None and not (isinstance(source, str) and source in EMBEDDED_CORPORA):
        budget = int(n_tokens / (1 - test_fraction if split == "train" else max(test_fraction, 1e-9)) * 1.1) + context
    documents = _tokenize(read_documents(source, column=column, dataset_split=dataset_split,
                                         dataset_kwargs=dataset_kwargs), tokenizer, budget)
    if not documents:
        raise EmptyCorpusError(f"The corpus {_describe(source)} contains no text.")
    train, test = split_documents(documents, test_fraction if split != "all" else 0.0, seed)
    chosen = {"train": train, "test": test, "all": train}[split]
    tokens = pack(chosen, context, bos_id(tokenizer))
    if len(tokens) == 0:
        raise EmptyCorpusError(
            f"The {split} split of {_describe(source)} has {sum(map(len, chosen))} tokens, fewer than one "
            f"context of {context}: use a larger corpus, a shorter context or a different test_fraction."
        )
    if n_tokens is not None:
        wanted = n_tokens // context
        if wanted == 0:
            raise ValueError(f"n_tokens={n_tokens} is less than one context of {context} tokens.")
        if wanted > len(tokens):
            warnings.warn(f"{_describe(source)} has {tokens.numel():,} tokens in its {split} split, fewer than "
                          f"the {n_tokens:,} requested; returning all of them.", stacklevel=2)
        tokens = tokens[:wanted]
    return tokens


def _describe(source: Any) -> str:
    return repr(source) if isinstance(source, (str, os.PathLike)) else f"<{type(source).__name__}>"
