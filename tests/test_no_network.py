"""Nothing in ldae touches the network at run time: a whole tiny run (stage 1, latents, stage 2, stage 3),
loading, the inference commands and the evaluation suite run with socket creation, connection and name
resolution disabled. Every attempt is recorded, so one swallowed by a library's ``try/except`` still
fails the test."""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path

import pytest
import torch

from ldae.cli import main

SHORT_RUN = [
    "--autoencoder.trainer.max_epochs", "1",
    "--autoencoder.trainer.limit_train_batches", "3",
    "--diffusion.trainer.max_epochs", "1",
    "--diffusion.validation.sample_every_n_epochs", "1",
    "--diffusion.validation.ddim_steps", "3",
    "--representation.trainer.max_epochs", "1",
    "--representation.trainer.check_val_every_n_epoch", "1",
    "--representation.validation.ddim_steps", "3",
]
SHORT_EVALUATION = [
    "--reconstruction.steps", "[3]", "--reconstruction.max_scans", "2",
    "--interpolation.steps", "3", "--interpolation.max_triplets", "2",
    "--manipulation.steps", "3", "--manipulation.max_scans", "1", "--manipulation.alphas", "[0.0, 1.0]",
]


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch):
    """Disable ``socket.socket``, ``socket.create_connection`` and ``socket.getaddrinfo``; yield the list of
    attempts, which must be empty at the end of the test."""
    import lightning.pytorch  # noqa: F401
    import monai  # noqa: F401  (imports urllib3, whose import-time IPv6 probe binds a loopback socket)

    attempts: list[str] = []

    def refuse(what: str):
        def _refuse(*args, **kwargs):
            attempts.append(f"{what}{args!r}")
            raise OSError(f"ldae tests: network access attempted ({what})")

        return _refuse

    class NoSocket(socket.socket):
        def __init__(self, *args, **kwargs) -> None:
            refuse("socket.socket")(*args, **kwargs)

    monkeypatch.setattr(socket, "socket", NoSocket)
    monkeypatch.setattr(socket, "create_connection", refuse("socket.create_connection"))
    monkeypatch.setattr(socket, "getaddrinfo", refuse("socket.getaddrinfo"))
    yield attempts
    assert not attempts, f"network access attempted: {attempts}"


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_the_guard_blocks_and_records(no_network: list[str]) -> None:
    with pytest.raises(OSError, match="network access attempted"):
        socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with pytest.raises(OSError):
        urllib.request.urlopen("http://example.org", timeout=1)
    with pytest.raises(OSError):
        torch.hub.load_state_dict_from_url("https://example.org/weights.pth", progress=False)
    assert len(no_network) >= 3
    no_network.clear()


def test_cli_and_config_without_network(no_network: list[str], phantom_cohort: Path,
                                        capsys: pytest.CaptureFixture) -> None:
    assert main(["check", str(phantom_cohort), "--json"]) == 0
    assert main(["fit", "--preset", "paper", "--stage", "representation", "--print-config"]) == 0
    capsys.readouterr()


@pytest.mark.slow
def test_whole_tiny_run_without_network(no_network: list[str], tmp_path: Path,
                                        capsys: pytest.CaptureFixture) -> None:
    """Train all stages briefly, then load, reconstruct, vary, generate and evaluate — offline."""
    import nibabel as nib

    from ldae.data.cohort import assign_splits, read_cohort, write_cohort
    from ldae.data.phantom import write_phantom_cohort
    from ldae.jobs.pipeline import run_pipeline
    from ldae.model import LDAE
    from ldae.runs import COMPRESSED_CSV, stage_dir

    csv = write_phantom_cohort(tmp_path / "cohort", n_subjects=15, sessions=(0, 12, 24), seed=0)
    write_cohort(assign_splits(read_cohort(csv), test_fraction=0.2, val_fraction=0.17, seed=0), csv)
    run = tmp_path / "run"
    run_pipeline("tiny", csv, run, overrides=SHORT_RUN,
                 steps=("autoencoder", "compress", "diffusion", "representation"))
    assert list((stage_dir(run, "diffusion") / "figures").glob("samples_epoch*.png"))  # decoded samples

    model = LDAE.load(run, steps=3)
    scan = read_cohort(stage_dir(run, "latents") / COMPRESSED_CSV)["path"].iloc[0]
    out = tmp_path / "out"
    for command in (["reconstruct", scan], ["variations", scan, "--n", "2"], ["encode", scan]):
        assert main([command[0], "--model", str(run), *command[1:], "--out", str(out), "--steps", "3",
                     "--device", "cpu"]) == 0, capsys.readouterr().err
    assert main(["generate", "--model", str(run), "--n", "1", "--steps", "3", "--out", str(out / "generated"),
                 "--device", "cpu"]) == 0, capsys.readouterr().err
    assert nib.load(str(next(out.glob("*_recon.nii.gz")))).shape == tuple(model.shape)
    assert main(["evaluate", "--model", str(run), "--preset", "tiny", *SHORT_EVALUATION]) == 0, \
        capsys.readouterr().err
    assert (stage_dir(run, "evaluation") / "metrics.json").is_file()
