"""Files adamerge writes and reads back, whatever they hold.

Atomic writes that a kill or a full disk cannot tear (:mod:`.atomic`), the locks that keep one process per run
directory or cache build (:mod:`.locking`), sha256 manifests that catch a changed file (:mod:`.manifest`), and the
module paths that moved in 0.3, for files older versions wrote (:mod:`.renamed`).

May import: ``adamerge.errors`` only.
"""
