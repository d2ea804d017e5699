"""The notebooks are committed clean and run end to end on a tiny prepared directory, run and checkpoint."""

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def parameters_cell(nb) -> nbformat.NotebookNode:
    cell = next(c for c in nb.cells if c.cell_type == "code")
    assert "parameters" in cell.metadata.get("tags", []), "the first code cell holds the parameters"
    return cell


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.stem)
def test_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: clear outputs before committing"
    parameters_cell(nb)


def execute(name: str, parameters: dict, tmp_path: Path) -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    cell = parameters_cell(nb)
    defaults = {line.split("=")[0].strip() for line in cell.source.splitlines() if "=" in line}
    assert set(parameters) <= defaults, f"unknown parameters {set(parameters) - defaults}"
    cell.source += "\n# injected by the test\n" + "\n".join(f"{k} = {v!r}" for k, v in parameters.items())
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    return nb


def outputs_text(nb) -> str:
    return json.dumps([c.get("outputs", []) for c in nb.cells])


@pytest.fixture(scope="module")
def run(tiny_run):
    return tiny_run


def test_data_overview(run, tmp_path):
    nb = execute("01_data_overview.ipynb", {"PREPARED_DIR": str(run["prepared"])}, tmp_path)
    assert "image/png" in outputs_text(nb) and "valid" in outputs_text(nb)


def test_training_curves(run, tmp_path):
    nb = execute("02_training_curves.ipynb", {"RUN_DIR": str(run["run"])}, tmp_path)
    assert "image/png" in outputs_text(nb) and "val/ppl" in outputs_text(nb)


def test_attention_analysis(run, tmp_path):
    ckpt = next(run["run"].rglob("last.ckpt"))
    out = tmp_path / "analysis"
    nb = execute("03_attention_analysis.ipynb", {"CKPT": str(ckpt), "INPUT": str(run["fasta"]), "OUT_DIR": str(out),
                                                 "NUM_SEQUENCES": 4, "MAX_LEN": 48, "THRESHOLD": 0.05, "MIN_KEPT": 1,
                                                 "CHECKPOINTS": [str(run["run"])], "PERMUTATIONS": 200}, tmp_path)
    text = outputs_text(nb)
    assert text.count("image/png") >= 4  # grid, enlarged head, similarity vs BLOSUM62, agreement over training
    assert "weighted" in text and "embedding" in text
    assert json.loads((out / "summary.json").read_text())["num_sequences"] == 4
