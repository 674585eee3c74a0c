"""``python -m fairseq_kd.cache`` (``fairseq-kd-build-cache``): build or inspect an offline teacher cache.

``build``
    Run the teacher (``--path a.pt``, or ``a.pt:b.pt`` for an ensemble) once,
    teacher-forced, over a binarized split (``--data DIR --split train``) and
    store its top ``--k`` ids and log-probabilities at ``--temperature`` for
    every target position into ``--out-dir`` (see :mod:`fairseq_kd.cache.build`).
    ``--num-shards N --shard-id I`` builds one shard (one process per GPU or
    machine, sharing ``--out-dir``); a re-run skips the complete shards.
``info``
    Print a cache's manifest and its size per target token.
``verify``
    Check every shard file against the sizes and digests in the manifest
    (sampled blocks; ``--full``: whole files) and every example's values.

Train on the result with ``--task distillation_translation --teacher-cache DIR``
instead of ``--teacher-path`` (docs/teacher_cache.md).
"""

import argparse
import json
import logging
import os
import sys
from typing import Optional, Sequence

from fairseq_kd.cache.manifest import DEFAULT_K, read_manifest
from fairseq_kd.cliargs import add_data_arguments, add_device_arguments, add_shard_arguments, add_teacher_arguments
from fairseq_kd.errors import exit_on_error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fairseq-kd-build-cache",
        description="Offline teacher cache: the teacher's top-k token ids and log-probabilities for every "
        "target position of a binarized split, sharded and resumable.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="run the teacher over a split and store its top-k (sharded, resumable)")
    add_data_arguments(b, "binarized data directory (dictionaries and the split)",
                       "binarized split to cache (default: train)")
    add_teacher_arguments(b)
    b.add_argument("--out-dir", required=True, help="cache directory (manifest.json and the shards)")
    b.add_argument("--k", type=int, default=DEFAULT_K, help=f"teacher tokens kept per position (default: {DEFAULT_K})")
    b.add_argument("--temperature", type=float, default=1.0,
                   help="softmax temperature of the stored log-probabilities; must equal the criterion's "
                   "--kd-temperature (default: 1)")
    add_shard_arguments(b, "build only this shard (default: every missing shard in turn)")
    b.add_argument("--max-tokens", type=int, default=4096, help="tokens per teacher batch")
    b.add_argument("--batch-size", type=int, help="sentences per teacher batch (default: no limit)")
    b.add_argument("--truncate-source", action="store_true",
                   help="feed the teacher sources cut to --max-source-positions, as a student trained with "
                   "--truncate-source sees them (recorded; training checks it)")
    b.add_argument("--max-source-positions", type=int, default=1024,
                   help="source length the sources are cut to with --truncate-source (default: 1024)")
    add_device_arguments(b, "run the teacher on the CPU")
    i = sub.add_parser("info", help="print a cache's manifest and its size per target token")
    i.add_argument("cache_dir", help="cache directory")
    v = sub.add_parser("verify", help="check the shard files' sizes and digests and every stored value")
    v.add_argument("cache_dir", help="cache directory")
    v.add_argument("--full", action="store_true",
                   help="digest the whole files (default: their sizes and sampled blocks)")
    return parser


def verify(cache_dir: str, full: bool) -> int:
    """Open the cache (sizes and digests, ``full``: whole files) and read every example (its values'
    range); returns the number of examples."""
    from fairseq_kd.cache.dataset import TeacherCache

    cache = TeacherCache(cache_dir, full=full)
    for i in range(len(cache)):
        cache[i]
    return len(cache)


def cache_size(cache_dir: str) -> dict:
    """Bytes on disk of a cache's data and index files, and per target token."""
    manifest = read_manifest(cache_dir)
    data = index = 0
    for folder, _, files in os.walk(cache_dir):
        for name in files:
            size = os.path.getsize(os.path.join(folder, name))
            data += size if name.endswith(".bin") else 0
            index += size if name.endswith(".idx") else 0
    tokens = max(1, manifest["num_target_tokens"])
    return {"data_bytes": data, "index_bytes": index, "data_bytes_per_target_token": data / tokens,
            "index_bytes_per_example": index / max(1, manifest["num_examples"])}


def main(argv: Optional[Sequence[str]] = None) -> None:
    logging.basicConfig(
        format="%(asctime)s | %(levelname)s | %(name)s | %(message)s",
        level=os.environ.get("LOGLEVEL", "INFO").upper(), stream=sys.stderr, force=True,
    )
    args = build_parser().parse_args(argv)
    with exit_on_error("fairseq-kd-build-cache"):
        if args.command == "info":
            print(json.dumps({"manifest": read_manifest(args.cache_dir), "size": cache_size(args.cache_dir)},
                             indent=1, sort_keys=True))
            return
        if args.command == "verify":
            n = verify(args.cache_dir, args.full)
            print(f"{args.cache_dir}: {n} examples, every file and value checked"
                  f"{' (whole-file sha256)' if args.full else ' (sizes and sampled sha256)'}")
            return
        from fairseq_kd.cache.build import build_cache
        from fairseq_kd.decoding.fairseq_backend import resolve_device

        build_cache(
            args.data, args.split, args.path, args.out_dir, k=args.k, temperature=args.temperature,
            num_shards=args.num_shards, shard_ids=None if args.shard_id is None else [args.shard_id],
            max_tokens=args.max_tokens, max_sentences=args.batch_size, source_lang=args.source_lang,
            target_lang=args.target_lang, device=resolve_device(args.device, args.cpu),
            precision=args.teacher_precision, teacher_data_dir=args.teacher_data_dir,
            progress=not args.no_progress_bar, truncate_source=args.truncate_source,
            max_source_positions=args.max_source_positions,
        )


if __name__ == "__main__":
    main()
