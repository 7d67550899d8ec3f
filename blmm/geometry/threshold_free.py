"""Threshold-free cluster enhancement (Smith & Nichols 2009), exact or with a step.

TFCE(v) = ∫_0^{x(v)} e(h, v)^E h^H dh, where e(h, v) is the extent (layout extents summed:
voxel count, or vertex area on surfaces) of the component of {u: x(u) >= h} holding v.
Two-sided maps: the positive part and the negative part are enhanced separately and the
negative result carries its sign (as nilearn and PALM do).

- `tfce` is EXACT: between consecutive map values the components do not change, so the
  integral is a sum of closed-form pieces e^E (b^{H+1} - a^{H+1}) / (H + 1).  One sort ranks
  the values; each element joins its highest higher neighbour (vectorised), and only the edges
  between two such chains go to a spanning forest (scipy, in C), which keeps the merges of two
  components (saddles, see `_merge_edges`).  Only the saddles are replayed one by one in
  Python, everything else is vectorised (see `_replay_merges`), and every element's sum is
  gathered by pointer jumping.  An element's value is a difference of component integrals:
  rounding is within ~1e-14 of the map's largest value, not of each element's own.
- `tfce_batch` and `tfce_maxima` take (maps x elements) batches; each row's result equals
  `tfce` of that row bit for bit.  `tfce_maxima` gathers the sums at the components' peaks
  only (a map's maximum is at one).  Cost (docs/performance.md): ~0.2-0.35 CPU s per 2 mm MNI
  map of 228k voxels, ~7 ms per fsaverage5 hemisphere.
- `tfce_stepped` is the Riemann sum at thresholds dh, 2dh, ... (each level's score times dh):
  the convention of MNE; nilearn and fslmaths omit the factor dh (divide by dh to compare).
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from blmm.errors import GeometryError
from blmm.geometry.clusters import row_components
from blmm.geometry.layout import SURFACE, VOLUME, SpatialLayout

# (H, E) defaults per part kind: volumes H = 2, E = 0.5; surfaces H = 2, E = 1 (area-weighted).
TFCE_DEFAULTS = {VOLUME: (2.0, 0.5), SURFACE: (2.0, 1.0)}
# Above-threshold (level, element) pairs labelled per graph call in the stepped variant.
NODES_PER_CALL = 4_000_000
# Elements (maps x elements) enhanced per exact pass.  Small: passes over larger arrays were
# slower per map when measured (sorts grow as n log n, gathers leave the cache), so only maps
# much smaller than a hemisphere share a pass.
ELEMENTS_PER_CALL = 16_384


def _checked(values: np.ndarray, layout: SpatialLayout, batch: bool = False) -> np.ndarray:
    """``values`` as float64 (maps x elements); one map unless ``batch``."""
    values = np.asarray(values, dtype=np.float64)
    maps = values if batch else values[None]
    if values.ndim != (2 if batch else 1) or values.shape[-1] != layout.n_elements:
        expected = "(maps, " if batch else "("
        raise GeometryError(
            f"TFCE map: found shape {values.shape}, expected {expected}{layout.n_elements},) "
            "(one value per element of the layout)")
    if not np.all(np.isfinite(values)):
        raise GeometryError("TFCE map: found NaN or infinite values, expected finite values "
                            "(set unfitted elements to 0)")
    return maps


def _part_pieces(layout: SpatialLayout):
    """(positions, first, second, extents, H, E) of each part, edges in part numbering."""
    for part, (first, second) in zip(layout.parts, layout.part_edges):
        yield (part.positions, first, second, layout.extents[part.positions],
               TFCE_DEFAULTS[part.kind])


def _each_part(values: np.ndarray, layout: SpatialLayout, H: float | None, E: float | None,
               two_sided: bool, positive_part) -> np.ndarray:
    """``positive_part`` of each part of every map of ``values`` (maps x elements), in chunks
    of about ELEMENTS_PER_CALL elements (at least one map)."""
    out = np.zeros_like(values)
    per_call = max(1, ELEMENTS_PER_CALL // max(1, layout.n_elements))
    for positions, first, second, extents, (H_default, E_default) in _part_pieces(layout):
        height = H_default if H is None else float(H)
        exponent = E_default if E is None else float(E)
        if not (height >= 0 and exponent >= 0):
            raise GeometryError(f"TFCE: found H = {height}, E = {exponent}; expected both >= 0")
        for start in range(0, values.shape[0], per_call):
            part = values[start:start + per_call, positions]
            result = positive_part(part, first, second, extents, height, exponent)
            if two_sided:
                result = result - positive_part(-part, first, second, extents, height, exponent)
            out[start:start + per_call, positions] = result
    return out


def tfce(values: np.ndarray, layout: SpatialLayout, H: float | None = None,
         E: float | None = None, two_sided: bool = True) -> np.ndarray:
    """Exact TFCE of a 1-D map over ``layout`` (H, E default per part: `TFCE_DEFAULTS`)."""
    return _each_part(_checked(values, layout), layout, H, E, two_sided, _exact_positive)[0]


def tfce_stepped(values: np.ndarray, layout: SpatialLayout, dh: float,
                 H: float | None = None, E: float | None = None,
                 two_sided: bool = True) -> np.ndarray:
    """TFCE as Σ_k e(h_k)^E h_k^H dh over h_k = k·dh, k = 1, 2, ... while h_k <= the maximum.

    A last step within 1e-9·dh of the maximum is taken at the maximum itself, so that
    ``dh = max / 100`` gives exactly 100 levels (as nilearn and fslmaths do).
    """
    if not dh > 0:
        raise GeometryError(f"TFCE step dh: found {dh!r}, expected a positive number")

    def stepped_rows(x, *args):
        return np.stack([_stepped_positive(row, *args, dh=float(dh)) for row in x])

    return _each_part(_checked(values, layout), layout, H, E, two_sided, stepped_rows)[0]


def tfce_batch(values: np.ndarray, layout: SpatialLayout, H: float | None = None,
               E: float | None = None, two_sided: bool = True) -> np.ndarray:
    """Exact TFCE of each row of a (maps x elements) batch (the resampled maps).

    Several maps are enhanced per pass (as disjoint copies of the graph); each row equals
    `tfce` of that row exactly, bit for bit.
    """
    values = _checked(np.atleast_2d(values), layout, batch=True)
    return _each_part(values, layout, H, E, two_sided, _exact_positive)


def tfce_maxima(values: np.ndarray, layout: SpatialLayout, H: float | None = None,
                E: float | None = None, two_sided: bool = True) -> np.ndarray:
    """The largest exact TFCE (in absolute value if two-sided) of each map of a batch.

    NaN (an element not fitted) counts as 0: in no cluster.  This is the resampling engine's
    transform, e.g. ``functools.partial(tfce_maxima, layout=layout)``.
    """
    values = np.atleast_2d(np.asarray(values, dtype=np.float64))
    values = _checked(np.where(np.isnan(values), 0.0, values), layout, batch=True)
    enhanced = _each_part(values, layout, H, E, two_sided,
                          lambda *args: _exact_positive(*args, peaks_only=True))
    return np.abs(enhanced).max(axis=1, initial=0.0)


def tfce_maxima_bytes(layout: SpatialLayout, maps: int) -> int:
    """An upper bound of what ``tfce_maxima`` allocates for a batch of ``maps`` maps (bytes).

    Per map its float64 copies (NaN set to 0, the enhanced maps, their absolute value: 32 bytes an
    element); per pass of ``_each_part`` (ELEMENTS_PER_CALL elements, at least one map) the exact
    transform's arrays, about 160 bytes an element and 80 an edge when every element is above 0
    (tracemalloc on volumes with 6 and 26 neighbours and on meshes: tests/geometry/test_tfce.py).
    """
    n = max(1, layout.n_elements)
    per_call = min(max(1, maps), max(1, ELEMENTS_PER_CALL // n))
    return int(32 * maps * n + per_call * (184 * n + 80 * layout.edges[0].size))


def _exact_positive(x: np.ndarray, first: np.ndarray, second: np.ndarray,
                    extents: np.ndarray, H: float, E: float, peaks_only: bool = False) -> np.ndarray:
    """Exact TFCE of the positive part of each row of ``x`` (maps x elements); elements at or
    below 0 get 0.  The rows are disjoint copies of the graph, enhanced in one pass.

    ``peaks_only``: only each component's highest element (a peak) gets its value, the rest 0;
    enough for a map's maximum, which is at a peak: an element's component at every level up to
    its own value also holds the peak its chain of joins climbs to, so the peak's integral is
    the element's plus a non-negative piece.
    """
    maps, n = x.shape
    flat = x.ravel()
    out = np.zeros(flat.size)
    positive = np.flatnonzero(flat > 0)
    if positive.size == 0:
        return out.reshape(x.shape)
    level = flat[positive]
    local = np.full(flat.size, -1, dtype=np.int64)
    local[positive] = np.arange(positive.size)
    shift = (np.arange(maps, dtype=np.int64) * n)[:, None]
    a, b = local[(first + shift).ravel()], local[(second + shift).ravel()]
    inside = (a >= 0) & (b >= 0)
    order = np.argsort(-level, kind="stable")  # rank 0 is the highest value
    rank = np.empty(positive.size, dtype=np.int64)
    rank[order] = np.arange(positive.size)
    higher, lower, peak = _merge_edges(a[inside], b[inside], rank, order)
    power = H + 1.0
    parent, delta, acc = _replay_merges(higher, lower, peak, level ** power, rank,
                                        extents[positive % n].astype(np.float64), E)
    chosen = np.flatnonzero(peak == np.arange(peak.size)) if peaks_only else np.arange(peak.size)
    # a peak's parent is a peak: the peaks' sub-forest sums exactly what the whole one does
    index = np.full(peak.size, -1, dtype=np.int64)
    index[chosen] = np.arange(chosen.size)
    # Each element's TFCE: the deltas on its path to its root plus the root's total, by
    # pointer jumping: `total` sums the deltas from an element up to (not including) `jump`.
    total = delta[chosen]
    jump = index[parent[chosen]]
    while True:
        hop = jump[jump]
        if np.array_equal(hop, jump):
            break
        total = total + total[jump]
        jump = hop
    out[positive[chosen]] = (total + acc[chosen][jump]) / power
    return out.reshape(x.shape)


def _merge_edges(a: np.ndarray, b: np.ndarray, rank: np.ndarray,
                 order: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The merges of the superlevel sets' components, as (higher end, lower end) edges sorted
    by the lower end's level (highest first), each element's first edge (its join) first; and
    the peak each element's chain of joins climbs to.

    An element joins at its own value: it is first linked to its highest higher neighbour
    (a join), so every element lies on a chain of joins up to a peak.  Its other higher
    neighbours can only merge two components (a saddle) if their chains end at another peak;
    those few edges, between peaks and keyed by the lower end's rank, go to Kruskal (scipy's
    minimum spanning tree, in C), which keeps the ones that merge.  Contracting the chains
    first changes no merge: an element's chain is complete before any edge of it is seen.
    """
    n = rank.size
    row_lower = rank[a] > rank[b]
    lower = np.where(row_lower, a, b)
    higher = np.where(row_lower, b, a)
    best = np.full(n, n, dtype=np.int64)
    np.minimum.at(best, lower, rank[higher])
    joins = best < n
    up = np.arange(n)
    up[joins] = order[best[joins]]
    peak = _fixed_point(up)
    cross = peak[lower] != peak[higher]
    below, own, other = lower[cross], peak[lower[cross]], peak[higher[cross]]
    # key: the lower end's rank, ties broken by the other peak's (unique, so the forest and
    # its order do not depend on scipy's sort nor on other maps of a batch)
    key = rank[below] * n + rank[other]
    # one edge per pair of peaks, its earliest (scipy would sum parallel edges' keys)
    pair = np.minimum(own, other) * n + np.maximum(own, other)
    by_pair = np.argsort(pair)
    pair = pair[by_pair]
    starts = np.flatnonzero(np.r_[True, pair[1:] != pair[:-1]]) if pair.size else pair
    earliest = np.minimum.reduceat(key[by_pair], starts) if pair.size else key
    from scipy.sparse.csgraph import minimum_spanning_tree  # when used: scipy's csgraph costs every run ~15 ms (issue 21)

    forest = minimum_spanning_tree(sp.csr_matrix(
        (earliest + 1.0, (pair[starts] // n, pair[starts] % n)), shape=(n, n)))
    kept = np.sort(forest.data.astype(np.int64) - 1)
    saddle_lower, saddle_higher = order[kept // n], order[kept % n]
    join_lower = order[joins[order]]
    lower = np.concatenate([join_lower, saddle_lower])
    higher = np.concatenate([up[join_lower], saddle_higher])
    # two sorted runs: a stable merge puts each element's join before its saddles
    merged = np.argsort(np.concatenate([2 * rank[join_lower], 2 * rank[saddle_lower] + 1]),
                        kind="stable")
    return higher[merged], lower[merged], peak


def _fixed_point(pointer: np.ndarray) -> np.ndarray:
    """Where following ``pointer`` ends (pointer[r] == r there), by pointer jumping."""
    while True:
        hop = pointer[pointer]
        if np.array_equal(hop, pointer):
            return pointer
        pointer = hop


def _group_cumsum(values: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Cumulative sums restarting at each True of ``starts`` (contiguous groups).

    A doubling scan (Hillis-Steele) within groups rather than one global cumsum: rounding
    stays relative to each group's own sums, not to the running total of all groups.
    """
    out = np.array(values, dtype=np.float64)
    group = np.cumsum(starts)
    shift = 1
    while shift < out.size:
        same = group[shift:] == group[:-shift]
        if not same.any():
            break
        out[shift:] += np.where(same, out[:-shift], 0.0)
        shift *= 2
    return out


def _replay_merges(higher: np.ndarray, lower: np.ndarray, peak: np.ndarray, top: np.ndarray,
                   rank: np.ndarray, extents: np.ndarray, E: float):
    """The forest's merges, highest level first, as a tree with each element's integral.

    Edges come sorted by their lower end's level (highest first); ``top`` is level^(H+1).
    Each component is named by its highest element, its peak (the elder rule): an element's
    first edge joins it to the component of its higher end (a "join"); its further edges merge
    two components (a "saddle"), the younger peak hanging under the elder.  Only the saddles
    are replayed one by one (a union-find over peaks); the joins' components are then found by
    binary lifting along the peaks' merge chains, and each component's extent and integral
    over its events (birth, joins, absorbed components, its own absorption) by grouped
    cumulative sums.  Returned: ``parent`` (an element's component at its join, a peak's elder
    at its absorption, itself for a final root), ``delta`` (its integral minus its parent's at
    that moment, times H + 1) and ``acc`` ((H + 1) times a final root's whole integral).
    """
    n = extents.size
    join = np.ones(higher.size, dtype=bool)
    join[1:] = lower[1:] != lower[:-1]
    joins, saddles = np.flatnonzero(join), np.flatnonzero(~join)
    elder, young = _saddle_merges(peak[higher[saddles]], peak[lower[saddles]], rank)
    component = _components_at(peak[higher[joins]], joins, elder, young, saddles, n)
    # Each component's extent when absorbed: its own elements, then absorbed ones, in order.
    extent = (np.bincount(component, weights=extents[lower[joins]], minlength=n) + extents).tolist()
    for a, b in zip(elder.tolist(), young.tolist()):
        extent[a] += extent[b]
    absorbed = np.asarray(extent)[young]
    # Events of every component: birth, joins, absorbing a younger one, being absorbed.
    peaks = np.flatnonzero(peak == np.arange(n))
    kinds = [(peaks, np.full(peaks.size, -1), top[peaks], extents[peaks]),
             (component, joins, top[lower[joins]], extents[lower[joins]]),
             (elder, saddles, top[lower[saddles]], absorbed),
             (young, saddles, top[lower[saddles]], np.zeros(young.size))]
    owner, integral, after, level, event = _event_integrals(kinds, E)
    bounds = np.cumsum([0] + [len(kind[0]) for kind in kinds])
    at_join, at_absorbing, at_absorbed = (event[bounds[k]:bounds[k + 1]] for k in (1, 2, 3))
    parent = np.arange(n)
    delta = np.zeros(n)
    parent[lower[joins]] = component
    delta[lower[joins]] = -integral[at_join]
    parent[young] = elder
    delta[young] = integral[at_absorbed] - integral[at_absorbing]
    last = np.flatnonzero(np.r_[owner[1:] != owner[:-1], True])  # each component's last event
    acc = np.zeros(n)
    acc[owner[last]] = integral[last] + after[last] ** E * level[last]
    return parent, delta, acc


def _saddle_merges(first_peak: np.ndarray, second_peak: np.ndarray,
                   rank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each saddle in order, the elder and the younger root of the two components it joins."""
    roots = list(range(rank.size))
    rank_list = rank.tolist()
    elder, young = [], []
    for a, b in zip(first_peak.tolist(), second_peak.tolist()):
        while roots[a] != a:
            roots[a] = roots[roots[a]]
            a = roots[a]
        while roots[b] != b:
            roots[b] = roots[roots[b]]
            b = roots[b]
        if rank_list[a] > rank_list[b]:  # rank 0 is the highest element
            a, b = b, a
        roots[b] = a
        elder.append(a)
        young.append(b)
    return np.asarray(elder, dtype=np.int64), np.asarray(young, dtype=np.int64)


def _components_at(peaks: np.ndarray, times: np.ndarray, elder: np.ndarray, young: np.ndarray,
                   merged_at: np.ndarray, n: int) -> np.ndarray:
    """The root at ``times`` of each of ``peaks`` (of ``n`` elements): up its merge chain while merged earlier.

    Merge times grow along a chain, so binary lifting works: tables of where 2^k merges lead
    and when the last of them happens.
    """
    hop = np.arange(n)
    when = np.full(hop.size, np.inf)
    hop[young] = elder
    when[young] = merged_at
    lifts = [(hop, when)]
    while not np.array_equal(hop[hop], hop):
        hop, when = hop[hop], when[hop]
        lifts.append((hop, when))
    component = peaks
    for hop, when in reversed(lifts):
        component = np.where(when[component] < times, hop[component], component)
    return component


def _event_integrals(kinds: list[tuple[np.ndarray, ...]], E: float):
    """Each component's extent and (H+1)-scaled integral at each of its events, in time order.

    ``kinds`` lists (component, time, level^(H+1), extent added) per kind of event.  Returned:
    the events' components, integrals and extents after them, levels (all in component then
    time order), and where each input event went in that order.
    """
    owner = np.concatenate([kind[0] for kind in kinds])
    at = np.concatenate([kind[1] for kind in kinds])
    level = np.concatenate([kind[2] for kind in kinds])
    grows = np.concatenate([kind[3] for kind in kinds])
    order = np.lexsort((at, owner))
    owner, level, grows = owner[order], level[order], grows[order]
    starts = np.ones(owner.size, dtype=bool)
    starts[1:] = owner[1:] != owner[:-1]
    after = _group_cumsum(grows, starts)
    previous = np.where(starts, level, np.roll(level, 1))
    integral = _group_cumsum((after - grows) ** E * (previous - level), starts)
    event = np.empty(owner.size, dtype=np.int64)
    event[order] = np.arange(owner.size)
    return owner, integral, after, level, event


def _stepped_positive(x: np.ndarray, first: np.ndarray, second: np.ndarray,
                      extents: np.ndarray, H: float, E: float, dh: float) -> np.ndarray:
    """Stepped TFCE of the positive part of ``x`` at levels dh, 2dh, ... (see `tfce_stepped`)."""
    out = np.zeros(x.size)
    top = float(x.max()) if x.size else 0.0
    if top <= 0:
        return out
    ratio = top / dh
    steps = int(np.floor(ratio)) + (1 if ratio - np.floor(ratio) > 1 - 1e-9 else 0)
    levels = np.minimum(dh * np.arange(1, steps + 1), top)
    count_above = x.size - np.searchsorted(np.sort(x), levels, side="left")
    start = 0
    while start < steps:
        stop = start + max(1, int(np.searchsorted(np.cumsum(count_above[start:]), NODES_PER_CALL)))
        above = x[None, :] >= levels[start:stop, None]
        found = row_components(above, first, second)
        extent = np.bincount(found.labels, weights=extents[found.elements],
                             minlength=found.n_components)
        score = extent[found.labels] ** E * levels[start + found.rows] ** H * dh
        out += np.bincount(found.elements, weights=score, minlength=x.size)
        start = stop
    return out
