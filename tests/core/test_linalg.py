"""The array seam's helpers (core/linalg.py) on a device not the namespace's default: what they make to meet
their inputs goes on the inputs' device, and the values are numpy's."""
from __future__ import annotations

import array_api_strict as xps
import numpy as np

from blmm.core import linalg as la


def test_device_of_is_none_for_numpy_and_the_arrays_device_elsewhere(strict_device):
    assert la.device_of(np.ones(2)) is None  # numpy: one device, and np.zeros(..., device=None) is its CPU
    assert la.device_of(xps.ones(2, device=strict_device)) == strict_device
    assert la.device_of(xps.ones(2)) == xps.Device("CPU_DEVICE")


def test_from_host_and_move_put_arrays_on_the_device_asked(strict_device):
    host = np.arange(6.0).reshape(2, 3)
    assert la.from_host(np, host) is host and la.move(np, host, strict_device) is host  # numpy: no-ops
    moved = la.move(xps, {"a": [host], "b": (host, 3)}, strict_device)
    assert moved["a"][0].device == moved["b"][0].device == strict_device and moved["b"][1] == 3
    assert la.from_host(xps, host, strict_device).device == strict_device
    assert la.from_host(xps, host).device == xps.Device("CPU_DEVICE")  # without one: the namespace's default


def test_helpers_keep_the_inputs_device(strict_device, numpy_refuses_strict_arrays):
    """Each helper that makes an index, a constant or an output array for its input: on the input's device
    (array_api_strict refuses to combine two devices), with numpy's values: gathers, scatters and the same
    float64 operations, so equal to the bit."""
    rng = np.random.default_rng(0)
    A = rng.standard_normal((4, 3, 3))
    A = A @ np.swapaxes(A, 1, 2) + 3 * np.eye(3)
    b = rng.standard_normal((4, 3))
    x = xps.asarray(A, device=strict_device)
    results = {
        "vech": (la.vech(A), la.vech(x)),
        "unvech": (la.unvech(la.vech(A), 3), la.unvech(la.vech(x), 3)),
        "pack_sym": (la.pack_sym(A, double_offdiag=True), la.pack_sym(x, double_offdiag=True)),
        "unvech_lower": (la.unvech_lower(la.vech(A), 3), la.unvech_lower(la.vech(x), 3)),
        "select_rows": (la.select_rows(A, np.array([0, 2])), la.select_rows(x, np.array([0, 2]))),
        "take_along": (la.take_along(A, np.array([2, 0]), axis=1), la.take_along(x, np.array([2, 0]), axis=1)),
        "take_block": (la.take_block(A, np.array([0, 2]), np.array([1])),
                       la.take_block(x, np.array([0, 2]), np.array([1]))),
        "running_max_from_end": (la.running_max_from_end(b[:, 0]),
                                 la.running_max_from_end(xps.asarray(b[:, 0], device=strict_device))),
    }
    solved, solved_ok = la.safe_solve(A, b)
    got, got_ok = la.safe_solve(x, xps.asarray(b, device=strict_device))
    results["safe_solve"] = (solved, got)
    results["safe_solve ok"] = (solved_ok, got_ok)
    put_host, put_strict = A.copy(), la.copied(x)
    la.put_rows(put_host, np.array([1, 3]), A[:2])
    la.put_rows(put_strict, np.array([1, 3]), x[:2, ...])
    results["put_rows"] = (put_host, put_strict)
    for name, (ref, strict) in results.items():
        assert strict.device == strict_device, name
        np.testing.assert_array_equal(la.to_host(strict), ref, err_msg=name)
