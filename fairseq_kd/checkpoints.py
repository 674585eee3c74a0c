"""Loading fairseq checkpoints with ``torch.load(weights_only=True)``.

Since torch 2.6, ``torch.load`` only unpickles tensors, containers and
primitive types unless told otherwise, and refuses fairseq checkpoints.  The
fix here is *not* to switch that safety off (neither by argument nor by
environment variable), but to allow-list exactly the classes
that fairseq's own checkpoints hold:

* ``argparse.Namespace``: the model config of legacy architectures
  (``cfg["model"]``) and the ``args`` of pre-0.10 checkpoints;
* ``numpy.ndarray`` / ``numpy.dtype`` and numpy's array reconstructor (plus
  the concrete dtype classes of numpy >= 1.25): the BLEU n-gram statistics that
  ``--eval-bleu`` logs as meters and that land in ``extra_state["metrics"]``.

:func:`install_safe_globals` is called when :mod:`fairseq_kd` is imported,
so ``--user-dir user_dir`` makes ``fairseq-train``/``fairseq-generate``
(which call ``torch.load`` with the default ``weights_only``) load fairseq
checkpoints.  On torch < 2.6 the default is the unrestricted unpickler and
nothing needs to be done.

:func:`average_checkpoints` averages the parameters of the last N interval
checkpoints (``checkpoint_<epoch>_<update>.pt``, found by
:func:`last_checkpoints`) of a save directory, like fairseq's
``scripts/average_checkpoints.py --num-update-checkpoints N
--checkpoint-upper-bound U`` (which the pip package does not ship); the
TIE-KD recipe evaluates students that way.  Its command line is
:func:`main_average` (``fairseq-kd-average-checkpoints``, also
``python -m fairseq_kd.wmt average``).
"""

import argparse
import os
import re
from typing import List, Optional, Sequence

import torch
from tqdm import tqdm

from fairseq_kd.errors import DistillationError, exit_on_error

__all__ = [
    "SAFE_GLOBALS", "install_safe_globals", "load_checkpoint_state",
    "last_checkpoints", "average_checkpoints", "main_average",
]


def _numpy_globals() -> List:
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy comes with torch and fairseq
        return []
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    found = [np.ndarray, np.dtype, _reconstruct]
    # The integer and float dtypes fairseq's meters produce (numpy >= 1.25
    # pickles a dtype through its concrete class, e.g. numpy.dtypes.Int64DType).
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        for name in ("Int32DType", "Int64DType", "Float32DType", "Float64DType", "BoolDType"):
            cls = getattr(dtypes, name, None)
            if cls is not None:
                found.append(cls)
    return found


SAFE_GLOBALS = [argparse.Namespace] + _numpy_globals()


def install_safe_globals() -> None:
    """Allow-list :data:`SAFE_GLOBALS` for ``torch.load(weights_only=True)``."""
    add_safe_globals = getattr(torch.serialization, "add_safe_globals", None)
    if add_safe_globals is not None:
        add_safe_globals(SAFE_GLOBALS)


def load_checkpoint_state(path: str):
    """fairseq's ``load_checkpoint_to_cpu`` (upgrades old formats, turns the
    config into an ``omegaconf`` object) on top of the safe loader."""
    from fairseq import checkpoint_utils

    install_safe_globals()
    return checkpoint_utils.load_checkpoint_to_cpu(path)


# ---- checkpoint averaging ----------------------------------------------------------------------


def last_checkpoints(save_dir: str, n: int, upper_bound: Optional[int] = None) -> List[str]:
    """The last ``n`` ``checkpoint_<epoch>_<update>.pt`` of ``save_dir`` by update (at most ``upper_bound``)."""
    if n < 1:
        raise DistillationError(f"--last must be at least 1, got {n}")
    found = []
    for name in os.listdir(save_dir) if os.path.isdir(save_dir) else []:
        m = re.fullmatch(r"checkpoint_\d+_(\d+)\.pt", name)
        if m and (upper_bound is None or int(m.group(1)) <= upper_bound):
            found.append((int(m.group(1)), os.path.join(save_dir, name)))
    found.sort()
    if len(found) < n:
        raise DistillationError(
            f"{save_dir} has {len(found)} interval checkpoints (checkpoint_<epoch>_<update>.pt"
            f"{f' up to update {upper_bound}' if upper_bound else ''}), {n} needed; "
            f"train with --save-interval-updates and --keep-interval-updates {n}"
        )
    return [path for _, path in found[-n:]]


def average_checkpoints(paths: Sequence[str], output: str) -> None:
    """Write the parameter average of ``paths`` to ``output`` (other fields from the last one)."""
    install_safe_globals()  # torch.load's weights_only default (torch >= 2.6) then reads fairseq checkpoints
    total = None
    state = None
    for path in tqdm(paths, desc="average", unit="ckpt", leave=False):
        try:
            state = torch.load(path, map_location="cpu")
        except Exception as e:  # a truncated or foreign file: name it instead of a traceback
            raise DistillationError(f"cannot load {path} ({type(e).__name__}: {e}); delete it or train further")
        if not isinstance(state, dict) or "model" not in state:
            raise DistillationError(f"{path} is not a fairseq checkpoint (no 'model' entry)")
        params = state["model"]
        if total is None:
            total = {k: v.detach().double().clone() for k, v in params.items()}
        else:
            if set(params) != set(total):
                raise DistillationError(f"{path} has other parameters than {paths[0]}; average checkpoints of one run")
            for k, v in params.items():
                total[k] += v.double()
    averaged = {}
    for k, v in total.items():
        mean = v / len(paths)
        reference = state["model"][k]
        averaged[k] = mean.to(reference.dtype) if reference.is_floating_point() else reference
    state["model"] = averaged
    tmp = output + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, output)


def add_average_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of :func:`main_average` (also those of ``python -m fairseq_kd.wmt average``)."""
    parser.add_argument("--dir", required=True, help="save directory with checkpoint_<epoch>_<update>.pt files")
    parser.add_argument("--last", type=int, required=True, help="number of checkpoints")
    parser.add_argument("--upper-bound", type=int, default=None, help="ignore checkpoints after this update")
    parser.add_argument("--output", required=True)


def run_average(args: argparse.Namespace) -> None:
    """Average the checkpoints ``args`` (of :func:`add_average_arguments`) name; errors are one line."""
    with exit_on_error("average"):
        paths = last_checkpoints(args.dir, args.last, args.upper_bound)
        average_checkpoints(paths, args.output)
        print(f"{args.output}: average of {', '.join(os.path.basename(p) for p in paths)}")


def main_average(argv: Optional[List[str]] = None) -> None:
    """``fairseq-kd-average-checkpoints --dir DIR --last N [--upper-bound U] --output FILE``."""
    parser = argparse.ArgumentParser(
        prog="fairseq-kd-average-checkpoints",
        description="Average the parameters of the last N interval checkpoints of a run.",
    )
    add_average_arguments(parser)
    run_average(parser.parse_args(argv))
