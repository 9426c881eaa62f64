"""The module graph's one-way rules, checked from the source with `ast` (every import, lazy ones included).

* ``triton_src/`` imports nothing of the project but itself and the layout module;
* ``reference/`` (planners and oracle) imports only itself: never the API, dispatcher, backends, diffusers
  shim, kernels, NPU code, nor the ``diffusers`` package;
* a backend never imports another backend, the dispatcher or the API;
* library code never imports ``bench/``;
* the interop converters (``lvsa_kernels/interop.py``) import only the layout module;
* the layout-aware ring (``lvsa_kernels/ring/``) imports only itself, the API and the layout module;
* the model table (``lvsa_kernels/models.py``) imports only the planners.
"""
import ast
import sys
from pathlib import Path
from typing import Dict, Iterator, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
# source folder -> installed package (setup.py's package_dir)
PACKAGES = {"lvsa_kernels": "lvsa_kernels", "reference": "lvsa_kernels.reference",
            "triton_src": "lvsa_kernels.triton_src", "npu": "lvsa_kernels.npu", "bench": "lvsa_kernels.bench"}
LAYOUT = "lvsa_kernels.reference.layout"
BACKEND_MODULES = ("lvsa_kernels.backends.flashinfer_backend", "lvsa_kernels.backends.reference_backend",
                   "lvsa_kernels.backends.sdpa_backend", "lvsa_kernels.backends.triton_backend", "lvsa_kernels.npu")
ABOVE_BACKENDS = ("lvsa_kernels.api", "lvsa_kernels.dispatch")


def _modules() -> Dict[str, Path]:
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package] + parts)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> Iterator[Tuple[int, str]]:
    """``(line, absolute module)`` for every import in the file (``from a import b`` yields a.b when a.b is a
    module of the project, else a)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                yield node.lineno, sub if sub in MODULES else target


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _violations(rule) -> Set[str]:
    bad = set()
    for name, path in MODULES.items():
        for line, target in _imports(name, path):
            reason = rule(name, target)
            if reason:
                bad.add(f"{path.relative_to(ROOT)}:{line} imports {target}: {reason}")
    return bad


def _project(module: str) -> bool:
    return _within(module, "lvsa_kernels")


def test_module_map_covers_the_source():
    assert {"lvsa_kernels.api", "lvsa_kernels.dispatch", LAYOUT, "lvsa_kernels.triton_src.schedule",
            "lvsa_kernels.npu.backend", "lvsa_kernels.bench.harness"} <= set(MODULES)


def test_imports_resolve_to_modules():
    """The rules below only see what resolves; an import of a project module that does not exist is a bug."""
    missing = set()
    for name, path in MODULES.items():
        for line, target in _imports(name, path):
            if _project(target) and target not in MODULES and target.rpartition(".")[0] not in MODULES:
                missing.add(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not missing


SETTINGS = "lvsa_kernels.settings"  # standard-library-only leaf: the cache folder and locked JSON files


def test_settings_is_a_leaf():
    assert not [t for _, t in _imports(SETTINGS, MODULES[SETTINGS]) if _project(t)]


def test_kernels_import_only_the_layout():
    def rule(name, target):
        if _within(name, "lvsa_kernels.triton_src") and _project(target) and not (
                _within(target, "lvsa_kernels.triton_src") or target in (LAYOUT, SETTINGS)):
            return "triton_src/ may import only itself, the layout module and the settings leaf"
    assert not _violations(rule)


def test_reference_imports_only_itself():
    def rule(name, target):
        if not _within(name, "lvsa_kernels.reference"):
            return None
        if _project(target) and not _within(target, "lvsa_kernels.reference"):
            return "reference/ (planners, oracle) must not depend on what it checks"
        if _within(target, "diffusers"):
            return "reference/ is pure PyTorch (diffusers code lives in lvsa_kernels/diffusers/)"
    assert not _violations(rule)


def _backend_of(module: str):
    return next((b for b in BACKEND_MODULES if _within(module, b)), None)


def test_backends_import_neither_each_other_nor_the_dispatcher():
    def rule(name, target):
        own = _backend_of(name)
        if own is None:
            return None
        other = _backend_of(target)
        if other is not None and other != own:
            return "backends never import each other"
        if any(_within(target, m) for m in ABOVE_BACKENDS) or target in ("lvsa_kernels", "lvsa_kernels.backends"):
            return "backends sit below the dispatcher and the API"
    assert not _violations(rule)


def test_library_never_imports_bench():
    def rule(name, target):
        if not _within(name, "lvsa_kernels.bench") and _within(target, "lvsa_kernels.bench"):
            return "bench/ is not part of the library"
    assert not _violations(rule)


RING = "lvsa_kernels.ring"


def test_ring_imports_only_the_api_and_the_layout():
    """The ring is pure torch.distributed over `block_sparse_attn`: any backend, no diffusers, no dispatcher."""
    def rule(name, target):
        if _within(name, RING) and (_project(target) or _within(target, "diffusers")) and not (
                _within(target, RING) or target in ("lvsa_kernels.api", LAYOUT)):
            return "ring/ may import only itself, the API and the layout module"
    assert not _violations(rule)


@pytest.mark.parametrize("source, target", [
    ("lvsa_kernels.triton_src.schedule", "lvsa_kernels.reference.lvsa"),
    ("lvsa_kernels.reference.svoo", "lvsa_kernels.api"),
    ("lvsa_kernels.npu.backend", "lvsa_kernels.dispatch"),
    ("lvsa_kernels.backends.triton_backend", "lvsa_kernels.backends.flashinfer_backend"),
    ("lvsa_kernels.dispatch", "lvsa_kernels.bench.harness"),
    ("lvsa_kernels.ring.attention", "lvsa_kernels.dispatch"),
])
def test_each_rule_catches_its_violation(monkeypatch, source, target):
    rules = [test_kernels_import_only_the_layout, test_reference_imports_only_itself,
             test_backends_import_neither_each_other_nor_the_dispatcher, test_library_never_imports_bench,
             test_ring_imports_only_the_api_and_the_layout]
    original = _imports

    def with_extra(name, path):
        yield from original(name, path)
        if name == source:
            yield 0, target

    monkeypatch.setattr(sys.modules[__name__], "_imports", with_extra)
    failed = 0
    for rule in rules:
        try:
            rule()
        except AssertionError:
            failed += 1
    assert failed == 1


INTEROP = "lvsa_kernels.interop"


def test_interop_imports_only_the_layout():
    """The converters are used by the FlashInfer backend and the benchmarks: they sit below both."""
    bad = [t for _, t in _imports(INTEROP, MODULES[INTEROP]) if _project(t) and t != LAYOUT]
    assert not bad


MODEL_TABLE = "lvsa_kernels.models"


def test_model_table_stays_light():
    """The model table is read by the CLI's --help and by the benchmarks: it may import only the planners (its
    `pattern()` builds an `LVSAPattern`), never diffusers or the shim (adapters key themselves by its rows)."""
    bad = [t for _, t in _imports(MODEL_TABLE, MODULES[MODEL_TABLE])
           if (_project(t) and not _within(t, "lvsa_kernels.reference")) or _within(t, "diffusers")]
    assert not bad


def test_setup_installs_every_package_folder():
    """A non-editable install (the GPU machines, a wheel) must carry every subpackage: setup.py lists them."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    listed = {node.targets[0].id: ast.literal_eval(node.value) for node in tree.body
              if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
              and node.targets[0].id in ("ROOTS", "SUBPACKAGES")}
    packages = set(listed["ROOTS"]) | set(listed["SUBPACKAGES"])
    for top, name in listed["ROOTS"].items():
        for init in (ROOT / name).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / name)
            dotted = ".".join((top, *rel.parts)) if rel.parts else top
            if "__pycache__" not in rel.parts:
                assert dotted in packages, f"setup.py does not install {dotted} ({init.parent})"
