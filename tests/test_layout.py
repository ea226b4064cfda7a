"""Specifications of the package's layout: labkit/README.md's module table is true."""

import ast
import re
from pathlib import Path

LABKIT = Path(__file__).resolve().parent.parent / "labkit"


def table_order() -> list[str]:
    return re.findall(r"^\| `([a-z_]+)\.py` \|", (LABKIT / "README.md").read_text(encoding="utf-8"), re.M)


def own_imports(module: str) -> set[str]:
    """The labkit modules `module` imports, anywhere in its file."""
    found = set()
    for node in ast.walk(ast.parse((LABKIT / f"{module}.py").read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "labkit":
            found.add(node.module.split(".")[1] if "." in node.module else "__init__")
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("labkit.")}
    return found - {module}


def test_every_module_has_a_row_in_the_table():
    modules = {p.stem for p in LABKIT.glob("*.py")} - {"__main__"}
    assert set(table_order()) == modules


def test_modules_import_only_modules_in_rows_above_them():
    order = table_order()
    upward = [(m, d) for m in order for d in own_imports(m) if order.index(d) > order.index(m)]
    assert not upward, f"(module, imports a module listed below it): {upward}"
