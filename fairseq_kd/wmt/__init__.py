"""The WMT corpora of the distillation papers (WMT'14 En-De and En-Fr, WMT'16 En-Ro), built from their
official sources: ``python -m fairseq_kd.wmt prepare|average`` (:mod:`fairseq_kd.wmt.cli`).

One concept a module: :mod:`~fairseq_kd.wmt.archives` (what each pair is made of), :mod:`~fairseq_kd.wmt.extract`,
:mod:`~fairseq_kd.wmt.clean`, :mod:`~fairseq_kd.wmt.rules`, :mod:`~fairseq_kd.wmt.testsets`,
:mod:`~fairseq_kd.wmt.build` and :mod:`~fairseq_kd.wmt.cli`. Importing the package imports none of them.
The recipe and its rules: docs/data_preparation.md and examples/wmt14/README.md.
"""
