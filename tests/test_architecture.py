"""The shape of the code: the product never imports the toy-world kit, no module imports form a cycle,
the product's functions stay short enough to read at once, and no line of the project's Python is longer than
120 characters (nor excused from a formatter with ``# fmt: skip``)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dreambooth_moslora", "toyworld", "webui")
MAX_FUNCTION_LINES = 80
MAX_LINE = 120


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every module of the three packages that ``path`` imports, at any depth of the file (lazy imports too)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)  # "from . import x" names a module
    modules = {module_name(p) for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    return {module_name(p): imported_modules(p) for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def test_the_product_never_imports_the_toy_world_kit_or_the_web_demo():
    graph = import_graph()
    offenders = {m: sorted(i for i in deps if not i.startswith("dreambooth_moslora"))
                 for m, deps in graph.items() if m.startswith("dreambooth_moslora")}
    assert {m: d for m, d in offenders.items() if d} == {}


def test_the_kit_imports_the_product_and_never_the_web_demo():
    graph = import_graph()
    assert any(d.startswith("dreambooth_moslora") for m, deps in graph.items() if m.startswith("toyworld")
               for d in deps)
    assert not [(m, d) for m, deps in graph.items() if m.startswith("toyworld") for d in deps if d.startswith("webui")]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of module imports (``a`` imports ``b`` … imports ``a``), or None."""
    edges = graph
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle():
    assert find_cycle(import_graph()) is None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.a"}}) == ["p.a", "p.b", "p.c", "p.a"]
    assert find_cycle({"p.a": {"p.b"}, "p.b": set()}) is None


def test_product_functions_are_short():
    long = []
    for path in (ROOT / "dreambooth_moslora").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{module_name(path)}.{node.name}: {length} lines")
    assert long == [], long


def python_files() -> list[Path]:
    return [ROOT / "train_dreambooth.py",
            *(p for folder in (*PACKAGES, "benchmarks", "tests") for p in sorted((ROOT / folder).rglob("*.py")))]


def test_lines_stay_within_120_characters_without_formatter_excuses():
    files, long, excused = python_files(), [], []
    for path in files:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            where = f"{path.relative_to(ROOT)}:{number}"
            if len(line) > MAX_LINE:
                long.append(f"{where} ({len(line)})")
            if line.rstrip().endswith("# fmt" + ": skip"):
                excused.append(where)
    assert len(files) > 50
    assert long == [] and excused == []
