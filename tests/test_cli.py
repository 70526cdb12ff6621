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


def test_every_subcommand_module_has_the_same_face():
    """Each ``ldae.commands.<name>``: HELP, add_arguments(parser) and the entry function main(args), which
    the CLI calls (no module keeps an entry function by another name); --preset lists config.PRESETS."""
    import argparse
    import importlib

    from ldae.cli import COMMANDS, build_parser
    from ldae.config import PRESETS

    for module_name in COMMANDS.values():
        module = importlib.import_module(module_name)
        assert isinstance(module.HELP, str) and callable(module.add_arguments), module_name
        assert callable(getattr(module, "main", None)) and not hasattr(module, "run"), module_name
    parser, _ = build_parser()
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    with_presets = [name for name, p in subcommands.items()
                    if any("--preset" in a.option_strings for a in p._actions)]
    assert {"fit", "evaluate", "bench", "pipeline"} <= set(with_presets)
    for name in with_presets:
        option = next(a for a in subcommands[name]._actions if "--preset" in a.option_strings)
        assert tuple(option.choices) == PRESETS, name


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_check_ok_json(phantom_cohort: Path, capsys):
    assert main(["check", str(phantom_cohort), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["subjects"] == 6 and summary["scans"] == 12
    assert summary["volume_grids"] == {"6x6x6 mm 32x40x32": "rows 2-13"}
    assert sum(summary["split_subjects"].values()) == 6


def test_check_write_split(phantom_cohort: Path, capsys):
    """--write-split writes COHORT.split.csv (or the file named) and never touches the input CSV."""
    before = phantom_cohort.read_bytes()
    assert "split" not in pd.read_csv(phantom_cohort).columns
    assert main(["check", str(phantom_cohort), "--write-split", "--no-volumes"]) == 0
    assert phantom_cohort.read_bytes() == before
    df = pd.read_csv(phantom_cohort.with_name("cohort.split.csv"))
    assert set(df["split"]) <= {"train", "val", "test"}
    assert (df.groupby("subject")["split"].nunique() == 1).all()
    out = phantom_cohort.parent / "named.csv"
    assert main(["check", str(phantom_cohort), "--write-split", str(out), "--no-volumes"]) == 0
    assert pd.read_csv(out)["split"].tolist() == df["split"].tolist()
    assert main(["check", str(phantom_cohort), "--write-split", str(phantom_cohort), "--no-volumes"]) == 2
    assert "never rewrites the cohort CSV in place" in capsys.readouterr().err
    assert phantom_cohort.read_bytes() == before


def test_check_write_split_round_trips_cells_verbatim(tmp_path: Path, capsys):
    """Subject 000, NA / null cells, ses-M06 sessions, a UTF-8 BOM and CRLF line ends survive exactly."""
    import csv
    import io

    from ldae.data.phantom import write_phantom_cohort

    src = write_phantom_cohort(tmp_path / "c", n_subjects=3, sessions=(0, 6))
    ref = pd.read_csv(src)
    lines = ["subject,session,path,diagnosis,age,notes,site"]
    for i, r in ref.iterrows():
        subject = f"{int(r['subject'][4:]):03d}"  # 000, 001, 002
        notes = ["NA", "null", "", "a, quoted note", "ses-M06", "007"][i % 6]
        lines.append(",".join([subject, f"ses-M{int(r['session']):02d}", f"images/{Path(r['path']).name}",
                               r["diagnosis"], f"{r['age']:.2f}", f'"{notes}"' if "," in notes else notes, "0042"]))
    raw = ("\ufeff" + "\r\n".join(lines) + "\r\n").encode("utf-8")
    cohort = tmp_path / "c" / "mine.csv"
    cohort.write_bytes(raw)
    assert main(["check", str(cohort), "--write-split", "--no-volumes"]) == 0
    assert cohort.read_bytes() == raw
    written = (tmp_path / "c" / "mine.split.csv").read_bytes()
    assert written.startswith(b"\xef\xbb\xbf") and b"\r\n" in written and b"\n" not in written.replace(b"\r\n", b"")
    before = list(csv.reader(io.StringIO(raw.decode("utf-8-sig"), newline="")))
    after = list(csv.reader(io.StringIO(written.decode("utf-8-sig"), newline="")))
    assert after[0] == before[0] + ["split"]
    assert [r[:-1] for r in after[1:]] == before[1:]  # every original cell, as text
    assert {r[-1] for r in after[1:]} <= {"train", "val", "test"}
    assert pd.read_csv(tmp_path / "c" / "mine.split.csv", dtype=str, keep_default_na=False)["subject"].iloc[0] == "000"


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
