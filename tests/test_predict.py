"""`ldae predict` and ``ldae.jobs.predict`` on the briefly trained tiny run (tests/conftest.py::tiny_run).

The probes are fitted here with ``ldae.evaluation.probes`` on y_sem computed scan by scan (the same
functions ``ldae evaluate`` uses, without its slow sections), so the predictions of the batched
``predict`` path can be checked against scikit-learn's own ``predict_proba``/``predict`` outputs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from ldae.cli import main
from ldae.errors import CohortError, LDAEError


@dataclass
class ProbedRun:
    """A run folder (stages linked from the fixture run) with RUN/evaluation/probes.json."""

    run: Path
    df: pd.DataFrame  # cohort rows (absolute paths, split, diagnosis, age)
    X: np.ndarray  # y_sem per row, one scan at a time
    ad: dict  # probe_ad_vs_cn result (test_index, test_score from scikit-learn)
    age: dict  # probe_age result (test_index, test_prediction)


def make_probed_run(tiny_run: Path, root: Path) -> ProbedRun:
    """Link the fixture's stages into ``root/run`` and save AD-vs-CN / age probes fitted on its train split."""
    from ldae.data.cohort import read_cohort
    from ldae.evaluation.probes import probe_ad_vs_cn, probe_age, save_probes
    from ldae.model import LDAE
    from ldae.runs import COMPRESSED_CSV, stage_dir

    run = root / "run"
    run.mkdir(parents=True)
    for stage in ("autoencoder", "latents", "diffusion", "representation"):
        (run / stage).symlink_to((tiny_run / stage).resolve())
    df = read_cohort(stage_dir(run, "latents") / COMPRESSED_CSV)
    model = LDAE.load(run)
    with torch.no_grad():
        X = np.concatenate([model.semantic(model.load_volume(p)[0]).double().numpy() for p in df["path"]])
    cols = (df["split"].to_numpy(), df["subject"].to_numpy())
    ad = probe_ad_vs_cn(X, df["diagnosis"].to_numpy(), *cols, seed=0)
    age = probe_age(X, df["age"].to_numpy(), *cols, seed=0)
    save_probes(stage_dir(run, "evaluation") / "probes.json", ad, age,  # as `ldae evaluate` saves them
                encoder_fingerprint=model.fingerprints["semantic_encoder"],
                representation_checkpoint=model.checkpoints["representation"])
    return ProbedRun(run, df, X, ad, age)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def probed(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> ProbedRun:
    return make_probed_run(tiny_run, tmp_path_factory.mktemp("predict"))


@pytest.fixture(scope="module")
def model(probed: ProbedRun):
    from ldae.model import LDAE

    return LDAE.load(probed.run)


def _write(path: Path, data: np.ndarray, spacing: float = 6.0) -> Path:
    """``data`` on the MNI-centred grid of its shape at ``spacing`` mm (the model's grid for 6 mm 32x40x32)."""
    from ldae.data.geometry import model_grid_affine

    nib.save(nib.Nifti1Image(data.astype(np.float32), model_grid_affine(spacing, data.shape[:3])), str(path))
    return path


# ----------------------------------------------------------------------------------- predictions
def test_cli_json_matches_scikit_learn_probe_on_test_rows(probed: ProbedRun, capsys):
    ad_rows = probed.df.index[probed.ad["test_index"]]
    age_rows = probed.df.index[probed.age["test_index"]]
    rows = list(dict.fromkeys([*age_rows, *ad_rows]))
    paths = probed.df.loc[rows, "path"].tolist()
    assert main(["predict", "--model", str(probed.run), *paths, "--json", "--batch-size", "3", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    by_scan = {r["scan"]: r for r in out["predictions"]}
    assert [r["scan"] for r in out["predictions"]] == paths
    p_ad = np.array([by_scan[probed.df.loc[i, "path"]]["p_ad"] for i in ad_rows])
    age = np.array([by_scan[probed.df.loc[i, "path"]]["age"] for i in age_rows])
    np.testing.assert_allclose(p_ad, probed.ad["test_score"], atol=1e-5)  # sklearn predict_proba
    np.testing.assert_allclose(age, probed.age["test_prediction"], atol=1e-3)  # sklearn Ridge.predict
    for r in out["predictions"]:
        assert r["label"] == ("AD" if r["p_ad"] >= out["threshold"] else "CN")
    assert out["probe_test_metrics"]["ad_vs_cn"]["auc"] == pytest.approx(probed.ad["auc"])
    assert out["probes"] == str(probed.run / "evaluation" / "probes.json")


def test_ad_scored_above_cn(probed: ProbedRun, model):
    """The phantom cohort plants a severity signal (larger 'ventricles' in AD). Asserted on the rows the
    probe was fitted on (train) and, because the phantom signal is strong, on the held-out test rows."""
    from ldae.jobs.predict import predict

    df = probed.df[probed.df["diagnosis"].isin(["AD", "CN"])]
    res = predict(model, df["path"].tolist(), batch_size=8, progress=False)
    p = pd.Series(res.p_ad, index=df.index)
    for split in ("train", "test"):
        sub = df[df["split"] == split]
        mean_ad = p[sub.index[sub["diagnosis"] == "AD"]].mean()
        mean_cn = p[sub.index[sub["diagnosis"] == "CN"]].mean()
        assert mean_ad > mean_cn, (split, mean_ad, mean_cn)


def test_batching_does_not_change_results(probed: ProbedRun, model):
    from ldae.jobs.predict import predict

    paths = probed.df["path"].tolist()[:5]
    one = predict(model, paths, batch_size=1, progress=False)
    many = predict(model, paths, batch_size=4, progress=False)
    # y_sem is standardised by the (calibrated) per-dimension std of the codes, small for this briefly trained
    # run: float32 batch-order differences of ~1e-7 in the pre-norm code become up to ~1e-4 here
    np.testing.assert_allclose(one.y_sem, many.y_sem, atol=2e-4)
    np.testing.assert_allclose(one.y_sem, probed.X[:5], atol=2e-4)
    np.testing.assert_allclose(one.p_ad, many.p_ad, atol=1e-6)
    np.testing.assert_allclose(one.age, many.age, atol=1e-4)


def test_csv_embeddings_and_table(probed: ProbedRun, tmp_path: Path, capsys):
    paths = probed.df["path"].tolist()[:3]
    csv, npz = tmp_path / "pred.csv", tmp_path / "emb.npz"
    code = main(["predict", "--model", str(probed.run), *paths, "--csv", str(csv), "--save-embeddings", str(npz)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "P(AD)" in printed and "sub-0000_ses-M00" in printed and "test AUC" in printed
    table = pd.read_csv(csv)
    assert list(table.columns) == ["scan", "name", "p_ad", "label", "age"]
    assert table["scan"].tolist() == paths and table["p_ad"].between(0, 1).all()
    emb = np.load(npz)
    assert emb["y_sem"].shape == (3, probed.X.shape[1])
    np.testing.assert_allclose(emb["y_sem"], probed.X[:3], atol=2e-4)  # see test_batching_does_not_change_results
    assert emb["scan"].tolist() == paths
    np.testing.assert_allclose(emb["p_ad"], table["p_ad"], rtol=1e-12)


# ----------------------------------------------------------------------------------- error paths
def test_no_probes_says_run_evaluate(probed: ProbedRun, tmp_path: Path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for stage in ("autoencoder", "diffusion", "representation"):
        (bare / stage).symlink_to(probed.run / stage)
    assert main(["predict", "--model", str(bare), probed.df["path"].iloc[0]]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "ldae evaluate" in err and str(bare / "evaluation" / "probes.json") in err


def test_missing_unreadable_and_4d_scans_are_named(probed: ProbedRun, tmp_path: Path, capsys):
    good = probed.df["path"].iloc[0]
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"not a nifti at all")
    four_d = _write(tmp_path / "fourd.nii.gz", np.random.default_rng(0).random((32, 40, 32, 2)))
    missing = tmp_path / "missing.nii.gz"
    for bad, words in ((missing, "file not found"), (garbage, "cannot read NIfTI"), (four_d, "expected a 3D volume")):
        assert main(["predict", "--model", str(probed.run), good, str(bad)]) == 2
        err = capsys.readouterr().err
        assert str(bad) in err and words in err, err


def test_wrong_field_of_view_is_named(probed: ProbedRun, model, tmp_path: Path):
    """A raw-like grid (1 mm, 64³ = 64 mm field of view around the MNI centre) misses most of the brain and is
    refused before any scan is encoded; the model's grid (6 mm, 32×40×32) passes, and so does a grid whose
    voxel axes are permuted in the affine (the scan is resampled by its affine)."""
    from ldae.data.geometry import model_grid_affine
    from ldae.jobs.predict import check_scan, predict

    rng = np.random.default_rng(0)
    raw = _write(tmp_path / "raw.nii.gz", rng.random((64, 64, 64)), spacing=1.0)
    with pytest.raises(CohortError, match=r"raw.nii.gz: field of view \(.*\) does not cover the brain.*--preprocess"):
        predict(model, [probed.df["path"].iloc[0], raw], progress=False)
    check_scan(_write(tmp_path / "ok.nii.gz", rng.random((32, 40, 32))), 6.0, (32, 40, 32))
    swapped = np.zeros((4, 4))
    swapped[0, 1] = swapped[1, 0] = swapped[2, 2] = 6.0
    swapped[3, 3] = 1.0
    swapped[:3, 3] = model_grid_affine(6.0, (32, 40, 32))[:3, 3]
    nib.save(nib.Nifti1Image(rng.random((40, 32, 32)).astype(np.float32), swapped), str(tmp_path / "sw.nii.gz"))
    check_scan(tmp_path / "sw.nii.gz", 6.0, (32, 40, 32))
    check_scan(raw, 6.0, (32, 40, 32), fov_tolerance=float("inf"))  # header-only check


def test_bad_voxels_error_names_file(probed: ProbedRun, model, tmp_path: Path):
    from ldae.jobs.predict import predict

    vol = np.random.default_rng(0).random((32, 40, 32))
    vol[3, 3, 3] = np.nan
    bad = _write(tmp_path / "nan.nii.gz", vol)
    with pytest.raises(CohortError, match=r"nan\.nii\.gz: volume holds 1 NaN"):
        predict(model, [bad], progress=False)


def test_probes_of_another_size_and_batch_size(probed: ProbedRun, model):
    from ldae.evaluation.probes import load_probes
    from ldae.jobs.predict import predict

    probes = load_probes(probed.run / "evaluation" / "probes.json")
    for part in ("ad_vs_cn", "age"):
        for key in ("coef", "mean", "scale"):
            probes[part][key] = probes[part][key][:7]
    with pytest.raises(LDAEError, match="expects 7-d embeddings.*y_sem has"):
        predict(model, [probed.df["path"].iloc[0]], probes=probes, progress=False)
    with pytest.raises(LDAEError, match="batch size must be >= 1"):
        predict(model, [probed.df["path"].iloc[0]], batch_size=0, progress=False)


# ----------------------------------------------------------------------------------- probes of this run only
def _run_with_retrained_representation(probed: ProbedRun, root: Path) -> Path:
    """A copy of the probed run whose representation checkpoint holds other encoder weights (as after
    retraining stage 3), with the old run's probes left in place."""
    import shutil

    from ldae.checkpoints import REPRESENTATION_PREFIXES

    run = root / "run"
    run.mkdir(parents=True)
    for stage in ("autoencoder", "latents", "diffusion"):
        (run / stage).symlink_to((probed.run / stage).resolve())
    shutil.copytree((probed.run / "representation").resolve(), run / "representation")
    shutil.copytree(probed.run / "evaluation", run / "evaluation")
    path = run / "representation" / "checkpoints" / "best.ckpt"
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    gen = torch.Generator().manual_seed(1)
    for key, value in ckpt["state_dict"].items():
        if key.startswith(REPRESENTATION_PREFIXES[True][0]) and value.is_floating_point():
            ckpt["state_dict"][key] = value + 0.01 * torch.randn(value.shape, generator=gen)
    torch.save(ckpt, path)
    return run


def test_stale_probes_of_a_retrained_representation_are_refused(probed: ProbedRun, tmp_path: Path, capsys):
    """The probes record the fingerprint of the encoder they were fitted on: after stage 3 changed, the
    old probes are refused with one line (they would give confident, meaningless P(AD) and ages)."""
    run = _run_with_retrained_representation(probed, tmp_path)
    code = main(["predict", "--model", str(run), probed.df["path"].iloc[0], "--device", "cpu"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1, err
    assert str(run / "evaluation" / "probes.json") in err[0]
    assert "the probes were fitted on another representation checkpoint" in err[0]
    assert str(probed.run / "representation" / "checkpoints" / "best.ckpt") in err[0]  # where they came from


def test_probes_without_fingerprint_warn(probed: ProbedRun, model, tmp_path: Path, caplog):
    """Probes written before fingerprints were recorded cannot be checked: used, with a warning."""
    from ldae.evaluation.probes import load_probes
    from ldae.jobs.predict import predict

    probes = load_probes(probed.run / "evaluation" / "probes.json")
    probes.pop("encoder_fingerprint")
    with caplog.at_level("WARNING"):
        res = predict(model, probed.df["path"].tolist()[:2], probes=probes, progress=False)
    assert "cannot be checked against this model" in caplog.text
    np.testing.assert_allclose(res.y_sem, probed.X[:2], atol=2e-4)  # see test_batching_does_not_change_results


def test_stage_folder_as_model_uses_the_runs_probes(probed: ProbedRun, capsys):
    """``--model RUN/representation``: the model of the run and its ``RUN/evaluation/probes.json``."""
    path = probed.df["path"].iloc[0]
    outs = []
    for model in (probed.run, probed.run / "representation"):
        assert main(["predict", "--model", str(model), path, "--json", "--device", "cpu"]) == 0
        outs.append(json.loads(capsys.readouterr().out))
    assert outs[1]["probes"] == outs[0]["probes"] == str(probed.run / "evaluation" / "probes.json")
    assert outs[1]["predictions"][0]["p_ad"] == pytest.approx(outs[0]["predictions"][0]["p_ad"], abs=1e-6)


# ----------------------------------------------------------------------------------- --preprocess
def test_preprocess_without_ants_says_so(probed: ProbedRun, model, monkeypatch):
    import ldae.jobs.preprocess as pre
    from ldae.jobs.predict import predict

    def no_ants():
        raise LDAEError(pre.INSTALL_HINT)

    monkeypatch.setattr(pre, "require_ants", no_ants)
    with pytest.raises(LDAEError, match="--preprocess: raw-T1 preprocessing needs ANTsPy"):
        predict(model, [probed.df["path"].iloc[0]], preprocess=True, progress=False)


def test_preprocess_runs_before_prediction(probed: ProbedRun, model, monkeypatch, tmp_path: Path):
    """The raw scan goes through preprocess_scan (stubbed: a 2-voxel shift, no ANTs run) into a temporary
    folder; results are those of the preprocessed volume but keep the user's file name."""
    import ldae.jobs.preprocess as pre
    from ldae.io import write_nifti
    from ldae.jobs.predict import predict

    calls = []

    def fake(src, out, cfg):
        data, affine = nib.load(str(src)).get_fdata(), nib.load(str(src)).affine
        calls.append((Path(src), Path(out), cfg["output"]["spacing"]))
        write_nifti(out, np.roll(data, 2, axis=0), affine)

    monkeypatch.setattr(pre, "require_ants", lambda: None)
    monkeypatch.setattr(pre, "preprocess_scan", fake)
    src = probed.df["path"].iloc[0]
    res = predict(model, [src], preprocess=True, progress=False)
    assert calls and calls[0][0] == Path(src) and not calls[0][1].exists()  # temporary folder removed
    assert res.scans == [src] and res.names == ["sub-0000_ses-M00_T1w"]
    shifted = _write(tmp_path / "shifted.nii.gz", np.roll(nib.load(src).get_fdata(), 2, axis=0))
    direct = predict(model, [shifted], progress=False)
    np.testing.assert_allclose(res.p_ad, direct.p_ad, atol=1e-7)
    plain = predict(model, [src], progress=False)
    assert not np.allclose(res.y_sem, plain.y_sem)
