"""The profiled (RE)ML objective: one declared interface (base.py), one structure per file."""
from blmm.core.objective.base import Evaluation, Objective
from blmm.core.objective.dense import DenseData, DenseObjective
from blmm.core.objective.levels import LevelData, LevelObjective
from blmm.core.objective.schur import SchurData, SchurObjective

__all__ = ["Evaluation", "Objective", "LevelObjective", "LevelData", "DenseObjective", "DenseData",
           "SchurObjective", "SchurData"]
