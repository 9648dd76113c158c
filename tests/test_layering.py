"""Data flows one way (file → formats → loader → model → generate → api → engine → server/cli): check the
imports of every module under herd/, in every form Python allows (`import herd.x`, `from herd.x import y`,
`from herd import x`, relative imports, imports inside functions)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "herd"
TOP_LEVEL = sorted(p.name.removesuffix(".py") for p in PACKAGE.iterdir()
                   if p.suffix == ".py" or (p / "__init__.py").is_file())

# top-level module under herd/ → the herd modules it may import (besides itself)
ALLOWED = {
    "errors": set(),
    "images": {"errors"},
    "config": {"errors"},
    "quant": {"errors", "kernels"},
    "kernels": {"errors"},
    "formats": {"config", "quant", "errors"},
    "tokenizer": {"errors"},
    "chat": {"tokenizer", "errors"},
    "model": {"config"},
    "transforms": {"model", "quant", "kernels", "errors"},
    "sampling": {"errors"},
    "fingerprint": {"formats", "quant"},
    "models": {"errors"},
    "runtime": {"errors", "kernels", "model"},
    "layout_cache": {"kernels"},
    "loader": {"formats", "model", "quant", "config", "errors", "transforms", "layout_cache"},
    "sharded_loader": {"formats", "model", "errors", "transforms", "loader", "distributed"},
    "distributed": {"errors", "model"},
    "plan": {"config", "errors", "formats", "transforms"},
    "decoding": {"tokenizer", "errors"},
    "generate": {"model", "sampling", "tokenizer", "errors", "decoding", "engine"},
    "engine": {"model", "sampling", "tokenizer", "errors", "decoding", "chat"},
    "api": {"chat", "config", "errors", "images", "fingerprint", "formats", "decoding", "generate", "loader", "model",
            "models", "runtime", "sampling", "tokenizer", "sharded_loader", "distributed"},
    "finetune": {"chat", "config", "errors", "fingerprint", "formats", "model", "quant", "tokenizer", "transforms",
                 "jsonl"},
    "jsonl": {"errors"},
    "server": {"api", "engine", "chat", "errors", "images", "sampling", "tokenizer"},
    # a client of the API and the engine (never of the server's internals; --server speaks HTTP)
    "eval": {"api", "engine", "errors", "sampling", "fingerprint", "formats", "jsonl"},
    # the arena: a client of the API and the engine too (endpoints are spoken to over HTTP)
    "arena": {"api", "engine", "errors", "sampling", "jsonl"},
    "cli": set(TOP_LEVEL) - {"cli", "__main__"},
    "__init__": {"api", "sampling", "errors", "finetune", "eval"},
    "__main__": {"cli"},
}
# Known violations, each with the issue that removes it (none now; listed here so nothing creeps in unseen).
KNOWN: dict[tuple[str, str], str] = {}


def herd_imports(source: str, module_path: tuple[str, ...]) -> set[str]:
    """The top-level herd modules that `source` (the file at herd/<module_path>.py) imports."""
    package = list(module_path[:-1]) if module_path[-1] != "__init__" else list(module_path[:-1])
    package = ["herd", *package]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against the file's own package
                base = package[: len(package) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names = [module] + [f"{module}.{a.name}" for a in node.names]  # `from herd import kernels`
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "herd" and len(parts) > 1 and parts[1] in TOP_LEVEL:
                found.add(parts[1])
    return found


def module_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).with_suffix("")
        top = rel.parts[0]
        graph.setdefault(top, set()).update(herd_imports(path.read_text(), rel.parts) - {top})
    return graph


def test_the_import_reader_sees_every_form():
    src = ("import herd.errors\nfrom herd.config import ModelArgs\nfrom herd import kernels, __version__\n"
           "from . import rope\nfrom ..quant import ggml\ndef f():\n    import herd.engine.runner as r\n")
    assert herd_imports(src, ("model", "model")) == {"errors", "config", "kernels", "model", "quant", "engine"}
    assert herd_imports("from . import api\n", ("__init__",)) == {"api"}


def test_every_module_is_in_the_layering_table():
    assert set(module_graph()) <= set(ALLOWED), f"add to ALLOWED: {sorted(set(module_graph()) - set(ALLOWED))}"


def test_imports_follow_the_data_flow():
    problems = []
    for module, imported in sorted(module_graph().items()):
        for bad in sorted(imported - ALLOWED[module]):
            if (module, bad) not in KNOWN:
                problems.append(f"herd/{module} imports herd.{bad}")
    assert not problems, "\n".join(problems)


def test_known_violations_are_still_real():
    """A fixed violation must leave KNOWN, so the table stays exact."""
    graph = module_graph()
    assert all(bad in graph.get(module, ()) for module, bad in KNOWN)


def test_nothing_below_the_api_imports_cli_server_or_engine():
    for module, imported in module_graph().items():
        if module in ("cli", "server", "__main__", "__init__", "api", "engine", "generate", "eval", "arena"):
            continue
        assert not imported & {"cli", "server", "engine", "api"}, (module, imported)


def test_model_imports_only_torch_and_config():
    for path in (PACKAGE / "model").glob("*.py"):
        source = path.read_text()
        tree = ast.parse(source)
        roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        roots |= {n.module.split(".")[0] for n in ast.walk(tree)
                  if isinstance(n, ast.ImportFrom) and n.module and n.level == 0}
        assert roots <= {"torch", "herd", "math", "__future__", "dataclasses", "typing"}, (path, roots)
        assert herd_imports(source, ("model", path.stem)) <= {"config", "model"}, (path, "imports herd beyond config")


def test_tests_read_nothing_outside_the_repository():
    """A user's clone has nothing beside it: test data lives in tests/data (or comes from a package the
    set-up installs), never in a folder next to the checkout."""
    tests = Path(__file__).resolve().parent
    markers = ("parents" + "[2]", "../" + "shared", "/shared/" + "data")  # split so this test does not match itself
    outside = []
    for path in sorted(tests.rglob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if any(m in line for m in markers):
                outside.append(f"{path.relative_to(tests.parent)}:{n}: {line.strip()}")
    assert not outside, "\n".join(outside)
