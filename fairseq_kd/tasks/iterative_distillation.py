"""``iterative_distillation``: distillation on bitext mixed with source-only text (docs/iterative_distillation.md).

``distillation_translation`` plus source sentences without a reference (``--unlabeled-subset NAME``), mixed
into every batch (:class:`fairseq_kd.data.mixed_source.MixedSourceDataset`, marker ``has_reference``).  The
bitext rows train the criterion as usual; the source-only rows get a target prefix from
``--prefix-source`` (the teacher's or the current student's greedy translation, or offline labels) and the
criterion's distillation term alone (``reference=False``), times ``--unlabeled-weight``.  Source-only
metrics are logged as ``unl_*``; the gold metrics stay bitext-only.
"""

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from fairseq import utils
from fairseq.data import data_utils
from fairseq.dataclass import ChoiceEnum
from fairseq.logging import metrics
from fairseq.tasks import register_task
from fairseq.tasks.translation import load_langpair_dataset
from torch import Tensor

from fairseq_kd.data.mixed_source import (
    MixedSourceDataset,
    select_rows,
    source_only_dataset,
    with_prefixes,
)
from fairseq_kd.errors import DistillationError
from fairseq_kd.tasks.source_only import check_source_only_criterion
from fairseq_kd.tasks.distillation_translation import (
    DistillationTranslationConfig,
    DistillationTranslationTask,
)

logger = logging.getLogger(__name__)

PREFIX_SOURCES = ("teacher", "student", "offline")

#: prefix of the logged keys of the source-only sub-batch
UNLABELED = "unl_"


@dataclass
class IterativeDistillationConfig(DistillationTranslationConfig):
    unlabeled_subset: Optional[str] = field(
        default=None,
        metadata={
            "help": "binarized source-only split mixed into the training data "
            "(DATA/NAME.SRC-TGT.SRC.bin/.idx, binarized with the task's source dictionary, e.g. "
            "by python -m fairseq_kd.unlabeled); without it the task trains like "
            "distillation_translation"
        },
    )
    prefix_source: ChoiceEnum(PREFIX_SOURCES) = field(
        default="teacher",
        metadata={
            "help": "target prefixes of the source-only examples: the teacher's or the current "
            "student's (eval mode) greedy translation decoded during training, or offline labels "
            "(--unlabeled-target-subset)"
        },
    )
    unlabeled_target_subset: Optional[str] = field(
        default=None,
        metadata={
            "help": "with --prefix-source offline: the binarized labels of the source-only split "
            "(DATA/NAME.SRC-TGT.TGT.bin/.idx, one line per source line; python -m "
            "fairseq_kd.decoding binarize --split UNLABELED_SUBSET --name NAME)"
        },
    )
    unlabeled_weight: float = field(
        default=1.0,
        metadata={
            "help": "weight of a source-only token's distillation term (a bitext token weighs "
            "1 - kd_alpha on its NLL and kd_alpha on its KD term)"
        },
    )
    prefix_max_len_a: float = field(
        default=1.5,
        metadata={"help": "greedy prefixes stop after a * source length + b tokens"},
    )
    prefix_max_len_b: int = field(
        default=10,
        metadata={"help": "see --prefix-max-len-a"},
    )


def _unwrap(model):
    """The fairseq model inside a (legacy) data-parallel wrapper."""
    return getattr(model, "module", model)


@register_task("iterative_distillation", dataclass=IterativeDistillationConfig)
class IterativeDistillationTask(DistillationTranslationTask):
    cfg: IterativeDistillationConfig

    def __init__(self, cfg, src_dict, tgt_dict):
        super().__init__(cfg, src_dict, tgt_dict)
        self.prefix_source = str(cfg.prefix_source)
        self._generators: Dict[str, Tuple[Tuple[int, ...], object]] = {}
        self.check_config()

    def check_config(self) -> None:
        cfg = self.cfg
        if cfg.unlabeled_target_subset and self.prefix_source != "offline":
            raise DistillationError(
                f"--unlabeled-target-subset is only read with --prefix-source offline "
                f"(got --prefix-source {self.prefix_source}): drop one of them"
            )
        if cfg.teacher_cache:
            raise DistillationError(
                "--teacher-cache holds the teacher on the bitext's gold prefixes only; iterative_distillation "
                "labels source-only text and new prefixes with the live teacher: pass --teacher-path"
            )
        if not cfg.unlabeled_subset:
            if cfg.unlabeled_target_subset:
                raise DistillationError(
                    "--unlabeled-target-subset labels a source-only split: pass --unlabeled-subset NAME too"
                )
            return
        if self.prefix_source == "offline" and not cfg.unlabeled_target_subset:
            raise DistillationError(
                "--prefix-source offline reads the labels of the source-only split: pass "
                "--unlabeled-target-subset NAME (written by python -m fairseq_kd.decoding binarize)"
            )
        if cfg.teacher_target_subset:
            raise DistillationError(
                "--teacher-target-subset cannot be combined with --unlabeled-subset: for teacher "
                "labels of the source-only split use --prefix-source offline --unlabeled-target-subset"
            )
        if cfg.unlabeled_weight < 0:
            raise DistillationError(f"--unlabeled-weight must be >= 0, got {cfg.unlabeled_weight}")
        if cfg.prefix_max_len_a < 0 or cfg.prefix_max_len_b < 1:
            raise DistillationError(
                f"--prefix-max-len-a must be >= 0 and --prefix-max-len-b >= 1, got "
                f"{cfg.prefix_max_len_a} and {cfg.prefix_max_len_b}"
            )

    # -- data --------------------------------------------------------------------

    def load_dataset(self, split, epoch=1, combine=False, **kwargs):
        super().load_dataset(split, epoch=epoch, combine=combine, **kwargs)
        if not self.cfg.unlabeled_subset or split != self.cfg.train_subset:
            return
        paths = utils.split_paths(self.cfg.data)
        data_path = paths[(epoch - 1) % len(paths)]
        source = self.load_source_only(data_path)
        labels = self.load_labels(data_path, len(source)) if self.prefix_source == "offline" else None
        self.datasets[split] = MixedSourceDataset(
            self.datasets[split], source_only_dataset(source, labels, self.tgt_dict)
        )
        logger.info(
            "%s: %d bitext + %d source-only examples (%s), prefixes: %s",
            split, self.datasets[split].num_bitext, len(source), self.cfg.unlabeled_subset,
            self.prefix_source if labels is None else f"offline {self.cfg.unlabeled_target_subset}",
        )

    def load_source_only(self, data_path: str):
        src, tgt = self.cfg.source_lang, self.cfg.target_lang
        name = self.cfg.unlabeled_subset
        try:
            return load_langpair_dataset(
                data_path, name, src, self.src_dict, tgt, self.tgt_dict,
                combine=False, dataset_impl=self.cfg.dataset_impl, upsample_primary=1,
                left_pad_source=self.cfg.left_pad_source, left_pad_target=self.cfg.left_pad_target,
                max_source_positions=self.cfg.max_source_positions,
                max_target_positions=self.cfg.max_target_positions,
                truncate_source=self.cfg.truncate_source, shuffle=True,
                pad_to_multiple=self.cfg.required_seq_len_multiple,
            )
        except FileNotFoundError:
            prefix = os.path.join(data_path, f"{name}.{src}-{tgt}.{src}")
            raise DistillationError(
                f"source-only split {prefix}.bin/.idx not found; binarize the text with "
                f"python -m fairseq_kd.unlabeled --data {data_path} --name {name}, or fix --unlabeled-subset"
            )

    def load_labels(self, data_path: str, num_examples: int):
        src, tgt = self.cfg.source_lang, self.cfg.target_lang
        name = self.cfg.unlabeled_target_subset
        prefix = os.path.join(data_path, f"{name}.{src}-{tgt}.{tgt}")
        labels = data_utils.load_indexed_dataset(prefix, self.tgt_dict, self.cfg.dataset_impl)
        if labels is None:
            raise DistillationError(
                f"labels {prefix}.bin/.idx not found; decode the {self.cfg.unlabeled_subset} split and "
                f"binarize it (python -m fairseq_kd.decoding binarize --split {self.cfg.unlabeled_subset} "
                f"--name {name}), or fix --unlabeled-target-subset"
            )
        if len(labels) != num_examples:
            raise DistillationError(
                f"labels {prefix}.bin have {len(labels)} lines but the source-only split "
                f"{self.cfg.unlabeled_subset} has {num_examples}: re-decode and re-binarize that split"
            )
        return labels

    # -- criterion -----------------------------------------------------------------

    def build_criterion(self, cfg, from_checkpoint=False):
        criterion = super().build_criterion(cfg, from_checkpoint=from_checkpoint)
        if self.cfg.unlabeled_subset:
            check_source_only_criterion(criterion, cfg._name)
        return criterion

    # -- prefixes ----------------------------------------------------------------

    def prefix_generator(self, kind: str, models: List[torch.nn.Module]):
        """A cached greedy ``SequenceGenerator`` over ``models``."""
        from fairseq.sequence_generator import SequenceGenerator

        key = tuple(id(m) for m in models)
        cached = self._generators.get(kind)
        if cached is not None and cached[0] == key:
            return cached[1]
        max_len = min([self.cfg.max_target_positions] + [m.max_decoder_positions() for m in models])
        generator = SequenceGenerator(
            models, self.tgt_dict, beam_size=1,
            max_len_a=self.cfg.prefix_max_len_a, max_len_b=self.cfg.prefix_max_len_b,
            max_len=max_len, min_len=1,
        )
        self._generators[kind] = (key, generator)
        return generator

    def generate_prefixes(self, sample, model) -> List[Tensor]:
        """Greedy translations (each ending with EOS) of ``sample``'s sources by
        the teacher or the current student, in ``sample``'s row order.

        The student decodes in eval mode (no dropout, as at test time) and is
        put back in its previous mode; nothing is recorded for autograd."""
        net_input = {k: sample["net_input"][k] for k in ("src_tokens", "src_lengths")}
        if self.prefix_source == "teacher":
            models = list(self.teacher.to_like(model).models)
            hypos = self.prefix_generator("teacher", models).generate(models, {"net_input": net_input})
        else:
            student = _unwrap(model)
            was_training = student.training  # (building a SequenceGenerator calls eval())
            generator = self.prefix_generator("student", [student])
            student.eval()
            try:
                hypos = generator.generate([student], {"net_input": net_input})
            finally:
                student.train(was_training)
        return [h[0]["tokens"] for h in hypos]

    def source_only_batch(self, sample, model):
        """``sample`` (source-only rows) with its training prefixes as targets."""
        if self.prefix_source == "offline":
            return sample
        prefixes = self.generate_prefixes(sample, model)
        return with_prefixes(
            sample, prefixes, self.tgt_dict.pad(), self.tgt_dict.eos(), self.cfg.left_pad_target
        )

    # -- training ----------------------------------------------------------------

    def split_batch(self, sample):
        """``(bitext rows, source-only rows)`` of a mixed batch; either is None when empty."""
        has_reference = sample["has_reference"]
        parts = []
        for rows in (has_reference.nonzero().squeeze(1), (~has_reference).nonzero().squeeze(1)):
            parts.append(
                select_rows(
                    sample, rows, self.tgt_dict.pad(), self.cfg.left_pad_source, self.cfg.left_pad_target
                ) if rows.numel() > 0 else None
            )
        return parts[0], parts[1]

    def mixed_loss(self, sample, model, criterion, **kwargs):
        """Loss, sample size and logging output of a mixed batch (forward only)."""
        bitext, source_only = self.split_batch(sample)
        if bitext is not None:
            loss, sample_size, logging_output = criterion(model, bitext, **kwargs)
        else:
            loss, sample_size = 0.0, 0
            logging_output = {"loss": 0.0, "nll_loss": 0.0, "ntokens": 0, "nsentences": 0, "sample_size": 0}
        if source_only is not None:
            source_only = self.source_only_batch(source_only, model)
            weight = self.cfg.unlabeled_weight
            u_kwargs = dict(kwargs, reference=False)
            if "backward" in kwargs:  # the criterion's per-pass backward, of the weighted term
                u_kwargs["backward"] = lambda part: kwargs["backward"](weight * part)
            u_loss, u_size, u_log = criterion(model, source_only, **u_kwargs)
            loss = loss + weight * u_loss
            sample_size = sample_size + u_size
            logging_output = dict(logging_output)
            logging_output["loss"] = logging_output["loss"] + weight * u_log["loss"]
            logging_output["sample_size"] = logging_output["sample_size"] + u_size
            logging_output["nsentences"] = logging_output["nsentences"] + u_log["nsentences"]
            for key, value in u_log.items():
                logging_output[UNLABELED + key] = value
        return loss, sample_size, logging_output

    def data_parallel_reason(self, sample):
        if "has_reference" in sample:
            return "iterative_distillation runs the student twice per batch (bitext and source-only rows)"
        return super().data_parallel_reason(sample)

    def training_loss(self, sample, model, criterion, **kwargs):
        if "has_reference" not in sample:
            return super().training_loss(sample, model, criterion, **kwargs)
        return self.mixed_loss(sample, model, criterion, **kwargs)

    # -- metrics -----------------------------------------------------------------

    @staticmethod
    def logging_outputs_can_be_summed(criterion) -> bool:
        # A batch without source-only rows lacks the unl_* keys, and fairseq's
        # fast summing across workers needs the same keys on every worker.
        return False

    def reduce_metrics(self, logging_outputs, criterion):
        def total(key):
            return sum(log.get(key, 0) for log in logging_outputs)

        source_only = any(UNLABELED + "ntokens" in log for log in logging_outputs)
        if not source_only or total("ntokens") > 0:
            super().reduce_metrics(logging_outputs, criterion)
        else:
            # an update of source-only rows only: no gold token, hence no gold metric
            sample_size = total("sample_size")
            if sample_size > 0:
                metrics.log_scalar("loss", total("loss") / sample_size / math.log(2), sample_size, round=3)
            metrics.log_scalar("bsz", total("nsentences"), priority=190, round=1)
        if not source_only:
            return
        tokens = total(UNLABELED + "ntokens")
        metrics.log_scalar(UNLABELED + "wpb", tokens, priority=181, round=1)
        metrics.log_scalar(UNLABELED + "bsz", total(UNLABELED + "nsentences"), priority=191, round=1)
        if tokens > 0:
            for key in criterion.__class__.per_token_keys:
                if any(UNLABELED + key in log for log in logging_outputs):
                    metrics.log_scalar(UNLABELED + key, total(UNLABELED + key) / tokens, tokens, round=4)
        for count_key, total_key, name in criterion.__class__.ratio_keys:
            denominator = total(UNLABELED + total_key)
            if denominator > 0:
                metrics.log_scalar(
                    UNLABELED + name, total(UNLABELED + count_key) / denominator, denominator, round=4
                )
