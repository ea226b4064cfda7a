"""lm-eval (EleutherAI's harness) runs the probes as labkit does: same prompt tokens, same rule, same score."""

import pytest

from labkit.data import load_split, write_jsonl
from labkit.evaluate import PROBE_TOKENS, probe_conversations, probe_correct
from labkit.harness import TASK_NAME, run_labkit, run_lm_eval, write_task

pytest.importorskip("lm_eval")
pytestmark = pytest.mark.usefixtures("one_thread")  # a busy 2-core machine: one thread is the fastest


def some_probes() -> list[dict]:
    """Four probes spread over the file: prompts of two lengths (a padded batch), two that SmolLM2 gets wrong."""
    return load_split("probes")[::4][:4]


@pytest.fixture
def task(tmp_path):
    """The probes task, in its own folder, over a file of `some_probes()`."""
    probes_file = tmp_path / "probes.jsonl"
    write_jsonl(probes_file, some_probes())
    return write_task(tmp_path / "task", probes_file), probes_file


def test_task_yaml_parses_and_names_the_probes_file(task):
    from lm_eval.tasks._yaml_loader import load_yaml

    folder, probes_file = task
    config = load_yaml(folder / f"{TASK_NAME}.yaml")  # lm-eval's own loader: resolves `!function`
    assert config["task"] == TASK_NAME
    assert config["dataset_path"] == "json"
    assert config["dataset_kwargs"]["data_files"]["test"] == str(probes_file.resolve())
    assert config["output_type"] == "generate_until"
    assert config["generation_kwargs"] == {"until": [], "do_sample": False, "max_gen_toks": PROBE_TOKENS}
    assert callable(config["process_results"])


def test_task_is_found_by_name_in_its_folder(task):
    from lm_eval.tasks import TaskManager

    folder, _ = task
    assert TaskManager(include_path=str(folder), include_defaults=False).all_tasks == [TASK_NAME]


@pytest.mark.parametrize("reply, answers", [
    ("The capital of France is Paris.", ["Paris"]),
    ("paris", ["Paris"]),
    ("Parisian food is famous.", ["Paris"]),
    ("The Paris-based company", ["Paris"]),
    ("It is 12.", ["12", "twelve"]),
    ("Twelve.", ["12", "twelve"]),
    ("I do not know.", ["Tokyo"]),
    ("", ["Tokyo"]),
])
def test_metric_is_labkit_probe_correct(task, reply, answers):
    from lm_eval.tasks._yaml_loader import load_yaml

    folder, _ = task
    process_results = load_yaml(folder / f"{TASK_NAME}.yaml")["process_results"]
    doc = {"question": "?", "answers": answers}
    assert process_results(doc, [reply]) == {"acc": float(probe_correct(reply, answers))}


def test_lm_eval_feeds_the_model_labkit_prompt_tokens(task, tiny_llama, tokenizer):
    """A random Llama with SmolLM2's vocabulary: what matters is the ids lm-eval gives it, not its replies."""
    folder, probes_file = task
    folder = write_task(folder, probes_file, max_gen_toks=1)  # one new token: the prompt is all we look at
    model = tiny_llama(vocab_size=len(tokenizer))
    seen = []
    hook = model.register_forward_pre_hook(lambda _, args, kwargs: seen.append(kwargs["input_ids"]), with_kwargs=True)
    try:
        run_lm_eval(model, tokenizer, folder, batch_size=1, limit=1)
    finally:
        hook.remove()
    conversation = probe_conversations(some_probes()[:1])[0]
    text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert seen[0][0].tolist() == tokenizer(text, add_special_tokens=False)["input_ids"]  # as labkit's generate
    assert text.count("<|im_start|>system") == 1  # the template's default system prompt, not a second one


def test_lm_eval_scores_smollm2_as_labkit_does(smollm2, task):
    model, tokenizer = smollm2
    folder, _ = task
    ours = run_labkit(model, tokenizer, some_probes())
    theirs = run_lm_eval(model, tokenizer, folder)
    assert theirs.prompts == ours.prompts
    assert [r.strip() for r in theirs.replies] == ours.replies
    assert theirs.correct == ours.correct
    assert theirs.score == ours.score
