"""fairseq-kd: knowledge distillation for fairseq translation models.

Importing the package registers its tasks and criterions with fairseq and
allow-lists the classes fairseq checkpoints hold for ``torch.load``'s
``weights_only`` mode (see :mod:`fairseq_kd.checkpoints`).
"""

__version__ = "0.1.0"

from fairseq_kd.checkpoints import install_fairseq_loader, install_safe_globals

install_safe_globals()
install_fairseq_loader()

import fairseq_kd.criterions  # noqa: E402,F401  (registers the criterions)
import fairseq_kd.tasks  # noqa: E402,F401  (registers the tasks)
