"""The package itself (tokenmix/__init__.py): what ``import tokenmix`` loads."""

from __future__ import annotations


def test_import_tokenmix_leaves_training_until_it_is_used():
    """Issue 40.4: the mixers alone do not pay for training's imports (torch.distributed's checkpointing
    took about a second on top of torch); ``tokenmix.train`` and the subpackages load when first used."""
    import subprocess
    import sys

    code = (
        "import sys, tokenmix\n"
        "heavy = [m for m in sys.modules if m.startswith(('tokenmix.training', 'tokenmix.cli', "
        "'tokenmix.bench', 'torch.distributed.checkpoint'))]\n"
        "assert not heavy, heavy\n"
        "assert tokenmix.train.__module__ == 'tokenmix.training.trainer'\n"
        "assert tokenmix.training.generate and 'tokenmix.training' in sys.modules\n"
        "try:\n    tokenmix.no_such_thing\nexcept AttributeError as error:\n    print(error)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "no attribute 'no_such_thing'" in done.stdout


# What each layer may import from tokenmix (docs/spec.md §9), lowest first: a layer imports only from
# below itself, so a reader follows a call downward and nothing runs up the layers.
LAYERS = {
    "errors": set(),
    "backend": {"errors"},
    "core": {"errors"},
    "kernels": {"errors", "backend", "core"},
    "functional": {"errors", "backend", "core", "kernels"},
    "context": {"errors", "backend", "core", "kernels", "functional"},
}


def _tokenmix_imports(path):
    """The tokenmix subpackages (first component under tokenmix) a module imports."""
    import ast

    package = path.relative_to(ROOT).parent.parts  # ('tokenmix', 'functional', 'aft')
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's own package
                base = package[: len(package) - node.level + 1]
                target = (*base, *(node.module or "").split(".")) if node.module else base
            elif (node.module or "").startswith("tokenmix"):
                target = tuple(node.module.split("."))
            else:
                continue
            names = [alias.name for alias in node.names]
            if len(target) == 1:  # "from tokenmix import x" or "from .. import x"
                found.update(names)
            else:
                found.add(target[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("tokenmix."))
    return found


ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_each_layer_imports_only_from_below_it():
    """Issue 40.3–4: kernels import nothing from functional (the packing they read lives in core), core
    nothing but errors, functional nothing from mixers, models or training."""
    wrong = []
    for layer, allowed in LAYERS.items():
        directory = ROOT / "tokenmix" / layer
        paths = sorted(directory.rglob("*.py")) if directory.is_dir() else [directory.with_suffix(".py")]
        for path in paths:
            own = {layer}
            for imported in _tokenmix_imports(path) - own - allowed:
                wrong.append(f"{path.relative_to(ROOT)} imports tokenmix.{imported}")
    assert not wrong, wrong
