"""Export and loading: the merged multi-task model on disk, and back.

Writing it with its heads, model card, per-task transformers directories, mergekit recipe and signature
(:mod:`.writer`, :mod:`.heads`, :mod:`.model_card`, :mod:`.hf_tasks`, :mod:`.mergekit_config`, :mod:`.signing`);
exporting what a run learned (:mod:`.from_run`); loading an export back as a model (:mod:`.loading`,
:mod:`.multitask`: ``adamerge.load_merged``).

May import: every layer below it (learned methods, training, objectives, ...). ``adamerge.load_merged`` must not
import Lightning: :mod:`.loading` and :mod:`.multitask` import only storage, pool, data (preprocessing, batches),
backbones and the merged model.
"""
