"""The layering the project promises, checked on the source: the engine at the bottom, one module that owns run
folders, pure analyses, one jobs layer that loads and writes, a report that only renders, a thin CLI, interventions
apart from measurement, and no import cycles (imports inside functions count; imports only for annotations under
TYPE_CHECKING do not)."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def _modules() -> dict[str, Path]:
    mods = {}
    for f in (SRC / "catchtag").rglob("*.py"):
        parts = f.relative_to(SRC).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return mods


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """catchtag modules ``name`` imports anywhere in its code, except under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text())
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for b in node.body for n in ast.walk(b))
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    got = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            got.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            got.add(base)
            got.update(f"{base}.{a.name}" for a in node.names)
    # lazy exports (catchtag/__init__, toy/__init__) name modules in strings: they are imported on first use
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.rstrip(":") in MODULES \
                and name in ("catchtag", "catchtag.toy"):
            got.add(node.value.rstrip(":"))
    return {m for m in got if m in MODULES and m != name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _in(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def test_no_import_cycles():
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(GRAPH[m]):
            if n in ("catchtag", "catchtag.toy"):  # packages whose __init__ only lists lazy exports
                continue
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)


# (who, what it must not import, why)
RULES = [
    ("catchtag.engine", lambda n: not _in(n, "catchtag.engine", "catchtag.errors"),
     "the engine sits at the bottom: it imports only itself and errors"),
    ("catchtag.runs", lambda n: _in(n, "catchtag.analysis", "catchtag.jobs", "catchtag.report", "catchtag.scan",
                                    "catchtag.models", "catchtag.result", "catchtag.cli"),
     "the run folder is below everything that reads or writes it"),
    ("catchtag.cache", lambda n: not _in(n, "catchtag.errors"), "the cache is a plain container"),
    ("catchtag.analysis", lambda n: _in(n, "catchtag.jobs", "catchtag.report", "catchtag.cli", "catchtag.runs",
                                        "catchtag.inputs", "catchtag.interventions"),
     "analyses only compute: no files, no model loading, no rendering, no interventions"),
    ("catchtag.analysis", lambda n: _in(n, "catchtag.scan", "catchtag.measure", "catchtag.models",
                                        "catchtag.engine.attention", "catchtag.distributed"),
     "analyses run no model: they declare what they need from a pass (a request) and read it from a ScanResult"),
    ("catchtag.interventions", lambda n: _in(n, "catchtag.jobs", "catchtag.report", "catchtag.cli", "catchtag.runs"),
     "interventions change a forward pass; jobs run them and write what they find"),
    ("catchtag.report", lambda n: _in(n, "catchtag.jobs", "catchtag.scan", "catchtag.models", "catchtag.inputs",
                                      "catchtag.cli", "catchtag.interventions", "catchtag.engine"),
     "the report only renders what runs hold: it never loads a model or runs a scan"),
    ("catchtag.scan", lambda n: _in(n, "catchtag.jobs", "catchtag.report", "catchtag.analysis", "catchtag.cli"),
     "the scan is measurement: it knows nothing of what reads its results"),
]


@pytest.mark.parametrize("who, forbidden, why", RULES, ids=[r[0] for r in RULES])
def test_layers(who, forbidden, why):
    bad = sorted(f"{m} imports {n}" for m, deps in GRAPH.items() if _in(m, who) for n in deps if forbidden(n))
    assert not bad, f"{why}: " + "; ".join(bad)


def test_only_the_cli_and_the_package_index_import_the_jobs():
    users = sorted(m for m, deps in GRAPH.items() if "catchtag.jobs" in deps)
    assert set(users) <= {"catchtag", "catchtag.cli"}, users


def test_the_rules_see_real_imports():
    """The checker itself: it finds imports made inside functions and skips TYPE_CHECKING ones."""
    assert "catchtag.runs" in GRAPH["catchtag.result"]  # ScanResult.load imports runs inside the method
    assert "catchtag.result" not in GRAPH["catchtag.report.figures"]  # annotation only
    assert "catchtag.jobs" in GRAPH["catchtag.cli"]
