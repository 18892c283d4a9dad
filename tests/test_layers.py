"""The package's structure: its import graph (read from the source with ast) has no cycle, no import that points
up a layer, and no import inside a function except of optional heavy dependencies (CONTRIBUTING.md, "Layout")."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ddpm_lightning"
# Bottom to top: a module may import modules of its own layer and of the layers before it.
LAYERS = [
    ["registry", "images", "seeds", "batch", "benign_warnings", "loggers"],
    ["checkpointing", "runs"],
    ["diffusion", "nets", "physics"],
    ["data", "metrics", "plots", "cpu"],
    ["training"],
    ["loading"],
    ["interop"],
    ["control"],
    ["compose", "summary"],
    ["evaluation", "edits"],
    ["tasks", "diffusers_io", "posthoc_ema"],
]
# Third-party packages a function may import where it needs them: optional, or slow to import and seldom used.
LAZY_OK = {"diffusers", "torch_fidelity", "kornia", "matplotlib", "submitit", "safetensors", "huggingface_hub", "scipy", "gdown",
           "sklearn", "torch.utils.cpp_extension",
           "ddpm_lightning.cpu"}  # the opt-in CPU plug-in: imported only by its one switch, and only when switched on


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module} is in no layer of tests/test_layers.py: place it in CONTRIBUTING.md's layout and here")


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for every import in the file; `from a import b` gives a.b where
    that is a module of the package, else a."""
    tree = ast.parse(path.read_text())
    local = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in ast.walk(f)}
    base = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno, id(node) in local) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative import
                module = ".".join([*base.split(".")[: len(base.split(".")) - node.level + 1], *([module] if module else [])])
            for a in node.names:
                sub = f"{module}.{a.name}"
                is_module = (PACKAGE.parent / Path(*sub.split("."))).with_suffix(".py").is_file() or (PACKAGE.parent / Path(*sub.split("."))).is_dir()
                found.append((sub if is_module else module, node.lineno, id(node) in local))
    return found


def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        edges[name] = {m for m, _, _ in imports(path) if m.startswith("ddpm_lightning.") and m != name}
    return edges


def test_no_import_points_up_a_layer():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        if name == "ddpm_lightning":
            continue
        for target, line, _ in imports(path):
            if target.startswith("ddpm_lightning.") and layer(target) > layer(name):
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}")
    assert not upward, "imports that point up a layer:\n" + "\n".join(upward)


def test_the_import_graph_has_no_cycle():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]) if nxt in path else nxt)
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])


def test_functions_import_only_optional_heavy_dependencies():
    lazy = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for target, line, inside in imports(path):
            if inside and not any(target == m or target.startswith(f"{m}.") for m in LAZY_OK):
                lazy.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target} inside a function")
    assert not lazy, "\n".join(lazy)


def test_the_checks_could_fail(tmp_path):
    """The graph reader sees an upward, a function-local and a relative import."""
    sample = tmp_path / "ddpm_lightning" / "diffusion" / "x.py"
    sample.parent.mkdir(parents=True)
    sample.write_text("from ddpm_lightning.tasks import train\n\ndef f():\n    import os\n    from . import schedules\n")
    global PACKAGE
    saved, PACKAGE = PACKAGE, tmp_path / "ddpm_lightning"
    try:
        found = imports(sample)
    finally:
        PACKAGE = saved
    assert ("ddpm_lightning.tasks", 1, False) in found and ("os", 4, True) in found
    assert any(m.startswith("ddpm_lightning.diffusion") and inside for m, _, inside in found)
    assert layer("ddpm_lightning.tasks") > layer("ddpm_lightning.diffusion.x")


MAX_LINES = 60
LONG_OK = {"ddpm_lightning/nets/unet.py:UNet.__init__"}  # the architecture of Ho et al. App. B, written out once


def test_functions_are_at_most_sixty_lines():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for cls in [None, *(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef))]:
            body = tree.body if cls is None else cls.body
            for fn in (n for n in body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
                start = min([d.lineno for d in fn.decorator_list] + [fn.lineno])
                name = f"{path.relative_to(PACKAGE.parent)}:{cls.name + '.' if cls else ''}{fn.name}"
                if fn.end_lineno - start + 1 > MAX_LINES and name not in LONG_OK:
                    long.append(f"{name} has {fn.end_lineno - start + 1} lines")
    assert not long, "\n".join(long)


def _top_imports(path: Path) -> set[str]:
    """The top-level names of the modules a file imports (absolute imports only)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_tests_share_helpers_not_each_other_and_benchmarks_import_no_test():
    tests = PACKAGE.parent / "tests"
    modules = {p.stem for p in tests.glob("*.py")}  # test files and conftest: never imported by name
    for path in sorted(tests.rglob("*.py")):
        wrong = _top_imports(path) & modules
        assert not wrong, f"{path.relative_to(tests.parent)} imports {sorted(wrong)}: share code through tests/helpers/ or fixtures"
    for path in sorted((PACKAGE.parent / "benchmarks").glob("*.py")):
        assert '/ "tests"' not in path.read_text(), f"{path.name} puts tests/ on its path"
        assert not _top_imports(path) & (modules | {"helpers"}), f"{path.name} imports from tests/"
