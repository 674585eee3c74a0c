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
"""

import logging
from dataclasses import dataclass, field
from typing import Optional

import torch
from fairseq.dataclass import ChoiceEnum
from fairseq.optim.amp_optimizer import AMPOptimizer
from fairseq.tasks import register_task
from fairseq.tasks.translation import TranslationConfig, TranslationTask

from fairseq_kd.errors import DistillationError
from fairseq_kd.teacher import PRECISIONS, load_teacher, split_paths

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


@register_task("distillation_translation", dataclass=DistillationTranslationConfig)
class DistillationTranslationTask(TranslationTask):
    cfg: DistillationTranslationConfig

    def __init__(self, cfg, src_dict, tgt_dict):
        super().__init__(cfg, src_dict, tgt_dict)
        self.teacher = None

    def build_criterion(self, cfg, from_checkpoint=False):
        criterion = super().build_criterion(cfg)
        if getattr(criterion, "needs_teacher", False):
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

    def load_teacher(self):
        if self.teacher is None:
            self.teacher = load_teacher(
                split_paths(self.cfg.teacher_path),
                self,
                precision=str(self.cfg.teacher_precision),
                teacher_data_dir=self.cfg.teacher_data_dir,
            )
            logger.info(
                "teacher: %d model(s), %d parameters, %s, frozen",
                len(self.teacher), self.teacher.num_parameters(), self.cfg.teacher_precision,
            )
        return self.teacher

    def criterion_kwargs(self, criterion, model):
        """Keyword arguments for a training call of ``criterion``."""
        if not getattr(criterion, "needs_teacher", False):
            return {}
        return {"teacher": self.teacher.to_like(model)}

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        model.train()
        model.set_num_updates(update_num)
        kwargs = self.criterion_kwargs(criterion, model)
        with torch.autograd.profiler.record_function("forward"):
            with torch.autocast("cuda", enabled=isinstance(optimizer, AMPOptimizer)):
                loss, sample_size, logging_output = criterion(model, sample, **kwargs)
        if ignore_grad:
            loss *= 0
        with torch.autograd.profiler.record_function("backward"):
            optimizer.backward(loss)
        return loss, sample_size, logging_output
