"""Checks and training state shared by the distillation tasks.

* **data parallelism** (:func:`check_data_parallel`, the one check): a criterion that calls the
  student's encoder and decoder separately (``calls_model_parts``: ``tie_kd``, ``hybrid_gated_kd``), or a
  task that runs the student twice per batch, bypasses the forward of torch's
  ``DistributedDataParallel`` and of ``fully_sharded``, whose gradient sync runs through it only; a
  criterion that generates with the student's parts (``generates``: ``on_policy_kd``) bypasses
  ``fully_sharded``'s parameter sharding.  The first training step under such a wrapper stops with one
  line naming ``--ddp-backend legacy_ddp`` (fairseq's own wrapper, which all-reduces the gradients after
  the backward whatever the forward did), before any update.
* **non-finite teacher output**: every teacher forward sets a device flag
  (:meth:`fairseq_kd.teacher.TeacherEnsemble.take_nonfinite`); the task reads
  it once per step, *after* the backward has been queued.  On a GPU that read
  waits for the backward to finish -- which fairseq's trainer waits for anyway
  right after, when it checks that the gradient norm is finite -- so it adds
  no stall of its own, whereas checking each teacher output where it is
  computed would stop the host in the middle of every forward.  The step that
  produced the first NaN / inf stops training with one line naming the
  teacher, the update and the first sample ids, before the optimizer applies
  it (fairseq would otherwise die on NaN gradients with a traceback, or -- when
  the NaN only reaches a discrete choice such as an argmax -- train on).
* **dictionaries**: the sha256 of the task's ``dict.{src,tgt}.txt`` is saved
  in the checkpoint's ``task_state``, so a teacher trained with these tasks
  is later refused if its dictionaries were regenerated
  (:func:`fairseq_kd.teacher.ensemble.check_recorded_dictionaries`).
* **criterion state**: fairseq saves a criterion's ``state_dict`` only when
  the criterion has parameters and never restores ``task_state`` into the
  trainer's task; a criterion with other training state (``selective_kd``'s
  global queue) exposes ``kd_state_dict`` / ``load_kd_state_dict``, saved in
  ``task_state["criterion"]`` and handed back on resume by the wrapped
  ``Trainer.load_checkpoint`` (:func:`fairseq_kd.checkpoints.install_trainer_hooks`).
"""

import logging
from typing import Dict, Optional

import torch

from fairseq_kd.criterions.base import Requirements, requirements
from fairseq_kd.errors import DistillationError
from fairseq_kd.hashing import dictionary_hashes

logger = logging.getLogger(__name__)


def bypassed_wrapper(model, sharded_only: bool = False) -> Optional[str]:
    """The data-parallel wrapper around ``model`` that syncs gradients only through its own forward --
    torch's DDP (``--ddp-backend pytorch_ddp``/``c10d``; not with ``sharded_only``) or fairseq's fully
    sharded one (``fully_sharded``, which also shards the parameters outside that forward) -- or None."""
    for module in (model, getattr(model, "module", None)):
        if isinstance(module, torch.nn.parallel.DistributedDataParallel) and not sharded_only:
            return "torch's DistributedDataParallel"
        if module is not None and type(module).__name__ == "FullyShardedDataParallel":
            return "FullyShardedDataParallel (--ddp-backend fully_sharded)"
    return None


def check_data_parallel(model, who: str, needs: Requirements, task_reason: Optional[str] = None) -> None:
    """The one data-parallel check: refuse a wrapper that the criterion ``who`` (its ``needs``) or the task
    (``task_reason``: a clause saying what it does that bypasses the wrapper's forward) would bypass."""
    reason = task_reason or (f"{who} calls the student's encoder and decoder separately" if needs.calls_model_parts
                             else None)
    wrapper = bypassed_wrapper(model) if reason else None
    if wrapper is None and needs.generates:
        reason = f"{who} generates with the student's encoder and decoder outside the forward (parameters sharded)"
        wrapper = bypassed_wrapper(model, sharded_only=True)
    if wrapper is not None:
        raise DistillationError(
            f"{reason}, which bypasses the gradient all-reduce of {wrapper}: train with --ddp-backend legacy_ddp"
        )


def check_teacher_output(teacher, sample, update_num: int) -> None:
    """Stop at the first step whose teacher output held NaN or +inf (reads the teacher's flag)."""
    if teacher is None or not teacher.take_nonfinite():
        return
    ids = sample.get("id") if isinstance(sample, dict) else None
    first = ids[:5].tolist() if ids is not None and hasattr(ids, "tolist") else []
    paths = ":".join(teacher.paths) or "the teacher"
    raise DistillationError(
        f"teacher {paths} produced NaN/inf log-probabilities at update {update_num + 1} "
        f"(batch of sample ids {first}...): check the teacher checkpoint, or use --teacher-precision fp32"
    )


def training_state(task, criterion) -> Dict:
    """What the task adds to fairseq's ``task_state``."""
    state = {"dictionary_sha256": dictionary_hashes(task.cfg.data, (task.cfg.source_lang, task.cfg.target_lang))}
    if requirements(criterion).training_state:
        state["criterion"] = criterion.kd_state_dict()
    return state


def restore_training_state(task_state: Dict, criterion) -> None:
    """Hand ``task_state["criterion"]`` back to the criterion on resume."""
    if not requirements(criterion).training_state:
        return
    saved = task_state.get("criterion")
    if saved is None:
        logger.warning("the checkpoint holds no state of criterion %s: it starts empty", type(criterion).__name__)
        return
    criterion.load_kd_state_dict(saved)
    logger.info("restored the training state of criterion %s from the checkpoint", type(criterion).__name__)
