"""Offline teacher cache: the teacher run once, its top-k stored, read back during training.

* :mod:`fairseq_kd.cache.manifest`: what a cache holds, the checks refusing one that does not fit;
* :mod:`fairseq_kd.cache.build`: running the teacher over a split into sharded, resumable files;
* :mod:`fairseq_kd.cache.dataset`: memory-mapped reading, the batch keys, the stand-in teacher;
* :mod:`fairseq_kd.cache.integrity`: the shard files' sizes and digests, the range of every value read;
* :mod:`fairseq_kd.cache.provenance`: what the teacher saw (the split's fingerprint, its languages);
* :mod:`fairseq_kd.cache.cli`: ``python -m fairseq_kd.cache`` / ``fairseq-kd-build-cache``.

The losses on the cached form are in :mod:`fairseq_kd.losses.topk`; docs/teacher_cache.md has the recipe.
"""

from fairseq_kd.cache.manifest import DEFAULT_K, MANIFEST, check_manifest, read_manifest

__all__ = ["DEFAULT_K", "MANIFEST", "check_manifest", "read_manifest"]
