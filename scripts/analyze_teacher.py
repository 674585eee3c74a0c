#!/usr/bin/env python
"""The TIE-KD teacher analysis (top-1 = gold rate, top-1 and top-k mass); see
:mod:`fairseq_kd.study.teacher_analysis` (also ``fairseq-kd-analyze-teacher``)."""

from fairseq_kd.study.teacher_analysis import main

if __name__ == "__main__":
    main()
