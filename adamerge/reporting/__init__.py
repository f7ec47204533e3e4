"""Reporting: what a run or a sweep found, read from its results files -- never from a model.

Results files, the comparison table and the coefficient heatmap (:mod:`.results`); the label-free selection of a
sweep's job (:mod:`.selection`); sweep summaries and their plots (:mod:`.sweep`, :mod:`.sweep_plots`); figures
(:mod:`.plots`); the HTML report and the ``adamerge-report`` command (:mod:`.html`); the loggers (:mod:`.loggers`).

May import: ``adamerge.errors``, ``adamerge.storage``.
"""
