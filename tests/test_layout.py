"""The package's layout holds: no module imports a higher layer, none imports another's private
names, and each opens with a docstring saying what it is."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "wasmchord"
# Lowest first; a module may import from its own layer's package and from lower layers.
LAYERS = [{"errors", "atomic"}, {"formats", "hub", "sampling", "constrain"}, {"config", "text"}, {"backends"},
          {"transformer"}, {"generate"}, {"engine"}, {"model"}, {"hf_models"},
          {"convert", "validate", "info", "bench", "serve"}, {"cli"}, {"__init__", "__main__"}]
LEVEL = {name: i for i, names in enumerate(LAYERS) for name in names}
MODULES = sorted(PACKAGE.rglob("*.py"))


def _name(path: Path) -> list[str]:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def _imports(path: Path):
    """(module imported, names imported) for every relative import of the file, as absolute names."""
    pkg = _name(path) if path.name == "__init__.py" else _name(path)[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = pkg[:len(pkg) - node.level + 1] + (node.module.split(".") if node.module else [])
            yield base, [a.name for a in node.names]


def _layer(parts: list[str]) -> str:
    return parts[1] if len(parts) > 1 else "__init__"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_a_higher_layer(path):
    me = _layer(_name(path)) if path.name != "__main__.py" else "__main__"
    for base, names in _imports(path):
        for target in ([base] if len(base) > 1 else [base + [n] for n in names]):
            other = _layer(target)
            assert other == me or LEVEL[other] < LEVEL[me], \
                f"{'.'.join(_name(path))} (layer {me}) imports {'.'.join(target)} (layer {other})"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_private_name_is_imported_across_modules(path):
    for base, names in _imports(path):
        assert not [n for n in names if n.startswith("_")], f"{path.name} imports {names} from {'.'.join(base)}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_every_module_opens_with_a_docstring(path):
    doc = ast.get_docstring(ast.parse(path.read_text()))
    assert doc and doc.splitlines()[0].strip(), path
