"""What a criterion must satisfy to distil on source-only examples, and its distillation term alone.

Used by :mod:`fairseq_kd.tasks.iterative_distillation`: a source-only example has no reference, so
only a KD criterion with a live teacher and no further gold-target term can be trained on it, and
the criterion is called with its NLL weight set to zero (:func:`distillation_only`).
"""

import contextlib

from fairseq_kd.criterions.base import KDCriterion
from fairseq_kd.errors import DistillationError

#: criterion options that weight further gold-target terms: they have no
#: meaning on a source-only example, so they must be 0 (option -> flag)
EXTRA_GOLD_TERMS = {
    "sekd_nll_weight": "--sekd-nll-weight",
}


def check_source_only_criterion(criterion, name: str) -> None:
    """Raise unless ``criterion`` can distil on source-only examples: a KD
    criterion that uses a live teacher and has no further gold-target term."""
    if not isinstance(criterion, KDCriterion) or not getattr(criterion, "needs_teacher", False):
        raise DistillationError(
            f"criterion {name} has no distillation term for source-only examples "
            f"(--unlabeled-subset): use a KD criterion with a live teacher, e.g. word_kd or tie_kd"
        )
    if getattr(criterion, "needs_teacher_target", False):
        raise DistillationError(
            f"criterion {name} trains on teacher targets of the bitext, which source-only examples "
            f"do not have: use word_kd (or tie_kd) with --prefix-source offline for the teacher's "
            f"labels of the source-only split"
        )
    for option, flag in EXTRA_GOLD_TERMS.items():
        value = getattr(criterion.cfg, option, 0.0)
        if value:
            raise DistillationError(
                f"{flag} {value} adds a gold-target term, which source-only examples "
                f"(--unlabeled-subset) do not have: set {flag} 0"
            )


@contextlib.contextmanager
def distillation_only(criterion: KDCriterion):
    """Within the block, ``criterion`` returns its distillation term alone
    (weight 1, no NLL term): its ``alpha`` is 1."""
    saved = criterion.alpha
    criterion.alpha = 1.0
    try:
        yield criterion
    finally:
        criterion.alpha = saved
