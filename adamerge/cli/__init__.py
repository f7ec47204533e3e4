"""The command: ``adamerge`` and ``adamerge-verify``.

The Hydra entry point and its guard (:mod:`.main`); the run's settings, parsed once from the composed configuration
into typed objects (:mod:`.settings`); one run's orchestration (:mod:`.runner`) and each method's run
(:mod:`.method_runs`); the checks before loading and before learning (:mod:`.preflight`, :mod:`.run_memory`);
checking a signed export (:mod:`.verify`).

May import: every other package but the ``adamerge`` facade. The raw Hydra configuration stops here: what lies below
takes typed settings.
"""
