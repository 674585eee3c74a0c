"""Registered criterions; importing this package registers all of them."""

from fairseq_kd.criterions import word_kd  # noqa: F401
