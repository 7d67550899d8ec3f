"""Old import paths of the public API keep working for one release, with a DeprecationWarning."""
from __future__ import annotations

import importlib

import pytest

import blmm.core.design
import blmm.core.fit
import blmm.core.inference
import blmm.core.sufficient

MOVED = [
    ("blmm.design", "RandomFactor", blmm.core.design.RandomFactor),
    ("blmm.design", "Contrast", blmm.core.design.Contrast),
    ("blmm.fit", "fit_lmm", blmm.core.fit.fit_lmm),
    ("blmm.fit", "fit_stats", blmm.core.fit.fit_stats),
    ("blmm.inference", "infer", blmm.core.inference.infer),
    ("blmm.stats", "sufficient_stats", blmm.core.sufficient.sufficient_stats),
]


@pytest.mark.parametrize("old, name, new", MOVED)
def test_old_path_warns_and_gives_the_same_object(old, name, new):
    module = importlib.import_module(old)
    with pytest.warns(DeprecationWarning, match=name):
        assert getattr(module, name) is new


def test_public_api_at_the_top():
    import blmm

    assert blmm.fit_lmm is blmm.core.fit.fit_lmm and blmm.infer is blmm.core.inference.infer
