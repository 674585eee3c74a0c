"""Entry point for ``fairseq-train --user-dir user_dir`` (and fairseq-generate, ...): fairseq imports this
directory as a package, which calls :func:`fairseq_kd.register` (the criterions, the tasks, the safe
checkpoint loader).  From a checkout without ``pip install``, the repository root is put on ``sys.path``."""

import os
import sys

try:
    import fairseq_kd
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import fairseq_kd

fairseq_kd.register()
