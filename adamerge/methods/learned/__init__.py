"""Learned methods: merges learned from unlabeled test data by a test-time objective, each in one module.

AdaMerging task- and layer-wise, AdaMerging++ and the builder every learned method shares (:mod:`.adamerging`);
learning on top of a data-free method's per-task vectors (:mod:`.bases`); Concrete subspace masks
(the mask, :mod:`.concrete_mask`; what its methods share and Concrete task arithmetic, :mod:`.concrete`; Concrete
AdaMerging, :mod:`.concrete_adamerging`); AdaRank (:mod:`.adarank`; its SVD-factored merged model,
:mod:`.spectral_merged`); progressive layer-wise distillation
(:mod:`.progressive`; the block inputs it caches and propagates, :mod:`.progressive_activations`; the arguments it
captures at a block's input, :mod:`.block_arguments`). Each registers in
:mod:`adamerge.methods.registry` and subclasses the learning step of
:mod:`adamerge.training.module`.

May import: every layer below ``adamerge.export`` (training, objectives, the data-free methods, the registry,
backbones, pool, data, reporting, storage, errors). One module sits lower than its package: :mod:`.merged`, the
differentiable merged model ``θ0 + Σ λ τ`` that the training step trains, imports only ``adamerge.pool`` and
``adamerge.errors``, so that objectives and training may use it.
"""
