"""Sweeps: a grid of methods x noise rates x seeds, each trial one ``raynoisy train`` run inside a Ray Tune
trial (the Train V2 pattern), resumable by run directory.

``raynoisy.tune.plan.plan_sweep`` resolves and checks every trial's config without Ray (import it alone to
fail fast); ``raynoisy.tune.runner.run_sweep`` runs the unfinished trials. The tables and the plot are
``raynoisy.report.write_sweep_report``.
"""
