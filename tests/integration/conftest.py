"""Integration fixtures: a real azmlinfsrv serving score.py with the tiny model."""

from __future__ import annotations

import pytest

from serverproc import Server


@pytest.fixture(scope="session")
def server(tiny_model_dir, tmp_path_factory):
    srv = Server(tiny_model_dir, tmp_path_factory.mktemp("server") / "azmlinfsrv.log")
    yield srv
    srv.stop()
