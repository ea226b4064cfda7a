"""Every input checked where it enters: generated malformed records and generated bad settings all end in one
LabkitError naming where the problem is, never in another exception and never in a run that goes on silently.

The generators are seeded (no hypothesis dependency): each run tries the same few hundred inputs, and a
failure names the input. The hand-picked cases of issue 32 are explicit examples next to them.
"""

import json
import math
import random
from dataclasses import fields

import pytest

from labkit import LabkitError, settings
from labkit.data import CHARS_PER_TOKEN, DataError, read_examples, read_jsonl, record_issues
from labkit.dataprep import load_jsonl
from labkit.dpo import DPOConfig
from labkit.preference import KTOConfig, ORPOConfig
from labkit.settings import ConfigError
from labkit.sft import SFTConfig

SYSTEM = {"role": "system", "content": "Triage the support ticket. Reply with JSON only."}
USER = {"role": "user", "content": "My invoice shows the wrong amount."}
ASSISTANT = {"role": "assistant", "content": "billing"}
CHAT = {"messages": [SYSTEM, USER, ASSISTANT]}
PAIR = {"prompt": [SYSTEM, USER], "chosen": [{"role": "assistant", "content": "Hi Ana, sorry about that."}],
        "rejected": [{"role": "assistant", "content": "Sorry about that."}]}
KIND = {"chat": CHAT, "pairs": PAIR}
MAX_LENGTH = 64  # the generated huge strings are longer than this many tokens can hold

# What a field may be replaced with: wrong types, nulls, nesting, empty and huge strings, odd numbers.
BAD_VALUES = [None, 0, -1, 1.5, float("nan"), True, "", "   ", [], {}, ["text"], {"text": "hi"}, [[]], 10**30]
BAD_ROLES = [None, 0, True, "", "User", "Assistant", "SYSTEM", "customer", " user", "user ", ["user"],
             {"role": "user"}]
BAD_TOP = [None, 0, 3.5, True, "messages", [], [CHAT], [1, 2]]


def mutations(good: dict, rng: random.Random, n: int) -> list[tuple[str, object]]:
    """n (description, record) pairs: `good` with one thing broken, each a record no training run can use."""
    out = []
    lists = [key for key, value in good.items() if isinstance(value, list)]
    while len(out) < n:
        op = rng.choice(["top", "drop_key", "retype_key", "drop_field", "retype_content", "retype_role",
                         "message_type", "empty_text", "huge_text", "roles"])
        record = json.loads(json.dumps(good))
        key = rng.choice(lists)
        i = rng.randrange(len(record[key]))
        message = record[key][i]
        if op == "top":
            value = rng.choice(BAD_TOP)
            out.append((f"the line is {value!r}", value))
            continue
        if op == "drop_key":
            del record[key]
        elif op == "retype_key":
            record[key] = rng.choice(BAD_VALUES + [[None], [0], ["hi"]])
        elif op == "drop_field":
            del message[rng.choice(["role", "content"])]
        elif op == "retype_content":
            message["content"] = rng.choice([v for v in BAD_VALUES if not isinstance(v, str)])
        elif op == "retype_role":
            message["role"] = rng.choice(BAD_ROLES)
        elif op == "message_type":
            record[key][i] = rng.choice([None, 0, "hello", [message], [], True])
        elif op == "empty_text":
            if message["role"] == "system":
                message, i = record[key][-1], len(record[key]) - 1  # an empty system prompt is allowed
            message["content"] = rng.choice(["", " ", "\n\t "])
        elif op == "huge_text":
            message["content"] = "x" * (MAX_LENGTH * CHARS_PER_TOKEN + rng.randrange(1, 10_000))
        elif op == "roles":
            broken_roles(record, rng)
        out.append((f"{op} on {key}[{i}]", record))
    return out


def chat_roles_ok(roles: list[str]) -> bool:
    """The rule for a chat example's roles: a user turn before the first answer, an assistant turn last."""
    rest = [r for r in roles if r != "system"]
    return bool(rest) and rest[0] == "user" and roles[-1] == "assistant"


def broken_roles(record: dict, rng: random.Random) -> None:
    """Give the record a shuffled or random sequence of known roles that training cannot use."""
    if "messages" in record:
        while True:
            roles = [rng.choice(["system", "user", "assistant"]) for _ in range(rng.randint(1, 4))]
            if not chat_roles_ok(roles):
                record["messages"] = [{"role": r, "content": f"turn {k}"} for k, r in enumerate(roles)]
                return
    side = rng.choice(["prompt", "chosen", "rejected"])
    if side == "prompt":
        record["prompt"] = rng.choice([[SYSTEM], [USER, ASSISTANT], [ASSISTANT], [SYSTEM, ASSISTANT, USER]])
    else:
        record[side] = rng.choice([[USER], [ASSISTANT, USER], [SYSTEM], [record["chosen" if side == "rejected"
                                                                                 else "rejected"][0]]])


def generated_records() -> list[tuple[str, str, object]]:
    """(kind, description, record): 150 broken chat examples and 150 broken preference pairs, seeded."""
    rng = random.Random(32)
    return [(kind, what, record) for kind in ("chat", "pairs") for what, record in mutations(KIND[kind], rng, 150)]


RECORDS = generated_records()


def write(tmp_path, records, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# ---------------------------------------------------------------- records


def test_the_generators_try_a_few_hundred_inputs():
    assert len(RECORDS) == 300 and len(SETTINGS) == 2410


@pytest.mark.parametrize("kind", ["chat", "pairs"])
def test_good_records_pass_every_loader(tmp_path, kind):
    path = write(tmp_path, [KIND[kind]] * 3)
    assert read_jsonl(path) == read_examples(path, kind, MAX_LENGTH) == load_jsonl(path, triage=False) == [KIND[kind]] * 3


def test_every_generated_broken_record_is_refused_by_every_loader_naming_its_line(tmp_path):
    for n, (kind, what, record) in enumerate(RECORDS):
        lines = [KIND[kind]] * (n % 3) + [record] + [KIND[kind]]
        path = write(tmp_path, lines, f"{n}.jsonl")
        where = f"{n}.jsonl:{n % 3 + 1}:"
        assert record_issues(record, kind, MAX_LENGTH), what
        for loader in (lambda: read_examples(path, kind, MAX_LENGTH), lambda: load_jsonl(path, False, MAX_LENGTH)):
            try:
                loader()
            except DataError as err:  # one line per problem, each naming file:line:field and how to fix it
                lines = str(err).splitlines()
                assert all(line.startswith(where) and "Fix:" in line for line in lines[len(lines) > 1:]), (what, lines)
            except Exception as err:  # noqa: BLE001 - the property: nothing but a LabkitError
                pytest.fail(f"{what}: {type(err).__name__}: {err}")
            else:
                pytest.fail(f"{what}: accepted {record!r}"[:300])


def test_every_accepted_record_renders_and_keeps_a_labelled_token(tokenizer):
    from labkit.dpo import tokenize_pair
    from labkit.sft import IGNORE, tokenize_chat

    rng = random.Random(0)
    for _ in range(40):
        roles = [rng.choice(["system", "user", "assistant"]) for _ in range(rng.randint(1, 5))]
        record = {"messages": [{"role": r, "content": f"turn {k} é ✓"} for k, r in enumerate(roles)]}
        if record_issues(record, "chat", 512):
            assert not chat_roles_ok(roles)
            continue
        row = tokenize_chat(tokenizer, record["messages"], 512)
        assert any(label != IGNORE for label in row["labels"]), roles
    row = tokenize_pair(tokenizer, PAIR, 512)
    assert row["chosen_ids"] and row["rejected_ids"]


def test_no_token_of_the_model_is_longer_than_the_bound_the_length_check_assumes(tokenizer):
    longest = max(len(tokenizer.decode([i])) for i in range(len(tokenizer)))
    assert longest <= CHARS_PER_TOKEN


ISSUE_CASES = {  # issue 32's hand-picked records: (kind, record, field named, words of the message)
    "content null": ("chat", {"messages": [USER, {"role": "assistant", "content": None}]},
                     "messages[1].content", "is null, not a string"),
    "content a list of parts": ("chat", {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                                                      ASSISTANT]}, "messages[0].content", "is a list of parts"),
    "message a plain string": ("chat", {"messages": ["hello", ASSISTANT]}, "messages[0]", "is a string, not a message"),
    "role missing": ("chat", {"messages": [{"content": "hi"}, ASSISTANT]}, "messages[0].role", "is missing"),
    "role a number": ("chat", {"messages": [{"role": 1, "content": "hi"}, ASSISTANT]}, "messages[0].role",
                      "is a number, not a string"),
    "role an object": ("chat", {"messages": [{"role": {"name": "user"}, "content": "hi"}, ASSISTANT]},
                       "messages[0].role", "is an object, not a string"),
    "role spelt User": ("chat", {"messages": [{"role": "User", "content": "hi"}, ASSISTANT]}, "messages[0].role",
                        "'User' is not a known role. Fix: use system, user or assistant"),
    "role spelt Assistant": ("chat", {"messages": [USER, {"role": "Assistant", "content": "ok"}]},
                             "messages[1].role", "'Assistant' is not a known role"),
    "a scalar line": ("chat", 42, "record", "the line is a number, not a JSON object"),
    "empty messages": ("chat", {"messages": []}, "messages", "is an empty list"),
    "assistant first": ("chat", {"messages": [ASSISTANT, USER, ASSISTANT]}, "messages[0].role",
                        "starts with an assistant turn"),
    "system only": ("chat", {"messages": [SYSTEM]}, "messages", "holds only a system prompt"),
    "no assistant turn": ("chat", {"messages": [SYSTEM, USER]}, "messages", "has no assistant turn at the end"),
    "pairs given to sft": ("chat", PAIR, "messages", "python -m labkit dpo"),
    "chat given to dpo": ("pairs", CHAT, "prompt", "python -m labkit sft"),
    "prompt as a plain string": ("pairs", {**PAIR, "prompt": "hi"}, "prompt", "is a string, not a list of chat messages"),
    "pair with the same replies": ("pairs", {**PAIR, "rejected": PAIR["chosen"]}, "rejected", "same reply as chosen"),
    "prompt ending with the answer": ("pairs", {**PAIR, "prompt": [USER, ASSISTANT]}, "prompt[1].role",
                                      "the prompt's last turn is 'assistant', not 'user'"),
}


@pytest.mark.parametrize("case", list(ISSUE_CASES))
def test_issue_case_is_one_line_naming_file_line_and_field(tmp_path, case):
    kind, record, field, says = ISSUE_CASES[case]
    path = write(tmp_path, [KIND[kind], record])
    with pytest.raises(DataError) as err:
        read_examples(path, kind, 512)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"data.jsonl:2:{field}: ") and says in message, message


def test_a_huge_example_is_refused_from_its_length_alone(tmp_path):
    huge = {"messages": [{"role": "user", "content": "word " * 2_000_000}, ASSISTANT]}  # 10 MB in one line
    path = write(tmp_path, [CHAT, huge])
    with pytest.raises(DataError, match=r"data.jsonl:2:messages: holds 10,000,007 characters, more than "
                                        r"max_length=512 tokens can hold") as err:
        read_examples(path, "chat", 512)
    assert "raise max_length" in str(err.value)


def test_the_notebook_loaders_check_records_too(tmp_path, monkeypatch):
    from labkit.data import load_split

    (tmp_path / "train.jsonl").write_text(json.dumps(CHAT) + "\n")
    (tmp_path / "preferences_train.jsonl").write_text(json.dumps({**PAIR, "chosen": None}) + "\n")
    monkeypatch.setenv("LABKIT_DATA", str(tmp_path))
    assert load_split("train") == [CHAT]
    with pytest.raises(DataError, match=r"preferences_train.jsonl:1:chosen: is null, not a list of chat messages"):
        load_split("preferences_train")


# ---------------------------------------------------------------- settings of the configs


CONFIGS = [SFTConfig, DPOConfig, ORPOConfig, KTOConfig]
MAX_INT = 2**31 - 1


def allowed(name: str, value) -> bool:
    """The spec every config's fields follow, written independently of labkit.settings' rules."""
    is_int = isinstance(value, int) and not isinstance(value, bool)
    is_num = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if name in ("steps", "batch_size", "grad_accum", "r", "eval_every"):
        return is_int and 1 <= value <= MAX_INT
    if name in ("max_length", "patience"):
        return value is None or (is_int and 1 <= value <= MAX_INT)
    if name == "checkpoint_every":
        return is_int and 0 <= value <= MAX_INT
    if name == "seed":
        return is_int and 0 <= value < 2**32
    if name in ("lr", "max_grad_norm", "lora_alpha", "beta", "desirable_weight", "undesirable_weight"):
        return is_num and value > 0
    if name in ("warmup_ratio", "lora_dropout"):
        return is_num and 0 <= value < 1
    if name == "weight_decay":
        return is_num and value >= 0
    if name == "loss_type":
        return value in ("sigmoid", "ipo", "hinge")
    if name == "target_modules":
        return value == "all-linear" or (isinstance(value, list) and bool(value)
                                         and all(isinstance(v, str) and v.strip() for v in value))
    raise AssertionError(f"no spec for {name}")


VALUES = [0, 1, -1, -2, 2, 0.0, 0.5, 0.999, 1.0, 1.5, -0.1, 1e-4, float("nan"), float("inf"), float("-inf"), True,
          False, None, "", "1", "abc", "all-linear", [], ["q_proj"], ["", "v_proj"], [1], {}, 2**31, 2**32, 10**40,
          "sigmoid", "ipo", "dpo"]


def generated_settings() -> list[tuple[type, str, object]]:
    """(config class, field, value): every field of every config with every value of VALUES, and 100 random ones."""
    rng = random.Random(32)
    cases = [(cls, f.name, v) for cls in CONFIGS for f in fields(cls) for v in VALUES]
    for _ in range(100):
        cls = rng.choice(CONFIGS)
        name = rng.choice([f.name for f in fields(cls)])
        cases.append((cls, name, rng.choice([rng.uniform(-2, 2), rng.randint(-5, 5), 10 ** rng.randint(5, 40),
                                            rng.choice(["x", "1e-3", "nan"])])))
    return cases


SETTINGS = generated_settings()


def test_every_generated_setting_is_accepted_exactly_when_the_spec_allows_it():
    for cls, name, value in SETTINGS:
        scheduled = allowed(name, value) and name in ("steps", "grad_accum")
        if scheduled and value * (cls.grad_accum if name == "steps" else cls.steps) > settings.MAX_MICRO_BATCHES:
            with pytest.raises(ConfigError, match=r"steps x grad_accum = \d+: must be at most 10,000,000"):
                cls(**{name: value})  # a schedule too long to plan up front
            continue
        try:
            config = cls(**{name: value})
        except ConfigError as err:
            assert not allowed(name, value), f"{cls.__name__}.{name} = {value!r} refused: {err}"
            assert str(err).startswith(f"{cls.__name__}.{name} = {value!r}: must be "), str(err)
        except Exception as err:  # noqa: BLE001 - the property: nothing but a LabkitError
            pytest.fail(f"{cls.__name__}.{name} = {value!r}: {type(err).__name__}: {err}")
        else:
            assert allowed(name, value), f"{cls.__name__}.{name} = {value!r} accepted"
            assert getattr(config, name) == value or value != value


FLAG_VALUES = ["0", "-1", "1", "2", "0.5", "1.5", "nan", "inf", "-inf", "1e400", "abc", "", "99999999999999999999",
               "q_proj", ",", "all-linear", "sigmoid"]


@pytest.mark.parametrize("command", ["sft", "dpo"])
def test_every_generated_flag_value_builds_an_allowed_config_or_is_one_line(command):
    from labkit.cli import build_config, config_class, parser_for

    for f in fields(config_class(command)):
        for text in FLAG_VALUES:
            argv = ["--data", "x", "--out", "y", f"--{f.name.replace('_', '-')}", text]
            try:
                config = build_config(parser_for(command).parse_args(argv), command)
            except LabkitError as err:
                assert "\n" not in str(err) and str(err).startswith(("python -m labkit", f"--{f.name.replace('_', '-')}"))
            except Exception as err:  # noqa: BLE001 - the property: nothing but a LabkitError
                pytest.fail(f"--{f.name} {text!r}: {type(err).__name__}: {err}")
            else:
                assert allowed(f.name, getattr(config, f.name)), f"--{f.name} {text!r} accepted"


def test_a_schedule_too_long_to_plan_is_refused():
    with pytest.raises(ConfigError, match=r"SFTConfig.steps x grad_accum = 100000000: must be at most 10,000,000"):
        SFTConfig(steps=10**6, grad_accum=100)


@pytest.mark.parametrize("config, says", [
    (lambda: SFTConfig(steps=0), "SFTConfig.steps = 0: must be an integer >= 1"),
    (lambda: SFTConfig(steps=-1), "SFTConfig.steps = -1: must be an integer >= 1"),
    (lambda: SFTConfig(grad_accum=0), "SFTConfig.grad_accum = 0: must be an integer >= 1"),
    (lambda: SFTConfig(max_grad_norm=-1.0), "SFTConfig.max_grad_norm = -1.0: must be a finite number > 0"),
    (lambda: SFTConfig(max_length=-5), "SFTConfig.max_length = -5: must be an integer >= 1 or None"),
    (lambda: SFTConfig(patience=0), "SFTConfig.patience = 0: must be an integer >= 1 or None"),
    (lambda: SFTConfig(lr=float("nan")), "SFTConfig.lr = nan: must be a finite number > 0"),
    (lambda: SFTConfig(lr=-1.0), "SFTConfig.lr = -1.0: must be a finite number > 0"),
    (lambda: SFTConfig(lora_dropout=1.5), "SFTConfig.lora_dropout = 1.5: must be a finite number in [0, 1)"),
    (lambda: SFTConfig(r=0), "SFTConfig.r = 0: must be an integer >= 1"),
    (lambda: SFTConfig(eval_every=0), "SFTConfig.eval_every = 0: must be an integer >= 1"),
    (lambda: SFTConfig(warmup_ratio=float("nan")), "SFTConfig.warmup_ratio = nan: must be a finite number in [0, 1)"),
    (lambda: DPOConfig(beta=0.0), "DPOConfig.beta = 0.0: must be a finite number > 0"),
    (lambda: DPOConfig(loss_type="IPO"), "DPOConfig.loss_type = 'IPO': must be one of ['sigmoid', 'ipo', 'hinge']"),
    (lambda: KTOConfig(undesirable_weight=0.0), "KTOConfig.undesirable_weight = 0.0: must be a finite number > 0"),
])
def test_issue_argument_is_refused_when_the_config_is_built(config, says):
    with pytest.raises(ConfigError) as err:
        config()
    assert str(err.value) == says and isinstance(err.value, LabkitError)


# ---------------------------------------------------------------- the environment


@pytest.mark.parametrize("value", ["abc", "0", "-2", "1.5", "2x", "10000", "99999999999999999999999"])
def test_a_bad_thread_count_is_one_line(monkeypatch, value):
    monkeypatch.setenv("LABKIT_THREADS", value)
    with pytest.raises(settings.SettingError, match=rf"LABKIT_THREADS='{value}' is not a whole number from 1 to"):
        settings.threads()


@pytest.mark.parametrize("value, threads", [("3", 3), (" 2 ", 2), ("", None)])
def test_a_good_thread_count_is_read(monkeypatch, value, threads):
    monkeypatch.setenv("LABKIT_THREADS", value)
    assert settings.threads() == threads


@pytest.mark.parametrize("value, on", [("1", True), ("YES", True), ("on", True), ("0", False), ("off", False),
                                       ("", False)])
def test_a_flag_reads_yes_and_no(monkeypatch, value, on):
    monkeypatch.setenv("LABKIT_REQUIRE_ENGINE", value)
    assert settings.flag("LABKIT_REQUIRE_ENGINE") is on


def test_a_flag_that_is_neither_yes_nor_no_is_one_line(monkeypatch):
    monkeypatch.setenv("LABKIT_REQUIRE_ENGINE", "maybe")
    with pytest.raises(settings.SettingError, match="LABKIT_REQUIRE_ENGINE='maybe' is not yes or no"):
        settings.flag("LABKIT_REQUIRE_ENGINE")


def test_a_data_folder_without_the_data_is_named_not_silently_replaced(monkeypatch, tmp_path):
    from labkit.paths import data_dir

    monkeypatch.setenv("LABKIT_DATA", str(tmp_path))
    with pytest.raises(settings.SettingError, match=r"LABKIT_DATA='.*' holds no train.jsonl"):
        data_dir()


def test_a_cuda_device_without_a_gpu_says_so(monkeypatch):
    import torch

    from labkit.runtime import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(LabkitError, match=r"device 'cuda' was asked for, but this machine has no GPU .* Fix: use the cpu"):
        check_device("cuda")
    assert check_device("cpu") == "cpu"
