import pytest

import mambastep
from mambastep.cli.common import DEFAULT_MODEL
from mambastep.settings import EngineSettings


@pytest.fixture(scope="module")
def local(one_thread):
    """The bundled model and its tokenizer in this process, on one thread as the servers run."""
    model = mambastep.load(DEFAULT_MODEL, settings=EngineSettings(threads=1))
    return model, mambastep.load_tokenizer(DEFAULT_MODEL)
