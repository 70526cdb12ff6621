"""One-line errors instead of tracebacks or silently wrong outputs (issue 21, cases 5, 7 and 8), on the
inference commands of a run with untrained tiny networks (as ``fake_run`` of test_reliability)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from ldae.cli import main
from ldae.errors import one_line
from test_reliability import (  # noqa: F401 (_one_thread: an autouse fixture)
    _one_thread,
    _scan,
    make_autoencoder_ckpt,
    make_diffusion_ckpt,
    make_representation_ckpt,
    one_error_line,
)


def _run_cmd(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _emb_dim(run: Path) -> int:
    from ldae.model import LDAE

    return int(LDAE.load(run).encoder.emb_dim)


@pytest.fixture(scope="module")
def run6(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """RUN/{autoencoder,latents,diffusion,representation}: untrained tiny networks on a 6-subject phantom
    cohort (as test_reliability's ``run6``)."""
    from ldae.data.cohort import assign_splits, read_cohort, write_cohort
    from ldae.data.phantom import write_phantom_cohort
    from ldae.jobs.compress import compress
    from ldae.runs import stage_dir

    root = tmp_path_factory.mktemp("run6")
    csv = write_phantom_cohort(root / "cohort", n_subjects=6, sessions=(0, 12), seed=0)
    write_cohort(assign_splits(read_cohort(csv), test_fraction=0.2, val_fraction=0.2, seed=0), csv)
    run = root / "run"
    latents_csv = compress(make_autoencoder_ckpt(run), csv, stage_dir(run, "latents"))
    make_representation_ckpt(run, make_diffusion_ckpt(run, latents_csv))
    return run


@pytest.fixture(scope="module")
def stats_run(run6: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the fake run with y_sem statistics (what `ldae manipulate` needs)."""
    run = tmp_path_factory.mktemp("stats") / "run"
    shutil.copytree(run6, run)
    d = _emb_dim(run)
    (run / "representation" / "checkpoints" / "ysem_stats.json").write_text(
        json.dumps({"mean": [0.0] * d, "std": [1.0] * d, "n": 4}))
    return run


# ------------------------------------------------------------------------------------------ case 7
@pytest.mark.parametrize("steps", ["0", "-3"])
def test_steps_zero_is_refused_like_negative(steps: str, run6: Path, tmp_path: Path, capsys):
    line = one_error_line(capsys, "reconstruct", main(["reconstruct", "--model", str(run6), str(_scan(run6)),
                                                      "--steps", steps, "--out", str(tmp_path / "o")]))
    assert f"--steps must be a positive number of DDIM steps, got {steps}" in line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("scale", ["0", "-1", "nan"])
def test_guidance_scale_must_be_positive(scale: str, run6: Path, tmp_path: Path, capsys):
    line = one_error_line(capsys, "variations", main(["variations", "--model", str(run6), str(_scan(run6)),
                                                     "--guidance-scale", scale, "--out", str(tmp_path / "o")]))
    assert f"--guidance-scale: expected a guidance scale > 0 (1 = the paper's decoding), got {float(scale)}" in line
    assert not (tmp_path / "o").exists()


def test_variations_n_zero_is_refused(run6: Path, tmp_path: Path, capsys):
    line = one_error_line(capsys, "variations", main(["variations", "--model", str(run6), str(_scan(run6)),
                                                     "--n", "0", "--out", str(tmp_path / "o")]))
    assert "--n must be at least 1" in line and not (tmp_path / "o").exists()


def test_close_alphas_get_distinct_file_names_and_bad_alphas_are_refused(stats_run: Path, tmp_path: Path, capsys):
    d = _emb_dim(stats_run)
    direction = tmp_path / "dir.npy"
    np.save(direction, np.linspace(-1, 1, d))
    base = ["manipulate", "--model", str(stats_run), str(_scan(stats_run)), "--direction", str(direction),
            "--steps", "2"]
    code, _, err = _run_cmd(capsys, [*base, "--alphas", "1", "1.001", "--out", str(tmp_path / "o")])
    assert code == 0, err
    names = sorted(p.name for p in (tmp_path / "o").glob("*.nii.gz"))
    assert len(names) == 2 and names[0].endswith("_alpha+1.000.nii.gz") and names[1].endswith("_alpha+1.001.nii.gz")
    for alphas, message in ((["nan"], "--alphas must be finite numbers, got nan"),
                            (["1", "inf"], "--alphas must be finite numbers, got inf"),
                            (["1", "1"], "--alphas lists 1 more than once")):
        line = one_error_line(capsys, "manipulate", main([*base, "--alphas", *alphas, "--out", str(tmp_path / "x")]))
        assert message in line
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------ case 5
@pytest.mark.parametrize("kind,message", [
    ("object", "not a numeric .npy direction (an object (pickled) array)"),
    ("nan", "the direction holds 1 NaN/inf value(s)"),
    ("inf", "the direction holds 1 NaN/inf value(s)"),
    ("matrix", "the direction must be a vector"),
    ("short", "has 3 entries, this model's y_sem has"),
])
def test_bad_direction_files_are_refused(kind: str, message: str, stats_run: Path, tmp_path: Path, capsys):
    d = _emb_dim(stats_run)
    path = tmp_path / f"{kind}.npy"
    vec = np.ones(d)
    if kind == "object":
        np.save(path, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    elif kind in ("nan", "inf"):
        vec[2] = np.nan if kind == "nan" else np.inf
        np.save(path, vec)
    elif kind == "matrix":
        np.save(path, np.ones((2, d)))
    else:
        np.save(path, np.ones(3))
    line = one_error_line(capsys, "manipulate", main(["manipulate", "--model", str(stats_run), str(_scan(stats_run)),
                                                     "--direction", str(path), "--out", str(tmp_path / "o")]))
    assert message in line and path.name in line
    assert not (tmp_path / "o").exists()


def test_hot_voxel_and_huge_values_do_not_change_y_sem(run6: Path, tmp_path: Path, capsys):
    """One voxel at 1e6 (min-max scaling would make the brain ~0) and a scan scaled to ~3e38 (float32
    overflow in min-max) encode to the y_sem of the original scan."""
    src = _scan(run6)
    img = nib.load(str(src))
    data = np.asarray(img.dataobj, dtype=np.float32)
    hot = data.copy()
    hot[16, 20, 16] = 1e6
    nib.save(nib.Nifti1Image(hot, img.affine), str(tmp_path / "hot.nii.gz"))
    nib.save(nib.Nifti1Image((data / data.max() * 3.0e38).astype(np.float32), img.affine), str(tmp_path / "huge.nii.gz"))
    code, _, err = _run_cmd(capsys, ["encode", "--model", str(run6), str(src), str(tmp_path / "hot.nii.gz"),
                                     str(tmp_path / "huge.nii.gz"), "--semantic-only", "--out", str(tmp_path / "o")])
    assert code == 0, err
    y = np.load(tmp_path / "o" / "encodings.npz")["y_sem"]
    assert np.isfinite(y).all()
    scale = np.linalg.norm(y[0])
    assert np.linalg.norm(y[1] - y[0]) < 0.02 * scale and np.linalg.norm(y[2] - y[0]) < 1e-3 * scale


# ------------------------------------------------------------------------------------------ case 8
def test_out_an_existing_file_is_refused_before_computing(run6: Path, tmp_path: Path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    line = one_error_line(capsys, "reconstruct", main(["reconstruct", "--model", str(run6), str(_scan(run6)),
                                                      "--out", str(afile)]))
    assert "--out is an existing file" in line
    assert afile.read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_out_unwritable_is_refused_before_computing(run6: Path, tmp_path: Path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        line = one_error_line(capsys, "reconstruct", main(["reconstruct", "--model", str(run6),
                                                          str(_scan(run6)), "--out", str(locked / "o")]))
        assert "--out is not writable" in line
    finally:
        locked.chmod(0o700)


def test_predict_csv_a_folder_and_a_folder_as_scan(run6: Path, tmp_path: Path, capsys):
    line = one_error_line(capsys, "predict", main(["predict", "--model", str(run6), str(_scan(run6)),
                                                  "--csv", str(tmp_path)]))
    assert "--csv is a folder" in line
    folder = tmp_path / "scan.nii.gz"
    folder.mkdir()
    line = one_error_line(capsys, "reconstruct", main(["reconstruct", "--model", str(run6), str(folder),
                                                      "--out", str(tmp_path / "o")]))
    assert "scan.nii.gz: is a folder, not a NIfTI file" in line and not (tmp_path / "o").exists()


def test_zero_byte_checkpoint_and_ansi_codes_give_one_clean_line(tmp_path: Path, run6: Path, capsys):
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    line = one_error_line(capsys, "reconstruct", main(["reconstruct", "--model", str(empty), str(_scan(run6)),
                                                      "--out", str(tmp_path / "o")]))
    assert "empty.ckpt" in line and not line.endswith("()")
    colour = tmp_path / "\x1b[31mred\x1b[0m.ckpt"
    line = one_error_line(capsys, "reconstruct", main(["reconstruct", "--model", str(colour), str(_scan(run6)),
                                                      "--out", str(tmp_path / "o")]))
    assert "\x1b" not in line and "red.ckpt" in line
    assert one_line("a\x1b[1;32mb\x1b[0m\n  c\x07") == "ab c"


def test_corrupt_ysem_stats_does_not_break_reconstruct(run6: Path, tmp_path: Path, capsys):
    run = tmp_path / "run"
    shutil.copytree(run6, run)
    (run / "representation" / "checkpoints" / "ysem_stats.json").write_text("{not json")
    code, out, err = _run_cmd(capsys, ["reconstruct", "--model", str(run), str(_scan(run)), "--steps", "2",
                                       "--out", str(tmp_path / "o")])
    assert code == 0, err
    d = _emb_dim(run)
    np.save(tmp_path / "d.npy", np.ones(d))
    line = one_error_line(capsys, "manipulate", main(["manipulate", "--model", str(run), str(_scan(run)),
                                                     "--direction", str(tmp_path / "d.npy"), "--steps", "2",
                                                     "--out", str(tmp_path / "m")]))
    assert "ysem_stats.json" in line


def test_dollar_in_a_file_name_is_drawn_literally(run6: Path, tmp_path: Path, capsys):
    scan = tmp_path / "scan_$x$_$1.nii.gz"
    shutil.copy(_scan(run6), scan)
    code, _, err = _run_cmd(capsys, ["reconstruct", "--model", str(run6), str(scan), "--steps", "2",
                                     "--out", str(tmp_path / "o")])
    assert code == 0, err
    assert (tmp_path / "o" / "scan_$x$_$1_recon.png").stat().st_size > 1000


@pytest.mark.parametrize("column,value,message", [
    ("session", "-6", "column 'session' has '-6' (months since baseline cannot be negative)"),
    ("age", "-5", "column 'age' has -5"),
    ("age", "700", "column 'age' has 700"),
])
def test_cohort_refuses_negative_sessions_and_implausible_ages(column: str, value: str, message: str,
                                                               phantom_cohort: Path, capsys):
    df = pd.read_csv(phantom_cohort, dtype=str)
    df.loc[3, column] = value
    df.to_csv(phantom_cohort, index=False)
    line = one_error_line(capsys, "check", main(["check", str(phantom_cohort), "--no-volumes"]))
    assert "row 5" in line and message in line


def test_check_names_the_csv_row_of_a_bad_volume(phantom_cohort: Path, capsys):
    df = pd.read_csv(phantom_cohort)
    victim = phantom_cohort.parent / df["path"].iloc[6]
    data = np.asarray(nib.load(str(victim)).dataobj, dtype=np.float32)
    data[1, 2, 3] = np.nan
    nib.save(nib.Nifti1Image(data, nib.load(str(victim)).affine), str(victim))
    line = one_error_line(capsys, "check", main(["check", str(phantom_cohort)]))
    assert "row 8: " in line and victim.name in line and "NaN/inf" in line
