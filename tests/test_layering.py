"""Data flows one way (file → formats → loader → model → generate → api → server/cli): check the imports."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "herd"

# module (top-level name under herd/) → herd modules it may import
ALLOWED = {
    "errors": set(),
    "config": {"errors"},
    "quant": {"errors", "quant"},
    "formats": {"config", "quant", "errors", "formats"},
    "tokenizer": {"errors", "tokenizer"},
    "chat": {"tokenizer", "errors", "chat"},
    "model": {"config", "model"},
    "sampling": set(),
    "fingerprint": {"formats", "quant"},
    "models": {"errors"},
    "loader": {"formats", "model", "quant", "config", "errors", "parallel"},
    "generate": {"model", "sampling", "tokenizer", "errors"},
    "engine": {"model", "sampling", "tokenizer", "errors", "generate"},
    "server": {"api", "engine", "chat", "errors", "sampling"},
}


def herd_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        else:
            continue
        found |= {n.split(".")[1] for n in names if n.startswith("herd.") and n.count(".") >= 1}
    return found


def module_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py")


def test_imports_follow_the_data_flow():
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_of(path)
        if module not in ALLOWED:
            continue
        bad = herd_imports(path) - ALLOWED[module] - {module}
        if bad:
            problems.append(f"{path.relative_to(PACKAGE.parent)} imports {sorted(bad)}")
    assert not problems, "\n".join(problems)


def test_nothing_imports_cli_or_server():
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_of(path)
        if module in ("cli", "server", "__main__"):
            continue
        assert not herd_imports(path) & {"cli", "server"}, path


def test_model_imports_only_torch_and_config():
    for path in (PACKAGE / "model").glob("*.py"):
        tree = ast.parse(path.read_text())
        roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module and n.level == 0}
        assert roots <= {"torch", "herd", "math", "__future__", "dataclasses", "typing"}, (path, roots)
