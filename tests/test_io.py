from pathlib import Path

import numpy as np
import pytest

from ldae.errors import ConfigError
from ldae.io import atomic_path, check_output_folder, write_json, write_nifti, write_npz


def test_atomic_path_success_and_failure(tmp_path: Path):
    target = tmp_path / "sub" / "out.txt"
    with atomic_path(target) as tmp:
        tmp.write_text("hello")
        assert not target.exists()
    assert target.read_text() == "hello"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "hello"  # untouched
    assert [p.name for p in target.parent.iterdir()] == ["out.txt"]  # no temp left behind


def test_writers_roundtrip(tmp_path: Path):
    write_json(tmp_path / "a.json", {"x": np.float32(1.5), "y": np.arange(3)})
    assert (tmp_path / "a.json").read_text().count("1.5") == 1
    write_npz(tmp_path / "a.npz", latent=np.ones((3, 2, 2, 2), np.float32))
    with np.load(tmp_path / "a.npz") as z:
        assert z["latent"].shape == (3, 2, 2, 2)
    aff = np.diag([1.5, 1.5, 1.5, 1])
    write_nifti(tmp_path / "v.nii.gz", np.zeros((4, 4, 4)), aff)
    import nibabel as nib

    img = nib.load(tmp_path / "v.nii.gz")
    assert img.get_data_dtype() == np.float32
    np.testing.assert_allclose(img.affine, aff)


def test_write_json_is_strict_json(tmp_path):
    import json
    import math

    import numpy as np

    from ldae.io import write_json

    path = write_json(tmp_path / "m.json", {"a": float("nan"), "b": [np.float32(1.5), np.inf], "c": np.arange(2),
                                            "d": {"e": np.float64(-np.inf), "f": tmp_path}})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text, parse_constant=lambda c: math.nan) == {"a": None, "b": [1.5, None], "c": [0, 1],
                                                                  "d": {"e": None, "f": str(tmp_path)}}


def test_check_output_folder_refuses_files_and_creates_nothing(tmp_path: Path):
    deep = tmp_path / "a" / "b" / "out"
    assert check_output_folder(deep) == deep
    assert not (tmp_path / "a").exists()  # checked, not created
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ConfigError, match=r"file\.txt: --out is an existing file, not a folder"):
        check_output_folder(tmp_path / "file.txt")
    with pytest.raises(ConfigError, match=r"--out cannot be created \(.*file\.txt is a file\)"):
        check_output_folder(tmp_path / "file.txt" / "sub")


def test_check_output_folder_refuses_a_read_only_parent(tmp_path: Path):
    import os

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):  # root ignores permissions: nothing to check
            pytest.skip("running as root")
        with pytest.raises(ConfigError, match=r"--out is not writable \(no write permission on .*ro\)"):
            check_output_folder(ro / "new")
    finally:
        ro.chmod(0o700)
