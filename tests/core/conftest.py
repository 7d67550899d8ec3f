"""Fixtures of the core's tests."""
from __future__ import annotations

import array_api_strict as xps
import pytest


@pytest.fixture
def numpy_refuses_strict_arrays():
    """numpy cannot read array_api_strict arrays here, as it cannot read a GPU's: a bare numpy call on a
    per-voxel array raises TypeError instead of quietly computing on the host.  (array_api_strict
    answers numpy's __array__ on its CPU device before Python 3.12, and __buffer__ from 3.12 on; the
    seam's own host crossings, `linalg.to_host`, go by DLPack, which stays open.)"""
    def refuse(self, *args, **kwargs):
        raise TypeError("a numpy function was called on an array_api_strict array: off the array seam")

    strict_array = type(xps.asarray(0.0))
    with pytest.MonkeyPatch.context() as mp:
        for protocol in ("__array__", "__buffer__"):
            if hasattr(strict_array, protocol):
                mp.setattr(strict_array, protocol, refuse)
        yield


@pytest.fixture
def strict_device():
    """array_api_strict's second device, where the seam tests put their inputs: an array the core makes on the
    namespace's default device instead of its inputs' fails to combine with them (ValueError), as a host
    array fails with a GPU's."""
    return xps.Device("device1")
