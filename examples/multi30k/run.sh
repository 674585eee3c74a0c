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
# --size demo (default) runs in about 15 minutes on 2 CPU cores: a slice of the
# training data and tiny models, for a smoke-level comparison.  --size full uses
# all 29k pairs and larger models (hours on a CPU, minutes on a GPU).
# --data-root is the folder holding multi30k_en_de/ (default ../shared/data next
# to the checkout); when the corpus is not there it is downloaded from the
# official Multi30k repository and its checksums are verified.
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
        TEACHER_UPDATES=400; STUDENT_UPDATES=250; LR=0.002; WARMUP=100; MAX_TOKENS=4096
        TRAIN_BEAM=1; TEST_BEAM=4
        DEFAULT_STUDENTS="baseline word_kd seq_kd"
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
STUDENTS=${STUDENTS:-$DEFAULT_STUDENTS}
WORK=${WORK:-$REPO/work/multi30k_${SRC}_${TGT}_$SIZE}
STAGE_DIR=$WORK/stages
DATA=$WORK/data
BIN=$DATA/bin
USER_DIR=$REPO/user_dir

# shellcheck source=../lib/stages.sh
source "$REPO/examples/lib/stages.sh"
command -v "$PYTHON" >/dev/null || { echo "run.sh: error: $PYTHON not found; set PYTHON" >&2; exit 1; }
"$PYTHON" -c "import fairseq_kd" 2>/dev/null || {
    echo "run.sh: error: fairseq_kd is not importable; install it first: pip install torch==2.13.0 && pip install -e $REPO" >&2
    exit 1
}
mkdir -p "$WORK"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

COMMON_TRAIN="--arch transformer --share-all-embeddings --optimizer adam --adam-betas (0.9,0.98)
    --lr $LR --lr-scheduler inverse_sqrt --warmup-updates $WARMUP --warmup-init-lr 1e-07 --clip-norm 1.0
    --max-tokens $MAX_TOKENS --seed 1 --no-epoch-checkpoints --keep-last-epochs 1 --patience -1
    --num-workers 0 --log-interval 20"
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    COMMON_TRAIN="$COMMON_TRAIN --cpu"
fi

prepare() {
    "$PYTHON" -m fairseq_kd.prepare --corpus "multi30k_${SRC}_${TGT}" --data-root "$DATA_ROOT" \
        --src $SRC --tgt $TGT --out "$DATA" --vocab-size $VOCAB ${TRAIN_LINES:+--train-lines $TRAIN_LINES}
}

train() {  # train NAME UPDATES ARCH_FLAGS [FLAGS...]
    local name=$1 updates=$2 arch=$3
    shift 3
    # shellcheck disable=SC2086
    "$PYTHON" -m fairseq_cli.train "$BIN" --save-dir "$WORK/$name" --user-dir "$USER_DIR" \
        $COMMON_TRAIN $arch --max-update "$updates" "$@" 2>&1 | tee "$WORK/$name.train.log"
}

train_teacher() {
    train teacher $TEACHER_UPDATES "$TEACHER_ARCH" --criterion label_smoothed_cross_entropy --label-smoothing 0.1
}

KD_TASK="--task distillation_translation --teacher-path $WORK/teacher/checkpoint_best.pt"

train_student() {  # train_student NAME
    local name=$1
    case $name in
        baseline) set -- --task distillation_translation --criterion label_smoothed_cross_entropy --label-smoothing 0.1 ;;
        word_kd) set -- $KD_TASK --criterion word_kd --kd-alpha 0.5 ;;
        seq_kd) set -- --task distillation_translation --teacher-target-subset train_teacher --criterion seq_kd ;;
        tie_kd) set -- $KD_TASK --criterion tie_kd --kd-alpha 0.5 --ddp-backend legacy_ddp ;;
        self_evolution_kd) set -- $KD_TASK --criterion self_evolution_kd --kd-alpha 0.5 ;;
        hybrid_gated_kd) set -- $KD_TASK --teacher-target-subset train_teacher --criterion hybrid_gated_kd --kd-alpha 0.5 ;;
        *) echo "run.sh: error: unknown student $name (baseline word_kd seq_kd tie_kd self_evolution_kd hybrid_gated_kd)" >&2; exit 2 ;;
    esac
    train "student_$name" $STUDENT_UPDATES "$STUDENT_ARCH" "$@"
}

decode_train_with_teacher() {  # Seq-KD data: the teacher's translations of the training source
    local device_flag=
    [[ $COMMON_TRAIN == *--cpu* ]] && device_flag=--cpu
    BEAM=$TRAIN_BEAM NUM_SHARDS=2 PARALLEL=2 OMP_NUM_THREADS=1 WORK="$WORK/seq_kd_decode" PYTHON="$PYTHON" \
        DECODE_ARGS="$device_flag --max-len-a 1.2 --max-len-b 10" \
        bash "$REPO/examples/wmt14/decode_teacher.sh" "$BIN" "$WORK/teacher/checkpoint_best.pt" train_teacher
    assert_lines "$WORK/seq_kd_decode/train_teacher.txt" "$(wc -l < "$DATA/raw/train.$SRC")"
}

translate() {  # translate NAME: test set -> WORK/NAME.test.hyp
    local name=$1 checkpoint=$WORK/$1/checkpoint_best.pt
    require_file "$checkpoint" "the $name training stage did not finish"
    "$PYTHON" -m fairseq_cli.generate "$BIN" --user-dir "$USER_DIR" --path "$checkpoint" \
        --gen-subset test --beam $TEST_BEAM --max-len-a 1.2 --max-len-b 10 --remove-bpe sentencepiece \
        --batch-size 128 --required-batch-size-multiple 1 \
        $( [[ $COMMON_TRAIN == *--cpu* ]] && echo --cpu ) > "$WORK/$name.test.gen"
    "$PYTHON" -m fairseq_kd.scoring extract "$WORK/$name.test.gen" "$WORK/$name.test.hyp" \
        --expect-lines "$(wc -l < "$DATA/raw/test.$TGT")"
    assert_lines "$WORK/$name.test.hyp" "$(wc -l < "$DATA/raw/test.$TGT")"
}

score() {
    local systems=(--system "teacher=$WORK/teacher.test.hyp")
    for s in $STUDENTS; do
        systems+=(--system "student $s=$WORK/student_$s.test.hyp")
    done
    "$PYTHON" -m fairseq_kd.scoring table --ref "$DATA/raw/test.$TGT" "${systems[@]}" --markdown "$WORK/results.md"
}

stage prepare prepare
stage teacher train_teacher
stage translate_teacher translate teacher
for s in $STUDENTS; do
    if [[ $s == seq_kd || $s == hybrid_gated_kd ]]; then
        stage decode_train_with_teacher decode_train_with_teacher
    fi
    stage "student_$s" train_student "$s"
    stage "translate_student_$s" translate "student_$s"
done
score
echo "results: $WORK/results.md"
