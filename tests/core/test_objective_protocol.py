"""Issue 19: every objective of the structure registry keeps the declared `Objective` protocol
(objective/base.py): one `data` signature, the Hessian declared, its bytes reported, and the
same log-likelihood as the dense formula at an arbitrary D."""
from __future__ import annotations

import inspect

import numpy as np
import pytest

from blmm.core.design import RandomFactor
from blmm.core.objective import DenseObjective
from blmm.core.objective.base import Evaluation, Objective
from blmm.core.structure import STRUCTURES, plan_fit
from blmm.core.sufficient import sufficient_stats

# the one signature of each protocol method (parameter names, in order), read from the protocol itself
SIGNATURES = {name: list(inspect.signature(getattr(Objective, name)).parameters)
              for name in ("data", "evaluate", "per_voxel_bytes", "held_bytes")}
# the dense formula and a structured one sum the same terms in another order: float64 noise on
# log-likelihoods of ~100 rows (~1e-12), with a margin
LLH_ATOL = 1e-9


def _design(kind: str, seed: int = 5, v: int = 4):
    """A small design of each shape the registry distinguishes: one factor, a nesting tree,
    crossed factors, and a nesting tree beside a crossed factor."""
    rng = np.random.default_rng(seed)
    n_sub, visits = 18, 3
    subject = np.repeat(np.arange(n_sub), visits)
    n = subject.size
    time = np.tile(np.arange(visits, dtype=float), n_sub) + rng.uniform(0, 0.2, n)
    X = np.column_stack([np.ones(n), rng.standard_normal(n), time])
    factors = [RandomFactor("subject", subject, np.column_stack([np.ones(n), time]))]
    if kind in ("nested", "nested+crossed"):
        factors.insert(0, RandomFactor("family", subject // 2, np.ones((n, 1))))
    if kind in ("crossed", "nested+crossed"):
        factors.append(RandomFactor("site", np.arange(n) % 4, np.ones((n, 1))))
    Y = X @ np.array([1.0, 0.5, 0.2])[:, None] + rng.standard_normal((n, v))
    return sufficient_stats(Y, X, factors)


# every registered structure on a design it takes (schur twice: one factor eliminated, and a tree)
CASES = [("levels", "one"), ("nested", "nested"), ("schur", "crossed"), ("schur", "nested+crossed"),
         ("dense", "crossed")]


def registered_objectives():
    """(id, objective, stats) of every objective the registry builds, missing-row ones included."""
    out = []
    for structure, kind in CASES:
        stats = _design(kind)
        plan = plan_fit(stats.layout, structure)
        obj = plan.objective(stats.XtX[0], stats.ZtX[0], stats.ZtZ[0], int(stats.n_obs[0]), True)
        out.append((f"{structure}-{kind}:{type(obj).__name__}", obj, stats))
        path = STRUCTURES[structure].missing_rows
        if path is not None:
            missing = path.build(stats.XtX[0], stats.ZtX[0], stats.ZtZ[0], int(stats.n_obs[0]), stats.layout, True,
                                 plan.tree)
            out.append((f"{structure}-{kind}:{type(missing).__name__}", missing, stats))
    return out


OBJECTIVES = registered_objectives()
IDS = [case[0] for case in OBJECTIVES]


def test_every_registered_objective_is_covered():
    """Every structure of the registry, and each missing-rows objective, appears above."""
    classes = {type(obj).__name__ for _, obj, _ in OBJECTIVES}
    assert {s for s, _ in CASES} == set(STRUCTURES)
    assert classes == {"LevelObjective", "MissingObjective", "NestedObjective", "NestedMissingObjective",
                       "SchurObjective", "SchurMissingObjective", "NestedSchurObjective",
                       "NestedSchurMissingObjective", "DenseObjective"}


@pytest.mark.parametrize("name, obj, stats", OBJECTIVES, ids=IDS)
def test_objective_keeps_the_protocol(name, obj, stats):
    for method, params in SIGNATURES.items():
        assert list(inspect.signature(getattr(type(obj), method)).parameters) == params, method
    assert (obj.n, obj.p, obj.reml) == (int(stats.n_obs[0]), stats.p, True)
    assert isinstance(obj.missing_rows, bool) and isinstance(obj.has_deviance_hessian, bool)
    # the Hessian is declared exactly where it is implemented
    assert obj.has_deviance_hessian == callable(getattr(obj, "deviance_hessian", None))
    assert obj.missing_rows == ("Missing" in type(obj).__name__)
    assert obj.per_voxel_bytes() > 0
    assert obj.held_bytes() > 0


def _reachable_bytes(obj, depth: int = 8, seen=None) -> int:
    """Bytes of the arrays reachable from obj's attributes (what held_bytes used to inspect)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if depth == 0:
        return 0
    if isinstance(obj, (list, tuple)):
        return sum(_reachable_bytes(a, depth - 1, seen) for a in obj)
    if isinstance(obj, dict):
        return sum(_reachable_bytes(a, depth - 1, seen) for a in obj.values())
    if hasattr(obj, "__dict__"):
        return sum(_reachable_bytes(a, depth - 1, seen) for a in vars(obj).values())
    return 0


@pytest.mark.parametrize("name, obj, stats", OBJECTIVES, ids=IDS)
def test_held_bytes_count_the_objectives_arrays(name, obj, stats):
    """What an objective reports is most of what it holds: its large arrays are all counted
    (index arrays and tiny constants may be left out; 90% leaves them room)."""
    reachable = _reachable_bytes(obj)
    assert 0.9 * reachable <= obj.held_bytes() <= reachable


@pytest.mark.parametrize("name, obj, stats", OBJECTIVES, ids=IDS)
def test_objective_evaluates_the_dense_likelihood(name, obj, stats):
    """At an arbitrary D every objective gives the dense formula's llh and β (the complete design:
    a missing-rows objective with no units is its base objective)."""
    rng = np.random.default_rng(11)
    v = stats.n_voxels
    D = []
    for q in stats.layout.q:
        A = rng.standard_normal((v, q, q))
        D.append(A @ np.swapaxes(A, 1, 2) / q + 0.1 * np.eye(q))
    dense = DenseObjective(stats.XtX[0], stats.ZtX[0], stats.ZtZ[0], int(stats.n_obs[0]), stats.layout, True)
    ref = dense.evaluate(D, dense.data(stats.XtY, stats.ZtY, stats.YtY))
    data = obj.data(stats.XtY, stats.ZtY, stats.YtY)
    assert np.array_equal(data.XtY, stats.XtY) and data.take(np.arange(2)).XtY.shape == (2, stats.p)
    ev = obj.evaluate(D, data)
    assert isinstance(ev, Evaluation)
    np.testing.assert_allclose(ev.llh, ref.llh, rtol=0, atol=LLH_ATOL)
    np.testing.assert_allclose(ev.beta, ref.beta, rtol=1e-8, atol=1e-10)  # β: the same GLS, float64 noise


@pytest.mark.parametrize("name, obj, stats", [case for case in OBJECTIVES if not case[1].missing_rows],
                         ids=[case[0] for case in OBJECTIVES if not case[1].missing_rows])
def test_one_pattern_objectives_refuse_units(name, obj, stats):
    with pytest.raises(ValueError, match="takes no missing-row units"):
        obj.data(stats.XtY, stats.ZtY, stats.YtY, {"n": np.full(stats.n_voxels, 3.0)})
