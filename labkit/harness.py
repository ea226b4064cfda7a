"""The probes as an EleutherAI lm-eval task: the ecosystem's harness, run offline, scoring like labkit does."""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from unittest.mock import patch

from labkit import LabkitError
from labkit.course.colab import install_on_colab
from labkit.evaluate import PROBE_TOKENS, generate, probe_conversations, score_probes
from labkit.paths import data_dir
from labkit.runtime import model_autocast, pick_amp_dtype

TASK_NAME = "labkit_probes"
LM_EVAL = "lm-eval==0.4.13"  # the version the Makefile installs (--no-deps) and the tests ran

# The task's metric, next to its YAML: lm-eval loads it by file (`!function utils.process_results`), and it
# calls labkit's own rule, so the two harnesses cannot disagree on what counts as a correct answer.
UTILS_PY = '''"""The metric of the labkit_probes task: labkit's own rule (labkit.evaluate.probe_correct)."""

from labkit.evaluate import probe_correct


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """1.0 when the reply states an accepted answer as a whole word, else 0.0."""
    return {"acc": float(probe_correct(results[0], doc["answers"]))}
'''


@dataclass
class ProbeRun:
    """One scoring of the probes: the mean score, each probe's prompt, reply and 0/1 score, and the wall time."""

    score: float
    prompts: list[str]
    replies: list[str]
    correct: list[float]
    seconds: float


def task_yaml(probes_path: Path | str | None = None, name: str = TASK_NAME, max_gen_toks: int = PROBE_TOKENS) -> str:
    """The task's YAML: the probes file as a JSON dataset, the question as a chat turn, greedy decoding."""
    import yaml

    probes_path = Path(probes_path) if probes_path else data_dir() / "probes.jsonl"
    config = {
        "task": name,
        "dataset_path": "json",  # datasets' JSON-lines loader: a local file, no Hub
        "dataset_kwargs": {"data_files": {"test": str(probes_path.resolve())}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "{{question}}",  # the user turn alone: the chat template adds the default system prompt
        "doc_to_target": "answers",  # a field name: the list of accepted answers, what the metric checks
        "generation_kwargs": {
            # No stop string but the model's end of turn (lm-eval appends it): left unset, `until` would default
            # to "\n\n" and could cut a reply before its answer, unlike labkit, which stops at end of turn only.
            "until": [],
            "do_sample": False,  # greedy, as labkit.evaluate.generate
            "max_gen_toks": max_gen_toks,
        },
        "process_results": "UTILS_FUNCTION",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }
    # `!function` is lm-eval's YAML tag for "a Python function in a file next to this one": no plain YAML value.
    return yaml.safe_dump(config, sort_keys=False).replace("UTILS_FUNCTION", "!function utils.process_results")


def write_task(folder: Path | str, probes_path: Path | str | None = None, name: str = TASK_NAME,
               max_gen_toks: int = PROBE_TOKENS) -> Path:
    """Write the probes task (`<name>.yaml` and its metric in `utils.py`) into `folder`; return the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.yaml").write_text(task_yaml(probes_path, name, max_gen_toks))
    (folder / "utils.py").write_text(UTILS_PY)
    return folder


def run_lm_eval(model, tokenizer, folder: Path | str, name: str = TASK_NAME, batch_size: int = 32,
                limit: int | None = None) -> ProbeRun:
    """Score an already-loaded model on the task in `folder` with lm-eval's `simple_evaluate` (offline)."""
    try:
        import lm_eval
    except ImportError:
        # lm-eval without its dependencies: its pytablewriter chain would change packages Colab has imported
        if not install_on_colab(LM_EVAL, "the evaluation harness", no_deps=True):
            raise LabkitError(f"lm-eval is not installed. Fix: pip install --no-deps {LM_EVAL}") from None
        import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    # lm-eval logs two WARNINGs whenever it is handed a model object instead of a name (and "num_fewshot
    # overwritten" for every task): expected here, and a pink stderr block in a notebook. Errors still show.
    quiet = logging.getLogger("lm_eval")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    # lm-eval draws its progress bars with plain `tqdm`, which writes text to stderr: in a notebook, a pink block of
    # half-drawn bars. tqdm.auto draws the same bars as a widget in a notebook and as text elsewhere.
    import lm_eval.api.model
    import lm_eval.api.task
    import lm_eval.models.huggingface
    from tqdm.auto import tqdm

    start = time.perf_counter()
    # The precision labkit.evaluate.generate runs in: lm-eval wraps generation in its own torch.autocast, disabled
    # unless told a dtype (which would switch ours off), and model_autocast adds labkit's fp32 attention on CPU.
    amp_dtype = pick_amp_dtype(next(model.parameters()).device.type)
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, mixed_precision_dtype=amp_dtype)
        with ExitStack() as bars, model_autocast(model):
            for module in (lm_eval.api.model, lm_eval.api.task, lm_eval.models.huggingface):
                bars.enter_context(patch.object(module, "tqdm", tqdm))
            out = lm_eval.simple_evaluate(
                model=lm,
                tasks=[name],
                task_manager=TaskManager(include_path=str(folder), include_defaults=False),  # ours only: no scan of all
                apply_chat_template=True,  # the tokenizer's chat template, as labkit.evaluate.generate applies it
                num_fewshot=0,
                limit=limit,
                bootstrap_iters=0,  # no stderr (100 000 resamples by default): the notebook has its own CI
                log_samples=True,  # keep the per-probe prompts and replies
                random_seed=None, numpy_random_seed=None, torch_random_seed=None,  # greedy: leave global RNGs alone
            )
    finally:
        quiet.setLevel(level)
    seconds = time.perf_counter() - start  # lm-eval's whole run: wrapping the model, loading the file, generating
    samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
    return ProbeRun(
        score=out["results"][name]["acc,none"],
        prompts=[s["arguments"][0][0] for s in samples],  # the chat-templated text lm-eval tokenized
        replies=[s["resps"][0][0] for s in samples],  # as lm-eval returns them: not stripped (labkit's are)
        correct=[s["acc"] for s in samples],
        seconds=seconds,
    )


def run_labkit(model, tokenizer, probes: list[dict], batch_size: int = 32) -> ProbeRun:
    """Score the same probes with labkit's own generate + score_probes, timed the same way."""
    start = time.perf_counter()
    conversations = probe_conversations(probes)
    replies = generate(model, tokenizer, conversations, max_new_tokens=PROBE_TOKENS, batch_size=batch_size,
                       progress=False)
    correct = score_probes(replies, probes)
    seconds = time.perf_counter() - start
    prompts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    return ProbeRun(sum(correct) / len(correct), prompts, replies, correct, seconds)
