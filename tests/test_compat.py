"""labkit's calls into Hugging Face libraries fit the installed versions (in the style of Unsloth's checks).

Every keyword argument that labkit/, the notebooks and benchmarks/ pass to a TRL, peft, transformers or
bitsandbytes API is looked up in that API's installed signature, so a renamed argument (`tokenizer=` ->
`processing_class=`) fails the one test named for that API. And pyproject's lower bounds admit the
versions Colab preinstalls, so installing labkit on Colab upgrades none of them.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import re
import tomllib
from collections import defaultdict
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
LIBRARIES = ("trl", "peft", "transformers", "bitsandbytes")

# Each API that labkit calls with keyword arguments -> where the keywords it takes are defined. An Auto class or
# a method that passes **kwargs on is checked against where they land.
APIS = {
    "trl.SFTConfig": ["trl.SFTConfig"],
    "trl.SFTTrainer": ["trl.SFTTrainer.__init__"],
    "trl.DPOConfig": ["trl.DPOConfig"],
    "trl.DPOTrainer": ["trl.DPOTrainer.__init__"],
    "trl.KTOConfig": ["trl.KTOConfig"],
    "trl.KTOTrainer": ["trl.KTOTrainer.__init__"],
    "trl.GRPOConfig": ["trl.GRPOConfig"],
    "trl.GRPOTrainer": ["trl.GRPOTrainer.__init__"],
    "peft.LoraConfig": ["peft.LoraConfig"],
    "peft.prepare_model_for_kbit_training": ["peft.prepare_model_for_kbit_training"],
    "peft.PeftModel.from_pretrained": ["peft.PeftModel.from_pretrained"],
    "transformers.AutoModelForCausalLM.from_pretrained": ["transformers.PreTrainedModel.from_pretrained"],
    "transformers.AutoTokenizer.from_pretrained": ["transformers.AutoTokenizer.from_pretrained"],
    "transformers.BitsAndBytesConfig": ["transformers.BitsAndBytesConfig.__init__"],
    "transformers.GenerationMixin.generate": ["transformers.GenerationMixin.generate",
                                              "transformers.GenerationConfig.__init__",
                                              "transformers.LlamaForCausalLM.forward"],
    "transformers.PreTrainedTokenizerBase.apply_chat_template":
        ["transformers.PreTrainedTokenizerBase.apply_chat_template"],
    "transformers.PreTrainedTokenizerBase.decode": ["transformers.PreTrainedTokenizerBase.decode"],
    "transformers.PreTrainedModel.gradient_checkpointing_enable":
        ["transformers.PreTrainedModel.gradient_checkpointing_enable"],
    "transformers.LlamaModel.forward": ["transformers.LlamaModel.forward"],
    "transformers.get_cosine_schedule_with_warmup": ["transformers.get_cosine_schedule_with_warmup"],
    "bitsandbytes.functional.quantize_4bit": ["bitsandbytes.functional.quantize_4bit"],
    "bitsandbytes.functional.get_4bit_type": ["bitsandbytes.functional.get_4bit_type"],
}
# Methods called on a model or tokenizer object (`model.generate(...)`), known by their name alone.
METHODS = {
    "generate": "transformers.GenerationMixin.generate",
    "apply_chat_template": "transformers.PreTrainedTokenizerBase.apply_chat_template",
    "decode": "transformers.PreTrainedTokenizerBase.decode",
    "gradient_checkpointing_enable": "transformers.PreTrainedModel.gradient_checkpointing_enable",
    "model": "transformers.LlamaModel.forward",  # causal_lm.model(...): the Llama body without its head
}

# What Colab preinstalls (late 2026, ../shared/reference/notebook-testing.md); trl and bitsandbytes it lacks.
COLAB_VERSIONS = {"torch": "2.11", "transformers": "5.15", "peft": "0.20", "accelerate": "1.14",
                  "datasets": "4.0", "matplotlib": "3.10", "ipywidgets": "7.7.1"}
# The one upgrade Colab gets, and why it needs no restart (tests/test_colab.py sees the same in pip's report).
UPGRADED_ON_COLAB = {"datasets": "every trl >= 1.0 requires datasets >= 4.7; no cell imports datasets before the "
                                 "first cell installs labkit, so the upgrade needs no runtime restart"}


def sources() -> list[tuple[str, list[tuple[str, str]]]]:
    """Each file of labkit/ (and labkit/course/), benchmarks/ and notebooks/ as (file, [(where, Python code)]): a notebook's code cells
    one by one (IPython magics dropped), a module whole."""
    found = [(str(p.relative_to(ROOT)), [(str(p.relative_to(ROOT)), p.read_text(encoding="utf-8"))])
             for folder in ["labkit", "labkit/course", "benchmarks"] for p in sorted((ROOT / folder).glob("*.py"))]
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        code = [(f"{path.relative_to(ROOT)} cell {i}", "\n".join(
                    line for line in "".join(c["source"]).splitlines() if not line.lstrip().startswith(("%", "!"))))
                for i, c in enumerate(cells) if c["cell_type"] == "code"]
        found.append((str(path.relative_to(ROOT)), code))
    return found


def imported_names(tree: ast.AST) -> dict[str, str]:
    """Local name -> 'library.Name' for every import in a module (`from trl.x import SFTConfig as C` -> trl.SFTConfig)."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.update({a.asname or a.name: f"{node.module.split('.')[0]}.{a.name}" for a in node.names})
        elif isinstance(node, ast.Import):
            names.update({a.asname or a.name: a.name for a in node.names})
    return names


def called_api(func: ast.expr, names: dict[str, str]) -> str | None:
    """The API a call's function expression names: an imported name, its attribute, or a known method."""
    if isinstance(func, ast.Name):
        return names.get(func.id)
    if isinstance(func, ast.Attribute):
        if isinstance(func.value, ast.Name) and func.value.id in names:
            return f"{names[func.value.id]}.{func.attr}"
        return METHODS.get(func.attr)
    return None


def keyword_calls() -> dict[str, dict[str, list[str]]]:
    """API -> keyword -> where it is passed ('file, line N'), for calls into the HF libraries in labkit's sources."""
    calls: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for _file, chunks in sources():
        trees = [(where, ast.parse(code, filename=where)) for where, code in chunks]
        names = {k: v for _, tree in trees for k, v in imported_names(tree).items()}  # imported anywhere in the file
        for where, tree in trees:
            for node in ast.walk(tree):
                api = called_api(node.func, names) if isinstance(node, ast.Call) else None
                if api and api.split(".")[0] in LIBRARIES:
                    for kw in node.keywords:
                        if kw.arg:  # **options cannot be read statically
                            calls[api][kw.arg].append(f"{where}, line {node.lineno}")
    return calls


def resolve(path: str):
    """The object a dotted path names ('transformers.PreTrainedModel.from_pretrained')."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError as error:
            if not f"{path}.".startswith(f"{error.name}."):  # not a part of `path`: the library fails to import
                raise
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(path)


KWARGS_READ = re.compile(r"""kwargs(?:\.pop|\.get)\(\s*["'](\w+)["']|kwargs\[["'](\w+)["']\]""")


def accepted_keywords(target) -> set[str]:
    """The keywords a callable takes: its named parameters and, if it has **kwargs, the names it reads from them."""
    params = inspect.signature(target).parameters.values()
    names = {p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    if any(p.kind == p.VAR_KEYWORD for p in params):
        names |= {a or b for a, b in KWARGS_READ.findall(inspect.getsource(target))}
    return names


def missing_keywords(api: str, passed: dict[str, list[str]]) -> dict[str, list[str]]:
    """The keywords labkit passes to `api` that its installed version does not take, with where they are passed."""
    accepted = set().union(*(accepted_keywords(resolve(target)) for target in APIS[api]))
    return {kw: places for kw, places in passed.items() if kw not in accepted}


@pytest.fixture(scope="module")
def calls() -> dict[str, dict[str, list[str]]]:
    return keyword_calls()


@pytest.mark.parametrize("api", sorted(APIS))
def test_keywords_labkit_passes_exist_in(api, calls):
    missing = missing_keywords(api, calls[api])
    assert not missing, (f"{api} in the installed version takes no {sorted(missing)}: passed at "
                         f"{missing}. Look up the new name in the library's changelog and rename it there.")


def test_every_checked_api_is_still_called_with_keywords(calls):
    assert not set(APIS) - set(calls), f"no longer called with keywords, drop from APIS: {set(APIS) - set(calls)}"


def test_every_library_call_with_keywords_is_checked(calls):
    unchecked = {api: sorted(kws) for api, kws in calls.items() if api not in APIS}
    assert not unchecked, f"add these to APIS in tests/test_compat.py: {unchecked}"


def test_the_check_fails_when_a_keyword_is_renamed(monkeypatch, calls):
    from peft import LoraConfig

    signature = inspect.signature(LoraConfig)
    renamed = [p.replace(name="alpha") if p.name == "lora_alpha" else p for p in signature.parameters.values()]
    monkeypatch.setattr(LoraConfig, "__signature__", signature.replace(parameters=renamed), raising=False)
    assert set(missing_keywords("peft.LoraConfig", calls["peft.LoraConfig"])) == {"lora_alpha"}


def test_the_check_reads_keywords_taken_through_kwargs(calls):
    # AutoModelForCausalLM.from_pretrained(..., dtype=...): `dtype` is popped from **kwargs, not a parameter.
    assert "dtype" in accepted_keywords(resolve("transformers.PreTrainedModel.from_pretrained"))
    assert "dtype" in calls["transformers.AutoModelForCausalLM.from_pretrained"]


def declared_requirements() -> list[Requirement]:
    """pyproject's dependencies and the `colab` extra (what the notebooks' first cell installs on Colab)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["colab"]]


@pytest.mark.parametrize("package", sorted(COLAB_VERSIONS))
def test_lower_bounds_admit_colabs_version_of(package):
    requirements = [r for r in declared_requirements() if r.name == package]
    version = Version(COLAB_VERSIONS[package])
    assert requirements, f"{package} is not a dependency in pyproject.toml; drop it from COLAB_VERSIONS"
    if package in UPGRADED_ON_COLAB:  # a known, explained upgrade: check it is still needed
        assert not all(r.specifier.contains(version, prereleases=True) for r in requirements), (
            f"{package} {version} is now accepted: drop it from UPGRADED_ON_COLAB")
        return
    for requirement in requirements:
        assert requirement.specifier.contains(version, prereleases=True), (
            f"pyproject.toml requires {requirement} but Colab has {package} {version}: installing labkit there "
            f"would upgrade it and force a runtime restart; lower the bound to <= {version}")
