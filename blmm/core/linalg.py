"""Batched helpers on stacks of small symmetric matrices: PSD projection and roots, vech
order, and packing of symmetric matrices to their upper triangle; and the core's array seam.

The seam (docs/architecture.md): the numerical core takes its array namespace from its inputs
(`namespace`, the array API standard through array_api_compat), so numpy arrays run on numpy
itself and any standard namespace (array_api_strict in the tests, cupy or torch) runs the same
code.  What the standard lacks sits here, each with its fallback in standard operations:
`einsum` (numpy's; else broadcast products and sums), `safe_cholesky` / `safe_solve` (numpy's
LinAlgError per voxel; else non-finite factors flag the voxel), `select_rows` / `put_rows` (integer
gather and scatter), `nan_to_num`, `running_max_from_end`, `to_host` / `from_host` (scipy's special
functions and scipy.sparse run on the host).  Arrays made here beside the inputs go on the inputs'
device (`device_of`), not the namespace's default one.
"""
from __future__ import annotations

import copy
import dataclasses
from functools import lru_cache
from types import ModuleType
from typing import Any

import array_api_compat
import numpy as np

Array = Any  # an array of any array API namespace (numpy's, array_api_strict's, cupy's, torch's)


def namespace(*arrays: Any) -> ModuleType:
    """The array API namespace of the inputs: numpy itself for numpy arrays (numpy >= 2 is a standard
    namespace; array_api_compat's wrapper would add a Python call per operation), else the standard's."""
    for a in arrays:  # numpy arrays, the hot case: numpy without array_namespace's ~6 µs per call
        if type(a) is not np.ndarray:
            return array_api_compat.array_namespace(*arrays, use_compat=False)
    return np


def namespace_or_numpy(*values: Any) -> ModuleType:
    """The namespace of the array arguments; numpy where there are none (lists and scalars, which the
    public functions take as np.asarray does)."""
    arrays = [x for x in values if array_api_compat.is_array_api_obj(x)]
    return namespace(*arrays) if arrays else np


def device_of(x: Array) -> Any:
    """The device of array x, for the arrays made to meet it (None for numpy: one device, and no call)."""
    return None if type(x) is np.ndarray else array_api_compat.device(x)


def running_max_from_end(x: Array) -> Array:
    """max(x[i:]) for every i of a 1-D array: numpy's ufunc accumulate; the standard has no cumulative
    maximum, so other namespaces compute it on the host."""
    xp = namespace(x)
    if xp is np:
        return np.maximum.accumulate(x[::-1])[::-1]
    return from_host(xp, running_max_from_end(to_host(x)), device_of(x))


def to_host(x: Array) -> np.ndarray:
    """A numpy array of x's values (a no-op for numpy arrays), by DLPack, for host-only functions."""
    return x if isinstance(x, np.ndarray) else np.from_dlpack(x)


def from_host(xp: ModuleType, a: Any, device: Any = None) -> Array:
    """A host (numpy) array or constant in namespace xp, on ``device`` (`device_of` an input; None: the
    namespace's default); a no-op for numpy."""
    return a if xp is np else xp.asarray(a, device=device)


def einsum(xp: ModuleType, subscripts: str, *operands: Array, optimize: bool = False) -> Array:
    """numpy's einsum where xp is numpy; elsewhere (no einsum in the standard) the same sum of
    products by broadcasting: repeated subscripts of one operand as its diagonal, then one product
    over every subscript and a sum over those not in the output (memory of the full product)."""
    if xp is np:
        return np.einsum(subscripts, *operands, optimize=optimize)
    inputs, output = subscripts.replace(" ", "").split("->")
    subs = inputs.split(",")
    letters = list(dict.fromkeys("".join(subs)))
    product = None
    for sub, x in zip(subs, operands):
        while len(set(sub)) < len(sub):  # a repeated subscript: that pair of axes' diagonal, moved last
            c = next(s for s in sub if sub.count(s) > 1)
            i = sub.index(c)
            j = sub.index(c, i + 1)
            rest = [k for k in range(len(sub)) if k not in (i, j)]
            x = xp.linalg.diagonal(xp.permute_dims(x, tuple(rest + [i, j])))
            sub = "".join(sub[k] for k in rest) + c
        order = sorted(range(len(sub)), key=lambda k: letters.index(sub[k]))
        x = xp.permute_dims(x, tuple(order))
        present = [sub[k] for k in order]
        x = xp.reshape(x, tuple(x.shape[present.index(c)] if c in present else 1 for c in letters))
        product = x if product is None else product * x
    summed = tuple(k for k, c in enumerate(letters) if c not in output)
    if summed:
        product = xp.sum(product, axis=summed)
    kept = [c for c in letters if c in output]
    return xp.permute_dims(product, tuple(kept.index(c) for c in output))


def sym(A: Array) -> Array:
    xp = namespace(A)
    return 0.5 * (A + xp.matrix_transpose(A))


def project_psd(D: Array) -> Array:
    """Nearest positive semi-definite matrix (eigenvalues clipped at 0)."""
    xp = namespace(D)
    q = D.shape[-1]
    if q == 1:
        return xp.maximum(D, 0.0)
    w, U = xp.linalg.eigh(sym(D))
    clipped = (U * xp.maximum(w, 0.0)[..., None, :]) @ xp.matrix_transpose(U)
    # per matrix, not per stack: a PSD matrix is returned as is whatever its neighbours are
    return xp.where(xp.all(w >= 0, axis=-1)[..., None, None], sym(D), clipped)


def lower_triangular_inverse(L: Array) -> Array:
    """L⁻¹ for a stack of lower-triangular (v, p, p) matrices, by forward substitution row by row
    across the whole stack (numpy's batched solve/inv costs ~20 µs per small matrix)."""
    xp = namespace(L)
    p = L.shape[-1]
    Li = xp.zeros_like(L)
    d = 1.0 / xp.linalg.diagonal(L)
    for i in range(p):
        row = -(L[:, i, None, :i] @ Li[:, :i, :])[:, 0, :]
        row[:, i] += 1.0
        Li[:, i, :] = row * d[:, i, None]
    return Li


def psd_root(D: Array) -> Array:
    """Lambda with Lambda Lambda' = D for PSD D (works when D is singular)."""
    xp = namespace(D)
    q = D.shape[-1]
    if q == 1:
        return xp.sqrt(xp.maximum(D, 0.0))
    w, U = xp.linalg.eigh(sym(D))
    return U * xp.sqrt(xp.maximum(w, 0.0))[..., None, :]


@lru_cache(maxsize=None)
def vech_index(q: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of vech order: the lower triangle, column by column (cached, read-only)."""
    cols, rows = np.triu_indices(q)  # (col, row) pairs of the lower triangle in column order
    rows.setflags(write=False)
    cols.setflags(write=False)
    return rows, cols


@lru_cache(maxsize=None)
def _gather_index(q: int, vech_order: bool) -> tuple[np.ndarray, np.ndarray]:
    """Flat positions (r q + c) of the packed entries, and for each of the q² entries its packed
    position: packing and unpacking as `take`, the standard's only integer gather (read-only)."""
    r, c = vech_index(q) if vech_order else upper_pairs(q)
    packed = np.asarray(r * q + c)
    where = np.empty((q, q), dtype=np.int64)
    where[r, c] = np.arange(r.size)
    where[c, r] = np.arange(r.size)
    where = where.reshape(-1)
    packed.setflags(write=False)
    where.setflags(write=False)
    return packed, where


def _pack(A: Array, vech_order: bool) -> Array:
    xp = namespace(A)
    q = A.shape[-1]
    if xp is np:  # numpy's fancy index gives a transposed layout, which later GEMMs round by: keep it
        r, c = vech_index(q) if vech_order else upper_pairs(q)
        return A[..., r, c]
    packed, _ = _gather_index(q, vech_order)
    return xp.take(xp.reshape(A, A.shape[:-2] + (q * q,)), from_host(xp, packed, device_of(A)), axis=-1)


def _unpack(a: Array, q: int, vech_order: bool) -> Array:
    xp = namespace(a)
    _, where = _gather_index(q, vech_order)
    return xp.reshape(xp.take(a, from_host(xp, where, device_of(a)), axis=-1), a.shape[:-1] + (q, q))


def vech(A: Array) -> Array:
    return _pack(A, vech_order=True)


def unvech(v: Array, q: int) -> Array:
    return _unpack(v, q, vech_order=True)


@lru_cache(maxsize=None)
def upper_pairs(p: int) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (r <= s) of a p x p symmetric matrix, row-major (cached, read-only)."""
    r, s = np.triu_indices(p)
    r.setflags(write=False)
    s.setflags(write=False)
    return r, s


def pack_sym(A: Array, double_offdiag: bool = False) -> Array:
    """Upper-triangle entries of symmetric (..., p, p); off-diagonals doubled if asked."""
    xp = namespace(A)
    out = _pack(A, vech_order=False)
    if double_offdiag:
        r, s = upper_pairs(A.shape[-1])
        out = out * from_host(xp, np.where(r == s, 1.0, 2.0), device_of(A))
    return out


def unpack_sym(a: Array, p: int) -> Array:
    return _unpack(a, p, vech_order=False)


def _failed_one_by_one(factor, ok, out) -> None:
    """After a batched LAPACK call raised (numpy: one singular voxel), redo the `ok` voxels one by one,
    marking those that raise again."""
    for i in np.flatnonzero(to_host(ok)):
        try:
            out[int(i), ...] = factor(int(i))
        except np.linalg.LinAlgError:
            ok[int(i)] = False


def safe_solve(A: Array, b: Array) -> tuple[Array, Array]:
    """Solve stacked systems A x = b (b: (..., k)); singular or non-finite systems give NaN rows.

    Returns (x, ok).  One bad voxel must not raise for its whole block, so a failed
    batched solve falls back to voxel-by-voxel (rare, and only for that block); a namespace
    that returns non-finite values instead of raising flags the voxel by the finite check.
    """
    xp = namespace(A, b)
    k = A.shape[-1]
    flatA = xp.reshape(A, (-1, k, k))
    flatb = xp.reshape(b, (-1, k))
    ok = (xp.all(xp.isfinite(xp.reshape(flatA, (flatA.shape[0], -1))), axis=1)
          & xp.all(xp.isfinite(flatb), axis=1))
    x = xp.full(flatb.shape, xp.nan, dtype=flatb.dtype, device=device_of(b))
    if xp.any(ok):
        try:
            x[ok] = xp.linalg.solve(flatA[ok], flatb[ok][..., None])[..., 0]
        except np.linalg.LinAlgError:
            _failed_one_by_one(lambda i: xp.linalg.solve(flatA[i, ...], flatb[i, ...][:, None])[:, 0], ok, x)
    ok &= xp.all(xp.isfinite(x), axis=1)
    x[~ok] = xp.nan
    return xp.reshape(x, b.shape), xp.reshape(ok, b.shape[:-1])


def safe_cholesky(A: Array) -> tuple[Array, Array]:
    """Lower Cholesky factors of stacked matrices; non-PD or non-finite ones give NaN and ok False."""
    xp = namespace(A)
    k = A.shape[-1]
    flat = xp.reshape(A, (-1, k, k))
    ok = xp.all(xp.isfinite(xp.reshape(flat, (flat.shape[0], -1))), axis=1)
    L = xp.full_like(flat, xp.nan)
    if xp.any(ok):
        try:
            L[ok] = xp.linalg.cholesky(flat[ok])
        except np.linalg.LinAlgError:
            _failed_one_by_one(lambda i: xp.linalg.cholesky(flat[i, ...]), ok, L)
        # a namespace that returns NaN for a matrix that is not PD (cupy) instead of raising
        ok &= xp.all(xp.isfinite(xp.reshape(L, (L.shape[0], -1))), axis=1)
    return xp.reshape(L, A.shape), xp.reshape(ok, A.shape[:-2])


@lru_cache(maxsize=None)
def duplication(q: int) -> np.ndarray:
    """Dup with vec(A) = Dup vech(A) for symmetric A, vec in row-major (a*q + b) order (cached, read-only)."""
    r, c = vech_index(q)
    Dup = np.zeros((q * q, r.size))
    Dup[r * q + c, np.arange(r.size)] = 1.0
    Dup[c * q + r, np.arange(r.size)] = 1.0
    Dup.setflags(write=False)
    return Dup


def select_rows(x: Array, idx: Any) -> Array:
    """x[idx] along the first axis; idx: a slice, or integer or boolean indices on the host or in x's
    namespace (the standard gathers integer indices only by `take`)."""
    xp = namespace(x)
    if xp is np or isinstance(idx, slice):
        return x[idx, ...]
    idx = from_host(xp, to_host(idx) if isinstance(idx, np.ndarray) else idx, device_of(x))
    return x[idx] if idx.dtype == xp.bool else xp.take(x, idx, axis=0)  # a mask is the standard's sole index


def put_rows(x: Array, idx: Any, values: Array) -> None:
    """x[idx] = values along the first axis, in place; idx: sorted unique integer indices on the host, or a
    boolean mask (the standard has no integer scatter: a host mask of the same rows, in the same order)."""
    xp = namespace(x)
    if xp is np:
        x[idx] = values
        return
    idx = np.asarray(idx)
    if idx.dtype != np.bool_:
        mask = np.zeros(x.shape[0], dtype=bool)
        mask[idx] = True
        idx = mask
    x[from_host(xp, idx, device_of(x))] = values  # a mask is the standard's sole index


def copied(x: Array) -> Array:
    """A copy of array x in its own namespace (the standard's arrays have no .copy())."""
    return namespace(x).asarray(x, copy=True)


def nan_to_num(x: Array) -> Array:
    """numpy's nan_to_num (NaN to 0, ±inf to the largest finite value), in standard operations elsewhere."""
    xp = namespace(x)
    if xp is np:
        return np.nan_to_num(x)
    big = xp.finfo(x.dtype).max
    return xp.where(xp.isnan(x), 0.0, xp.where(x == xp.inf, big, xp.where(x == -xp.inf, -big, x)))


def unvech_lower(v: Array, q: int) -> Array:
    """The lower-triangular (..., q, q) matrices whose vech is v (zeros above the diagonal), by `take`."""
    xp = namespace(v)
    _, where = _gather_index(q, vech_order=True)
    zero = q * (q + 1) // 2  # the padded zero's position, after the vech entries
    lower = np.where(np.arange(q)[:, None] >= np.arange(q)[None, :], where.reshape(q, q), zero).reshape(-1)
    padded = xp.concat([v, xp.zeros(v.shape[:-1] + (1,), dtype=v.dtype, device=device_of(v))], axis=-1)
    return xp.reshape(xp.take(padded, from_host(xp, lower, device_of(v)), axis=-1), v.shape[:-1] + (q, q))


def move(xp: ModuleType, thing: Any, device: Any = None) -> Any:
    """`thing` with its numpy arrays (also inside lists, tuples, dicts, dataclasses and the attributes
    of an objective) as arrays of namespace xp on ``device`` (None: the namespace's default): an
    objective and its data are built on the host, from scipy.sparse and numpy, and moved once to where
    the voxels' arrays live (a no-op for numpy)."""
    if xp is np:
        return thing
    if isinstance(thing, np.ndarray):
        return xp.asarray(thing, device=device)
    if isinstance(thing, (list, tuple)):
        return type(thing)(move(xp, t, device) for t in thing)
    if isinstance(thing, dict):
        return {k: move(xp, t, device) for k, t in thing.items()}
    if dataclasses.is_dataclass(thing) and not isinstance(thing, type):
        return dataclasses.replace(thing, **{f.name: move(xp, getattr(thing, f.name), device)
                                             for f in dataclasses.fields(thing) if f.init})
    if hasattr(thing, "__dict__") and not isinstance(thing, (type, ModuleType)):
        moved = copy.copy(thing)
        for name, value in vars(thing).items():
            setattr(moved, name, move(xp, value, device))
        return moved
    return thing


def take_along(x: Array, idx: np.ndarray, axis: int) -> Array:
    """x's entries idx (host integers) along one axis: numpy's fancy index (and its result's memory
    layout, which later sums round by); elsewhere the standard's `take`."""
    xp = namespace(x)
    if xp is np:
        return x[(slice(None),) * (axis % x.ndim) + (idx, ...)]
    return xp.take(x, from_host(xp, np.asarray(idx), device_of(x)), axis=axis)


def take_block(x: Array, rows: np.ndarray, cols: np.ndarray) -> Array:
    """x[..., rows, cols] over the last two axes for host integer indices (every row with every
    column): numpy's fancy index; elsewhere two `take`s (the standard has no outer indexing)."""
    xp = namespace(x)
    if xp is np:
        return x[(slice(None),) * (x.ndim - 2) + (rows[:, None], cols[None, :])]  # not `...`: another layout
    dev = device_of(x)
    rows_taken = xp.take(x, from_host(xp, np.asarray(rows), dev), axis=-2)
    return xp.take(rows_taken, from_host(xp, np.asarray(cols), dev), axis=-1)
