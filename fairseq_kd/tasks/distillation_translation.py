"""``distillation_translation``: fairseq's ``translation`` task plus a teacher.

The task loads the teacher (one checkpoint or a ``:``-separated ensemble) when
the criterion is built, i.e. only when training, checks its dictionaries
against the task's, and passes it to the criterion in :meth:`train_step`.
Holding the teacher here rather than on the criterion is deliberate: fairseq's
trainer puts every module hanging on the criterion into DDP, casts it under
``--fp16``, gives its parameters to the optimizer and saves it into every
checkpoint.  Validation and generation never see the teacher.

Plain fairseq criterions work unchanged with this task (they are called
without the teacher).

With ``--teacher-target-subset NAME`` the training split also carries the
teacher's translations (Seq-KD data, binarized into the same data directory
by ``python -m fairseq_kd.decoding binarize``): batches gain
``teacher_target``, ``teacher_prev_output_tokens`` and ``teacher_ntokens``
(:mod:`fairseq_kd.data.teacher_target`), which criterions that do not use
them ignore.  What a criterion needs from the task (a teacher, teacher targets, ...) is its
:class:`~fairseq_kd.criterions.base.Requirements`, read here only.

With ``--teacher-cache DIR`` (built by ``python -m fairseq_kd.cache build``)
no teacher is loaded at all: the training split's batches carry the
teacher's cached top-k (:mod:`fairseq_kd.cache.dataset`) and the criterion
is handed the :class:`~fairseq_kd.teacher.cached.CachedTeacher` built from each
batch instead of the live teacher.  The cache's manifest must match the task's dictionaries, the
training split and the criterion's temperature, and the criterion must accept
the cached form (``teacher_cache_error``); ``--teacher-path`` and
``--teacher-cache`` together are refused.
"""

import logging
from dataclasses import dataclass, field
from typing import Optional

import torch
from fairseq import utils
from fairseq.dataclass import ChoiceEnum
from fairseq.optim.amp_optimizer import AMPOptimizer
from fairseq.tasks import register_task
from fairseq.tasks.translation import TranslationConfig, TranslationTask

from fairseq_kd.cache import provenance
from fairseq_kd.cache.dataset import load_teacher_cache
from fairseq_kd.criterions.base import requirements
from fairseq_kd.cache.manifest import check_manifest, read_manifest
from fairseq_kd.data.teacher_target import TeacherTargetDataset, load_teacher_target
from fairseq_kd.errors import DistillationError
from fairseq_kd.hashing import dictionary_hashes
from fairseq_kd.tasks import guards
from fairseq_kd.teacher.cached import CachedTeacher
from fairseq_kd.teacher.ensemble import PRECISIONS, load_teacher, split_paths

logger = logging.getLogger(__name__)


@dataclass
class DistillationTranslationConfig(TranslationConfig):
    teacher_path: Optional[str] = field(
        default=None,
        metadata={
            "help": "teacher checkpoint, or several separated by ':' to distil from their "
            "ensemble (probabilities averaged in log space)"
        },
    )
    teacher_data_dir: Optional[str] = field(
        default=None,
        metadata={
            "help": "directory with the teacher's dict.{src,tgt}.txt, when the data directory "
            "recorded in the teacher checkpoint has moved"
        },
    )
    teacher_precision: ChoiceEnum(list(PRECISIONS)) = field(
        default="fp32",
        metadata={"help": "dtype of the teacher's forward pass; --fp16 never casts the teacher"},
    )
    teacher_target_subset: Optional[str] = field(
        default=None,
        metadata={
            "help": "name of the binarized subset holding the teacher's translations of the "
            "training split (DATA/NAME.src-tgt.tgt.bin/.idx, same dictionary as the gold target); "
            "loaded next to the gold target of --train-subset (Seq-KD)"
        },
    )
    teacher_cache: Optional[str] = field(
        default=None,
        metadata={
            "help": "offline teacher cache directory (python -m fairseq_kd.cache build): the teacher's "
            "top-k for every target position of --train-subset, used instead of --teacher-path"
        },
    )


@register_task("distillation_translation", dataclass=DistillationTranslationConfig)
class DistillationTranslationTask(TranslationTask):
    cfg: DistillationTranslationConfig

    def __init__(self, cfg, src_dict, tgt_dict):
        super().__init__(cfg, src_dict, tgt_dict)
        self.teacher = None  # the live teacher (a TeacherEnsemble)
        self.cache_manifest = None  # with --teacher-cache: its manifest, checked against the criterion
        if cfg.teacher_cache and cfg.teacher_path:
            raise DistillationError(
                "--teacher-path and --teacher-cache are exclusive: the cache replaces the live teacher; "
                "pass one of them"
            )
        self.criterion = None  # the training criterion, whose extra state rides in task_state

    def load_dataset(self, split, epoch=1, combine=False, **kwargs):
        super().load_dataset(split, epoch=epoch, combine=combine, **kwargs)
        if self.cfg.teacher_target_subset and split == self.cfg.train_subset:
            paths = utils.split_paths(self.cfg.data)
            data_path = paths[(epoch - 1) % len(paths)]
            dataset = self.datasets[split]
            teacher_target = load_teacher_target(
                data_path, self.cfg.teacher_target_subset, split, self.cfg.source_lang,
                self.cfg.target_lang, self.tgt_dict, len(dataset), self.cfg.dataset_impl,
            )
            self.datasets[split] = TeacherTargetDataset(dataset, teacher_target)
            logger.info(
                "%s: teacher targets %s (%d examples)", split, self.cfg.teacher_target_subset,
                len(teacher_target),
            )
        if self.cfg.teacher_cache and split == self.cfg.train_subset:
            self.datasets[split] = load_teacher_cache(self.cfg.teacher_cache, self.datasets[split], split,
                                                      self.tgt_dict.pad(), self.cfg)

    def build_criterion(self, cfg, from_checkpoint=False):
        criterion = super().build_criterion(cfg)
        self.criterion = criterion
        needs = requirements(criterion)
        provenance.check_cache_reader(self.cfg, needs.teacher, cfg._name)
        if needs.teacher_target and not self.cfg.teacher_target_subset:
            raise DistillationError(
                f"criterion {cfg._name} trains on the teacher's translations: pass "
                f"--teacher-target-subset NAME (written by python -m fairseq_kd.decoding binarize)"
            )
        if needs.teacher and self.cfg.teacher_cache:
            self.cache_manifest = self.load_teacher_cache(criterion, cfg._name)
        elif needs.teacher:
            if not self.cfg.teacher_path:
                raise DistillationError(
                    f"criterion {cfg._name} distils from a teacher: pass --teacher-path CHECKPOINT"
                )
            self.load_teacher()
        elif self.cfg.teacher_path:
            logger.warning(
                "--teacher-path is ignored: criterion %s does not use a teacher", cfg._name
            )
        return criterion

    def load_teacher_cache(self, criterion, name: str) -> dict:
        """Check the cache's manifest against this run and the criterion; the manifest."""
        path = self.cfg.teacher_cache
        manifest = read_manifest(path)
        data_dir = utils.split_paths(self.cfg.data)[0]
        expected = {
            "dictionaries": dictionary_hashes(data_dir, (self.cfg.source_lang, self.cfg.target_lang)),
            "split": self.cfg.train_subset,
            "temperature": requirements(criterion).temperature,
        }
        check_manifest(path, manifest, expected, fixes={
            "dictionaries": f"build the cache from {data_dir} (the dictionaries of this run)",
            "split": "build the cache on --train-subset, or set --train-subset to the cached split",
            "temperature": "pass the cache's temperature as --kd-temperature, or rebuild it at this temperature",
        })
        refusal = criterion.teacher_cache_error(manifest)
        if refusal:
            raise DistillationError(f"--teacher-cache {path}: {refusal}")
        logger.info("teacher: cache %s (k=%d, temperature %g)", path, manifest["k"], manifest["temperature"])
        return manifest

    def load_teacher(self):
        if self.teacher is None:
            self.teacher = load_teacher(
                split_paths(self.cfg.teacher_path),
                self,
                precision=str(self.cfg.teacher_precision),
                teacher_data_dir=self.cfg.teacher_data_dir,
            )
            provenance.check_live_teacher_languages(split_paths(self.cfg.teacher_path), self.cfg)
            logger.info(
                "teacher: %d model(s), %d parameters, %s, frozen",
                len(self.teacher), self.teacher.num_parameters(), self.cfg.teacher_precision,
            )
        return self.teacher

    def max_positions(self):
        """The task's limits and a live teacher's: fairseq then skips (or refuses, naming the example) a pair
        the teacher's positional embeddings do not reach, before the teacher sees it."""
        own = super().max_positions()
        if self.teacher is None:
            return own
        src, tgt = self.teacher.max_positions()
        return min(own[0], src), min(own[1], tgt)

    def teacher_for(self, sample, model):
        """The teacher a criterion distils ``sample`` from: the batch's cached one, or the live teacher on
        ``model``'s device."""
        return CachedTeacher.from_batch(sample) if self.cfg.teacher_cache else self.teacher.to_like(model)

    def criterion_kwargs(self, criterion, model, sample):
        """Keyword arguments for a training call of ``criterion`` on ``sample``."""
        if not requirements(criterion).teacher:
            return {}
        return {"teacher": self.teacher_for(sample, model)}

    def data_parallel_reason(self, sample) -> Optional[str]:
        """What this task does with ``sample`` that bypasses a data-parallel wrapper's forward (None: nothing)."""
        return None

    def training_loss(self, sample, model, criterion, **kwargs):
        """``criterion``'s ``(loss, sample_size, logging_output)`` on a training ``sample`` (forward only)."""
        return criterion(model, sample, **kwargs)

    # -- checkpointed state (fairseq_kd.tasks.guards) ---------------------------------

    def state_dict(self):
        return dict(super().state_dict(), **guards.training_state(self, self.criterion))

    def load_training_state(self, task_state, criterion):
        """Called on resume with the checkpoint's ``task_state`` (fairseq_kd.checkpoints)."""
        guards.restore_training_state(task_state, criterion)

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        """fairseq's train step with the teacher handed to the criterion.  A criterion with
        ``backward_per_pass`` (a loss summed over several decoder passes) is also handed a
        ``backward`` callable, which it calls on each pass's share of the loss (through
        ``optimizer.backward``: fp16 loss scaling and AMP apply; zeroed for an ignored batch); it
        returns its total loss detached and this step runs no backward of its own.  Several backward
        calls in one step only accumulate into the gradients, which fairseq's trainer all-reduces
        after ``train_step`` under ``--ddp-backend legacy_ddp`` and sums over ``--update-freq``
        (torch's DDP, whose hooks expect one backward per forward, is refused for these criterions)."""
        needs = requirements(criterion)
        guards.check_data_parallel(model, type(criterion).__name__, needs, self.data_parallel_reason(sample))
        model.train()
        model.set_num_updates(update_num)
        kwargs = self.criterion_kwargs(criterion, model, sample)
        per_pass = "teacher" in kwargs and needs.backward_per_pass
        if per_pass:

            def backward(part):  # outside autocast, as the whole loss's backward below
                with torch.autograd.profiler.record_function("backward"), torch.autocast("cuda", enabled=False):
                    optimizer.backward(part * 0 if ignore_grad else part)

            kwargs["backward"] = backward
        with torch.autograd.profiler.record_function("forward"):
            with torch.autocast("cuda", enabled=isinstance(optimizer, AMPOptimizer)):
                loss, sample_size, logging_output = self.training_loss(sample, model, criterion, **kwargs)
        if ignore_grad:
            loss *= 0
        if not per_pass:
            with torch.autograd.profiler.record_function("backward"):
                optimizer.backward(loss)
        guards.check_teacher_output(kwargs.get("teacher"), sample, update_num)
        return loss, sample_size, logging_output
