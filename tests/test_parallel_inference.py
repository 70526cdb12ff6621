"""Data-parallel inference (``ldae compress`` and ``ldae encode --csv`` with ``--devices 2``: two CPU
processes over gloo, launched by Lightning Fabric) gives the same outputs as one process, written once by
the main process, and a failure in either process stops both with the user's error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ldae.data.cohort import read_cohort, write_cohort
from ldae.distributed import Workers
from ldae.runs import COMPRESSED_CSV, LATENT_META, stage_dir

pytestmark = pytest.mark.slow


def _ldae(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "ldae", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


@pytest.fixture(scope="module")
def cohort(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """7 scans of the tiny run's cohort (odd: the two processes get 4 and 3), all splits present."""
    df = read_cohort(stage_dir(tiny_run, "latents") / COMPRESSED_CSV).drop(columns=["latent_path"])
    df = pd.concat([df[df["split"] == s].iloc[:n] for s, n in (("train", 4), ("val", 1), ("test", 2))])
    return write_cohort(df, tmp_path_factory.mktemp("pinf") / "cohort.csv")


def _ae(tiny_run: Path) -> str:
    return str(stage_dir(tiny_run, "autoencoder") / "checkpoints" / "best.ckpt")


def test_compress_on_two_processes_equals_one(tiny_run: Path, cohort: Path, tmp_path: Path) -> None:
    outs = {}
    for devices in (1, 2):
        out = tmp_path / f"out{devices}"
        proc = _ldae("compress", "--autoencoder", _ae(tiny_run), "--csv", str(cohort), "--out", str(out),
                     "--devices", str(devices), "--batch-size", "2")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.count("latents:") == 1 and "7 encoded now" in proc.stdout
        outs[devices] = out
    one, two = (pd.read_csv(outs[d] / COMPRESSED_CSV) for d in (1, 2))
    assert [Path(p).name for p in one["latent_path"]] == [Path(p).name for p in two["latent_path"]]
    pd.testing.assert_frame_equal(one.drop(columns="latent_path"), two.drop(columns="latent_path"))
    for a, b in zip(one["latent_path"], two["latent_path"]):
        with np.load(outs[1] / a) as za, np.load(outs[2] / b) as zb:
            assert za["latent"].std() > 0
            np.testing.assert_allclose(za["latent"], zb["latent"], rtol=0, atol=1e-5)
    m1, m2 = (json.loads((outs[d] / LATENT_META).read_text()) for d in (1, 2))
    assert m2["n_latents"] == 7 and m2["encoded_last_run"] == 7
    assert m2["scale_factor"] == pytest.approx(m1["scale_factor"], rel=1e-6)
    assert sorted(p.name for p in outs[2].iterdir()) == sorted([COMPRESSED_CSV, LATENT_META, "latents"])
    assert len(list((outs[2] / "latents").iterdir())) == 7  # no temporary or per-process leftovers

    rerun = _ldae("compress", "--autoencoder", _ae(tiny_run), "--csv", str(cohort), "--out", str(outs[2]),
                  "--devices", "2")
    assert rerun.returncode == 0 and "0 encoded now" in rerun.stdout


def test_failure_in_one_process_stops_both(tiny_run: Path, cohort: Path, tmp_path: Path) -> None:
    df = read_cohort(cohort)
    bad = tmp_path / "truncated.nii.gz"
    bad.write_bytes(Path(df["path"].iloc[1]).read_bytes()[:200])
    df.loc[df.index[1], "path"] = str(bad)  # row 1: the second process's share
    csv = write_cohort(df, tmp_path / "cohort.csv")
    proc = _ldae("compress", "--autoencoder", _ae(tiny_run), "--csv", str(csv), "--out", str(tmp_path / "out"),
                 "--devices", "2", timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ldae compress: error:")]
    assert errors and all("truncated.nii.gz" in line for line in errors), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / LATENT_META).exists() and not (tmp_path / "out" / COMPRESSED_CSV).exists()


def test_encode_csv_on_two_processes_equals_one(tiny_run: Path, cohort: Path, tmp_path: Path) -> None:
    for devices in (1, 2):
        proc = _ldae("encode", "--model", str(tiny_run), "--csv", str(cohort), "--out", str(tmp_path / f"e{devices}"),
                     "--steps", "2", "--device", "cpu", "--devices", str(devices))
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.count("scan(s) encoded") == 1
    df = read_cohort(cohort)
    with np.load(tmp_path / "e1" / "encodings.npz") as one, np.load(tmp_path / "e2" / "encodings.npz") as two:
        expected = [f"{s}_M{int(m):03d}" for s, m in zip(df["subject"], df["session"])]
        assert list(one["names"]) == list(two["names"]) == expected
        assert one["y_sem"].shape == (7, two["y_sem"].shape[1]) and one["z_T"].shape[0] == 7
        assert np.abs(one["y_sem"] - one["y_sem"][:1]).max() > 0  # different scans, different vectors
        np.testing.assert_allclose(one["y_sem"], two["y_sem"], rtol=0, atol=1e-5)
        np.testing.assert_allclose(one["z_T"], two["z_T"], rtol=0, atol=1e-4)


def test_workers_share_out_every_item_once() -> None:
    import torch

    items = list(range(11))
    shares = [Workers(rank=r, world_size=3, device=torch.device("cpu")).shard(items) for r in range(3)]
    assert sorted(sum(shares, [])) == items and [len(s) for s in shares] == [4, 4, 3]
    solo = Workers(rank=0, world_size=1, device=torch.device("cpu"))
    assert solo.shard(items) == items and solo.gather("x") == ["x"] and solo.broadcast(5) == 5
    with pytest.raises(ValueError, match="boom"):
        solo.together(lambda: (_ for _ in ()).throw(ValueError("boom")))


def test_launch_rejects_bad_device_arguments() -> None:
    from ldae.distributed import launch
    from ldae.errors import ConfigError

    assert launch("cpu").device.type == "cpu" and launch("cpu").world_size == 1
    for kwargs, message in (({"device": "tpu9"}, "tpu9"), ({"device": "cuda:x"}, "index"),
                            ({"device": "cpu", "devices": 0}, "at least 1"),
                            ({"device": "cuda:1", "devices": 2}, "names one device")):
        with pytest.raises(ConfigError, match=message):
            launch(**kwargs)


def test_unshard_inverts_shard() -> None:
    import torch

    items = list("abcdefghij")
    for world in (1, 2, 3, 4):
        ranks = [Workers(rank=r, world_size=world, device=torch.device("cpu")) for r in range(world)]
        assert ranks[0].unshard([w.shard(items) for w in ranks]) == items


_PARENT = r"""
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2], sys.argv[3]],
                         env=dict(os.environ, LDAE_LAUNCHER_PID=str(os.getpid())))
while not os.path.exists(sys.argv[3] + ".ready") and child.poll() is None:
    time.sleep(0.05)
time.sleep(1.0)
open(sys.argv[3] + ".parent", "w").write(repr(time.time()))
"""
_CHILD = r"""
import sys, time
import torch
from ldae.distributed import Workers
open(sys.argv[2] + ".ready", "w").close()
Workers(rank=1, world_size=2, device=torch.device("cpu"), failed=sys.argv[1] == "failed").close()
open(sys.argv[2] + ".child", "w").write(repr(time.time()))
"""


@pytest.mark.parametrize("failed", [True, False])
def test_spawned_process_outlives_its_launcher_only_after_a_failure(failed: bool, tmp_path: Path) -> None:
    """After a failure, a process spawned by ``--devices N`` exits after the main one (Lightning's launcher
    would SIGKILL the main process on seeing a child's non-zero exit); after success it does not wait."""
    import time

    stamp = tmp_path / "stamp"
    subprocess.run([sys.executable, "-c", _PARENT, _CHILD, "failed" if failed else "ok", str(stamp)],
                   check=True, timeout=120)
    deadline = time.monotonic() + 60
    while not Path(f"{stamp}.child").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    parent_exit = float(Path(f"{stamp}.parent").read_text())
    child_exit = float(Path(f"{stamp}.child").read_text())
    assert (child_exit >= parent_exit) if failed else (child_exit < parent_exit - 0.5)
