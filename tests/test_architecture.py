"""The import structure ARCHITECTURE.md describes: every import of a vpmoe module (at module level or inside a
function) points down the layers, so there are no package cycles and none hidden in a function; production code
never imports the test helpers; shipped configs are package data."""

import ast
import subprocess
import sys
from pathlib import Path

import vpmoe

PACKAGE = Path(vpmoe.__file__).resolve().parent

# Lower rank = lower layer. A module may import a module of another unit only if that unit's rank is lower.
RANKS = {
    "__init__": 0, "errors": 0, "spans": 0, "hostmem": 0,  # __init__: the package root holds only the version
    "config": 1, "tokenizer": 1, "distributed": 1, "artifacts.files": 1, "artifacts.lock": 1,
    "artifacts.__init__": 1,
    "provenance": 2, "artifacts.weights": 2, "artifacts.checkpoints": 2,
    "data": 3, "model": 3,
    "optim": 4,
    "artifacts.models": 5,
    "teacher": 6, "export": 6,
    "train": 7,
    "eval": 8, "perf": 8,
    "upcycle": 9,
    "demo": 10, "doctor": 10,
    "cli": 11,
}


def unit(module: str) -> str:
    """The layering unit of a dotted module name: its first component below `vpmoe`; in `artifacts` each module is
    a unit of its own (its storage modules sit with the foundation, `artifacts.models` above the model)."""
    parts = module.split(".")
    if len(parts) > 2 and parts[1] == "artifacts":
        return f"artifacts.{parts[2]}"
    return parts[1] if len(parts) > 1 else "__init__"


def vpmoe_imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import of a vpmoe module in the file, wherever it is."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = ".".join(("vpmoe", *path.relative_to(PACKAGE).with_suffix("").parts))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "vpmoe"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against this module's package
                base = package.split(".")[: -node.level]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] == "vpmoe":
                found += [(node.lineno, _submodule(module, a.name)) for a in node.names]
    return found


def _submodule(module: str, name: str) -> str:
    """`from module import name` imports the submodule `module.name` when there is one, else from `module`."""
    folder = PACKAGE.joinpath(*module.split(".")[1:])
    return f"{module}.{name}" if (folder / f"{name}.py").is_file() or (folder / name).is_dir() else module


def production_files() -> list[Path]:
    return [p for p in PACKAGE.rglob("*.py") if "testing" not in p.relative_to(PACKAGE).parts]


def test_every_unit_has_a_rank():
    units = {unit(".".join(("vpmoe", *p.relative_to(PACKAGE).with_suffix("").parts))) for p in production_files()}
    assert units - {"__init__"} <= set(RANKS), sorted(units - set(RANKS))


def test_imports_point_down_the_layers():
    upward = []
    for path in production_files():
        here = unit(".".join(("vpmoe", *path.relative_to(PACKAGE).with_suffix("").parts)))
        if here == "__init__":
            continue
        for line, module in vpmoe_imports(path):
            there = unit(module)
            if there == "testing":
                upward.append(f"{path.relative_to(PACKAGE)}:{line} imports the test helpers {module}")
            elif there != here and RANKS[there] >= RANKS[here]:
                upward.append(f"{path.relative_to(PACKAGE)}:{line} ({here}) imports {module} ({there})")
    assert not upward, "\n".join(upward)


def test_shipped_configs_resolve_from_any_directory(tmp_path):
    code = ("from vpmoe.config import locate, shipped_names\n"
            "names = {k: shipped_names(k) for k in ('model', 'train', 'data', 'teacher', 'upcycle', 'eval')}\n"
            "assert 'vpMoE' in names['model'] and 'tiny_ce' in names['train'], names\n"
            "print(locate('tiny_moe', 'model'))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()).is_file()
