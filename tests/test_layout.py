"""The package tree's rules: the repository root shadows no installed distribution, every stage
imports only the stages below it, no import cycle, and a short top level.

Python puts the working directory first on ``sys.path`` for ``python -m ...``. A
top-level package or module in the root whose name an installed distribution
owns is then imported instead of that distribution: our old top-level
``kernels/`` hid Hugging Face's ``kernels``, which transformers imports, and
every README command failed at import.
"""
import ast
import importlib.metadata as md
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _root_import_names() -> set[str]:
    """Names that ``import NAME`` resolves to a module or regular package of the repository root (a
    folder without ``__init__.py`` is only a namespace portion: an installed package still wins)."""
    names = set()
    for entry in ROOT.iterdir():
        if entry.name.startswith("."):
            continue
        if entry.is_file() and entry.suffix == ".py":
            names.add(entry.stem)
        elif entry.is_dir() and (entry / "__init__.py").is_file():
            names.add(entry.name)
    return names


def test_no_root_name_is_owned_by_an_installed_distribution():
    owned = md.packages_distributions()
    ours = {"loraprune", "setup"}  # our own distribution; setup.py is the build script, never imported
    clashes = {n: owned[n] for n in _root_import_names() - ours if n in owned}
    assert not clashes, f"the repository root shadows installed top-level names: {clashes}"


def test_transformers_and_loraprune_import_from_the_repository_root():
    code = "import transformers.models.llama.modeling_llama, loraprune, loraprune.kernels; print(loraprune.__file__)"
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert Path(res.stdout.strip()).resolve() == ROOT / "loraprune" / "__init__.py"


# The stages, bottom first: a module may import its own stage and those before it, never one after.
# (The README's "Where things are" and docs/layout.md describe each.)
STAGES = ["errors", "kernels", "utils", "data", "structure", "model", "method", "config", "surgery", "export",
          "eval", "run", "apps", "demo", "__init__"]


def stage_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_module_belongs_to_a_stage():
    unknown = {m for m in package_modules() if stage_of(m) not in STAGES}
    assert not unknown, f"modules outside the known stages (add the stage to STAGES and docs/layout.md): {unknown}"


def test_each_stage_imports_only_the_stages_below_it():
    modules = package_modules()
    bad = []
    for module, path in modules.items():
        rank = STAGES.index(stage_of(module))
        for target in _imported(module, path, set(modules)):
            if STAGES.index(stage_of(target)) > rank:
                bad.append(f"{module} -> {target}")
    assert not bad, "imports that go up the stages (move the code down, or the call up): " + ", ".join(sorted(bad))


def test_the_direction_check_sees_an_upward_import(tmp_path):
    """The check itself: a lazy relative import from a low stage to a high one is found and ranked up."""
    path = tmp_path / "masks.py"
    path.write_text("def f():\n    from ..run.engine import LoRAPruner\n")
    known = {"loraprune.run.engine", "loraprune.structure.masks"}
    targets = _imported("loraprune.structure.masks", path, known)
    assert targets == {"loraprune.run.engine"}
    assert STAGES.index(stage_of("loraprune.run.engine")) > STAGES.index(stage_of("loraprune.structure.masks"))


def test_the_top_level_is_short():
    """At most 14 modules and subpackages directly in loraprune/ (besides __init__.py): the stages show."""
    entries = [p.name for p in (ROOT / "loraprune").iterdir()
               if p.name not in ("__init__.py", "__pycache__") and (p.suffix == ".py" or (p / "__init__.py").is_file())]
    others = [p.name for p in (ROOT / "loraprune").iterdir()
              if p.name not in ("__pycache__",) and p.suffix != ".py" and not (p / "__init__.py").is_file()]
    assert len(entries) <= 14, sorted(entries)
    assert not others, f"loraprune/ holds non-module entries (data belongs in its stage): {others}"


def _absolute_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_no_module_shares_a_name_with_a_package_it_imports(tmp_path):
    """The old ``loraprune/gguf.py`` imported the PyPI ``gguf``: ``from .gguf import`` and ``import gguf``
    meant two different things a few lines apart, in it and in its neighbours. No module or package
    may share its name with a top-level package that it, or a module beside it, imports."""
    modules = package_modules()
    clashes = []
    for module, path in modules.items():
        name = module.rpartition(".")[2]
        folder = path.parent if path.name != "__init__.py" else path.parent.parent
        neighbours = [p for m, p in modules.items() if p.parent == folder]
        if any(name in _absolute_imports(p) for p in neighbours):
            clashes.append(module)
    assert not clashes, clashes
    bad = tmp_path / "gguf.py"
    bad.write_text("import gguf\n")
    assert "gguf" in _absolute_imports(bad)  # the check sees what the old module did


def test_the_kernel_package_imports_only_torch_triton_and_itself():
    allowed = {"torch", "triton", "loraprune.kernels", "__future__"}
    stdlib = set(sys.stdlib_module_names)
    paths = sorted((ROOT / "loraprune" / "kernels").glob("*.py"))
    assert len(paths) >= 5, "the kernels are expected in loraprune/kernels/"
    bad = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: inside the package
                    continue
                mods = [node.module]
            else:
                continue
            for m in mods:
                top = m.split(".")[0]
                if top in stdlib or top in allowed or m.startswith("loraprune.kernels"):
                    continue
                bad.append(f"{path.name}: {m}")
    assert not bad, f"the kernel layer imports code above it: {bad}"


# ------------------------------------------------------------------ import graph
def package_modules() -> dict[str, Path]:
    """Every module of loraprune, every subpackage's included -> its file (found on disk: nothing is imported)."""
    pkg = ROOT / "loraprune"
    found = {}
    for path in sorted(pkg.rglob("*.py")):
        parts = ("loraprune",) + path.relative_to(pkg).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(test)


def _imported(module: str, path: Path, known: set[str]) -> set[str]:
    """Modules of ``known`` that ``module`` imports anywhere (lazy imports included,
    ``if TYPE_CHECKING:`` blocks excluded)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if _is_type_checking(child):
                continue
            if isinstance(child, ast.Import):
                out.update(a.name for a in child.names if a.name in known)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.rsplit(".", child.level - 1)[0] if child.level > 1 else package
                    target = f"{base}.{child.module}" if child.module else base
                else:
                    target = child.module or ""
                for alias in child.names:  # a submodule imported by name needs only that submodule
                    sub = f"{target}.{alias.name}"
                    out.add(sub if sub in known else target)
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return out & known - {module}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    stack: list[str] = []

    def dfs(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := dfs(nxt)):
                return cycle
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := dfs(node)):
            return cycle
    return None


def test_no_import_cycle_among_loraprune_modules():
    modules = package_modules()
    graph = {m: _imported(m, p, set(modules)) for m, p in modules.items()}
    assert {"loraprune.data.windows", "loraprune.eval", "loraprune.apps.toy_shakespeare", "loraprune.kernels.ops"} <= set(graph)
    assert "loraprune.data.windows" in graph["loraprune.eval"]  # the walk sees relative imports
    assert _find_cycle(graph) is None, " -> ".join(_find_cycle(graph))


def test_cycle_finder_finds_a_lazy_cycle(tmp_path):
    """The detector itself: a function-level import closing a loop counts (the old eval <-> reference)."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _find_cycle(graph) == ["a", "b", "c", "a"]
    path = tmp_path / "eval.py"
    path.write_text("def f():\n    from .apps.toy_shakespeare import x\nif TYPE_CHECKING:\n    from .run.engine import y\n")
    known = {"loraprune.apps.toy_shakespeare", "loraprune.run.engine"}
    assert _imported("loraprune.eval", path, known) == {"loraprune.apps.toy_shakespeare"}


def test_every_error_class_lives_in_errors_py():
    """One home for the error family: importing every module defines no LoRAPruneError subclass elsewhere."""
    import importlib

    from loraprune.errors import LoRAPruneError

    for module in package_modules():
        importlib.import_module(module)
    found, todo = [], [LoRAPruneError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    elsewhere = sorted(f"{c.__module__}.{c.__qualname__}" for c in found if not c.__module__.startswith("loraprune.errors"))
    elsewhere = [name for name in elsewhere if name.startswith("loraprune.")]  # tests may subclass for their own use
    assert len(found) >= 15 and not elsewhere, elsewhere
