"""The sections of ``ldae evaluate``, one module each (:mod:`ldae.evaluation.evaluate` runs them in order):

* :mod:`.probing`: linear probes (AD vs CN, age) per feature set and the factor probes;
* :mod:`.reconstruction`: paper table 6 on the test split;
* :mod:`.interpolation`: missing-timepoint prediction against its baselines;
* :mod:`.manipulation`: volume changes along the AD-vs-CN direction, with the signed checks;
* :mod:`.figures`: the qualitative figures of the report.

:mod:`.common` holds what they share (the scan cache, batched embedding, per-scan scores). Each section
returns a dataclass of :mod:`ldae.evaluation.results`.
"""
