import os

# Tests never reach the Hub: the model comes from labkit's cache or the offline package.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def perturb_adapter(model, std: float = 0.05, seed: int = 0) -> None:
    """Give LoRA's B matrices non-zero values (seeded per name), so a policy differs from its reference and A gets
    gradients: `from conftest import perturb_adapter` in the parity tests."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, std, generator=torch.Generator().manual_seed(seed * 1000 + len(name)))


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


TINY_LLAMA = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="session")
def tiny_llama():
    """The factory of small random Llamas: `tiny_llama(seed=0, **overrides)`, overrides being LlamaConfig fields.

    By default 2 layers, hidden 64, vocabulary 128: the same code paths as SmolLM2 at a fraction of the cost.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    def make(seed: int = 0, **overrides) -> LlamaForCausalLM:
        torch.manual_seed(seed)
        return LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, **overrides})).eval()

    return make


@pytest.fixture(scope="module")
def one_thread():
    """Run a module single-threaded (`pytestmark = pytest.mark.usefixtures("one_thread")`): its tensors
    are small, and on a busy 2-core machine two spinning OpenMP threads made such tests 10-30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pairs():
    """The first four preference pairs of data/preferences_train.jsonl (DPO, ORPO and KTO tests)."""
    from labkit.data import read_jsonl
    from labkit.paths import data_dir

    return read_jsonl(data_dir() / "preferences_train.jsonl")[:4]


@pytest.fixture(scope="module")
def vocab_llama(tiny_llama, tokenizer):
    """The tiny Llama factory sized for SmolLM2's vocabulary: `vocab_llama(seed=0)`."""
    return lambda seed=0: tiny_llama(seed, vocab_size=len(tokenizer), max_position_embeddings=512,
                                     tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id)
