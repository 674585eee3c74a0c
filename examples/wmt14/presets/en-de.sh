# shellcheck shell=bash
# WMT'14 English-German: the settings examples/wmt14/run.sh reads (one source of truth; override any
# of them with run.sh --set NAME=VALUE).  Sources: TIE-KD's released training scripts (spec methods.md
# §2.3) for the models and schedule; fairseq's examples/translation/prepare-wmt14en2de.sh for the BPE.
# shellcheck disable=SC2034  # every variable here is read by run.sh

CPU_CORPUS=opennmt_toy_en_de   # WMT news domain, Moses-tokenized; no test split: the last 1000 valid lines are held out
CPU_TEST_FROM_VALID=1000
CPU_TRAIN_LINES=
CPU_VALID_LINES=1000
FULL_CORPUS=wmt14_en_de        # scripts/prepare-wmt.sh --pair en-de

TEACHER_DROPOUT=0.3            # TIE-KD (transformer_vaswani_wmt_en_de_big)
STUDENT_DROPOUT=0.1            # TIE-KD (transformer base)
FULL_TEACHER_UPDATES=300000    # TIE-KD
FULL_STUDENT_UPDATES=200000    # TIE-KD; the last 5 checkpoints (every 5000 updates, up to 200k) averaged
PATIENCE=-1                    # no early stopping (TIE-KD: fixed update counts)
BPE_MERGES=40000               # fairseq prepare-wmt14en2de.sh (BPE_TOKENS=40000)

# the papers' numbers this pair's README compares with (tokenized BLEU, newstest2014)
PAPER_NOTE="TIE-KD (ACL 2023): TIE-KD student +1.04 tokenized BLEU over the Transformer-base student"
