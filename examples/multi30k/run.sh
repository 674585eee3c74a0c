#!/usr/bin/env bash
# The main job: knowledge distillation on Multi30k English->German, end to end.
#
#   bash examples/multi30k/run.sh [--size demo|full] [--data-root DIR] [--work DIR] [--students "LIST"]
#
# Stages: prepare (slice, joint SentencePiece, binarize) -> teacher -> one student per
# entry of STUDENTS -> translate the test set with each model -> sacrebleu table
# (WORK/results.md).  A finished stage is skipped on a re-run; an interrupted
# fairseq-train resumes from its checkpoint_last.pt.
#
# --size demo (default) runs in about 20 minutes on 2 CPU cores: a slice of the
# training data and tiny models, for a smoke-level comparison.  --size full uses
# all 29k pairs and larger models (hours on a CPU, minutes on a GPU).
# --data-root is the folder holding multi30k_en_de/ (default ../shared/data next
# to the checkout); when the corpus is not there it is downloaded from the
# official Multi30k repository and its checksums are verified.  The stages live in
# scripts/lib/pipeline.sh (shared with examples/wmt14/run.sh); this script is its preset.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
SIZE=demo
DATA_ROOT=$REPO/../shared/data
WORK=
STUDENTS=
PYTHON=${PYTHON:-python}
SRC=en
TGT=de

while [ $# -gt 0 ]; do
    case $1 in
        --size) SIZE=$2; shift 2 ;;
        --data-root) DATA_ROOT=$2; shift 2 ;;
        --work) WORK=$2; shift 2 ;;
        --students) STUDENTS=$2; shift 2 ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *) echo "run.sh: error: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

case $SIZE in
    demo)
        TRAIN_LINES=10000; VOCAB=4000
        TEACHER_ARCH="--encoder-embed-dim 128 --decoder-embed-dim 128 --encoder-ffn-embed-dim 256 --decoder-ffn-embed-dim 256 --encoder-layers 2 --decoder-layers 2 --encoder-attention-heads 4 --decoder-attention-heads 4"
        STUDENT_ARCH="--encoder-embed-dim 64 --decoder-embed-dim 64 --encoder-ffn-embed-dim 128 --decoder-ffn-embed-dim 128 --encoder-layers 1 --decoder-layers 1 --encoder-attention-heads 2 --decoder-attention-heads 2"
        TEACHER_UPDATES=300; STUDENT_UPDATES=120; LR=0.002; WARMUP=100; MAX_TOKENS=4096
        TRAIN_BEAM=1; TEST_BEAM=4
        DEFAULT_STUDENTS="baseline word_kd seq_kd self_evolution_kd hybrid_gated_kd"
        ;;
    full)
        TRAIN_LINES=; VOCAB=8000
        TEACHER_ARCH="--encoder-embed-dim 256 --decoder-embed-dim 256 --encoder-ffn-embed-dim 1024 --decoder-ffn-embed-dim 1024 --encoder-layers 3 --decoder-layers 3 --encoder-attention-heads 4 --decoder-attention-heads 4 --dropout 0.3"
        STUDENT_ARCH="--encoder-embed-dim 128 --decoder-embed-dim 128 --encoder-ffn-embed-dim 512 --decoder-ffn-embed-dim 512 --encoder-layers 2 --decoder-layers 2 --encoder-attention-heads 4 --decoder-attention-heads 4 --dropout 0.1"
        TEACHER_UPDATES=6000; STUDENT_UPDATES=4000; LR=0.001; WARMUP=1000; MAX_TOKENS=4096
        TRAIN_BEAM=5; TEST_BEAM=5
        DEFAULT_STUDENTS="baseline word_kd seq_kd tie_kd self_evolution_kd hybrid_gated_kd"
        ;;
    *) echo "run.sh: error: --size must be demo or full, got $SIZE" >&2; exit 2 ;;
esac

# ---- the shared pipeline (scripts/lib/pipeline.sh) with this preset ------------------------------
RECIPE=run.sh
STUDENTS=${STUDENTS:-$DEFAULT_STUDENTS}
WORK=${WORK:-$REPO/work/multi30k_${SRC}_${TGT}_$SIZE}
CORPUS=multi30k_${SRC}_${TGT}
VALID_LINES=; TEST_LINES=; TEST_FROM_VALID=; WORKERS=1
TRAIN_ARGS="--share-all-embeddings --optimizer adam --adam-betas (0.9,0.98)
    --lr-scheduler inverse_sqrt --warmup-updates $WARMUP --warmup-init-lr 1e-07 --clip-norm 1.0
    --max-tokens $MAX_TOKENS --seed 1 --no-epoch-checkpoints --keep-last-epochs 1 --patience -1
    --num-workers 0 --log-interval 20"
TEACHER_ARGS="--arch transformer $TEACHER_ARCH --lr $LR"
STUDENT_ARGS="--arch transformer $STUDENT_ARCH --lr $LR"
STUDENT_AVERAGE=0; AVERAGE_UPPER_BOUND=
DECODE_SHARDS=2; DECODE_PARALLEL=2; DECODE_ARGS="--max-len-a 1.2 --max-len-b 10"
TEST_DECODE_ARGS="--max-len-a 1.2 --max-len-b 10"
LENPEN=1; TEST_BATCH=128; FP16=0

# shellcheck source=../../scripts/lib/pipeline.sh
source "$REPO/scripts/lib/pipeline.sh"
pipeline_run
