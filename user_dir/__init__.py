"""Entry point for ``fairseq-train --user-dir user_dir``: registers fairseq-kd.

fairseq imports this directory as a package; importing :mod:`fairseq_kd`
registers the tasks and criterions and installs the safe checkpoint loader.
When running from a checkout without ``pip install``, the repository root is
put on ``sys.path`` so that :mod:`fairseq_kd` is importable.
"""

import os
import sys

try:
    import fairseq_kd  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import fairseq_kd  # noqa: F401
