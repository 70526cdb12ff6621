"""The package's layering (issue 15, /work/notes/LAYERS.md), checked on the source: every ``ldae`` import
of every module under ``src/ldae`` — module level, function level and ``TYPE_CHECKING`` blocks alike —
must target a module of the same or a lower layer, and a subcommand module must not import another
subcommand (only the shared private helpers ``ldae.commands._*``).

Layers, lowest first::

    0 base         ldae, errors, io, config, distributed, runs, viz
    1 building     data.*, nets.*, diffusion.*, metrics      (pure torch / numpy / MONAI)
    2 checkpoints  checkpoints                               (the format + per-stage loaders)
    3 model        model, baselines.*                        (inference, no Lightning)
    4 training     training.*                                (LightningModules, fit, EMA)
    5 evaluation   evaluation.*, report
    6 jobs         jobs.*                                    (compress, pipeline, demo, predict, bench, ...)
    7 interface    commands.*, cli, __main__                 (argparse only)

A module that fits none of these fails the test too, so that a new module is placed deliberately. The
one exemption (:data:`EXEMPT`) is the package face's lazy ``from ldae import LDAE``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "ldae"

#: (module-name prefix, rank, layer name); the longest matching prefix wins.
LAYERS: tuple[tuple[str, int, str], ...] = (
    ("ldae", 0, "base"),
    ("ldae.errors", 0, "base"),
    ("ldae.io", 0, "base"),
    ("ldae.config", 0, "base"),
    ("ldae.distributed", 0, "base"),
    ("ldae.runs", 0, "base"),
    ("ldae.viz", 0, "base"),
    ("ldae.data", 1, "data"),
    ("ldae.nets", 1, "nets"),
    ("ldae.diffusion", 1, "diffusion"),
    ("ldae.metrics", 1, "metrics"),
    ("ldae.checkpoints", 2, "checkpoints"),
    ("ldae.model", 3, "model"),
    ("ldae.baselines", 3, "model"),
    ("ldae.training", 4, "training"),
    ("ldae.evaluation", 5, "evaluation"),
    ("ldae.report", 5, "evaluation"),
    ("ldae.jobs", 6, "jobs"),
    ("ldae.commands", 7, "interface"),
    ("ldae.cli", 7, "interface"),
    ("ldae.__main__", 7, "interface"),
)

#: the only imports allowed to go up, and why
EXEMPT: dict[tuple[str, str], str] = {
    ("ldae", "ldae.model"): "the package face: `from ldae import LDAE` imports the model lazily (PEP 562 "
                            "__getattr__, so `import ldae` itself stays at the base)",
}


def module_name(path: Path) -> str:
    """``src/ldae/nets/unet.py`` -> ``ldae.nets.unet``; a package's ``__init__`` -> the package."""
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer(module: str) -> tuple[int, str] | None:
    """``(rank, layer name)`` of an ``ldae`` module, None when no layer claims it. ``ldae`` alone claims
    only the package itself (its ``__init__``), not every submodule."""
    best: tuple[str, int, str] | None = None
    for prefix, rank, name in LAYERS:
        matches = module == prefix or (prefix != "ldae" and module.startswith(prefix + "."))
        if matches and (best is None or len(prefix) > len(best[0])):
            best = (prefix, rank, name)
    return None if best is None else (best[1], best[2])


def imported_modules(path: Path, modules: dict[str, Path], source: str | None = None) -> list[tuple[int, str]]:
    """``(line, target module)`` of every ``ldae`` import in a file (any nesting level; ``source``
    replaces the file's text). ``from pkg import name`` targets ``pkg.name`` when that is a module,
    otherwise ``pkg``."""
    text = path.read_text(encoding="utf-8") if source is None else source
    tree = ast.parse(text, filename=str(path))
    own = module_name(path)
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "ldae"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "ldae":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((node.lineno, sub if sub in modules else target))
    return found


def is_command(module: str) -> bool:
    """A subcommand module ``ldae.commands.<name>`` (not the package, not a private ``_helper``)."""
    prefix = "ldae.commands."
    return module.startswith(prefix) and not module[len(prefix):].startswith("_")


def violations() -> list[str]:
    modules = all_modules()
    out: list[str] = []
    for name, path in modules.items():
        own = layer(name)
        rel = path.relative_to(SRC.parent)
        if own is None:
            out.append(f"{rel}: module {name} belongs to no layer (add it to LAYERS.md and this test)")
            continue
        for line, target in sorted(set(imported_modules(path, modules))):
            if (name, target) in EXEMPT:
                continue
            dep = layer(target)
            if dep is None:
                out.append(f"{rel}:{line}: imports {target}, which belongs to no layer")
            elif dep[0] > own[0]:
                out.append(f"{rel}:{line}: {name} ({own[1]}, layer {own[0]}) imports {target} "
                           f"({dep[1]}, layer {dep[0]})")
            elif name.startswith("ldae.commands.") and is_command(target) and target != name:
                out.append(f"{rel}:{line}: {name} imports the sibling command {target} "
                           "(share code through a private ldae.commands._* helper)")
    return out


def test_every_module_imports_only_its_own_or_lower_layers() -> None:
    found = violations()
    assert not found, "layering violations:\n" + "\n".join(found)


def test_the_scanner_sees_function_level_relative_and_from_imports() -> None:
    """The scanner itself: a lazy import inside a function, a relative import and ``from pkg import
    submodule`` are all found and resolved (text parsed as if it lived at ``ldae/nets/_probe.py``)."""
    path = PACKAGE / "nets" / "_probe.py"
    source = ("from . import unet\n"
              "def f():\n    from ldae.training.ema import EMA\n    import ldae.model\n"
              "    from ldae.commands import _inference\n")
    targets = [t for _, t in imported_modules(path, all_modules(), source)]
    assert targets == ["ldae.nets.unet", "ldae.training.ema", "ldae.model", "ldae.commands._inference"]
    assert [layer(t)[0] for t in targets] == [1, 4, 3, 7]  # type: ignore[index]
    assert layer("ldae") == (0, "base") and layer("ldae.baselines.voxel_dae") == (3, "model")
    assert layer("ldae.unknown_module") is None
    assert is_command("ldae.commands.compress") and not is_command("ldae.commands._args")


def test_inference_does_not_import_lightning(tiny_run: Path) -> None:
    """``import ldae.model`` and ``LDAE.load`` of a trained run leave Lightning out of ``sys.modules``
    (inference needs no training framework), in a fresh interpreter."""
    code = (
        "import sys\n"
        "import ldae.model\n"
        f"m = ldae.model.LDAE.load({str(tiny_run)!r})\n"
        "from ldae import LDAE\n"
        "assert LDAE is ldae.model.LDAE\n"
        "bad = sorted(k for k in sys.modules if k.split('.')[0] in ('lightning', 'pytorch_lightning'))\n"
        "print('LOADED', type(m).__name__, len(bad), bad[:5])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LOADED LDAE 0 []" in proc.stdout, proc.stdout
