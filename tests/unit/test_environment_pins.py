"""environment/conda.yaml installs exactly what pyproject.toml says the service needs.

The container's pip list must be the ``serve`` extra plus the base dependencies (requests),
with the same version specifiers, so that what is tested locally (``pip install .[serve]``)
is what Azure ML builds. A drift in either file fails here.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
CONDA = REPO / "environment" / "conda.yaml"


def parse_conda_minimal(text: str) -> dict:
    """Just enough YAML for a conda environment file: ``dependencies`` with a nested ``pip`` list.

    Returns {"dependencies": [str | {"pip": [str]}]}; used when PyYAML is not installed.
    """
    deps: list = []
    section = None
    pip_list: list[str] | None = None
    for raw in text.splitlines():
        line = raw.split(" #", 1)[0].rstrip() if not raw.lstrip().startswith("#") else ""
        if not line:
            continue
        indent = len(line) - len(line.lstrip())
        item = line.strip()
        if indent == 0:
            section = item.rstrip(":") if item.endswith(":") else None
            pip_list = None
            continue
        if section != "dependencies" or not item.startswith("- "):
            continue
        value = item[2:].strip()
        if value == "pip:":
            pip_list = []
            deps.append({"pip": pip_list})
        elif pip_list is not None and indent > 2:
            pip_list.append(value.strip("'\""))
        else:
            pip_list = None
            deps.append(value.strip("'\""))
    return {"dependencies": deps}


def load_conda(text: str) -> dict:
    try:
        import yaml
    except ImportError:
        return parse_conda_minimal(text)
    return yaml.safe_load(text)


def requirement_map(specs) -> dict[str, str]:
    """{canonical name: specifier string} for requirement strings; rejects duplicates."""
    out: dict[str, str] = {}
    for spec in specs:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        assert name not in out, f"{req.name} is listed twice"
        out[name] = str(req.specifier)
    return out


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def conda() -> dict:
    return load_conda(CONDA.read_text(encoding="utf-8"))


def _pip_list(conda: dict) -> list[str]:
    pips = [d["pip"] for d in conda["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pips) == 1, "conda.yaml needs exactly one 'pip:' list under dependencies"
    return pips[0]


def test_conda_pip_pins_match_the_serve_extra(pyproject, conda):
    project = pyproject["project"]
    expected = requirement_map(project["optional-dependencies"]["serve"] + project["dependencies"])
    actual = requirement_map(_pip_list(conda))
    missing = {n: s for n, s in expected.items() if n not in actual}
    extra = {n: s for n, s in actual.items() if n not in expected}
    differ = {n: (expected[n], actual[n]) for n in expected.keys() & actual.keys() if expected[n] != actual[n]}
    assert not missing, f"in pyproject.toml (serve extra or base) but not in conda.yaml: {missing}"
    assert not extra, f"in conda.yaml but in neither the serve extra nor the base dependencies: {extra}"
    assert not differ, f"specifiers differ (pyproject, conda): {differ}"


def test_batch_conda_is_the_online_one_plus_the_batch_extra(pyproject, conda):
    project = pyproject["project"]
    extras = project["optional-dependencies"]
    expected = requirement_map(extras["serve"] + project["dependencies"] + extras["batch"])
    batch = load_conda((REPO / "deployment" / "batch" / "conda.yaml").read_text(encoding="utf-8"))
    assert requirement_map(_pip_list(batch)) == expected
    assert [d for d in batch["dependencies"] if isinstance(d, str)] == [d for d in conda["dependencies"] if isinstance(d, str)]


def test_conda_python_satisfies_requires_python(pyproject, conda):
    plain = [d for d in conda["dependencies"] if isinstance(d, str)]
    pythons = [d for d in plain if d.replace(" ", "").startswith("python=")]
    assert pythons == ["python=3.11"], f"pin the container's Python as python=3.11, found {pythons}"
    assert "3.11" in SpecifierSet(pyproject["project"]["requires-python"])
    assert "pip" in plain, "conda.yaml must install pip for its pip: list"


def test_minimal_parser_agrees_with_yaml():
    yaml = pytest.importorskip("yaml", reason="PyYAML not installed: the fallback parser is the only one")
    text = CONDA.read_text(encoding="utf-8")
    assert parse_conda_minimal(text)["dependencies"] == yaml.safe_load(text)["dependencies"]


def test_pin_check_catches_a_drift():
    """The comparison itself: a changed specifier or a stray package shows up."""
    expected = requirement_map(["torch>=2.4", "Pillow>=10.3"])
    assert requirement_map(["torch>=2.4", "pillow>=10.3"]) == expected  # names compare canonically
    assert requirement_map(["torch>=2.5", "pillow>=10.3"]) != expected
    drifted = parse_conda_minimal("dependencies:\n  - python=3.11\n  - pip:\n      - torch>=2.5  # newer\n")
    assert drifted["dependencies"] == ["python=3.11", {"pip": ["torch>=2.5"]}]
    with pytest.raises(AssertionError, match="twice"):
        requirement_map(["torch>=2.4", "torch>=2.5"])
