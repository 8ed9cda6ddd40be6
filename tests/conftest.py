"""Shared fixtures: the real default model, loaded once per test session."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # this machine cannot reach the hub; fail fast instead of retrying
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

import tcwidgets as tcw


@pytest.fixture(scope="session")
def lm():
    """The embedded default model, SmolLM2-135M-Instruct."""
    return tcw.load_model()


@pytest.fixture(scope="session")
def contexts(lm):
    """A few short held-out contexts of the default corpus."""
    return tcw.load_corpus("python-docs", lm, context=32, n_tokens=4 * 32, split="test")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
