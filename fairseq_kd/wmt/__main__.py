"""``python -m fairseq_kd.wmt prepare|average ...``: see :mod:`fairseq_kd.wmt.cli`."""

from fairseq_kd.wmt.cli import main

main()
