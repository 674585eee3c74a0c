"""Registered criterions; importing this package registers all of them."""

from fairseq_kd.criterions import word_kd  # noqa: F401
from fairseq_kd.criterions import hybrid_gated_kd  # noqa: F401
from fairseq_kd.criterions import seq_kd  # noqa: F401
from fairseq_kd.criterions import self_evolution_kd  # noqa: F401
from fairseq_kd.criterions import tie_kd  # noqa: F401
from fairseq_kd.criterions import selective_kd  # noqa: F401
from fairseq_kd.criterions import on_policy_kd  # noqa: F401
