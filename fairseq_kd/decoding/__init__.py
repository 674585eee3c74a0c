"""Sequence-level KD data: decode the training sources with the teacher, merge, binarize.

``python -m fairseq_kd.decoding {decode,merge,binarize} ...`` (usage:
:mod:`fairseq_kd.decoding.cli`; the recipe: ``docs/seq_kd.md``).  One step per
module:

=====================  ==============================================================
``corpus.py``          what is decoded: :class:`Corpus` of a binarized split or a text file
``shards.py``          the shard plan: shard ranges and files, claims, the manifest, resume checks
``backend.py``         the translation-backend interface and registry (:data:`BACKENDS`)
``fairseq_backend.py`` the fairseq backend: task, device, settings, ``SequenceGenerator``
``decode.py``          decoding one shard / every shard of a corpus / as a work queue
``selection.py``       hypothesis choice (Seq-Inter) and degenerate-output checks
``merge.py``           merging the shards in source order, with the report
``binarize.py``        binarizing the merged teacher targets next to the gold data
``cli.py``             the command line: ``build_parser``, ``main``, ``decode(args)``
=====================  ==============================================================

A new translation backend NAME is one module ``NAME_backend.py`` here,
registering a :class:`TranslationBackend` subclass with
``@register_backend("NAME")``, as ``ctranslate2_backend.py`` does (the
optional CTranslate2 backend, ``decode --backend ctranslate2``).
"""

from fairseq_kd.cliargs import shard_range
from fairseq_kd.decoding.backend import BACKENDS, TranslationBackend, Translator, get_backend, register_backend
from fairseq_kd.decoding.binarize import binarize
from fairseq_kd.decoding.cli import build_parser, decode, logger, main
from fairseq_kd.decoding.corpus import Corpus, corpus_from_split, corpus_from_text
from fairseq_kd.decoding.decode import decode_corpus, decode_queue, decode_shard
from fairseq_kd.decoding.fairseq_backend import (
    FairseqBackend,
    build_task,
    generation_settings,
    resolve_device,
    teacher_translator,
)
from fairseq_kd.decoding.merge import MergeReport, merge, read_shards
from fairseq_kd.decoding.selection import (
    DEGENERATE_KINDS,
    DegenerateCheck,
    remove_bpe,
    repeated_ngram,
    select_by_bleu,
    sentence_bleu,
)
from fairseq_kd.decoding.shards import (
    MANIFEST,
    ShardBusy,
    num_chunks,
    read_manifest,
    shard_path,
    shards_complete,
    write_json_atomic,
    write_manifest,
)
from fairseq_kd.errors import DistillationError
from fairseq_kd.textio import count_lines, read_text_lines, write_lines_atomic

__all__ = [
    "BACKENDS", "DEGENERATE_KINDS", "MANIFEST", "Corpus", "DegenerateCheck", "DistillationError",
    "FairseqBackend", "MergeReport", "ShardBusy", "TranslationBackend", "Translator", "binarize", "build_parser",
    "build_task", "corpus_from_split", "corpus_from_text", "count_lines", "decode", "decode_corpus", "decode_queue",
    "decode_shard", "generation_settings", "get_backend", "logger", "main", "merge", "num_chunks", "read_manifest",
    "read_shards", "read_text_lines", "register_backend", "remove_bpe", "repeated_ngram",
    "resolve_device", "select_by_bleu", "sentence_bleu", "shard_path", "shard_range",
    "shards_complete", "teacher_translator", "write_json_atomic", "write_lines_atomic",
    "write_manifest",
]
