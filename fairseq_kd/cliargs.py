"""Command-line arguments the tools share (the data, the teacher, the shards, the device) and the shard plan
they set (:func:`shard_range`); docs/architecture.md."""

import argparse
from typing import Tuple

from fairseq_kd.errors import DistillationError

PRECISIONS = ("fp32", "fp16", "bf16")


def add_data_arguments(parser: argparse.ArgumentParser, data_help: str, split_help: str) -> None:
    """``--data``, ``--split`` (default train), ``-s/--source-lang``, ``-t/--target-lang``."""
    parser.add_argument("--data", required=True, help=data_help)
    parser.add_argument("--split", default="train", help=split_help)
    parser.add_argument("-s", "--source-lang", help="source language (default: inferred from --data)")
    parser.add_argument("-t", "--target-lang", help="target language (default: inferred from --data)")


def add_teacher_arguments(parser: argparse.ArgumentParser) -> None:
    """``--path`` (a checkpoint or an ensemble ``a.pt:b.pt``), ``--teacher-data-dir``, ``--teacher-precision``."""
    parser.add_argument("--path", required=True, help="teacher checkpoint, or several separated by ':' (an ensemble)")
    parser.add_argument("--teacher-data-dir",
                        help="directory with the teacher's dictionaries, if its recorded data directory moved")
    parser.add_argument("--teacher-precision", default="fp32", choices=list(PRECISIONS), help="dtype of the teacher")


def add_shard_arguments(parser: argparse.ArgumentParser, shard_id_help: str) -> None:
    """``--num-shards`` (default 1) and ``--shard-id`` (default: every shard in turn); see :func:`shard_range`."""
    parser.add_argument("--num-shards", type=int, default=1, help="number of contiguous shards of the examples")
    parser.add_argument("--shard-id", type=int, help=shard_id_help)


def add_device_arguments(parser: argparse.ArgumentParser, cpu_help: str) -> None:
    """``--device``, ``--cpu``, ``--no-progress-bar``."""
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--cpu", action="store_true", help=cpu_help)
    parser.add_argument("--no-progress-bar", action="store_true", help="no tqdm progress bar")


def shard_range(num_examples: int, num_shards: int, shard_id: int) -> Tuple[int, int]:
    """``[start, end)`` of the example ids of shard ``shard_id`` (contiguous, sizes differ by <= 1)."""
    if num_shards < 1:
        raise DistillationError(f"--num-shards must be >= 1, got {num_shards}")
    if not 0 <= shard_id < num_shards:
        raise DistillationError(f"--shard-id must be in [0, {num_shards}), got {shard_id}")
    return num_examples * shard_id // num_shards, num_examples * (shard_id + 1) // num_shards
