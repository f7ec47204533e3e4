"""The embedded demo zoo, apart from everything else: real weights fine-tuned offline on bundled images.

Its tasks' data (:mod:`.tasks`), its recipe and cache (:mod:`.recipe`), and building it (:mod:`.zoo`); the text study
zoo, all-MiniLM-L6-v2 on built sentence tasks (:mod:`.text_tasks`, :mod:`.text_zoo`), built and cached the same way.
Only the command uses it (the ``${demo_zoo:}`` resolver of ``conf/``); no other package imports it.

May import: ``adamerge.backbones``, ``adamerge.storage`` (and anything below the command).
"""
