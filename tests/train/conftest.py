"""Fixtures of the training tests."""

import pytest

from tether.tasks.tiny_model import build_tiny_model


@pytest.fixture(scope="session")
def llama(tmp_path_factory):
    """A tiny random Llama (hidden 32, 2 layers) on tether's character vocabulary."""
    return str(build_tiny_model(tmp_path_factory.mktemp("llama"), hidden_size=32, num_layers=2, seed=0))
