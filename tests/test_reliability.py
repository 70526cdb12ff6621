"""Reliability: bad inputs through the CLI (exit 2, one stderr line naming the culprit, no partial output),
atomic writers, strict loading of mismatched stages, determinism, and (slow) SIGKILL + resume.

Fast tests use a *fabricated* run: every stage's checkpoint is written from a randomly initialised (and
perturbed, so that no output layer is trivially zero) module, and the latents are real ``compress`` output
of that autoencoder. That exercises every loader and command in seconds; trained weights change nothing
for the properties checked here.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from ldae.checkpoints import CHECKPOINT_KEY
from ldae.cli import main
from ldae.config import load_preset
from ldae.data.cohort import assign_splits, read_cohort, write_cohort
from ldae.data.phantom import write_phantom_cohort
from ldae.runs import COMPRESSED_CSV, LATENT_META, stage_dir

LDAE_EXE = str(Path(sys.executable).parent / "ldae")
SRC = Path(__file__).resolve().parents[1] / "src" / "ldae"


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread is as fast and avoids OpenMP contention on the shared cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------- fabricated run


def _perturb(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))


def _save(module, path: Path) -> Path:
    ckpt = {"state_dict": module.state_dict(), "epoch": 0, "global_step": 0}
    module.on_save_checkpoint(ckpt)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path


def make_autoencoder_ckpt(run: Path, seed: int = 0) -> Path:
    from ldae.training.autoencoder import AutoencoderModule

    torch.manual_seed(seed)
    cfg = load_preset("tiny", "autoencoder")
    cfg["out"] = str(stage_dir(run, "autoencoder"))
    module = AutoencoderModule(cfg)
    _perturb(module, seed)
    return _save(module, stage_dir(run, "autoencoder") / "checkpoints" / "best.ckpt")


def make_diffusion_ckpt(run: Path, latents_csv: Path, seed: int = 0, preset: str = "tiny",
                        model: dict | None = None) -> Path:
    from ldae.data.latents import read_latent_meta
    from ldae.training.latent_diffusion import LatentDiffusionModule

    meta = read_latent_meta(latents_csv)
    cfg = load_preset(preset, "diffusion")
    cfg["out"], cfg["data"]["csv"] = str(stage_dir(run, "diffusion")), str(latents_csv)
    cfg["model"].update(model or {})
    torch.manual_seed(seed)
    module = LatentDiffusionModule(cfg, meta["scale_factor"], meta["latent_shape"], meta["autoencoder_checkpoint"],
                                   meta["autoencoder_fingerprint"])
    _perturb(module, seed)
    return _save(module, stage_dir(run, "diffusion") / "checkpoints" / "best.ckpt")


def make_representation_ckpt(run: Path, diffusion: Path, seed: int = 0) -> Path:
    from ldae.training.representation import RepresentationModule

    cfg = load_preset("tiny", "representation")
    cfg["out"] = str(stage_dir(run, "representation"))
    torch.manual_seed(seed)
    module = RepresentationModule(cfg, str(diffusion))
    _perturb(module, seed)
    return _save(module, stage_dir(run, "representation") / "checkpoints" / "best.ckpt")


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """RUN/{autoencoder,latents,diffusion,representation} on a 6-subject phantom cohort (tiny preset)."""
    from ldae.jobs.compress import compress

    root = tmp_path_factory.mktemp("fake_run")
    csv = write_phantom_cohort(root / "cohort", n_subjects=6, sessions=(0, 12), seed=0)
    write_cohort(assign_splits(read_cohort(csv), test_fraction=0.2, val_fraction=0.2, seed=0), csv)
    run = root / "run"
    ae = make_autoencoder_ckpt(run)
    latents_csv = compress(ae, csv, stage_dir(run, "latents"))
    diffusion = make_diffusion_ckpt(run, latents_csv)
    make_representation_ckpt(run, diffusion)
    return run


@pytest.fixture(scope="module")
def model(fake_run: Path):
    from ldae.model import LDAE

    return LDAE.load(fake_run, steps=4)


def _scan(run: Path, i: int = 0) -> Path:
    return Path(read_cohort(stage_dir(run, "latents") / COMPRESSED_CSV)["path"].iloc[i])


# ---------------------------------------------------------------------- assertions


def one_error_line(capsys: pytest.CaptureFixture, command: str, code: int) -> str:
    """Exit code 2, exactly one non-empty stderr line ``ldae <command>: error: ...``, no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"ldae {command}: error: "), lines[0]
    return lines[0]


def temp_leftovers(folder: Path) -> list[Path]:
    """Files left by ``ldae.io.atomic_path`` (hidden ``.<name>.XXXX<suffix>``) under ``folder``."""
    return [p for p in folder.rglob(".*") if p.is_file()] if folder.exists() else []


def visible(folder: Path, pattern: str) -> list[Path]:
    """Files matching ``pattern`` that are not atomic-write temporaries (pathlib's ``*`` matches dot files)."""
    return sorted(p for p in folder.glob(pattern) if not p.name.startswith("."))


# ---------------------------------------------------------------------- bad volumes


def _write(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> None:
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))


def _ruin(path: Path, kind: str) -> None:
    """Replace a cohort volume by a broken one of the given kind."""
    img = nib.load(str(path))
    good, affine = np.asarray(img.dataobj, dtype=np.float32), img.affine  # the broken file keeps its geometry
    if kind == "missing":
        path.unlink()
    elif kind == "truncated_gzip":
        raw = path.read_bytes()
        path.write_bytes(raw[: len(raw) // 2])
    elif kind == "corrupt_gzip":
        path.write_bytes(gzip.compress(b"\x00garbage, not a NIfTI header" * 20))
    elif kind == "2d":
        _write(path, good[:, :, 0], affine)
    elif kind == "4d":
        _write(path, np.stack([good, good], axis=-1), affine)
    elif kind == "nan":
        good[3, 4, 5] = np.nan
        _write(path, good, affine)
    elif kind == "inf":
        good[1, 1, 1] = np.inf
        _write(path, good, affine)
    elif kind == "all_zero":
        _write(path, np.zeros_like(good), affine)
    else:  # pragma: no cover
        raise ValueError(kind)


BAD_VOLUMES = {
    "missing": r"row 4: column 'path': file not found: .*{name}",
    "truncated_gzip": r"{name}: cannot read NIfTI",
    "corrupt_gzip": r"{name}: cannot read NIfTI",
    "2d": r"{name}: expected a 3D volume, got 2D",
    "4d": r"{name}: expected a 3D volume, got 4D with shape \(32, 40, 32, 2\)",
    "nan": r"{name}: volume holds 1 NaN/inf voxel",
    "inf": r"{name}: volume holds 1 NaN/inf voxel",
    "all_zero": r"{name}: volume is constant \(value 0\)",
}


@pytest.mark.parametrize("kind", list(BAD_VOLUMES))
def test_check_bad_volume(kind: str, phantom_cohort: Path, capsys: pytest.CaptureFixture) -> None:
    """``ldae check --write-split``: one line naming the file, and the CSV is not touched."""
    victim = phantom_cohort.parent / pd.read_csv(phantom_cohort)["path"].iloc[2]
    _ruin(victim, kind)
    before = phantom_cohort.read_bytes()
    line = one_error_line(capsys, "check", main(["check", str(phantom_cohort), "--write-split"]))
    assert re.search(BAD_VOLUMES[kind].format(name=re.escape(victim.name)), line), line
    assert phantom_cohort.read_bytes() == before
    assert not temp_leftovers(phantom_cohort.parent)


@pytest.mark.parametrize("kind", ["truncated_gzip", "4d", "nan", "all_zero"])
def test_compress_bad_volume_leaves_no_cohort_csv(kind: str, fake_run: Path, phantom_cohort: Path,
                                                  tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    victim = phantom_cohort.parent / pd.read_csv(phantom_cohort)["path"].iloc[5]
    _ruin(victim, kind)
    out = tmp_path / "latents"
    code = main(["compress", "--autoencoder", str(fake_run), "--csv", str(phantom_cohort), "--out", str(out),
                 "--batch-size", "2"])
    line = one_error_line(capsys, "compress", code)
    assert re.search(BAD_VOLUMES[kind].format(name=re.escape(victim.name)), line), line
    assert not (out / COMPRESSED_CSV).exists() and not (out / LATENT_META).exists()
    assert not temp_leftovers(out)
    for npz in out.rglob("*.npz"):  # latents of earlier batches are complete files
        with np.load(npz) as data:
            assert data["latent"].shape == (3, 8, 10, 8)


def test_reconstruct_bad_scan_writes_nothing(fake_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    scan = tmp_path / "scan.nii.gz"
    shutil.copy(_scan(fake_run), scan)
    _ruin(scan, "nan")
    out = tmp_path / "out"
    code = main(["reconstruct", "--model", str(fake_run), str(scan), "--out", str(out), "--device", "cpu"])
    assert "scan.nii.gz: volume holds 1 NaN/inf voxel" in one_error_line(capsys, "reconstruct", code)
    assert not out.exists() or not list(out.iterdir())


# ---------------------------------------------------------------------- bad cohort CSVs


def _bad_csv(csv: Path, kind: str) -> tuple[Path, str]:
    """A broken copy of a cohort CSV (beside it, so relative paths resolve) and the expected message."""
    df = pd.read_csv(csv)
    bad = csv.parent / f"bad_{kind}.csv"
    if kind == "missing_column":
        df = df.drop(columns=["age"])
        expected = r"missing required column\(s\): age"
    elif kind == "duplicate":
        df.loc[3, ["subject", "session"]] = df.loc[2, ["subject", "session"]].to_numpy()
        expected = r"row 5: duplicate \(subject, session\) = \(sub-0001, 0\)"
    elif kind == "age":
        df["age"] = df["age"].astype(object)
        df.loc[1, "age"] = "seventy"
        expected = r"row 3: column 'age' has non-numeric value 'seventy'"
    elif kind == "diagnosis":
        df.loc[4, "diagnosis"] = "FTD"
        expected = r"row 6: column 'diagnosis' has unknown value 'FTD'"
    elif kind == "empty":
        bad.write_text("")
        return bad, r"bad_empty.csv.*empty"
    elif kind == "header_only":
        df = df.iloc[:0]
        expected = r"no rows"
    elif kind == "no_such_file":
        return csv.parent / "absent.csv", r"absent.csv"
    else:  # pragma: no cover
        raise ValueError(kind)
    df.to_csv(bad, index=False)
    return bad, expected


BAD_CSVS = ["missing_column", "duplicate", "age", "diagnosis", "empty", "header_only", "no_such_file"]


@pytest.mark.parametrize("kind", BAD_CSVS)
def test_check_bad_csv(kind: str, phantom_cohort: Path, capsys: pytest.CaptureFixture) -> None:
    bad, expected = _bad_csv(phantom_cohort, kind)
    line = one_error_line(capsys, "check", main(["check", str(bad), "--no-volumes"]))
    assert re.search(expected, line) and bad.name in line, line


@pytest.mark.parametrize("kind", BAD_CSVS)
def test_fit_bad_csv_creates_no_run(kind: str, phantom_cohort: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture) -> None:
    bad, expected = _bad_csv(phantom_cohort, kind)
    out = tmp_path / "run"
    code = main(["fit", "--preset", "tiny", "--stage", "autoencoder", "--data.csv", str(bad), "--out", str(out)])
    line = one_error_line(capsys, "fit", code)
    assert re.search(expected, line) and bad.name in line, line
    assert not out.exists()


def test_compress_and_evaluate_bad_csv(fake_run: Path, phantom_cohort: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture) -> None:
    bad, expected = _bad_csv(phantom_cohort, "diagnosis")
    out = tmp_path / "latents"
    code = main(["compress", "--autoencoder", str(fake_run), "--csv", str(bad), "--out", str(out)])
    assert re.search(expected, one_error_line(capsys, "compress", code))
    assert not out.exists()
    out = tmp_path / "evaluation"
    code = main(["evaluate", "--model", str(fake_run), "--csv", str(bad), "--out", str(out), "--preset", "tiny"])
    assert re.search(expected, one_error_line(capsys, "evaluate", code))
    assert not (out / "metrics.json").exists() and not temp_leftovers(out)


# ---------------------------------------------------------------------- bad latents (stage 2 / 3 fit)


def _copy_latents(run: Path, dest: Path) -> Path:
    shutil.copytree(stage_dir(run, "latents"), dest)
    df = pd.read_csv(dest / COMPRESSED_CSV)
    df["path"] = [str((stage_dir(run, "latents") / p).resolve()) for p in df["path"]]
    df.to_csv(dest / COMPRESSED_CSV, index=False)
    return dest / COMPRESSED_CSV


@pytest.mark.parametrize(
    "kind,expected",
    [
        ("shape", r"{name}: latent has shape \(3, 4, 5, 4\), expected \(3, 8, 10, 8\)"),
        ("corrupt", r"{name}: cannot read latent NPZ"),
        ("nan", r"{name}: latent holds NaN/inf values"),
    ],
)
@pytest.mark.parametrize("stage", ["diffusion", "representation"])
def test_fit_bad_latent_creates_no_run(stage: str, kind: str, expected: str, fake_run: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture) -> None:
    csv = _copy_latents(fake_run, tmp_path / "latents")
    victim = Path(read_cohort(csv)["latent_path"].iloc[7])
    if kind == "shape":
        np.savez_compressed(victim, latent=np.ones((3, 4, 5, 4), np.float32))
    elif kind == "corrupt":
        victim.write_bytes(victim.read_bytes()[:50])
    else:
        np.savez_compressed(victim, latent=np.full((3, 8, 10, 8), np.nan, np.float32))
    out = tmp_path / "run"
    args = ["fit", "--preset", "tiny", "--stage", stage, "--data.csv", str(csv), "--out", str(out)]
    if stage == "representation":
        args += ["--diffusion_checkpoint", str(stage_dir(fake_run, "diffusion") / "checkpoints" / "best.ckpt")]
    line = one_error_line(capsys, "fit", main(args))
    assert re.search(expected.format(name=re.escape(victim.name)), line), line
    assert not out.exists()


# ---------------------------------------------------------------------- checkpoints of another stage / preset


def test_checkpoint_of_another_stage(fake_run: Path, phantom_cohort: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture) -> None:
    diffusion = stage_dir(fake_run, "diffusion") / "checkpoints" / "best.ckpt"
    autoencoder = stage_dir(fake_run, "autoencoder") / "checkpoints" / "best.ckpt"
    out = tmp_path / "latents"
    code = main(["compress", "--autoencoder", str(diffusion), "--csv", str(phantom_cohort), "--out", str(out)])
    line = one_error_line(capsys, "compress", code)
    assert f"{diffusion}: this is a checkpoint of stage 'diffusion', expected stage 'autoencoder'" in line
    assert not out.exists()

    run = tmp_path / "rep"
    code = main(["fit", "--preset", "tiny", "--stage", "representation", "--out", str(run),
                 "--data.csv", str(stage_dir(fake_run, "latents") / COMPRESSED_CSV),
                 "--diffusion_checkpoint", str(autoencoder)])
    line = one_error_line(capsys, "fit", code)
    assert f"{autoencoder}: this is a checkpoint of stage 'autoencoder', expected stage 'diffusion'" in line
    assert not run.exists()

    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(autoencoder.read_bytes()[:4096])
    code = main(["compress", "--autoencoder", str(truncated), "--csv", str(phantom_cohort), "--out", str(out)])
    assert f"{truncated}: cannot load checkpoint" in one_error_line(capsys, "compress", code)
    assert not out.exists()


def _run_on_other_diffusion(fake_run: Path, root: Path, **diffusion_kwargs) -> Path:
    """A run folder whose representation checkpoint (of ``fake_run``) names another diffusion checkpoint."""
    other = make_diffusion_ckpt(root / "other", stage_dir(fake_run, "latents") / COMPRESSED_CSV, **diffusion_kwargs)
    rep = stage_dir(fake_run, "representation") / "checkpoints" / "best.ckpt"
    ckpt = torch.load(rep, map_location="cpu", weights_only=True)
    ckpt[CHECKPOINT_KEY]["diffusion_checkpoint"] = str(other)
    run = root / "run"
    (stage_dir(run, "representation") / "checkpoints").mkdir(parents=True)
    torch.save(ckpt, stage_dir(run, "representation") / "checkpoints" / "best.ckpt")
    return run


@pytest.mark.parametrize(
    "other,expected",
    [
        ({"preset": "small", "model": {"channels": [16, 32], "attention_factors": [2], "num_heads": 2,
                                       "norm_num_groups": 8}},
         r"was trained on a diffusion UNet of another configuration \(preset 'tiny'\) than the one in .*other.*"
         r"\(preset 'small'\)"),
        ({"seed": 1}, r"was trained on other diffusion weights than those in .*other.*fingerprint differs"),
    ],
    ids=["other_preset", "other_weights"],
)
def test_ldae_load_refuses_another_diffusion_model(other: dict, expected: str, fake_run: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    run = _run_on_other_diffusion(fake_run, tmp_path, **other)
    out = tmp_path / "out"
    code = main(["reconstruct", "--model", str(run), str(_scan(fake_run)), "--out", str(out), "--device", "cpu"])
    assert re.search(expected, one_error_line(capsys, "reconstruct", code))
    assert not out.exists()


def test_console_script_prints_exactly_one_line(phantom_cohort: Path, tmp_path: Path) -> None:
    """The real console script: stderr is exactly the error line (no logging noise, no traceback)."""
    bad, _ = _bad_csv(phantom_cohort, "duplicate")
    proc = subprocess.run([LDAE_EXE, "check", str(bad)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"ldae check: error: {bad}: row 5: duplicate (subject, session) = (sub-0001, 0)"
    ]


# ---------------------------------------------------------------------- atomic outputs

WRITER_CALL = re.compile(
    r"np\.save(z|z_compressed)?\(|nib\.save\(|torch\.save\(|\.to_csv\(|\.savefig\(|\.write_text\(|"
    r"\.write_bytes\(|json\.dump\(|\.to_filename\(|image_write\(|shutil\.copy|"
    r"open\([^)]*[\"'][wax]b?\+?[\"']"
)


def test_every_writer_in_the_package_goes_through_atomic_path() -> None:
    """Static audit: a raw writer call is only allowed on the temporary path of ``ldae.io.atomic_path``
    (the variable ``tmp``) — anything else could leave a half-written file under its final name."""
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if WRITER_CALL.search(code) and "tmp" not in code and "/proc/" not in code:  # /proc: kernel knobs
                offenders.append(f"{path.relative_to(SRC)}:{lineno}: {line.strip()}")
    assert not offenders, "non-atomic writes:\n" + "\n".join(offenders)


def _fail_midway_now(path: str | os.PathLike) -> None:
    Path(path).write_bytes(b"half a file")
    raise OSError(28, "No space left on device")


def _fail_midway(monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> None:
    """Patch the writer ``module.name`` to write a few bytes to its path argument, then fail."""

    def broken(*args, **kwargs):
        _fail_midway_now(next(a for a in args if isinstance(a, (str, os.PathLike))))

    monkeypatch.setattr(module, name, broken)


def test_writers_leave_nothing_when_interrupted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ldae import io
    from ldae.training.common import make_checkpoint_io

    cases = [
        (np, "savez_compressed", lambda p: io.write_npz(p, latent=np.zeros(3)), "a.npz"),
        (nib, "save", lambda p: io.write_nifti(p, np.ones((4, 4, 4)), np.eye(4)), "a.nii.gz"),
        (torch, "save", lambda p: io.save_torch(p, {"x": 1}), "a.pt"),
        (torch, "save", lambda p: make_checkpoint_io().save_checkpoint({"x": 1}, p), "last.ckpt"),
    ]
    for module, name, write, filename in cases:
        with monkeypatch.context() as m:
            _fail_midway(m, module, name)
            with pytest.raises(OSError, match="No space left"):
                write(tmp_path / filename)
        assert not (tmp_path / filename).exists(), filename
    with monkeypatch.context() as m:
        m.setattr(pd.DataFrame, "to_csv", lambda self, path, **kw: _fail_midway_now(path))
        with pytest.raises(OSError):
            io.write_csv(tmp_path / "a.csv", pd.DataFrame({"a": [1]}))
    assert not (tmp_path / "a.csv").exists()
    # an existing file survives a failed rewrite unchanged
    io.write_text(tmp_path / "keep.txt", "old")
    with monkeypatch.context() as m, pytest.raises(OSError):
        m.setattr(Path, "write_text", lambda self, text: _fail_midway_now(self))
        io.write_text(tmp_path / "keep.txt", "new")
    assert (tmp_path / "keep.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_compress_interrupted_by_a_failing_write(fake_run: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A write failing on the 3rd latent: no cohort CSV/meta, the written latents are complete, no temp files."""
    from ldae.jobs.compress import compress

    real = np.savez_compressed
    calls = {"n": 0}

    def flaky(path, **arrays):  # what ldae.io.write_npz calls on its temporary path
        calls["n"] += 1
        if calls["n"] == 3:
            _fail_midway_now(path)
        return real(path, **arrays)

    monkeypatch.setattr(np, "savez_compressed", flaky)
    out = tmp_path / "latents"
    with pytest.raises(OSError, match="No space left"):
        compress(stage_dir(fake_run, "autoencoder") / "checkpoints" / "best.ckpt",
                                 stage_dir(fake_run, "latents") / COMPRESSED_CSV, out, batch_size=1)
    assert not (out / COMPRESSED_CSV).exists() and not (out / LATENT_META).exists()
    written = visible(out / "latents", "*.npz")
    assert len(written) == 2 and not temp_leftovers(out)
    for npz in written:
        with np.load(npz) as data:
            assert data["latent"].shape == (3, 8, 10, 8)


# ---------------------------------------------------------------------- strict, safe loading


def test_every_torch_load_is_weights_only() -> None:
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        text = path.read_text()
        for match in re.finditer(r"torch\.load\(([^()]|\([^()]*\))*\)", text):
            if "weights_only=True" not in match.group(0):
                offenders.append(f"{path.relative_to(SRC)}: {match.group(0)}")
        for match in re.finditer(r"load_state_dict\(([^()]|\([^()]*\))*\)", text):
            call = match.group(0)
            if "strict=False" in call:
                offenders.append(f"{path.relative_to(SRC)}: {call}")
    assert not offenders, "\n".join(offenders)


def test_stage_loaders_refuse_extra_or_missing_weights(fake_run: Path, tmp_path: Path) -> None:
    """Every stage loader is strict: one extra and one missing key are both named."""
    from ldae.checkpoints import load_autoencoder, load_latent_diffusion, load_representation
    from ldae.errors import CheckpointError

    loaders = {"autoencoder": load_autoencoder, "diffusion": load_latent_diffusion,
               "representation": load_representation}
    prefixes = {"autoencoder": "autoencoder.", "diffusion": "ema.module.", "representation": "ema_encoder.module."}
    for stage, loader in loaders.items():
        ckpt = torch.load(stage_dir(fake_run, stage) / "checkpoints" / "best.ckpt", map_location="cpu",
                          weights_only=True)
        state = ckpt["state_dict"]
        dropped = next(k for k in state if k.startswith(prefixes[stage]))
        del state[dropped]
        state[prefixes[stage] + "surplus.weight"] = torch.zeros(1)
        path = tmp_path / f"{stage}.ckpt"
        torch.save(ckpt, path)
        with pytest.raises(CheckpointError) as info:
            loader(path)
        msg = str(info.value)
        assert str(path) in msg and "1 missing key(s)" in msg and "1 unexpected key(s): surplus.weight" in msg
        assert dropped[len(prefixes[stage]):] in msg


# ---------------------------------------------------------------------- determinism


def test_compress_is_deterministic(fake_run: Path, tmp_path: Path) -> None:
    from ldae.jobs.compress import compress

    ae = stage_dir(fake_run, "autoencoder") / "checkpoints" / "best.ckpt"
    csv = stage_dir(fake_run, "latents") / COMPRESSED_CSV
    outs = [compress(ae, csv, tmp_path / f"latents{i}", batch_size=2) for i in range(2)]
    a, b = (read_cohort(o)["latent_path"] for o in outs)
    for pa, pb in zip(a, b):
        with np.load(pa) as za, np.load(pb) as zb:
            assert np.array_equal(za["latent"], zb["latent"])
    ma, mb = (json.loads((o.parent / LATENT_META).read_text()) for o in outs)
    assert ma["scale_factor"] == mb["scale_factor"]


def test_reconstruction_and_sampling_are_deterministic(model, fake_run: Path) -> None:
    x, _ = model.load_volume(_scan(fake_run))
    r1, r2 = model.reconstruct(x), model.reconstruct(x)
    assert torch.equal(r1, r2)
    y1, z1 = model.encode(x)
    y2, z2 = model.encode(x)
    assert torch.equal(y1, y2) and torch.equal(z1, z2)
    v1, v2, v3 = (model.variations(x, 2, seed=s) for s in (3, 3, 4))
    assert torch.equal(v1, v2)
    assert not torch.equal(v1, v3)
    assert torch.equal(model.generate(2, seed=5), model.generate(2, seed=5))
    torch.manual_seed(123)  # the global RNG does not leak into seeded operations
    assert torch.equal(model.semantic_only(x, seed=7), model.semantic_only(x, seed=7))


def test_cli_reconstruct_twice_writes_identical_volumes(fake_run: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    arrays = []
    for i in range(2):
        out = tmp_path / f"out{i}"
        assert main(["reconstruct", "--model", str(fake_run), str(_scan(fake_run)), "--out", str(out),
                     "--steps", "3", "--device", "cpu"]) == 0
        (nii,) = out.glob("*_recon.nii.gz")
        arrays.append(np.asarray(nib.load(str(nii)).dataobj))
    assert np.array_equal(arrays[0], arrays[1])


# ---------------------------------------------------------------------- self-contained run folders


def _reconstruct_cli(model: Path, scan: Path, out: Path) -> np.ndarray:
    """``ldae reconstruct --model MODEL SCAN`` (3 DDIM steps); the written volume."""
    assert main(["reconstruct", "--model", str(model), str(scan), "--out", str(out), "--steps", "3",
                 "--device", "cpu"]) == 0
    (nii,) = out.glob("*_recon.nii.gz")
    return np.asarray(nib.load(str(nii)).dataobj)


def test_copied_run_uses_its_own_stages(fake_run: Path, tmp_path: Path) -> None:
    """A copied run folder loads its own autoencoder and diffusion model: replacing the original's stages
    changes nothing in the copy's output (and the original then refuses its replaced stages)."""
    original = shutil.copytree(fake_run, tmp_path / "original")
    copy = shutil.copytree(original, tmp_path / "copy")
    scan = _scan(fake_run)
    before = _reconstruct_cli(copy, scan, tmp_path / "before")
    make_autoencoder_ckpt(original, seed=1)
    make_diffusion_ckpt(original, stage_dir(original, "latents") / COMPRESSED_CSV, seed=1)
    assert np.array_equal(_reconstruct_cli(copy, scan, tmp_path / "after"), before)
    from ldae.errors import CheckpointError
    from ldae.model import LDAE

    model = LDAE.load(copy)
    assert {s: Path(p) for s, p in model.checkpoints.items()} == {
        s: stage_dir(copy, s) / "checkpoints" / "best.ckpt" for s in ("autoencoder", "diffusion", "representation")}
    with pytest.raises(CheckpointError, match=r"was trained on other diffusion weights than those in .*original"):
        LDAE.load(original)


def test_replaced_autoencoder_is_refused(fake_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The autoencoder fingerprint recorded by compress and stage 2 is checked at load: another
    autoencoder in the run folder stops every command with one line (nothing written)."""
    run = shutil.copytree(fake_run, tmp_path / "run")
    make_autoencoder_ckpt(run, seed=1)
    out = tmp_path / "out"
    code = main(["reconstruct", "--model", str(run), str(_scan(fake_run)), "--out", str(out), "--device", "cpu"])
    line = one_error_line(capsys, "reconstruct", code)
    ae = stage_dir(run, "autoencoder") / "checkpoints" / "best.ckpt"
    assert f"was trained on other autoencoder weights than those in {ae} (weights fingerprint differs)" in line
    assert not out.exists()
    code = main(["generate", "--model", str(run), "--n", "1", "--steps", "2", "--out", str(out), "--device", "cpu"])
    assert "other autoencoder weights" in one_error_line(capsys, "generate", code)
    assert not out.exists()


def _as_format1(ckpt_path: Path, paths: dict[str, str]) -> None:
    """Rewrite a checkpoint's metadata the way ldae wrote it before format 2: no format key, no relative
    paths, no autoencoder fingerprint, upstream paths as given on the command line (``paths``)."""
    from ldae.checkpoints import CHECKPOINT_KEY

    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    meta = ckpt[CHECKPOINT_KEY]
    for key in [k for k in meta if k == "format" or k.endswith("_relative") or k == "autoencoder_fingerprint"]:
        del meta[key]
    meta.update({f"{stage}_checkpoint": path for stage, path in paths.items()})
    torch.save(ckpt, ckpt_path)


def test_format1_checkpoints_load_from_their_run_never_the_cwd(fake_run: Path, model, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Checkpoints written by the previous code still load. Their upstream paths were stored as given
    (here relative to the directory training ran in): they are never resolved against the current
    directory (a decoy diffusion model waits there), the run folder's own stages are used."""
    from ldae.model import LDAE

    run = shutil.copytree(fake_run, tmp_path / "old" / "run")
    rel = {s: str(Path("run") / s / "checkpoints" / "best.ckpt") for s in ("autoencoder", "diffusion")}
    _as_format1(stage_dir(run, "diffusion") / "checkpoints" / "best.ckpt", {"autoencoder": rel["autoencoder"]})
    _as_format1(stage_dir(run, "representation") / "checkpoints" / "best.ckpt", rel)
    cwd = tmp_path / "cwd"
    make_diffusion_ckpt(cwd / "run", stage_dir(fake_run, "latents") / COMPRESSED_CSV, seed=1)  # the decoy
    monkeypatch.chdir(cwd)
    old = LDAE.load(run, steps=model.steps)
    assert old.metadata["representation"].format == 1 and old.metadata["diffusion"].format == 1
    assert Path(old.checkpoints["diffusion"]) == stage_dir(run, "diffusion") / "checkpoints" / "best.ckpt"
    x = old.load_volume(_scan(fake_run))[0]
    torch.testing.assert_close(old.reconstruct(x), model.reconstruct(x), rtol=0, atol=0)


def test_stage_folder_as_model(fake_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``--model RUN/representation`` loads the run it belongs to; a stage folder whose diffusion model is
    nowhere to be found says so (not "expected stage 'diffusion'")."""
    scan = _scan(fake_run)
    whole = _reconstruct_cli(fake_run, scan, tmp_path / "whole")
    assert np.array_equal(_reconstruct_cli(stage_dir(fake_run, "representation"), scan, tmp_path / "stage"), whole)
    alone = shutil.copytree(stage_dir(fake_run, "representation"), tmp_path / "alone" / "representation")
    gone = tmp_path / "gone" / "best.ckpt"
    _as_format1(alone / "checkpoints" / "best.ckpt", {"diffusion": str(gone)})
    out = tmp_path / "out"
    code = main(["reconstruct", "--model", str(alone), str(scan), "--out", str(out), "--device", "cpu"])
    line = one_error_line(capsys, "reconstruct", code)
    assert f"the diffusion checkpoint it was trained on (recorded as '{gone}') was not found" in line
    assert str(tmp_path / "alone" / "diffusion" / "checkpoints" / "best.ckpt") in line
    assert "expected stage" not in line and not out.exists()


def test_foreign_probes_are_refused_by_manipulate(fake_run: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    """Probes saved for another representation checkpoint (other encoder fingerprint) are refused."""
    from ldae.evaluation.probes import save_probes

    run = shutil.copytree(fake_run, tmp_path / "run")
    d = int(load_preset("tiny", "representation")["model"]["semantic_encoder"]["emb_dim"])
    lin = {"coef": np.ones(d), "intercept": 0.0, "mean": np.zeros(d), "scale": np.ones(d)}
    ad = dict(lin, direction=np.ones(d) / np.sqrt(d), classes=["CN", "AD"], positive_class="AD", C=1.0, threshold=0.5)
    save_probes(stage_dir(run, "evaluation") / "probes.json", ad, dict(lin, alpha=1.0),
                encoder_fingerprint="0" * 64, representation_checkpoint="/elsewhere/best.ckpt")
    out = tmp_path / "out"
    code = main(["manipulate", "--model", str(run), str(_scan(fake_run)), "--out", str(out), "--device", "cpu"])
    line = one_error_line(capsys, "manipulate", code)
    assert "the probes were fitted on another representation checkpoint (/elsewhere/best.ckpt)" in line
    assert not out.exists()


# ---------------------------------------------------------------------- interruption (real SIGKILL)


def _popen(args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([LDAE_EXE, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=env)


def _kill_when(proc: subprocess.Popen, ready, delay: float = 0.0, timeout: float = 600) -> None:
    """SIGKILL ``proc`` (our own process group) ``delay`` s after ``ready()`` turns true."""
    start = time.monotonic()
    while not ready():
        assert proc.poll() is None, f"finished before it could be killed: {proc.communicate()[1][-2000:]}"
        assert time.monotonic() - start < timeout, "timed out waiting"
        time.sleep(0.02)
    time.sleep(delay)
    assert proc.poll() is None, "finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([LDAE_EXE, *args], capture_output=True, text=True, env=env, timeout=900)


FAST_AE = ["--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
           "--trainer.precision", "32-true", "--trainer.enable_progress_bar", "false"]


def _ckpt_progress(path: Path) -> tuple[int, int]:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return int(ckpt["epoch"]), int(ckpt["global_step"])


@pytest.mark.slow
def test_fit_killed_mid_epoch_resumes(phantom_cohort: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["fit", "--preset", "tiny", "--stage", "autoencoder", "--data.csv", str(phantom_cohort),
            "--out", str(out), "--trainer.max_epochs", "4", "--loss.adversarial_warmup_epochs", "2", *FAST_AE]
    last = out / "checkpoints" / "last.ckpt"
    _kill_when(_popen(args), last.is_file, delay=0.3)
    killed_epoch, killed_step = _ckpt_progress(last)  # loads: the kill left no corrupt checkpoint
    assert killed_epoch < 3
    assert not temp_leftovers(out)
    again = _run(args)  # without --resume the run folder is protected
    assert again.returncode == 2 and "pass --resume" in again.stderr.strip().splitlines()[-1]
    resumed = _run([*args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Restored all states from the checkpoint at {last}" in resumed.stderr
    epoch, step = _ckpt_progress(last)
    # epochs 0-1: generator steps only (adversary warm-up), epochs 2-3: generator + discriminator
    assert (epoch, step) == (3, 2 + 2 + 4 + 4)
    metrics = pd.read_csv(out / "logs" / "metrics.csv")
    val = metrics.dropna(subset=["val/ssim"])
    assert sorted(set(val["epoch"])) == [0, 1, 2, 3]  # the log kept the epoch before the kill
    assert (val["epoch"] == 0).sum() == 1
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]


@pytest.mark.slow
def test_pipeline_killed_resumes_by_itself(phantom_cohort: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    fast = [a if not a.startswith("--trainer.") else "--autoencoder." + a[2:] for a in FAST_AE]
    args = ["pipeline", "--preset", "tiny", "--csv", str(phantom_cohort), "--out", str(out),
            "--steps", "autoencoder", "compress", "--autoencoder.trainer.max_epochs", "3", *fast]
    last = stage_dir(out, "autoencoder") / "checkpoints" / "last.ckpt"
    _kill_when(_popen(args), last.is_file, delay=0.3)
    assert not (stage_dir(out, "autoencoder") / "done.json").exists()
    resumed = _run(args)  # the same command again: no --resume needed
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restored all states from the checkpoint" in resumed.stderr
    assert _ckpt_progress(last)[0] == 2
    assert (stage_dir(out, "autoencoder") / "done.json").is_file()
    df = read_cohort(stage_dir(out, "latents") / COMPRESSED_CSV)
    assert all(Path(p).is_file() for p in df["latent_path"])
    again = _run(args)  # everything done: both steps skipped, keeping the seconds they took (issue 21)
    secs = {step: json.loads((stage_dir(out, folder) / "done.json").read_text())["seconds"]
            for step, folder in (("autoencoder", "autoencoder"), ("compress", "latents"))}
    assert again.returncode == 0, again.stderr[-3000:]
    assert (f"autoencoder {secs['autoencoder']:.0f} s (done before), compress {secs['compress']:.0f} s (done before)"
            in again.stdout)
    assert json.loads((out / "timings.json").read_text()) == pytest.approx(secs)
    assert not (out / "ldae.lock").exists()


@pytest.mark.slow
def test_compress_and_synth_rerun_after_sigkill(fake_run: Path, tmp_path: Path) -> None:
    csv = write_phantom_cohort(tmp_path / "cohort", n_subjects=20, sessions=(0, 12, 24), seed=1)
    out = tmp_path / "latents"
    args = ["compress", "--autoencoder", str(fake_run), "--csv", str(csv), "--out", str(out), "--batch-size", "1"]
    _kill_when(_popen(args), lambda: bool(visible(out / "latents", "*.npz")))
    assert not (out / COMPRESSED_CSV).exists()
    done = _run(args)
    assert done.returncode == 0, done.stderr[-3000:]
    encoded_now = int(re.search(r"(\d+) encoded now", done.stdout).group(1))
    assert 0 < encoded_now < 60  # the rerun skipped the latents finished before the kill
    df = read_cohort(out / COMPRESSED_CSV)
    assert len(df) == 60 and not temp_leftovers(out)
    for p in df["latent_path"]:
        with np.load(p) as data:
            assert data["latent"].shape == (3, 8, 10, 8) and np.isfinite(data["latent"]).all()

    synth = tmp_path / "synth"
    args = ["synth", "--out", str(synth), "--subjects", "3", "--shape", "32", "40", "32", "--spacing", "6",
            "--workers", "1", "--quiet"]
    _kill_when(_popen(args), lambda: bool(visible(synth / "images", "*.nii.gz")))
    done = _run(args)
    assert done.returncode == 0, done.stderr[-3000:]
    skipped = int(re.search(r"(\d+) written, (\d+) already complete", done.stdout).group(2))
    assert skipped >= 1  # volumes finished before the kill are complete files and are kept
    df = read_cohort(synth / "cohort.csv")
    assert not temp_leftovers(synth)
    for p in df["path"]:
        assert np.isfinite(np.asarray(nib.load(p).dataobj)).all()
