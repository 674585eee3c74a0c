"""``python -m fairseq_kd.cache build|info ...``: see :mod:`fairseq_kd.cache.cli`."""

from fairseq_kd.cache.cli import main

main()
