"""The eval core: batched greedy generation and the running task's metrics."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def generate(
    model,
    tokenizer,
    conversations: list[list[dict]],
    max_new_tokens: int = 64,
    batch_size: int = 32,
    progress: bool = True,
) -> list[str]:
    """Greedy replies to chat prompts, batched with left padding, stopping at end of turn."""
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    # Longest prompts first: batches of similar length waste less padding.
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    replies: list[str] = [""] * len(texts)
    was_training = model.training
    model.eval()
    for start in tqdm(range(0, len(order), batch_size), desc="generate", disable=not progress, leave=False):
        idx = order[start : start + batch_size]
        batch = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        out = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        for i, row in zip(idx, out[:, batch["input_ids"].shape[1] :]):
            replies[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
    model.train(was_training)
    return replies
