"""Decoding: one shard of a :class:`~fairseq_kd.decoding.corpus.Corpus` into
its JSON-lines file (:func:`decode_shard`), and every requested shard after
the manifest check (:func:`decode_corpus`), or as a work queue: claim the next
shard nobody holds until none is left (:func:`decode_queue`).  The translation
itself is a :data:`~fairseq_kd.decoding.backend.Translator` (a backend's
``translate``)."""

import json
import logging
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

from fairseq_kd.decoding.backend import Translator
from fairseq_kd.decoding.corpus import Corpus
from fairseq_kd.cliargs import shard_range
from fairseq_kd.decoding.shards import (
    CLAIM_TIMEOUT,
    ShardBusy,
    partial_shards,
    shard_lock,
    shard_path,
    write_manifest,
)
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
    claim_timeout: Optional[float] = CLAIM_TIMEOUT,
    worker: str = "",
) -> bool:
    """Decode shard ``shard_id`` unless it is already complete (:class:`ShardBusy`
    while another live process decodes it).

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
    with shard_lock(final, claim_timeout, worker):
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

    # killed (SIGTERM), interrupted, failed: the lock is released, the partial file redone by the next claim
    _write_records(corpus, translate, tmp, indices, too_long, batches, record, shard_id, num_shards, progress)
    os.replace(tmp, final)
    if too_long.any():
        logger.warning(
            "shard %d/%d: %d sources longer than %d tokens were not decoded",
            shard_id, num_shards, int(too_long.sum()), max_source_len,
        )
    logger.info("shard %d/%d complete: %d examples -> %s", shard_id, num_shards, len(indices), final)
    return True


def _write_records(corpus, translate, tmp, indices, too_long, batches, record, shard_id, num_shards, progress):
    from tqdm import tqdm

    dataset = corpus.dataset
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


def decode_queue(
    corpus: Corpus,
    translate: Translator,
    out_dir: str,
    num_shards: int,
    settings: Optional[Dict] = None,
    wait: bool = False,
    poll: float = 10.0,
    **shard_kwargs,
) -> List[int]:
    """The work queue: claim and decode the next shard no live process holds, until none is
    left; returns the ids decoded here.  With ``wait``, then wait until every shard is complete,
    taking over the claims of processes that stopped (``claim_timeout`` in ``shard_kwargs``)."""
    decode_corpus(corpus, None, out_dir, num_shards, [], settings=settings)  # the manifest check
    done: List[int] = []
    while True:
        busy = []
        for s in range(num_shards):
            if os.path.exists(shard_path(out_dir, s, num_shards)):
                continue
            try:
                if decode_shard(corpus, translate, out_dir, s, num_shards, **shard_kwargs):
                    done.append(s)
            except ShardBusy:
                busy.append(s)
        if not busy or not wait:
            if busy:
                logger.info("%d shard(s) of %d held by other workers: left to them", len(busy), num_shards)
            return done
        logger.info("waiting for %d shard(s) of %d held by other workers (first: %d)", len(busy), num_shards, busy[0])
        time.sleep(poll)
