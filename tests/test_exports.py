"""The public API: every package re-exports exactly what its __all__ says."""

from __future__ import annotations

import importlib

import pytest

PACKAGES = [
    "trio_sign",
    "trio_sign.crypto",
    "trio_sign.attested",
    "trio_sign.authz",
    "trio_sign.enclave",
    "trio_sign.gateway",
    "trio_sign.kms",
    "trio_sign.nitro",
    "trio_sign.ops",
    "trio_sign.parent",
    "trio_sign.participant",
    "trio_sign.rpc",
    "trio_sign.shares",
    "trio_sign.sse",
    "trio_sign.testing",
    "trio_sign.transport",
]


@pytest.mark.parametrize("name", PACKAGES)
def test_all_names_exist_and_are_public(name: str) -> None:
    module = importlib.import_module(name)
    exported = module.__all__
    assert len(exported) == len(set(exported))
    for attr in exported:
        assert hasattr(module, attr), f"{name}.{attr} is in __all__ but missing"
    public = {a for a in vars(module) if not a.startswith("_")}
    submodules = {a for a in public if type(getattr(module, a)).__name__ == "module"}
    assert public - submodules - {"annotations"} <= set(exported) | {"__version__"}
