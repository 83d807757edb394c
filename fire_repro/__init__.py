"""The code the scripts on top share: data sets, attacks, the training loop, checkpoints, results,
tables and the plan of run_all.sh. Each module is named for its job (README.md, "Files").

For your own code (after `pip install -e .`, or from the repository's folder):

    from fire_repro import load_model, test_split, attack_pgd_ce

Importing the package loads nothing heavy: the names below are loaded from their modules on first use.
"""
import importlib

_WHERE = {"load_model": "checkpoints", "test_split": "data", "attack_pgd_ce": "attacks", "pgd_step": "attacks",
          "evaluate": "attacks", "DATASETS": "data"}
__all__ = list(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(f"fire_repro.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'fire_repro' has no attribute {name!r}")
