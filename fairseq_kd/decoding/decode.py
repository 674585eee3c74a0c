"""Decoding: one shard of a :class:`~fairseq_kd.decoding.corpus.Corpus` into
its JSON-lines file (:func:`decode_shard`), and every requested shard after
the manifest check (:func:`decode_corpus`).  The translation itself is a
:data:`~fairseq_kd.decoding.backend.Translator` (a backend's ``translate``)."""

import json
import logging
import os
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np

from fairseq_kd.decoding.backend import Translator
from fairseq_kd.decoding.corpus import Corpus
from fairseq_kd.cliargs import shard_range
from fairseq_kd.decoding.shards import partial_shards, shard_lock, shard_path, write_manifest
from fairseq_kd.textio import unique_tmp

logger = logging.getLogger("fairseq_kd.decoding")


def decode_shard(
    corpus: Corpus,
    translate: Translator,
    out_dir: str,
    shard_id: int,
    num_shards: int,
    max_tokens: Optional[int] = 4096,
    max_sentences: Optional[int] = None,
    max_source_len: Optional[int] = None,
    progress: bool = True,
) -> bool:
    """Decode shard ``shard_id`` unless it is already complete.

    Returns True when the shard was decoded now, False when it was skipped.
    Sources longer than ``max_source_len`` are not decoded: their record has
    no hypothesis text (``"skipped": "too_long"``) and ``merge`` flags it as
    empty.
    """
    final = shard_path(out_dir, shard_id, num_shards)
    if os.path.exists(final):
        logger.info("shard %d/%d is complete (%s): skipped", shard_id, num_shards, final)
        return False
    os.makedirs(out_dir, exist_ok=True)
    with shard_lock(final):
        if os.path.exists(final):  # completed by another process meanwhile
            logger.info("shard %d/%d is complete (%s): skipped", shard_id, num_shards, final)
            return False
        for old in partial_shards(final):
            logger.info("shard %d/%d: incomplete %s from an earlier run is redone", shard_id, num_shards, old)
            os.remove(old)
        return _decode_shard(corpus, translate, final, unique_tmp(final), shard_id, num_shards, max_tokens,
                             max_sentences, max_source_len, progress)


def _decode_shard(corpus, translate, final, tmp, shard_id, num_shards, max_tokens, max_sentences,
                  max_source_len, progress) -> bool:
    from tqdm import tqdm

    start, end = shard_range(len(corpus), num_shards, shard_id)
    indices = np.arange(start, end, dtype=np.int64)
    dataset = corpus.dataset
    sizes = np.asarray(dataset.src_sizes)
    too_long = np.zeros(len(indices), dtype=bool)
    if max_source_len is not None and len(indices):
        too_long = sizes[indices] > max_source_len
    todo = indices[~too_long]
    todo = todo[np.argsort(sizes[todo], kind="mergesort")]
    batches = dataset.batch_by_size(todo, max_tokens=max_tokens, max_sentences=max_sentences) if len(todo) else []

    def record(index: int, hyps, skipped=None) -> str:
        rec = {
            "id": int(index),
            "src": corpus.source_text(index),
            "ref": corpus.reference_text(index),
            "hyps": [{"text": text, "score": round(float(score), 5)} for text, score in hyps],
        }
        if skipped:
            rec["skipped"] = skipped
        return json.dumps(rec, ensure_ascii=False)

    with open(tmp, "w", encoding="utf-8") as f, tqdm(
        total=len(indices), unit="sent", desc=f"shard {shard_id}/{num_shards}",
        disable=not progress, dynamic_ncols=True, file=sys.stderr,
    ) as bar:
        for index in indices[too_long]:
            f.write(record(index, [], skipped="too_long") + "\n")
        bar.update(int(too_long.sum()))
        for batch in batches:
            sample = dataset.collater([dataset[int(i)] for i in batch])
            results = translate(sample)
            for index, hyps in zip(sample["id"].tolist(), results):
                f.write(record(index, hyps) + "\n")
            bar.update(len(batch))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    if too_long.any():
        logger.warning(
            "shard %d/%d: %d sources longer than %d tokens were not decoded",
            shard_id, num_shards, int(too_long.sum()), max_source_len,
        )
    logger.info("shard %d/%d complete: %d examples -> %s", shard_id, num_shards, len(indices), final)
    return True


def decode_corpus(
    corpus: Corpus,
    translate: Translator,
    out_dir: str,
    num_shards: int = 1,
    shard_ids: Optional[Sequence[int]] = None,
    settings: Optional[Dict] = None,
    **shard_kwargs,
) -> List[int]:
    """Write the manifest and decode ``shard_ids`` (default: all); returns the
    ids of the shards decoded now (complete shards are skipped)."""
    if shard_ids is None:
        shard_ids = range(num_shards)
    for shard_id in shard_ids:
        shard_range(len(corpus), num_shards, shard_id)  # validates the id
    manifest = {
        "num_examples": len(corpus),
        "num_shards": num_shards,
        "source": corpus.description,
        "has_references": corpus.references is not None,
        "settings": settings or {},
    }
    write_manifest(out_dir, manifest)
    return [
        s for s in shard_ids
        if decode_shard(corpus, translate, out_dir, s, num_shards, **shard_kwargs)
    ]
