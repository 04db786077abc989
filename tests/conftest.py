"""Shared fixtures: a tiny BLIP-2 in the hub layout and a loopback image host."""

from __future__ import annotations

import pytest

from support import ImageHost


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from blip2.tiny import make_tiny_blip2

    return make_tiny_blip2(tmp_path_factory.mktemp("tiny-blip2") / "blip2-tiny")


@pytest.fixture(scope="session")
def image_host():
    host = ImageHost()
    yield host
    host.close()
