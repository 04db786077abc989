"""deployment/sdk-deploy.ipynb is a valid nbformat 4 notebook whose code compiles.

Validated with nbformat's JSON schema when nbformat is installed, else by the structure the
schema requires. IPython lines (``%pip``, ``!cmd``) are dropped before ``compile()``. Nothing
is executed: running the notebook needs an Azure subscription.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parents[2] / "deployment"
NOTEBOOK = DEPLOY / "sdk-deploy.ipynb"


def cell_source(cell: dict) -> str:
    src = cell["source"]
    return src if isinstance(src, str) else "".join(src)


def python_only(source: str) -> str:
    """``source`` with IPython magics and shell escapes blanked (line numbers kept)."""
    return "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in source.splitlines())


@pytest.fixture(scope="module")
def notebook() -> dict:
    return json.loads(NOTEBOOK.read_text(encoding="utf-8"))


def code_cells(nb: dict) -> list[str]:
    return [cell_source(c) for c in nb["cells"] if c["cell_type"] == "code"]


def test_notebook_structure(notebook):
    assert notebook["nbformat"] == 4 and isinstance(notebook["nbformat_minor"], int)
    assert notebook["metadata"]["kernelspec"]["language"] == "python"
    for cell in notebook["cells"]:
        assert cell["cell_type"] in ("markdown", "code", "raw")
        assert isinstance(cell["metadata"], dict) and isinstance(cell["source"], (str, list))
        if cell["cell_type"] == "code":
            # Committed without outputs: no stale results, no keys or URLs of a past run.
            assert cell["outputs"] == [] and cell["execution_count"] is None


def test_notebook_validates_with_nbformat():
    nbformat = pytest.importorskip("nbformat", reason="nbformat not installed (pip install nbformat)")
    nb = nbformat.read(str(NOTEBOOK), as_version=4)
    nbformat.validate(nb)


def test_every_code_cell_compiles(notebook):
    cells = code_cells(notebook)
    assert cells
    for i, source in enumerate(cells):
        compile(python_only(source), f"{NOTEBOOK.name}[code cell {i}]", "exec")


def test_notebook_covers_the_sdk_flow(notebook):
    code = "\n".join(code_cells(notebook))
    for needed in ("MLClient(DefaultAzureCredential()", "ManagedOnlineEndpoint(", "load_online_deployment(",
                   "online_deployments.begin_create_or_update", "online_endpoints.get_keys",
                   "Blip2Client(", "Conversation(", "online_endpoints.begin_delete"):
        assert needed in code, f"the notebook no longer shows {needed}"
    # Files it opens are relative to deployment/ and must exist there.
    for name in re.findall(r"[\"']([\w.-]+\.(?:yml|yaml|json))[\"']", code):
        assert (DEPLOY / name).is_file(), f"the notebook refers to deployment/{name}, which does not exist"


def test_magic_stripping_keeps_python():
    src = "%pip install x\nimport os\n  !ls\nprint(os.sep)"
    assert python_only(src) == "\nimport os\n\nprint(os.sep)"
    with pytest.raises(SyntaxError):
        compile(python_only("x = (1,\n%time y"), "t", "exec")
