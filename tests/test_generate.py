import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from labkit.evaluate import generate, greedy_batch

pytestmark = pytest.mark.usefixtures("one_thread")

PAD = 0


@pytest.fixture(scope="module")
def tiny():
    """A two-layer Llama with random weights: the real architecture, fast enough for many prompts."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    """n random prompts of different lengths (3 to 20 tokens)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 64, (int(torch.randint(3, 21, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def reference(model, prompt: list[int], max_new_tokens: int, eos_id: int) -> list[int]:
    """transformers' own greedy decoding of one prompt, alone (no padding)."""
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=eos_id, pad_token_id=PAD)
    return out[0, len(prompt):].tolist()


def test_greedy_batch_equals_model_generate_token_for_token(tiny):
    batch = prompts(12)
    eos = reference(tiny, batch[0], 5, eos_id=-1)[2]  # a token some rows emit early: rows stop at different steps
    ours = greedy_batch(tiny, batch, max_new_tokens=16, eos_id=eos, pad_id=PAD)
    theirs = [reference(tiny, p, 16, eos) for p in batch]
    theirs = [t[: t.index(eos) + 1] if eos in t else t for t in theirs]  # generate pads finished rows; we stop
    assert ours == theirs


def test_finished_rows_leave_the_batch(tiny):
    batch = prompts(6)
    eos = greedy_batch(tiny, batch[:1], max_new_tokens=1, eos_id=-1, pad_id=PAD)[0][0]  # row 0 stops at once
    sizes = []
    hook = tiny.model.register_forward_hook(lambda module, args, kwargs, out: sizes.append(kwargs["input_ids"].shape[0]),
                                            with_kwargs=True)
    try:
        out = greedy_batch(tiny, batch, max_new_tokens=4, eos_id=eos, pad_id=PAD)
    finally:
        hook.remove()
    assert out[0] == [eos]
    assert sizes[0] == 6 and sizes[1] == 6 - sum(o[0] == eos for o in out)


def test_every_reply_stops_at_max_new_tokens(tiny):
    out = greedy_batch(tiny, prompts(5), max_new_tokens=7, eos_id=-1, pad_id=PAD)
    assert [len(o) for o in out] == [7] * 5


def test_all_rows_finished_ends_the_batch(tiny):
    batch = prompts(1)
    eos = greedy_batch(tiny, batch, max_new_tokens=1, eos_id=-1, pad_id=PAD)[0][0]
    assert greedy_batch(tiny, batch, max_new_tokens=50, eos_id=eos, pad_id=PAD) == [[eos]]


def test_generate_equals_model_generate_on_test_tickets(smollm2):
    from labkit.data import load_split
    from labkit.tickets import prompt_conversations

    model, tokenizer = smollm2
    conversations = prompt_conversations(load_split("test")[:6])
    ours = generate(model, tokenizer, conversations, max_new_tokens=24, batch_size=4, progress=False)
    theirs = []
    for conversation in conversations:
        ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
        out = model.generate(**ids, max_new_tokens=24, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
        theirs.append(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    assert ours == theirs


def test_peft_wrapped_model_equals_model_generate(tiny):
    import copy

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    peft_model = get_peft_model(copy.deepcopy(tiny), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    peft_model.eval()
    batch = prompts(4, seed=1)
    ours = greedy_batch(peft_model, batch, max_new_tokens=8, eos_id=-1, pad_id=PAD)
    assert ours == [reference(peft_model, p, 8, eos_id=-1) for p in batch]


def test_cached_generate_reads_the_second_call_from_disk(smollm2, tmp_path, monkeypatch):
    import labkit.evaluate as evaluate

    monkeypatch.setenv("LABKIT_HOME", str(tmp_path))
    model, tokenizer = smollm2
    conversations = [[{"role": "user", "content": "Say hi."}]]
    first = evaluate.cached_generate(model, tokenizer, conversations, 4, model_key="smollm2", progress=False)
    monkeypatch.setattr(evaluate, "generate", lambda *a, **k: pytest.fail("generated again"))
    assert evaluate.cached_generate(model, tokenizer, conversations, 4, model_key="smollm2", progress=False) == first
    assert len(list((tmp_path / "replies").glob("*.json"))) == 1


def test_cached_generate_keys_replies_by_model_length_and_batch_size(smollm2, tmp_path, monkeypatch):
    import labkit.evaluate as evaluate

    monkeypatch.setenv("LABKIT_HOME", str(tmp_path))
    model, tokenizer = smollm2
    calls = []
    monkeypatch.setattr(evaluate, "generate", lambda m, t, c, max_new_tokens, **kw: calls.append(kw) or ["x"])
    conversations = [[{"role": "user", "content": "Say hi."}]]
    for key, length, batch in [("a", 4, 32), ("b", 4, 32), ("a", 5, 32), ("a", 4, 32), ("a", 4, 64), ("a", 4, 64)]:
        evaluate.cached_generate(model, tokenizer, conversations, length, model_key=key, progress=False,
                                 batch_size=batch)
    assert [c["batch_size"] for c in calls] == [32, 32, 32, 64]


def test_cached_generate_builds_a_model_only_on_a_cache_miss(smollm2, tmp_path, monkeypatch):
    import labkit.evaluate as evaluate

    monkeypatch.setenv("LABKIT_HOME", str(tmp_path))
    model, tokenizer = smollm2
    conversations = [[{"role": "user", "content": "Say hi."}]]
    builds = []

    def build():
        builds.append(1)
        return model

    first = evaluate.cached_generate(build, tokenizer, conversations, 4, model_key="smollm2", progress=False,
                                     precision_of=model)
    again = evaluate.cached_generate(build, tokenizer, conversations, 4, model_key="smollm2", progress=False,
                                     precision_of=model)
    assert first == again == evaluate.cached_generate(model, tokenizer, conversations, 4, model_key="smollm2",
                                                      progress=False)
    assert len(builds) == 1


def test_cached_generate_asks_for_the_precision_of_a_builder(tmp_path, monkeypatch):
    import labkit.evaluate as evaluate
    from labkit import LabkitError

    monkeypatch.setenv("LABKIT_HOME", str(tmp_path))
    with pytest.raises(LabkitError, match="precision_of"):
        evaluate.cached_generate(lambda: None, None, [], 4, model_key="m", progress=False)
