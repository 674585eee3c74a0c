# shellcheck shell=bash
# WMT'14 English-French: the settings examples/wmt14/run.sh reads (override with --set NAME=VALUE).
# TIE-KD released only its En-De scripts: the models and schedule are En-De's, except the teacher's
# dropout, which is the Transformer-big En-Fr value of Vaswani et al. (2017) and fairseq's scaling-NMT
# example (0.1); the BPE is fairseq's examples/translation/prepare-wmt14en2fr.sh.
# shellcheck disable=SC2034  # every variable here is read by run.sh

CPU_CORPUS=multi30k_en_fr
CPU_TEST_FROM_VALID=
CPU_TRAIN_LINES=10000
CPU_VALID_LINES=
FULL_CORPUS=wmt14_en_fr        # scripts/prepare-wmt.sh --pair en-fr (36M pairs)

TEACHER_DROPOUT=0.1            # Vaswani et al. 2017, big En-Fr (P_drop 0.1)
STUDENT_DROPOUT=0.1            # as En-De (TIE-KD)
FULL_TEACHER_UPDATES=300000    # as En-De (TIE-KD silent for En-Fr); 36M pairs: about 3 epochs at 32k tokens/update
FULL_STUDENT_UPDATES=200000
PATIENCE=-1                    # no early stopping
BPE_MERGES=40000               # fairseq prepare-wmt14en2fr.sh (BPE_TOKENS=40000)

PAPER_NOTE="TIE-KD (ACL 2023): TIE-KD student +0.60 tokenized BLEU over the Transformer-base student"
