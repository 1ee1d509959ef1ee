"""Fixtures shared by the engine tests: a tiny 6-layer checkpoint on disk and the model loaded
from it (tests that need stages load them from the directory)."""

import pytest

from hispec.model import load_model
from tests.unit.spec_helpers import tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny6")
    tiny_model(directory)
    return directory


@pytest.fixture(scope="module")
def model(model_dir):
    return load_model(model_dir)
