"""Every learner notebook in notebooks/ runs top to bottom without an error.

The notebooks are stored without outputs; here each one is executed in a fresh `python3`
kernel (the interpreter running pytest, via ipykernel), with notebooks/ as its working folder
and the environment of conftest's `_isolated_env` fixture (temporary cache, no network),
which the kernel inherits when it starts.

Each notebook names its data in a cell tagged `parameters` (`SMS_SPAM = "sms-spam"`). Where
a named dataset resolves (CI: `LLMSCRATCH_DATA_DIR`), the notebook runs on it as a learner's
would; where it can't (a fresh clone offline), the test points the parameter at a file of the
same kind made from the embedded corpus or a seeded synthetic set, so every notebook still
runs end to end.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import synthetic_instructions, synthetic_sms

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))


def test_notebooks_exist():
    assert len(NOTEBOOKS) >= 5, f"expected the learner notebooks in {NOTEBOOKS_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    with_outputs = [i for i, c in enumerate(nb.cells)
                    if c.cell_type == "code" and (c.get("outputs") or c.get("execution_count"))]
    assert not with_outputs, f"{path.name}: clear the outputs of cells {with_outputs} before saving"


PARAM = re.compile(r'^(?P<var>[A-Z_]+) = "(?P<name>[a-z0-9-]+)"', re.M)


@pytest.fixture(scope="session")
def stand_ins(tmp_path_factory, docs_text, corpus_file) -> dict[str, Path]:
    """Files of the same kind as each named dataset, made from what every clone has."""
    folder = tmp_path_factory.mktemp("stand-ins")
    big = folder / "docs200k.txt"  # for tinyshakespeare: the notebooks use <= 200,000 chars
    big.write_text(docs_text[:200_000], encoding="utf-8")
    sms = folder / "sms.tsv"  # headerless label<TAB>text, like the UCI file
    sms.write_text("".join(f"{y}\t{t}\n" for y, t in synthetic_sms(300, 100)), encoding="utf-8")
    instructions = folder / "instructions.json"
    instructions.write_text(json.dumps(synthetic_instructions(300)), encoding="utf-8")
    return {"the-verdict": corpus_file, "tinyshakespeare": big, "sms-spam": sms,
            "alpaca-1100": instructions}


def test_every_notebook_names_its_data_in_a_parameters_cell():
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
        uses_data = re.search(r"load_text\(|read_labeled\(|read_instruction_records\(", code)
        params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        if uses_data:
            assert len(params) == 1 and PARAM.search(params[0].source), path.name
            # no dataset named outside the parameters cell, and no path guessed next to the clone
            rest = "\n".join(c.source for c in nb.cells if c.cell_type == "code" and c not in params)
            assert not re.search(r"(load_text|read_labeled|read_instruction_records)\(\"", rest), path.name
            assert "shared" not in code, path.name


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch, named_dataset, stand_ins):
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if "parameters" in cell.metadata.get("tags", []):
            def substitute(m):
                found = named_dataset.find(m["name"])
                return m[0] if isinstance(found, Path) else f'{m["var"]} = {str(stand_ins[m["name"]])!r}'
            cell.source = PARAM.sub(substitute, cell.source)
    client = nbclient.NotebookClient(
        nb,
        kernel_name="python3",
        timeout=600,  # per cell
        resources={"metadata": {"path": str(NOTEBOOKS_DIR)}},
    )
    # Raises CellExecutionError, with the failing cell and its traceback, on any error.
    client.execute()
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
