#!/usr/bin/env bash
# Knowledge distillation on the WMT pairs of the papers (WMT'14 En-De, En-Fr; WMT'16 En-Ro), end to end.
#
#   bash examples/wmt14/run.sh --pair en-de|en-fr|en-ro --scale cpu|full [--data-root DIR] [--work DIR]
#        [--students "LIST"] [--checksums FILE] [--rounds N] [--unlabeled FILE]
#
# Stages (scripts/lib/pipeline.sh, shared with the main job): [prepare_wmt] -> prepare -> teacher ->
# translate_teacher -> [decode_train_with_teacher] -> per student: student_NAME [-> average_student_NAME]
# -> translate_student_NAME -> sacrebleu table WORK/results.md -> [iterative rounds, scripts/iterate.sh].
# A finished stage is skipped on a re-run (remove WORK/stages/NAME.done to redo one); prepare-wmt.sh
# and iterate.sh keep their own state and skip their finished steps themselves.
#
# --scale cpu   real data from --data-root (default ../shared/data), tiny models, a few hundred updates:
#               en-de opennmt_toy_en_de (WMT news domain; it has no test split: the last 1000 lines of its
#               valid set, newstest2012, are held out as the test set), en-fr multi30k_en_fr, en-ro tatoeba_en_ro.
# --scale full  the WMT corpus built by prepare-wmt.sh under --data-root (default work/corpora) and the
#               TIE-KD paper's settings: transformer_vaswani_wmt_en_de_big teacher (300k updates), Transformer
#               base students (200k updates, last 5 checkpoints averaged), beam 4, lenpen 0.6.  GPUs needed.
# --students    any of: baseline word_kd seq_kd tie_kd self_evolution_kd hybrid_gated_kd (default: all six)
# --checksums   sha256 manifest of the WMT archives (--scale full), see examples/wmt14/README.md
# --rounds N    also run N rounds of iterative distillation on source-only text (--unlabeled FILE; at
#               --scale cpu the training source is used when it is not given)
#
# Environment overrides (quick tries, tests): TRAIN_LINES VALID_LINES TEST_LINES VOCAB TEACHER_UPDATES
# STUDENT_UPDATES TRAIN_BEAM TEST_BEAM DECODE_SHARDS; PYTHON [python]; ITERATE_SH [scripts/iterate.sh].
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PAIR=
SCALE=
DATA_ROOT=
WORK=
STUDENTS=
CHECKSUMS=
ROUNDS=0
UNLABELED=
PYTHON=${PYTHON:-python}
ITERATE_SH=${ITERATE_SH:-$REPO/scripts/iterate.sh}
RECIPE=run.sh

die() { echo "$RECIPE: error: $*" >&2; exit 2; }
abspath() { if [[ -z $1 || $1 == /* ]]; then echo "$1"; else echo "$PWD/$1"; fi; }

while [ $# -gt 0 ]; do
    case $1 in
        -h | --help) sed -n '2,25p' "$0"; exit 0 ;;
        --pair | --scale | --data-root | --work | --students | --checksums | --rounds | --unlabeled)
            [ $# -ge 2 ] || die "$1 needs a value (see --help)" ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
    case $1 in
        --pair) PAIR=$2 ;;
        --scale) SCALE=$2 ;;
        --data-root) DATA_ROOT=$2 ;;
        --work) WORK=$2 ;;
        --students) STUDENTS=$2 ;;
        --checksums) CHECKSUMS=$2 ;;
        --rounds) ROUNDS=$2 ;;
        --unlabeled) UNLABELED=$2 ;;
    esac
    shift 2
done

# ---- required inputs ------------------------------------------------------------------------------
case $PAIR in
    en-de | en-fr | en-ro) ;;
    '') die "--pair is required: en-de, en-fr or en-ro" ;;
    *) die "--pair must be en-de, en-fr or en-ro, got $PAIR" ;;
esac
case $SCALE in
    cpu | full) ;;
    '') die "--scale is required: cpu (local real data, tiny models) or full (WMT, paper settings)" ;;
    *) die "--scale must be cpu or full, got $SCALE" ;;
esac
[[ $ROUNDS =~ ^[0-9]+$ ]] || die "--rounds must be a number of rounds, got $ROUNDS"
[[ -z $CHECKSUMS || $SCALE == full ]] || die "--checksums is for the WMT downloads of --scale full"
[[ -z $CHECKSUMS || -f $CHECKSUMS ]] || die "checksum manifest $CHECKSUMS not found (--checksums)"
[[ -z $UNLABELED || -f $UNLABELED ]] || die "source-only text $UNLABELED not found (--unlabeled)"
[[ $SCALE == cpu || $ROUNDS == 0 || -n $UNLABELED ]] \
    || die "--rounds at --scale full needs --unlabeled FILE (source-only text, e.g. WMT News Crawl)"
SRC=en
TGT=${PAIR#en-}
CHECKSUMS=$(abspath "$CHECKSUMS")
UNLABELED=$(abspath "$UNLABELED")

# ---- presets ------------------------------------------------------------------------------------------
# A variable already set in the environment wins (':=' for numbers, '=' where empty means "all").
if [[ $SCALE == cpu ]]; then
    DATA_ROOT=${DATA_ROOT:-$REPO/../shared/data}
    case $PAIR in
        en-de) CORPUS=opennmt_toy_en_de; TEST_FROM_VALID=1000; : "${TRAIN_LINES=}"; : "${VALID_LINES=1000}" ;;
        en-fr) CORPUS=multi30k_en_fr; TEST_FROM_VALID=; : "${TRAIN_LINES=10000}"; : "${VALID_LINES=}" ;;
        en-ro) CORPUS=tatoeba_en_ro; TEST_FROM_VALID=; : "${TRAIN_LINES=}"; : "${VALID_LINES=}" ;;
    esac
    : "${TEST_LINES=}" "${VOCAB:=4000}" "${TEACHER_UPDATES:=600}" "${STUDENT_UPDATES:=300}"
    : "${TRAIN_BEAM:=1}" "${TEST_BEAM:=4}" "${DECODE_SHARDS:=2}"
    WORKERS=1
    TRAIN_ARGS="--share-all-embeddings --optimizer adam --adam-betas (0.9,0.98)
        --lr-scheduler inverse_sqrt --warmup-updates 100 --warmup-init-lr 1e-07 --clip-norm 1.0
        --max-tokens 4096 --seed 1 --no-epoch-checkpoints --keep-last-epochs 1 --patience -1
        --num-workers 0 --log-interval 20"
    TEACHER_ARGS="--arch transformer --encoder-embed-dim 128 --decoder-embed-dim 128
        --encoder-ffn-embed-dim 256 --decoder-ffn-embed-dim 256 --encoder-layers 2 --decoder-layers 2
        --encoder-attention-heads 4 --decoder-attention-heads 4 --lr 0.002"
    STUDENT_ARGS="--arch transformer --encoder-embed-dim 64 --decoder-embed-dim 64
        --encoder-ffn-embed-dim 128 --decoder-ffn-embed-dim 128 --encoder-layers 1 --decoder-layers 1
        --encoder-attention-heads 2 --decoder-attention-heads 2 --lr 0.002"
    STUDENT_AVERAGE=0; AVERAGE_UPPER_BOUND=
    DECODE_PARALLEL=2; DECODE_ARGS="--max-len-a 1.2 --max-len-b 10"
    LENPEN=1; TEST_BATCH=128; FP16=0
    ON_DEGENERATE=keep  # iterative rounds: such tiny students loop, "drop" would leave most labels out
else
    DATA_ROOT=${DATA_ROOT:-$REPO/work/corpora}
    case $PAIR in
        en-de) CORPUS=wmt14_en_de ;;
        en-fr) CORPUS=wmt14_en_fr ;;
        en-ro) CORPUS=wmt16_en_ro ;;
    esac
    TEST_FROM_VALID=
    : "${TRAIN_LINES=}" "${VALID_LINES=}" "${TEST_LINES=}" "${VOCAB:=32000}"
    : "${TEACHER_UPDATES:=300000}" "${STUDENT_UPDATES:=200000}" "${TRAIN_BEAM:=5}" "${TEST_BEAM:=4}"
    : "${DECODE_SHARDS:=8}"
    WORKERS=$(nproc 2>/dev/null || echo 4)
    # about 32k target tokens per update, as in the paper (4 GPUs x 4096 tokens x update-freq 2)
    GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
    UPDATE_FREQ=$(( 8 / (GPUS > 0 ? GPUS : 1) ))
    UPDATE_FREQ=$(( UPDATE_FREQ > 0 ? UPDATE_FREQ : 1 ))
    TRAIN_ARGS="--share-all-embeddings --optimizer adam --adam-betas (0.9,0.98)
        --lr-scheduler inverse_sqrt --warmup-updates 4000 --warmup-init-lr 1e-07 --clip-norm 5.0
        --weight-decay 0.0 --max-tokens 4096 --update-freq $UPDATE_FREQ --save-interval-updates 5000
        --keep-interval-updates 5 --no-epoch-checkpoints --seed 1 --log-format simple --log-interval 100"
    # the teacher's best checkpoint by valid BLEU (beam 4, lenpen 0.6; sacreBLEU 13a on the raw text)
    TEACHER_ARGS="--arch transformer_vaswani_wmt_en_de_big --dropout 0.3 --attention-dropout 0.1
        --activation-dropout 0.1 --lr 5e-4 --eval-bleu --eval-bleu-args {\"beam\":4,\"lenpen\":0.6}
        --eval-bleu-remove-bpe sentencepiece --best-checkpoint-metric bleu --maximize-best-checkpoint-metric"
    STUDENT_ARGS="--arch transformer --dropout 0.1 --attention-dropout 0.1 --activation-dropout 0.1 --lr 7e-4"
    STUDENT_AVERAGE=5; AVERAGE_UPPER_BOUND=$STUDENT_UPDATES
    DECODE_PARALLEL=1; DECODE_ARGS="--max-len-a 1.2 --max-len-b 10 --max-tokens 8000"
    LENPEN=0.6; TEST_BATCH=128; FP16=1
    ON_DEGENERATE=drop
fi
STUDENTS=${STUDENTS:-baseline word_kd seq_kd tie_kd self_evolution_kd hybrid_gated_kd}
WORK=$(abspath "${WORK:-$REPO/work/wmt_${SRC}_${TGT}_$SCALE}")
DATA_ROOT=$(abspath "$DATA_ROOT")
if [[ $SCALE == cpu ]]; then
    [ -d "$DATA_ROOT/$CORPUS" ] || {
        echo "$RECIPE: error: $DATA_ROOT/$CORPUS not found: --scale cpu reads the local corpus $CORPUS; pass --data-root DIR (the folder holding $CORPUS/)" >&2
        exit 1
    }
fi

# shellcheck source=../../scripts/lib/pipeline.sh
source "$REPO/scripts/lib/pipeline.sh"
pipeline_setup

prepare_wmt() {  # no stage marker: prepare-wmt.sh skips its own finished steps, and verifies the
                 # archives again whenever --checksums is given
    echo "== [prepare_wmt] $(date '+%H:%M:%S') $DATA_ROOT/$CORPUS"
    PYTHON="$PYTHON" bash "$REPO/scripts/prepare-wmt.sh" --pair "$PAIR" --out "$DATA_ROOT/$CORPUS" \
        ${CHECKSUMS:+--checksums "$CHECKSUMS"}
}

iterate() {  # iterative rounds on source-only text; iterate.sh keeps its own per-round state in WORK/iterate
    # (computed first: the assignments in front of a command see each other, and DATA is one of them)
    local unlabeled=${UNLABELED:-$DATA/raw/train.$SRC} spm=$DATA/spm.model valid_ref=$DATA/raw/valid.$TGT
    require_file "$WORK/teacher/checkpoint_best.pt" "the teacher stage did not finish"
    echo "== [iterate] $(date '+%H:%M:%S') $ROUNDS rounds on $unlabeled ($ITERATE_SH resumes from $WORK/iterate/state)"
    DATA="$BIN" UNLABELED="$unlabeled" SPM_MODEL="$spm" TEACHER="$WORK/teacher/checkpoint_best.pt" \
        VALID_REF="$valid_ref" WORK="$WORK/iterate" SRC="$SRC" TGT="$TGT" ROUNDS="$ROUNDS" \
        UPDATES_PER_ROUND="$STUDENT_UPDATES" ARCH_ARGS="${student_args[*]}" TRAIN_ARGS="${train_args[*]}" \
        LABEL_BEAM="$TRAIN_BEAM" VALID_BEAM="$TEST_BEAM" ON_DEGENERATE="$ON_DEGENERATE" \
        CPU=$([[ ${device[*]} == --cpu ]] && echo 1 || echo 0) PYTHON="$PYTHON" USER_DIR="$USER_DIR" \
        bash "$ITERATE_SH"
}

if [[ $SCALE == full ]]; then
    prepare_wmt
fi
pipeline_run
if (( ROUNDS > 0 )); then
    iterate
else
    echo "iterative rounds on source-only text: add --rounds N [--unlabeled FILE] (runs scripts/iterate.sh)"
fi
