"""Experiments: persona gating, sweeps and the field's follow-up experiments.

Each experiment module declares ``EXPERIMENT = Experiment(name, config, run)``
(``framework``); they share one config base (``config``), one runner (``runner``,
``timings``), typed summaries and verdicts (``summary``, ``measure``) and one report
builder (``reporting``).
"""
