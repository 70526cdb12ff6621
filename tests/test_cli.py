import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from ldae import __version__
from ldae.cli import main


def test_help_lists_subcommands(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for name in ("check", "fit", "demo"):
        assert name in out


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_check_ok_json(phantom_cohort: Path, capsys):
    assert main(["check", str(phantom_cohort), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["subjects"] == 6 and summary["scans"] == 12
    assert summary["volume_shapes"] == [[32, 40, 32]]
    assert sum(summary["split_subjects"].values()) == 6


def test_check_write_split(phantom_cohort: Path, capsys):
    assert "split" not in pd.read_csv(phantom_cohort).columns
    assert main(["check", str(phantom_cohort), "--write-split", "--no-volumes"]) == 0
    df = pd.read_csv(phantom_cohort)
    assert set(df["split"]) <= {"train", "val", "test"}
    assert (df.groupby("subject")["split"].nunique() == 1).all()


def test_check_missing_column_one_line_exit_2(phantom_cohort: Path, capsys):
    df = pd.read_csv(phantom_cohort).drop(columns=["diagnosis"])
    bad = phantom_cohort.parent / "bad.csv"
    df.to_csv(bad, index=False)
    assert main(["check", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "missing required column(s): diagnosis" in err and "bad.csv" in err
    assert "Traceback" not in err


def test_check_bad_volume_names_file(phantom_cohort: Path, capsys):
    df = pd.read_csv(phantom_cohort)
    victim = phantom_cohort.parent / df["path"].iloc[3]
    victim.write_bytes(victim.read_bytes()[:100])
    assert main(["check", str(phantom_cohort)]) == 2
    err = capsys.readouterr().err
    assert victim.name in err and "cannot read NIfTI" in err


def test_debug_shows_traceback(phantom_cohort: Path, capsys):
    bad = phantom_cohort.parent / "nope.csv"
    assert main(["--debug", "check", str(bad)]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_fit_unknown_override_exit_2(capsys):
    assert main(["fit", "--preset", "tiny", "--stage", "autoencoder", "--trainer.max_epoch", "1"]) == 2
    assert "unknown config key 'trainer.max_epoch'" in capsys.readouterr().err


def test_fit_print_config_applies_overrides(capsys):
    assert main(["fit", "--preset", "tiny", "--stage", "autoencoder", "--trainer.max_epochs", "3",
                 "--data.csv", "c.csv", "--out", "runs/x", "--print-config"]) == 0
    import yaml

    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["trainer"]["max_epochs"] == 3 and cfg["data"]["csv"] == "c.csv" and cfg["out"] == "runs/x"


def test_unknown_argument_rejected_for_commands_without_overrides(phantom_cohort: Path):
    with pytest.raises(SystemExit) as info:
        main(["check", str(phantom_cohort), "--bogus", "1"])
    assert info.value.code == 2


def test_console_script_runs():
    exe = Path(sys.executable).parent / "ldae"
    proc = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "check" in proc.stdout
