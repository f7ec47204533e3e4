"""The training machinery every learned method runs on.

The LightningModule's learning step (:mod:`.module`) with its per-task passes (:mod:`.task_passes`), its evaluation
(:mod:`.evaluation`) and checkpoint hooks with
resume (:mod:`.resume`); task batching (:mod:`.task_batching`); protected tasks -- their settings
(:mod:`.protected_config`), losses (:mod:`.protected`), run-time state (:mod:`.protection`) and causal-LM refusal
checks (:mod:`.safety`) -- and the alignment vector (:mod:`.alignment`); stopping on a signal (:mod:`.preemption`);
the step profile (:mod:`.profiling`); adapted heads (``heads: adapt``) -- their settings, pseudo-labels and records
(:mod:`.heads_config`) and the heads' fitting (:mod:`.adapted_heads`); the merge sharded over devices by FSDP2
(``trainer=fsdp``: the strategy and its rules, :mod:`.sharding`; the merge laid out for FSDP2, :mod:`.sharded_merge`).

May import: objectives, the merged model (``adamerge.methods.learned.merged``), backbones, the methods' registry and
checks, pool, data, reporting, storage, errors; never a learned method, export or the command.
"""
