# shellcheck shell=bash
# WMT'16 English-Romanian: the settings examples/wmt14/run.sh reads (override with --set NAME=VALUE).
# The papers give no En-Ro schedule and fairseq has no En-Ro example.  610k pairs are about 520 updates
# per epoch at 32k tokens per update, so En-De's 200k-300k updates would be hundreds of epochs; these
# values are this recipe's own choice: 50k updates with early stopping on the valid loss (patience 10
# validations, one every 1000 updates) and dropout 0.3 on both models, as for other small WMT pairs.
# shellcheck disable=SC2034  # every variable here is read by run.sh

CPU_CORPUS=tatoeba_en_ro
CPU_TEST_FROM_VALID=
CPU_TRAIN_LINES=
CPU_VALID_LINES=
FULL_CORPUS=wmt16_en_ro        # scripts/prepare-wmt.sh --pair en-ro

TEACHER_DROPOUT=0.3            # this recipe's choice (papers silent)
STUDENT_DROPOUT=0.3            # this recipe's choice (papers silent)
FULL_TEACHER_UPDATES=50000     # this recipe's choice: about 95 epochs
FULL_STUDENT_UPDATES=50000
PATIENCE=10                    # validations without improvement (one every VALIDATE_UPDATES)
VALIDATE_UPDATES=1000
BPE_MERGES=40000               # as En-De (no fairseq En-Ro script)

PAPER_NOTE="TIE-KD (ACL 2023): TIE-KD student +1.11 tokenized BLEU over the Transformer-base student"
