"""The model pool and its task vectors: what gets merged.

Loading checkpoints in any format (:mod:`.checkpoints`) and checking a fine-tuned one against its pretrained model
(:mod:`.validation`); the pool of a pretrained backbone with its fine-tuned checkpoints and frozen heads
(:mod:`.modelpool`); task vectors ``τ_k = θ_k − θ0`` (:mod:`.task_vectors`), one PEFT adapter read and checked
(:mod:`.peft_adapter`) and LoRA adapters as task vectors (:mod:`.lora`); choosing and grouping tensors by name
(:mod:`.key_filters`); what a run will hold in memory, planned from the checkpoints' headers (:mod:`.inventory`;
the model's and the run's shapes, :mod:`.memory_shapes`; the plan, :mod:`.memory_plan`).

May import: ``adamerge.errors``, ``adamerge.storage``. Nothing here merges, learns or reads data.
"""
