"""Merge methods: the one registry of every method by name, and the two families that register in it.

- :mod:`.registry`: ``register_method`` / ``get_method`` / ``available_methods`` -- mirrored one file per name by
  the Hydra group ``conf/method/``; :mod:`.configs`: a method's hyperparameters from that group; :mod:`.checks`:
  the value checks methods share.
- :mod:`.data_free`: methods that need only the task vectors (``adamerge.merge``).
- :mod:`.learned`: methods that learn their merge from unlabeled test data through :mod:`adamerge.training`.

May import: this package's registry, configs and checks import only ``adamerge.errors`` (the registry finds the
built-in methods by module name on first lookup); ``data_free`` and ``learned`` import what their ``__init__`` says.
"""

from adamerge.methods.registry import MethodSpec, available_methods, get_method, register_method

__all__ = ["MethodSpec", "available_methods", "get_method", "register_method"]
