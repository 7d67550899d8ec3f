"""Arrays only: the model's mathematics, with no nibabel, dask or files.

* ``design``: RandomFactor, Contrast (and the FactorLayout of Z's columns, in ``sufficient``);
* ``sufficient``: SufficientStats, presence patterns, the data sums and their accumulation;
* ``inference``: T and F contrasts with Satterthwaite degrees of freedom;
* ``lrt``: null distributions and nesting checks of likelihood-ratio tests.

The fit itself (``blmm.fit``, ``blmm.objective``, ``blmm.linalg``) joins this package later.
"""
