"""The repository root shadows no installed distribution, and the kernel layer depends on nothing above it.

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
