"""Fixtures of the command-line tests."""

from __future__ import annotations

import pytest

import fastskip as fs


@pytest.fixture
def tiny_name(monkeypatch, tiny):
    """``--model tiny`` loads the session's small random model (3 layers x 4 heads)."""
    real = fs.model.load_model

    def load(name, **kwargs):
        return tiny if name == "tiny" else real(name, **kwargs)
    monkeypatch.setattr(fs.model, "load_model", load)
    return "tiny"
