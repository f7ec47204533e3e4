"""Backbones: the networks whose weights get merged, and the frozen heads that read them.

EfficientNet-Lite0 with real ImageNet weights offline (:mod:`.efficientnet`); CLIP vision towers and zero-shot heads
(:mod:`.clip`); transformers text classifiers and causal LMs with their prompt data (:mod:`.hf`) and reading their
checkpoints onto the backbone (:mod:`.hf_checkpoints`, :class:`~.hf_checkpoints.HFModelPool`); task heads
(:mod:`.heads`); a backbone's sequence of blocks (:mod:`.blocks`). A new backbone is a module here plus a
``conf/modelpool`` file (docs/architecture.md).

May import: ``adamerge.errors``, ``adamerge.storage``, ``adamerge.pool``, ``adamerge.data``.
"""
