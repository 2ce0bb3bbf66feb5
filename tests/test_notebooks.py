"""The Colab notebooks in notebooks/ run top to bottom on this machine's CPU, against the shipped model."""

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["generate_tpu.ipynb", "finetune_tpu.ipynb"])
def test_notebook_runs(name, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    notebook = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    NotebookClient(notebook, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()  # raises on a failing cell

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])]
    assert any("image/png" in output.get("data", {}) for output in outputs)  # pictures were shown
    assert any("1 replica(s)" in output.get("text", "") for output in outputs)  # the default strategy, here
    if name == "finetune_tpu.ipynb":
        assert (tmp_path / "finetuned" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
        assert (tmp_path / "finetuned" / "checkpoints" / "checkpoint").is_file()
    else:
        assert sorted(os.listdir(tmp_path / "outputs")) == [f"{i:05d}.png" for i in range(4)]
