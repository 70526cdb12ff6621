"""YAML presets with inheritance and dotted command-line overrides.

A preset file may name a parent with ``_inherit: <preset>/<stage>.yaml`` (relative to the packaged
``configs`` folder); the child is deep-merged over the parent, so ``tiny`` states only what differs from
``paper``. Overrides such as ``--trainer.max_epochs 3`` replace one leaf; the key must already exist (a
typo is an error, not a silently ignored setting), except that ``trainer`` also takes any other Lightning
``Trainer`` argument (``--trainer.strategy ddp``). The fully resolved config is saved beside every run.

:func:`load_settings` is the one loader of every settings file: the stage presets, ``preprocess.yaml``,
``synth.yaml`` and ``bench.yaml`` (packaged defaults, an optional user YAML whose keys must all exist in
the defaults, then strict overrides); every unknown key is reported by :func:`unknown_key` in one wording.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ldae.errors import ConfigError
from ldae.io import write_text

#: the packaged presets (``configs/<preset>/<stage>.yaml``): the paper's settings and two smaller ones
PRESETS = ("paper", "small", "tiny")
#: the method's three training stages, in the order they are trained
STAGES = ("autoencoder", "diffusion", "representation")
#: the baselines (paper tables 5 and 7), trained like a stage from their own preset files
BASELINES = ("voxel_dae", "supervised")
#: every config ``stage`` that ``ldae fit`` trains
TRAINABLE_STAGES = STAGES + BASELINES
INHERIT_KEY = "_inherit"


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-4`` as a float (YAML 1.2 style; PyYAML needs ``1.0e-4``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.VERBOSE,
    ),
    list("-+0123456789."),
)


def yaml_load(text: str):
    """Parse YAML text with the project's loader (safe; YAML 1.2 floats)."""
    return yaml.load(text, Loader=_Loader)


def configs_root() -> Path:
    """Folder of the packaged presets (``ldae/configs``)."""
    return Path(str(resources.files("ldae") / "configs"))


def preset_path(preset: str, stage: str) -> Path:
    """Path of the packaged preset file for ``stage`` (e.g. ``tiny``, ``autoencoder``)."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset '{preset}' (choose from {', '.join(PRESETS)})")
    path = configs_root() / preset / f"{stage}.yaml"
    if not path.is_file():
        raise ConfigError(f"preset '{preset}' has no config for stage '{stage}' ({path})")
    return path


def deep_merge(base: dict, override: dict) -> dict:
    """Return ``base`` updated recursively by ``override`` (dicts merge, other values replace)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _read_yaml(path: Path) -> dict:
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, not a YAML config file")
    try:
        data = yaml_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        from ldae.errors import describe

        raise ConfigError(f"{path}: cannot read config ({describe(exc)})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping at top level")
    return data


def load_config(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """Load a YAML config, resolving ``_inherit`` chains (relative to the packaged configs folder,
    or to the file's own folder when the parent exists there)."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"{path}: circular {INHERIT_KEY}")
    data = _read_yaml(path)
    parent = data.pop(INHERIT_KEY, None)
    if parent is None:
        return data
    candidates = [path.parent / parent, configs_root() / parent]
    parent_path = next((p for p in candidates if p.is_file()), None)
    if parent_path is None:
        raise ConfigError(f"{path}: {INHERIT_KEY} '{parent}' not found")
    return deep_merge(load_config(parent_path, _seen + (path,)), data)


def load_preset(preset: str, stage: str, overrides: Sequence[str] | Sequence[tuple[str, Any]] = ()) -> dict:
    """Resolved packaged preset for one stage, with strict dotted overrides (:func:`load_settings`)."""
    return load_settings(preset_path(preset, stage), overrides=overrides)


def load_settings(
    defaults: str | Path,
    path: str | Path | None = None,
    overrides: Sequence[str] | Sequence[tuple[str, Any]] = (),
    open_sections: Sequence[str] = (),
) -> dict:
    """The one settings loader: ``defaults`` (a YAML file, ``_inherit`` resolved), deep-merged with the
    user's YAML at ``path`` (which may ``_inherit`` the defaults), then the dotted ``overrides``.

    Strict: a key of the user file that the defaults do not have is a ConfigError naming the file and the
    key (:func:`check_known_keys`), except inside ``open_sections`` (dotted names of mappings whose keys
    are free, e.g. a table of named sources); an override must name an existing key (:func:`set_dotted`).
    Values are checked by the caller, which knows what they mean.
    """
    cfg = load_config(defaults)
    if path is not None:
        user = load_config(path)
        check_known_keys(user, cfg, source=str(path), open_sections=open_sections)
        cfg = deep_merge(cfg, user)
    return apply_overrides(cfg, list(overrides)) if overrides else cfg


def unknown_key(key: str, known: Iterable[str], source: str | None = None, also: str = "") -> ConfigError:
    """The ConfigError for an unknown dotted ``key`` (one wording everywhere): ``[source: ]unknown config
    key 'a.b' (known here: x, y[also])``, listing the keys that exist at that level."""
    names = ", ".join(sorted(known)) or "none"
    where = f"{source}: " if source else ""
    return ConfigError(f"{where}unknown config key '{key}' (known here: {names}{also})")


def check_known_keys(user: dict, reference: dict, source: str | None = None, prefix: str = "",
                     open_sections: Sequence[str] = ()) -> None:
    """Raise :func:`unknown_key` for the first key of ``user`` (recursively) that ``reference`` lacks:
    a typo in a settings file is an error, never a silently ignored setting."""
    for key, value in user.items():
        dotted = f"{prefix}{key}"
        if key not in reference:
            raise unknown_key(dotted, reference, source)
        if isinstance(value, dict) and isinstance(reference[key], dict) and dotted not in open_sections:
            check_known_keys(value, reference[key], source, f"{dotted}.", open_sections)


def parse_overrides(args: list[str]) -> list[tuple[str, Any]]:
    """Parse ``['--a.b', '3', '--c=x']`` into ``[('a.b', 3), ('c', 'x')]``; values are YAML scalars."""
    pairs: list[tuple[str, Any]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) <= 2:
            raise ConfigError(f"unexpected argument '{arg}' (overrides look like --section.key VALUE)")
        key = arg[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override '{arg}' has no value")
            raw = args[i + 1]
            i += 2
        try:
            value = yaml_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        pairs.append((key, value))
    return pairs


def set_dotted(cfg: dict, key: str, value: Any, strict: bool = True) -> None:
    """Set ``cfg['a']['b'] = value`` for ``key='a.b'``; with ``strict`` the key must already exist."""
    parts = key.split(".")
    node = cfg
    for depth, part in enumerate(parts[:-1]):
        if not isinstance(node.get(part), dict):
            if strict:
                where = ".".join(parts[: depth + 1])
                raise ConfigError(f"unknown config key '{key}' ('{where}' is not a section)")
            node[part] = {}
        node = node[part]
    leaf = parts[-1]
    if strict and leaf not in node and not (parts[:-1] == ["trainer"] and leaf in trainer_arguments()):
        also = "; or any lightning Trainer argument" if parts[:-1] == ["trainer"] else ""
        raise unknown_key(key, node, also=also)
    if strict:
        value = check_value(key, node.get(leaf), value, trainer=parts[:-1] == ["trainer"])
    node[leaf] = value


#: leaves whose numbers must be >= 1 (batch sizes, accumulation), > 0 (learning rates), >= 0 (workers)
_AT_LEAST_ONE = re.compile(r"(^|_)batch_size$|^accumulate_grad_batches$")
_POSITIVE = re.compile(r"^lr(_generator|_discriminator)?$|_lr$")
_NON_NEGATIVE = re.compile(r"^num_workers$")


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return "a string"


def check_value(key: str, old: Any, new: Any, trainer: bool = False) -> Any:
    """``new`` for the config leaf ``key`` whose preset value is ``old``, or ConfigError (one line, before
    anything is created) when its type does not fit: numbers stay numbers (``--data.batch_size two`` and
    ``--optim.lr_generator fast`` are refused; an integer leaf takes no fraction, except in ``trainer``,
    whose Lightning arguments often take both), booleans stay booleans, lists stay lists; a leaf whose
    preset value is null or a string takes any scalar. Batch sizes must be >= 1, learning rates > 0 and
    finite, ``num_workers`` >= 0. An integral float for an integer leaf becomes an int."""
    import math

    leaf = key.rsplit(".", 1)[-1]

    def bad(expected: str) -> ConfigError:
        shown = f"'{new}'" if isinstance(new, str) else repr(new)
        return ConfigError(f"config key '{key}' expects {expected} (preset value {old!r}), got {shown}")

    if old is None or (new is None and trainer):
        pass
    elif isinstance(old, bool):
        if not isinstance(new, bool):
            raise bad("true or false")
    elif isinstance(old, (int, float)):
        if isinstance(new, bool) or not isinstance(new, (int, float)):
            raise bad(_kind(old))
        if isinstance(new, float) and math.isnan(new):
            raise bad(_kind(old))
        if isinstance(old, int) and isinstance(new, float) and not trainer:
            if not new.is_integer():
                raise bad("an integer")
            new = int(new)
    elif isinstance(old, (list, tuple)):
        if not isinstance(new, (list, tuple)):
            raise bad("a list")
    elif isinstance(old, dict):
        if not isinstance(new, dict):
            raise bad("a mapping")
    elif isinstance(new, (list, tuple, dict)):  # a string leaf takes any scalar (e.g. precision 16)
        raise bad("a single value")
    if isinstance(new, (int, float)) and not isinstance(new, bool):
        if _AT_LEAST_ONE.search(leaf) and not new >= 1:
            raise ConfigError(f"config key '{key}' must be at least 1, got {new}")
        if _POSITIVE.search(leaf) and not (new > 0 and math.isfinite(new)):
            raise ConfigError(f"config key '{key}' must be a positive finite learning rate, got {new}")
        if _NON_NEGATIVE.search(leaf) and not new >= 0:
            raise ConfigError(f"config key '{key}' must be >= 0, got {new}")
    return new


def trainer_arguments() -> set[str]:
    """Names of ``lightning.pytorch.Trainer``'s arguments: the ``trainer`` section is passed straight to it,
    so e.g. ``--trainer.strategy ddp`` or ``--trainer.num_nodes 2`` are valid overrides."""
    import inspect

    from lightning.pytorch import Trainer

    return set(inspect.signature(Trainer.__init__).parameters) - {"self"}


def get_dotted(cfg: dict, key: str, default: Any = None) -> Any:
    """Read ``cfg['a']['b']`` for ``key='a.b'`` (``default`` when absent)."""
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def apply_overrides(cfg: dict, overrides: list[str] | list[tuple[str, Any]]) -> dict:
    """Return a copy of ``cfg`` with command-line overrides applied (strict keys)."""
    out = copy.deepcopy(cfg)
    pairs = parse_overrides(overrides) if overrides and isinstance(overrides[0], str) else overrides
    for key, value in pairs:  # type: ignore[misc]
        set_dotted(out, key, value)
    return out


def dump_config(cfg: dict) -> str:
    """YAML text of a resolved config (key order kept)."""
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None)


def save_config(cfg: dict, path: str | Path) -> Path:
    """Atomically save the fully resolved config (e.g. ``RUN/config.yaml``)."""
    return write_text(path, dump_config(cfg))
