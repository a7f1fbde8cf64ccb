"""What the fast tier (`make test`, -m "not slow") must keep: every ssl_ops module imports, and every registered
method and pretext is trained by at least one fast test (the registry-parametrized invariants)."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import ssl_ops

MODULES = sorted(m.name for m in pkgutil.walk_packages(ssl_ops.__path__, "ssl_ops."))


@pytest.mark.parametrize("module", MODULES)
def test_every_module_imports(module):
    assert importlib.import_module(module).__name__ == module


def test_registry_parametrized_tests_cover_every_method_and_pretext_in_the_fast_tier(pytestconfig):
    """test_invariants's leakage test is the fast tier's smoke run of every registry entry: it must not be slow."""
    import test_invariants
    from ssl_ops.methods import METHODS
    from ssl_ops.pretexts import PRETEXTS

    assert set(test_invariants.NAMES) == set(METHODS) | set(PRETEXTS)
    fn = test_invariants.test_labels_of_unlabeled_images_never_reach_training
    assert not any(m.name == "slow" for m in getattr(fn, "pytestmark", [])) and \
        not any(m.name == "slow" for m in getattr(test_invariants, "pytestmark", []))
