from pathlib import Path

import pytest

from ldae.config import (
    apply_overrides,
    deep_merge,
    get_dotted,
    load_config,
    load_preset,
    parse_overrides,
    save_config,
)
from ldae.errors import ConfigError


def test_parse_overrides_yaml_values():
    pairs = parse_overrides(["--trainer.max_epochs", "3", "--data.csv=a/b.csv", "--x.flag", "true",
                             "--x.lr", "1e-4", "--x.shape", "[1, 2, 3]"])
    assert pairs == [("trainer.max_epochs", 3), ("data.csv", "a/b.csv"), ("x.flag", True),
                     ("x.lr", 1e-4), ("x.shape", [1, 2, 3])]


def test_parse_overrides_errors():
    with pytest.raises(ConfigError, match="has no value"):
        parse_overrides(["--a.b"])
    with pytest.raises(ConfigError, match="unexpected argument"):
        parse_overrides(["positional"])


def test_apply_overrides_strict_and_copy():
    cfg = {"trainer": {"max_epochs": 10}, "data": {"csv": None}}
    out = apply_overrides(cfg, ["--trainer.max_epochs", "3", "--data.csv", "c.csv"])
    assert out == {"trainer": {"max_epochs": 3}, "data": {"csv": "c.csv"}}
    assert cfg["trainer"]["max_epochs"] == 10  # input untouched
    with pytest.raises(ConfigError, match="unknown config key 'trainer.max_epoch'.*max_epochs"):
        apply_overrides(cfg, ["--trainer.max_epoch", "3"])
    with pytest.raises(ConfigError, match="'nope' is not a section"):
        apply_overrides(cfg, ["--nope.x", "1"])


def test_deep_merge():
    base = {"a": {"b": 1, "c": [1, 2]}, "d": 1}
    assert deep_merge(base, {"a": {"c": [3]}, "e": 2}) == {"a": {"b": 1, "c": [3]}, "d": 1, "e": 2}
    assert base == {"a": {"b": 1, "c": [1, 2]}, "d": 1}


def test_inherit_chain_and_save(tmp_path: Path):
    parent = tmp_path / "parent.yaml"
    parent.write_text("stage: x\nmodel: {width: 8, depth: 2}\ntrainer: {max_epochs: 5}\n")
    child = tmp_path / "child.yaml"
    child.write_text("_inherit: parent.yaml\nmodel: {width: 4}\n")
    cfg = load_config(child)
    assert cfg == {"stage": "x", "model": {"width": 4, "depth": 2}, "trainer": {"max_epochs": 5}}
    saved = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(saved) == cfg


def test_circular_and_missing_inherit(tmp_path: Path):
    a = tmp_path / "a.yaml"
    b = tmp_path / "b.yaml"
    a.write_text("_inherit: b.yaml\n")
    b.write_text("_inherit: a.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config(a)
    c = tmp_path / "c.yaml"
    c.write_text("_inherit: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="nowhere.yaml"):
        load_config(c)
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)


def test_packaged_presets_resolve():
    paper = load_preset("paper", "autoencoder")
    tiny = load_preset("tiny", "autoencoder")
    assert paper["model"]["channels"] == [64, 128, 128, 128]
    assert paper["data"]["shape"] == [128, 160, 128] and paper["data"]["spacing"] == 1.5
    assert tiny["preset"] == "tiny" and tiny["stage"] == "autoencoder"
    # tiny inherits what it does not change
    assert get_dotted(tiny, "data.labels") == paper["data"]["labels"]
    with pytest.raises(ConfigError, match="unknown preset"):
        load_preset("huge", "autoencoder")


def test_scientific_floats_in_yaml(tmp_path: Path):
    p = tmp_path / "c.yaml"
    p.write_text("a: 1e-7\nb: 5.0e-5\nc: 1E3\nd: 12\ne: 1.5\n")
    cfg = load_config(p)
    assert cfg == {"a": 1e-7, "b": 5e-5, "c": 1000.0, "d": 12, "e": 1.5}
    assert isinstance(cfg["a"], float) and isinstance(cfg["d"], int)


def test_load_settings_is_strict_with_one_wording(tmp_path: Path):
    from ldae.config import load_settings

    defaults = tmp_path / "defaults.yaml"
    defaults.write_text("a: {x: 1, y: [1, 2]}\nsources: {one: {gm: 0.8}}\nseed: 0\n")
    user = tmp_path / "user.yaml"
    user.write_text("a: {x: 5}\nsources: {two: {gm: 0.7}}\n")
    cfg = load_settings(defaults, user, ["--seed", "3"], open_sections=("sources",))
    assert cfg == {"a": {"x": 5, "y": [1, 2]}, "sources": {"one": {"gm": 0.8}, "two": {"gm": 0.7}}, "seed": 3}
    # a typo in the user file, nested or not, names the file, the dotted key and what exists there
    user.write_text("a: {z: 5}\n")
    with pytest.raises(ConfigError, match=r"user.yaml: unknown config key 'a.z' \(known here: x, y\)$"):
        load_settings(defaults, user)
    user.write_text("sources: {two: {gm: 0.7}}\n")  # not an open section here
    with pytest.raises(ConfigError, match=r"user.yaml: unknown config key 'sources.two' \(known here: one\)$"):
        load_settings(defaults, user)
    # an override is reported in the same words (without a file)
    with pytest.raises(ConfigError, match=r"^unknown config key 'a.w' \(known here: x, y\)$"):
        load_settings(defaults, overrides=["--a.w", "1"])
    # a user file that inherits the defaults gets them all, and its own keys are still checked
    user.write_text(f"_inherit: {defaults.name}\na: {{y: [3]}}\n")
    assert load_settings(defaults, user)["a"] == {"x": 1, "y": [3]}


def test_presets_and_stages_are_defined_once():
    from ldae.config import BASELINES, PRESETS, STAGES, TRAINABLE_STAGES, configs_root
    from ldae.runs import STAGE_DIRS
    from ldae.training import STAGE_MODULES

    assert STAGES == ("autoencoder", "diffusion", "representation")
    assert TRAINABLE_STAGES == STAGES + BASELINES and tuple(STAGE_MODULES) == TRAINABLE_STAGES
    assert set(TRAINABLE_STAGES) < set(STAGE_DIRS)
    for preset in PRESETS:  # every preset has a file per trainable stage, and names itself and its stage
        for stage in TRAINABLE_STAGES:
            cfg = load_preset(preset, stage)
            assert (cfg["preset"], cfg["stage"]) == (preset, stage)
    assert sorted(p.name for p in configs_root().iterdir() if p.is_dir() and p.name in PRESETS) == sorted(PRESETS)
