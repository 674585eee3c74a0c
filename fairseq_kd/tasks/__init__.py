"""Registered tasks; importing this package registers all of them."""

from fairseq_kd.tasks import distillation_translation  # noqa: F401
from fairseq_kd.tasks import iterative_distillation  # noqa: F401
