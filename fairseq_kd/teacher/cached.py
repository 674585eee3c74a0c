"""The cached teacher of one training batch, built from the batch's top-k (docs/teacher_cache.md).

The training split's collater (:class:`fairseq_kd.cache.dataset.TeacherCacheDataset`) puts the teacher's
cached top-k into every batch; :meth:`CachedTeacher.from_batch` reads it back as the
:class:`~fairseq_kd.losses.teacher.TopKTeacher` a criterion distils from, on the batch's gold prefixes.
"""

from torch import Tensor

from fairseq_kd.cache.dataset import ERROR_KEY, IDS_KEY, LPROBS_KEY, TAIL_KEY
from fairseq_kd.errors import DistillationError
from fairseq_kd.losses.teacher import TopKTeacher


class CachedTeacher:
    """The teacher a criterion is handed with ``--teacher-cache``: the batch's cached distribution, which
    exists on the batch's gold prefixes only."""

    def __init__(self, distribution: TopKTeacher, prefixes: Tensor):
        self.topk, self.prefixes = distribution, prefixes

    @classmethod
    def from_batch(cls, sample) -> "CachedTeacher":
        if ERROR_KEY in sample:  # a damaged example, met by a data-loader worker: its one-line error
            raise DistillationError(sample[ERROR_KEY])
        if IDS_KEY not in sample:
            raise DistillationError(
                f"this batch carries no cached teacher distribution ({IDS_KEY}): --teacher-cache covers the "
                f"training split only"
            )
        distribution = TopKTeacher(sample[IDS_KEY], sample[LPROBS_KEY], sample[TAIL_KEY])
        return cls(distribution, sample["net_input"]["prev_output_tokens"])

    def distribution(self, net_input) -> TopKTeacher:
        """The teacher's distribution on ``net_input``'s prefixes, which must be the batch's gold ones."""
        if net_input["prev_output_tokens"] is not self.prefixes:
            raise DistillationError(
                "the teacher cache holds the teacher on the training batch's gold prefixes only, not on other "
                "prefixes: use the live teacher (--teacher-path)"
            )
        return self.topk

    def take_nonfinite(self) -> bool:
        """Never: the cache build refuses non-finite teacher values."""
        return False
