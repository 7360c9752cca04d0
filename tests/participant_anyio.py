"""A pytest plugin for the participant tests that run under both anyio backends.

``pyproject.toml`` sets pytest-trio's ``trio_mode``, which marks every ``async def`` test
``trio`` and then runs it with ``trio.run`` itself, whatever its ``anyio_backend``. A test
module that loads this plugin (``pytest_plugins = ["tests.participant_anyio"]``) gets, for
the tests it marks ``@pytest.mark.anyio``, that automatic ``trio`` mark taken off again, so
anyio's own plugin runs them on the backend its ``anyio_backend`` fixture names ("asyncio"
and "trio"). Every other test keeps trio_mode.
"""

from __future__ import annotations

import pytest


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("anyio") is None:
            continue
        item.own_markers[:] = [mk for mk in item.own_markers if mk.name != "trio"]
