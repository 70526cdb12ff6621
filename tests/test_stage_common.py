from pathlib import Path

import pytest
import torch

from ldae.checkpoints import CHECKPOINT_KEY, load_checkpoint, stage_metadata
from ldae.errors import CheckpointError, ConfigError
from ldae.io import save_torch
from ldae.nets.weights import load_state_dict_strict
from ldae.runs import find_checkpoint
from ldae.training.common import make_checkpoint_io, prepare_run


def test_prepare_run_writes_nothing_and_guards_existing_runs(tmp_path: Path):
    """prepare_run only checks (nothing is created before the model is built and a resume is validated);
    start_run makes the folder, takes the lock and saves the config."""
    from ldae.runs import LOCK_FILE
    from ldae.training.common import start_run

    cfg = {"stage": "autoencoder", "out": str(tmp_path / "run"), "trainer": {"max_epochs": 1}}
    out, resume = prepare_run(cfg)
    assert resume is None and not out.exists()
    lock = start_run(cfg, out, None)
    assert (out / "config.yaml").is_file() and (out / LOCK_FILE).is_file()
    lock.release()
    assert not (out / LOCK_FILE).exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="existing file"):
        prepare_run(dict(cfg, out=str(tmp_path / "file")))
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "last.ckpt").write_bytes(b"x")
    with pytest.raises(ConfigError, match="--resume"):
        prepare_run(cfg)
    _, resume = prepare_run(cfg, resume=True)
    assert resume == out / "checkpoints" / "last.ckpt"
    with pytest.raises(ConfigError, match="'out'"):
        prepare_run({"stage": "x"})


def test_load_checkpoint_checks_stage(tmp_path: Path):
    path = save_torch(tmp_path / "a.ckpt", {"state_dict": {"w": torch.ones(2)},
                                           CHECKPOINT_KEY: stage_metadata({"preset": "tiny"}, "diffusion").to_dict()})
    assert load_checkpoint(path, "diffusion")["state_dict"]["w"].sum() == 2
    with pytest.raises(CheckpointError, match="stage 'diffusion', expected stage 'autoencoder'"):
        load_checkpoint(path, "autoencoder")
    (tmp_path / "bad.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot load checkpoint"):
        load_checkpoint(tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "none.ckpt")


class _Arbitrary:
    """Stands for any pickled object a weights_only load must refuse."""


def test_weights_only_refuses_pickled_objects(tmp_path: Path):
    path = tmp_path / "evil.ckpt"
    torch.save({"obj": _Arbitrary()}, path)
    with pytest.raises(CheckpointError, match="cannot load checkpoint"):
        load_checkpoint(path)


def test_strict_load_lists_keys():
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state.pop("1.bias")
    state["extra.weight"] = torch.zeros(1)
    state["0.weight"] = torch.zeros(4, 2)
    with pytest.raises(CheckpointError) as info:
        load_state_dict_strict(model, state, "ckpt.pt")
    msg = str(info.value)
    assert "1 missing key(s): 1.bias" in msg
    assert "1 unexpected key(s): extra.weight" in msg
    assert "0.weight (4, 2) vs (3, 2)" in msg
    good = {k: v.clone() + 1 for k, v in model.state_dict().items()}
    load_state_dict_strict(model, good, "ok")
    assert torch.equal(model[0].bias, good["0.bias"])


def test_atomic_checkpoint_io(tmp_path: Path):
    io = make_checkpoint_io()
    io.save_checkpoint({"a": torch.ones(1)}, tmp_path / "c" / "x.ckpt")
    assert torch.load(tmp_path / "c" / "x.ckpt", weights_only=True)["a"].item() == 1
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["x.ckpt"]


def test_find_checkpoint(tmp_path: Path):
    ckpt = tmp_path / "run" / "diffusion" / "checkpoints" / "best.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"x")
    assert find_checkpoint(tmp_path / "run", "diffusion") == ckpt
    assert find_checkpoint(tmp_path / "run" / "diffusion", "diffusion") == ckpt
    assert find_checkpoint(ckpt, "diffusion") == ckpt
    with pytest.raises(CheckpointError, match="no autoencoder checkpoint"):
        find_checkpoint(tmp_path / "run", "autoencoder")
