"""Teacher inference.

* :mod:`fairseq_kd.teacher.ensemble`: loading one frozen checkpoint or an
  ensemble (safe loader, dictionary check) and its forward passes;
* :mod:`fairseq_kd.teacher.greedy`: the teacher's greedy translation of a
  batch, decoded on the fly during training.
"""

from fairseq_kd.teacher.ensemble import (
    PRECISIONS,
    TeacherEnsemble,
    compare_dictionaries,
    load_teacher,
    split_paths,
)
from fairseq_kd.teacher.greedy import greedy_teacher_translation, max_decoder_positions, shift_right

__all__ = [
    "PRECISIONS", "TeacherEnsemble", "compare_dictionaries", "greedy_teacher_translation", "load_teacher",
    "max_decoder_positions", "shift_right", "split_paths",
]
