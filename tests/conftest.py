import os

# Tests never reach the Hub: the model comes from labkit's cache or the offline package.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct and its tokenizer, loaded once for the whole test session."""
    from labkit.models import load_model

    return load_model()
