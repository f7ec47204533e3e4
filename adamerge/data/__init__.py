"""Data and preprocessing: each task's unlabeled inputs and its labelled evaluation split.

Where a task's data lives and how it is loaded and checked (:mod:`.tasks`); raw examples to model inputs
(:mod:`.preprocessing`), encoded once and cached (:mod:`.input_cache`); what a batch is and the two splits
(:mod:`.batches`); the LightningDataModule that serves every task (:mod:`.datamodule`).

May import: ``adamerge.errors``, ``adamerge.storage``. Only :mod:`.datamodule` imports Lightning: a loaded export
preprocesses with :mod:`.preprocessing` and :mod:`.batches` alone.
"""
