import pytest

from server.config import Settings


@pytest.fixture(scope="session")
def default_model_dir():
    """The embedded SmolLM2 checkpoint, prepared once (make test runs prepare-model first)."""
    from server.model.prepare import prepare_model

    return prepare_model(Settings.from_env(), None, progress=False)
