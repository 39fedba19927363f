"""House rules that CI checks: every module under splitbench/ has a docstring and at most 400 lines, every
function at most 60 lines. Prints each breach as file:line and exits 1 if there is one."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def breaches(root: Path) -> list[str]:
    out = []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text()
        lines = text.count("\n") + (not text.endswith("\n"))
        if lines > MAX_MODULE_LINES:
            out.append(f"{path}:1: module has {lines} lines (> {MAX_MODULE_LINES})")
        tree = ast.parse(text, str(path))
        if text.strip() and ast.get_docstring(tree) is None:
            out.append(f"{path}:1: module has no docstring")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    out.append(f"{path}:{node.lineno}: function {node.name} has {n} lines (> {MAX_FUNCTION_LINES})")
    return out


if __name__ == "__main__":
    found = breaches(Path(sys.argv[1] if len(sys.argv) > 1 else "splitbench"))
    print("\n".join(found) if found else "house rules: ok")
    sys.exit(1 if found else 0)
