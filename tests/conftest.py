import os

# Tests never reach the Hub: the model comes from labkit's cache or the offline package.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct and its tokenizer, loaded once for the whole test session."""
    from labkit.models import load_model

    return load_model()


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2's tokenizer and chat template alone (no model weights), with a pad token."""
    from transformers import AutoTokenizer

    from labkit.models import resolve

    tok = AutoTokenizer.from_pretrained(resolve())
    tok.pad_token = tok.pad_token or tok.eos_token
    return tok


@pytest.fixture(scope="module")
def one_thread():
    """Run a module single-threaded (`pytestmark = pytest.mark.usefixtures("one_thread")`): its tensors
    are small, and on a busy 2-core machine two spinning OpenMP threads made such tests 10-30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
