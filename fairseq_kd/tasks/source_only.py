"""Which criterions can distil on source-only examples (``iterative_distillation``, docs/iterative_distillation.md).

A source-only example has no reference: only a KD criterion with a live teacher and no teacher-target
term can be trained on it; it is then called with ``reference=False`` and returns its distillation
term alone (:class:`fairseq_kd.criterions.base.Requirements`).
"""

from fairseq_kd.criterions.base import requirements
from fairseq_kd.errors import DistillationError


def check_source_only_criterion(criterion, name: str) -> None:
    """Raise unless ``criterion`` can distil on source-only examples."""
    refusal = requirements(criterion).source_only_error
    if refusal is not None:
        raise DistillationError(f"criterion {name} {refusal}")
