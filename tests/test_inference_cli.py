"""The inference subcommands on the tiny run fixture: NIfTI outputs with the input's grid, PNG figures."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from ldae.cli import main
from ldae.runs import COMPRESSED_CSV, stage_dir


@pytest.fixture(scope="module")
def scans(tiny_run: Path) -> list[str]:
    df = pd.read_csv(stage_dir(tiny_run, "latents") / COMPRESSED_CSV)
    first = df[df["subject"] == df["subject"].iloc[0]].sort_values("session")
    return [str(stage_dir(tiny_run, "latents") / p) for p in first["path"].iloc[:2]]


def _check_nifti(path: Path, like: str) -> np.ndarray:
    img, ref = nib.load(path), nib.load(like)
    assert img.shape == ref.shape
    np.testing.assert_allclose(img.affine, ref.affine, atol=1e-4)  # model-ready input: same grid
    data = img.get_fdata()
    assert 0.0 <= data.min() and data.max() <= 1.0 and data.std() > 0
    return data


@pytest.mark.slow
def test_reconstruct_variations_encode(tiny_run: Path, scans: list[str], tmp_path: Path, capsys):
    assert main(["reconstruct", "--model", str(tiny_run), scans[0], "--out", str(tmp_path), "--steps", "3"]) == 0
    name = Path(scans[0]).name.replace(".nii.gz", "")
    _check_nifti(tmp_path / f"{name}_recon.nii.gz", scans[0])
    assert (tmp_path / f"{name}_recon.png").stat().st_size > 1000
    assert "SSIM" in capsys.readouterr().out
    assert main(["variations", "--model", str(tiny_run), scans[0], "--n", "2", "--out", str(tmp_path),
                 "--steps", "3"]) == 0
    v0 = _check_nifti(tmp_path / f"{name}_var0.nii.gz", scans[0])
    v1 = _check_nifti(tmp_path / f"{name}_var1.nii.gz", scans[0])
    assert np.abs(v0 - v1).max() > 0
    assert main(["encode", "--model", str(tiny_run), *scans, "--out", str(tmp_path), "--steps", "3"]) == 0
    with np.load(tmp_path / "encodings.npz") as z:
        assert z["y_sem"].shape[0] == 2 and z["z_T"].shape[0] == 2 and list(z["names"]) == [
            Path(s).name.replace(".nii.gz", "") for s in scans]


@pytest.mark.slow
def test_interpolate_and_manipulate(tiny_run: Path, scans: list[str], tmp_path: Path, capsys):
    assert main(["interpolate", "--model", str(tiny_run), *scans, "--ts", "0", "0.5", "1", "--out",
                 str(tmp_path), "--steps", "3"]) == 0
    outs = sorted(tmp_path.glob("*_t*.nii.gz"))
    assert len(outs) == 3 and list(tmp_path.glob("*_interpolation.png"))
    direction = tmp_path / "direction.npy"
    from ldae.model import LDAE

    np.save(direction, np.ones(LDAE.load(tiny_run).encoder.emb_dim, dtype=np.float32))
    assert main(["manipulate", "--model", str(tiny_run), scans[0], "--direction", str(direction),
                 "--alphas", "0", "2", "--out", str(tmp_path), "--steps", "3"]) == 0
    assert len(list(tmp_path.glob("*_alpha*.nii.gz"))) == 2 and list(tmp_path.glob("*_manipulation.png"))


def test_manipulate_without_probes_is_a_clear_error(tiny_run: Path, scans: list[str], tmp_path: Path, capsys):
    assert main(["manipulate", "--model", str(tiny_run), scans[0], "--direction", str(tmp_path / "none.json"),
                 "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "none.json" in err and "ldae evaluate" in err and len(err.strip().splitlines()) == 1


def test_batch_inference_input_errors(tiny_run: Path, scans: list[str], tmp_path: Path, capsys):
    assert main(["encode", "--model", str(tiny_run), "--out", str(tmp_path)]) == 2
    assert "no scans given" in capsys.readouterr().err
    other = tmp_path / "elsewhere" / Path(scans[0]).name
    other.parent.mkdir()
    other.write_bytes(Path(scans[0]).read_bytes())
    assert main(["reconstruct", "--model", str(tiny_run), scans[0], str(other), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "would both write outputs named" in err and str(other) in err and len(err.strip().splitlines()) == 1
    bad = tmp_path / "cohort.csv"
    bad.write_text("subject,session\nA,0\n")
    assert main(["encode", "--model", str(tiny_run), "--csv", str(bad), "--out", str(tmp_path)]) == 2
    assert "cohort.csv" in capsys.readouterr().err and not (tmp_path / "encodings.npz").exists()


@pytest.mark.slow
def test_encode_csv_matches_positional_scans(tiny_run: Path, scans: list[str], tmp_path: Path) -> None:
    """A cohort CSV names its outputs <subject>_M<session>; the encodings equal those of the same files."""
    df = pd.read_csv(stage_dir(tiny_run, "latents") / COMPRESSED_CSV)
    rows = df[df["path"].apply(lambda p: str(stage_dir(tiny_run, "latents") / p) in scans)]
    csv = tmp_path / "c.csv"
    rows = rows.drop(columns=["latent_path"])
    rows.assign(path=[str(stage_dir(tiny_run, "latents") / p) for p in rows["path"]]).to_csv(csv, index=False)
    assert main(["encode", "--model", str(tiny_run), "--csv", str(csv), "--out", str(tmp_path / "a"),
                 "--steps", "2", "--semantic-only"]) == 0
    assert main(["encode", "--model", str(tiny_run), *scans, "--out", str(tmp_path / "b"), "--steps", "2",
                 "--semantic-only"]) == 0
    with np.load(tmp_path / "a" / "encodings.npz") as a, np.load(tmp_path / "b" / "encodings.npz") as b:
        assert list(a["names"]) == [f"{s}_M{int(m):03d}" for s, m in zip(rows["subject"], rows["session"])]
        assert "z_T" not in a.files
        np.testing.assert_allclose(a["y_sem"], b["y_sem"], rtol=0, atol=1e-6)
