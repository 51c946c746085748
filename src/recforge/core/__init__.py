"""The kernel layer every other part of recforge stands on; it imports nothing from recforge but ``errors``.

- :mod:`~recforge.core.topk`: top-k selection with the one tie-break (higher score, then smaller index) and the
  ``UNSCORED`` sentinel;
- :mod:`~recforge.core.ranking`: batched full-catalogue ranking (hits and first relevant rank);
- :mod:`~recforge.core.metrics`: ranking and rating metrics on arrays;
- :mod:`~recforge.core.validation`: the early-stopping validator, on the same kernels as the reported metrics;
- :mod:`~recforge.core.threads`, :mod:`~recforge.core.device`: numba/BLAS and torch threads, device choice;
- :mod:`~recforge.core.accelerator`, :mod:`~recforge.core.gpu_environment`: whether work goes to a GPU, and the
  process settings its first GPU work needs, without importing torch;
- :mod:`~recforge.core.rng`: seeded random streams for numba kernels;
- :mod:`~recforge.core.sparse`: growing and merging CSR matrices, storing them as arrays;
- :mod:`~recforge.core.params`: the parameter vocabulary, constraints and renamed parameters;
- :mod:`~recforge.core.vectors`: row normalisation of embedding matrices;
- :mod:`~recforge.core.progress`: per-epoch progress bars.
"""
