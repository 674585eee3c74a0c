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
"""

import argparse
from typing import List

import torch

__all__ = ["SAFE_GLOBALS", "install_safe_globals", "load_checkpoint_state"]


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
