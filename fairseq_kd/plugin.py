"""The plugin's one registration call, :func:`register`, made by ``user_dir/__init__.py`` (docs/architecture.md)."""


def register() -> None:
    """Plug fairseq-kd into fairseq; idempotent (a second call changes nothing).

    * ``torch.load(weights_only=True)`` allow-lists fairseq's checkpoint classes and fairseq's checkpoint
      loader goes through the safe wrapper (:func:`fairseq_kd.checkpoints.install_checkpoint_loader`);
    * the trainer hands ``task_state`` back to the task on resume and records the dictionaries' sha256 in
      every checkpoint (:func:`fairseq_kd.checkpoints.install_trainer_hooks`);
    * the criterions and tasks are registered (importing their modules runs fairseq's ``register_*``).
    """
    from fairseq_kd import checkpoints

    checkpoints.install_trainer_hooks()  # installs the checkpoint loader and the safe globals first
    import fairseq_kd.criterions  # noqa: F401
    import fairseq_kd.tasks  # noqa: F401
