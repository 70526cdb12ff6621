"""Guarded reruns (issue 21, case 6): a run folder records its inputs and refuses a rerun with others
unless --restart; finished steps keep their timings; one writer per run or stage folder (lock file with
stale-lock detection); `fit --resume` checks the model before writing anything; bad overrides leave no
folder behind.

The pipeline tests replace training and compression by stand-ins that write what the next step reads
(the guard logic is what is tested, not the networks)."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ldae.cli import main
from ldae.runs import LOCK_FILE, RunLock


def one_error_line(capsys: pytest.CaptureFixture, command: str, code: int) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith(f"ldae {command}: error: "), err
    return lines[0]


@pytest.fixture
def stand_ins(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """``fit`` and ``compress`` replaced by quick writers of best.ckpt / the compressed CSV; returns the
    list of steps actually run."""
    import ldae.jobs.compress as compress_module
    import ldae.training as training

    calls: list[str] = []

    def fake_fit(cfg: dict, resume: bool = False) -> Path:
        calls.append(cfg["stage"])
        time.sleep(0.05)
        best = Path(cfg["out"]) / "checkpoints" / "best.ckpt"
        best.parent.mkdir(parents=True, exist_ok=True)
        best.write_bytes(b"stand-in")
        return best

    real = compress_module.compress

    @functools.wraps(real)
    def fake_compress(autoencoder_ckpt, csv, out_dir=None, **kwargs):
        calls.append("compress")
        time.sleep(0.05)
        out = Path(out_dir) / "cohort_with_compressed_latent.csv"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(Path(csv).read_text())
        return out

    monkeypatch.setattr(training, "fit", fake_fit)
    monkeypatch.setattr(compress_module, "compress", fake_compress)
    return calls


STEPS = ["--steps", "autoencoder", "compress", "diffusion"]


def test_rerun_with_other_csv_or_overrides_is_refused_unless_restart(phantom_cohort: Path, tmp_path: Path,
                                                                     stand_ins: list[str], capsys):
    out = tmp_path / "run"
    args = ["pipeline", "--csv", str(phantom_cohort), "--out", str(out), *STEPS,
            "--autoencoder.trainer.max_epochs", "1"]
    assert main(args) == 0
    assert stand_ins == ["autoencoder", "compress", "diffusion"]
    recorded = json.loads((out / "inputs.json").read_text())
    assert recorded["preset"] == "tiny" and len(recorded["csv_sha256"]) == 64
    assert recorded["configs"]["autoencoder"]["trainer"]["max_epochs"] == 1
    capsys.readouterr()

    other = phantom_cohort.with_name("other.csv")
    other.write_text(phantom_cohort.read_text().replace("CN", "MCI", 1))
    line = one_error_line(capsys, "pipeline", main([*args[:2], str(other), *args[3:]]))
    assert "made from other inputs" in line and "cohort CSV" in line and "--restart" in line
    line = one_error_line(capsys, "pipeline", main([*args[:-1], "2"]))
    assert "autoencoder: trainer.max_epochs 1 -> 2" in line
    assert stand_ins == ["autoencoder", "compress", "diffusion"]  # nothing ran

    assert main([*args[:-1], "2", "--restart"]) == 0
    assert stand_ins[3:] == ["autoencoder", "compress", "diffusion"]
    assert json.loads((out / "inputs.json").read_text())["configs"]["autoencoder"]["trainer"]["max_epochs"] == 2


def test_rerun_keeps_the_timings_of_finished_steps(phantom_cohort: Path, tmp_path: Path, stand_ins: list[str],
                                                   capsys):
    out = tmp_path / "run"
    args = ["pipeline", "--csv", str(phantom_cohort), "--out", str(out), *STEPS]
    assert main(args) == 0
    first = json.loads((out / "timings.json").read_text())
    assert all(v > 0.04 for v in first.values()), first
    capsys.readouterr()
    assert main(args) == 0  # the same inputs: every step skipped
    assert stand_ins == ["autoencoder", "compress", "diffusion"]
    assert json.loads((out / "timings.json").read_text()) == pytest.approx(first)
    assert "(done before)" in capsys.readouterr().out
    # a step added to a finished run is not "other inputs"
    assert main([*args, "representation"]) == 0
    assert stand_ins[-1] == "representation"
    assert "representation" in json.loads((out / "inputs.json").read_text())["configs"]
    assert not (out / LOCK_FILE).exists()


def test_a_second_writer_is_refused_and_a_stale_lock_taken_over(phantom_cohort: Path, tmp_path: Path,
                                                                stand_ins: list[str], capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK_FILE).write_text(json.dumps({"pid": holder.pid, "host": __import__("socket").gethostname(),
                                                  "since": "now", "what": "ldae pipeline"}))
        args = ["pipeline", "--csv", str(phantom_cohort), "--out", str(out), *STEPS]
        line = one_error_line(capsys, "pipeline", main(args))
        assert f"another ldae process is writing this folder (pid {holder.pid}" in line and LOCK_FILE in line
        assert stand_ins == []
    finally:
        holder.kill()
        holder.wait()
    assert main(args) == 0  # its process is gone: the stale lock is taken over
    assert stand_ins == ["autoencoder", "compress", "diffusion"] and not (out / LOCK_FILE).exists()


def test_run_lock_is_exclusive_reentrant_and_released(tmp_path: Path):
    with RunLock(tmp_path, "a") as outer:
        info = json.loads((tmp_path / LOCK_FILE).read_text())
        assert info["pid"] == __import__("os").getpid() and info["what"] == "a"
        with RunLock(tmp_path, "b"):  # the same process: nested
            pass
        assert (tmp_path / LOCK_FILE).exists()
        code = ("import sys; from ldae.runs import RunLock\n"
                "try:\n    RunLock(sys.argv[1]).acquire()\nexcept Exception as e:\n    print(e); sys.exit(3)")
        other = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
        assert other.returncode == 3 and "another ldae process" in other.stdout, other.stderr
        assert outer is not None
    assert not (tmp_path / LOCK_FILE).exists()
    assert not [p for p in tmp_path.iterdir()]  # no temporary left


# ------------------------------------------------------------------------- nothing left behind
@pytest.mark.parametrize("override,expected", [
    (["--data.batch_size", "two"], "config key 'data.batch_size' expects an integer (preset value 2), got 'two'"),
    (["--optim.lr_generator", "fast"], "config key 'optim.lr_generator' expects a number"),
    (["--data.batch_size", "0"], "config key 'data.batch_size' must be at least 1, got 0"),
])
def test_bad_override_is_one_line_and_leaves_no_folder(override: list[str], expected: str, phantom_cohort: Path,
                                                       tmp_path: Path, capsys):
    out = tmp_path / "new_run"
    fit = ["fit", "--preset", "tiny", "--stage", "autoencoder", "--data.csv", str(phantom_cohort),
           "--out", str(out), *override]
    assert expected in one_error_line(capsys, "fit", main(fit))
    assert not out.exists()
    pipe = ["pipeline", "--csv", str(phantom_cohort), "--out", str(out), f"--autoencoder.{override[0][2:]}",
            override[1]]
    assert expected in one_error_line(capsys, "pipeline", main(pipe))
    assert not out.exists()
    line = one_error_line(capsys, "pipeline", main(["pipeline", "--csv", str(phantom_cohort), "--out", str(out),
                                                    "--compress.batch_size", "two"]))
    assert "config key 'compress.batch_size' expects an integer" in line and not out.exists()


def test_out_that_is_a_file_or_config_that_is_a_folder(phantom_cohort: Path, tmp_path: Path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    line = one_error_line(capsys, "pipeline", main(["pipeline", "--csv", str(phantom_cohort), "--out", str(afile)]))
    assert "--out is an existing file" in line
    line = one_error_line(capsys, "fit", main(["fit", "--preset", "tiny", "--stage", "autoencoder", "--data.csv",
                                               str(phantom_cohort), "--out", str(afile)]))
    assert "--out is an existing file" in line
    line = one_error_line(capsys, "fit", main(["fit", "--config", str(tmp_path), "--out", str(tmp_path / "r")]))
    assert "is a folder, not a YAML config file" in line and not (tmp_path / "r").exists()


def test_fit_resume_checks_the_model_before_writing_anything(phantom_cohort: Path, tmp_path: Path, capsys):
    """A run with a last.ckpt of the tiny autoencoder: --resume with other channels or another grid stops
    with one line; config.yaml and the logs are untouched (nothing created)."""
    import torch

    from ldae.config import load_preset
    from ldae.training.autoencoder import AutoencoderModule

    out = tmp_path / "run"
    cfg = load_preset("tiny", "autoencoder")
    cfg["out"], cfg["data"]["csv"] = str(out), str(phantom_cohort)
    module = AutoencoderModule(cfg)
    ckpt = {"state_dict": module.state_dict(), "epoch": 0, "global_step": 0}
    module.on_save_checkpoint(ckpt)
    (out / "checkpoints").mkdir(parents=True)
    torch.save(ckpt, out / "checkpoints" / "last.ckpt")
    (out / "config.yaml").write_text("original: true\n")
    base = ["fit", "--preset", "tiny", "--stage", "autoencoder", "--data.csv", str(phantom_cohort), "--out", str(out),
            "--resume"]
    line = one_error_line(capsys, "fit", main([*base, "--model.channels", "[8, 16, 16]"]))
    assert "--resume with a config that changes the model" in line and "has shape" in line
    line = one_error_line(capsys, "fit", main([*base, "--data.spacing", "5.0"]))
    assert "--resume with data.spacing 5.0 but the run was trained with 6.0" in line
    assert (out / "config.yaml").read_text() == "original: true\n"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "config.yaml"]
