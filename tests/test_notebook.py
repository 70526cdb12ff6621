"""notebooks/tutorial.ipynb executes end to end (nbclient) against the tiny run fixture, so a broken API
breaks the build."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "tutorial.ipynb"
KERNEL = "ldae-test-python"


def _code(nb) -> list[str]:
    return [c.source for c in nb.cells if c.cell_type == "code"]


def test_notebook_uses_the_python_api_only():
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for src in _code(nb):
        for line in src.splitlines():
            assert not line.lstrip().startswith(("!", "%")), line
        assert "subprocess" not in src and "os.system" not in src


@pytest.mark.slow
def test_notebook_executes(tiny_run: Path, tmp_path: Path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    from test_predict import make_probed_run  # tests/ is on sys.path (rootdir conftest, no package)

    probed = make_probed_run(tiny_run, tmp_path)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # a kernel spec for this interpreter, found first through JUPYTER_PATH (never a user's other python3)
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": KERNEL, "language": "python"}))
    env = {"LDAE_RUN": str(probed.run), "LDAE_STEPS": "5", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "JUPYTER_PATH": str(tmp_path / "jupyter")}
    old = {k: os.environ.get(k) for k in [*env, "LDAE_RAW_T1"]}
    os.environ.update(env)
    os.environ.pop("LDAE_RAW_T1", None)
    try:  # the kernel inherits this process's environment
        client = nbclient.NotebookClient(nb, timeout=600, kernel_name=KERNEL,
                                         resources={"metadata": {"path": str(tmp_path)}})
        client.execute()  # raises CellExecutionError on the first failing cell
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 7  # input, autoencoder, variations, LDAE, interpolation, 2 manipulations
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "autoencoder reconstruction SSIM" in text and "CN -> AD: P(AD)" in text and "AD -> CN: P(AD)" in text
    tables = [o for o in outputs if "text/html" in o.get("data", {})]
    assert any("p_ad" in o["data"]["text/html"] for o in tables)  # the predictions table
