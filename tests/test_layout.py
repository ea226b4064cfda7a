"""Specifications of the package's layout: labkit/README.md's module table is true."""

import ast
import re
from pathlib import Path

LABKIT = Path(__file__).resolve().parent.parent / "labkit"


def table_order() -> list[str]:
    return re.findall(r"^\| `([a-z_]+)\.py` \|", (LABKIT / "README.md").read_text(encoding="utf-8"), re.M)


def imported_modules(tree: ast.AST) -> set[str]:
    """The labkit modules a parsed file imports, in every form: `import labkit.x`, `from labkit.x import y`,
    `from labkit import x`, `from . import x`, `from .x import y` and `importlib.import_module("labkit.x")`."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            parts = node.module.split(".") if node.module else []
            if node.level:  # relative, inside labkit/: `from .x import y` or `from . import x`
                parts = ["labkit", *parts]
            if parts[:1] != ["labkit"]:
                continue
            if len(parts) > 1:
                found.add(parts[1])
            else:  # `from labkit import x`: x is a module when labkit/x.py exists, else a name from __init__
                found |= {a.name if (LABKIT / f"{a.name}.py").exists() else "__init__" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("labkit.")}
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and str(node.args[0].value).startswith("labkit.")):
            found.add(node.args[0].value.split(".")[1])
    return found


def own_imports(module: str) -> set[str]:
    """The labkit modules `module` imports, anywhere in its file."""
    return imported_modules(ast.parse((LABKIT / f"{module}.py").read_text(encoding="utf-8"))) - {module}


def test_every_module_has_a_row_in_the_table():
    modules = {p.stem for p in LABKIT.glob("*.py")} - {"__main__"}
    assert set(table_order()) == modules


def test_modules_import_only_modules_in_rows_above_them():
    order = table_order()
    upward = [(m, d) for m in order for d in own_imports(m) if order.index(d) > order.index(m)]
    assert not upward, f"(module, imports a module listed below it): {upward}"


def test_every_import_form_is_seen():
    source = ("import labkit.quant\nfrom labkit.lora import x\nfrom labkit import distributed, LabkitError\n"
              "from . import rank\nfrom .sft import y\nimportlib.import_module('labkit.judge')\n")
    assert imported_modules(ast.parse(source)) == {"quant", "lora", "distributed", "__init__", "rank", "sft", "judge"}
