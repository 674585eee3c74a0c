"""fairseq-kd: knowledge distillation for fairseq translation models.

Importing the package defines names only (no fairseq import, nothing registered or patched);
:func:`register`, which ``--user-dir user_dir`` calls, plugs it into fairseq (docs/architecture.md).
"""

__version__ = "0.1.0"


def register() -> None:
    """Register the criterions and tasks with fairseq and install the safe checkpoint loader and the
    trainer hooks (:func:`fairseq_kd.plugin.register`); idempotent."""
    from fairseq_kd import plugin

    plugin.register()
