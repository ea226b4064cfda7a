"""Specifications of the package's layout: labkit/README.md's module table is true."""

import ast
import re
from pathlib import Path

LABKIT = Path(__file__).resolve().parent.parent / "labkit"


def table_order() -> list[str]:
    """The modules in labkit/README.md's table, top to bottom: `sft` for labkit/sft.py, `course.site` for labkit/course/site.py."""
    rows = re.findall(r"^\| `((?:course/)?[a-z_]+)\.py` \|", (LABKIT / "README.md").read_text(encoding="utf-8"), re.M)
    return [row.replace("/", ".") for row in rows]


def all_modules() -> set[str]:
    """Every module of the package by the same names (a subpackage's __init__ holds only its docstring)."""
    top = {p.stem for p in LABKIT.glob("*.py")} - {"__main__"}
    return top | {f"{p.parent.name}.{p.stem}" for p in LABKIT.glob("*/*.py") if p.stem != "__init__"}


def is_module(name: str) -> bool:
    return (LABKIT / f"{name.replace('.', '/')}.py").exists()


def imported_modules(tree: ast.AST, package: str = "labkit") -> set[str]:
    """The labkit modules a parsed file of `package` imports, in every form: `import labkit.x`, `from labkit.x import y`,
    `from labkit import x`, `from labkit.course import x`, relative `from . import x`, `from .x import y`,
    `from ..x import y`, and `importlib.import_module("labkit.x")`."""
    found = set()

    def add(module: str, names: list[str]) -> None:  # module relative to labkit ("" for labkit itself)
        for name in names:
            sub = f"{module}.{name}" if module else name
            found.add(sub if is_module(sub) else module or "__init__")  # else a name defined in `module`

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            parts = node.module.split(".") if node.module else []
            if node.level:  # relative: from the file's package, one level up per extra dot
                base = package.split(".")
                parts = base[: len(base) - node.level + 1] + parts
            if parts[:1] == ["labkit"]:
                add(".".join(parts[1:]), [a.name for a in node.names])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".", 1)[1] for a in node.names if a.name.startswith("labkit.")}
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and str(node.args[0].value).startswith("labkit.")):
            found.add(node.args[0].value.split(".", 1)[1])
    return found


def own_imports(module: str) -> set[str]:
    """The labkit modules `module` imports, anywhere in its file."""
    package = "labkit." + module.rsplit(".", 1)[0] if "." in module else "labkit"
    source = (LABKIT / f"{module.replace('.', '/')}.py").read_text(encoding="utf-8")
    return imported_modules(ast.parse(source), package) - {module}


def test_every_module_has_a_row_in_the_table():
    assert set(table_order()) == all_modules()


def test_modules_import_only_modules_in_rows_above_them():
    order = table_order()
    upward = [(m, d) for m in order for d in own_imports(m) if order.index(d) > order.index(m)]
    assert not upward, f"(module, imports a module listed below it): {upward}"


def test_every_import_form_is_seen():
    source = ("import labkit.quant\nfrom labkit.lora import x\nfrom labkit import distributed, LabkitError\n"
              "from . import rank\nfrom .sft import y\nimportlib.import_module('labkit.judge')\n"
              "from labkit.course import checks\nimport labkit.course.site\nfrom labkit.course.prose import z\n")
    assert imported_modules(ast.parse(source)) == {"quant", "lora", "distributed", "__init__", "rank", "sft", "judge",
                                                   "course.checks", "course.site", "course.prose"}


def test_relative_imports_inside_the_course_subpackage_resolve_from_it():
    source = "from .outputs import x\nfrom . import colab\nfrom ..sft import y\nfrom .. import dpo\n"
    assert imported_modules(ast.parse(source), "labkit.course") == {"course.outputs", "course.colab", "sft", "dpo"}


def test_the_course_tooling_lives_in_its_own_subpackage():
    tooling = {"colab", "checks", "diagrams", "outputs", "prose", "site", "warm"}
    assert {m for m in all_modules() if not m.startswith("course.")}.isdisjoint(tooling)
    assert {f"course.{m}" for m in tooling} <= all_modules()