"""The CPU-scale distillation study: the teacher analysis (``teacher_analysis``),
the report (``report``) and its plots (``plots``); run by ``examples/multi30k/study.sh``."""
