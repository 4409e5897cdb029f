"""Probe for tests/test_tiers.py (not collected by default: no ``test_`` prefix)."""

import pytest


def test_default_tier():
    assert True


@pytest.mark.full
def test_full_tier():
    assert True
