"""Experiments: persona gating, sweeps and the field's follow-up experiments.

Each experiment is a ``run_<name>(lm, out_dir, config)`` function built on the
shared machinery in ``runner``, ``store``, ``steerlab.plots`` and ``steerlab.report``.
"""
