#!/usr/bin/env bash
# The main job: knowledge distillation on Multi30k English->German, end to end.
#
#   bash examples/multi30k/run.sh [--size demo|full] [--data-root DIR] [--work DIR]
#
# Stages: prepare (joint SentencePiece, binarize) -> teacher, and beside it two baseline students
# (seeds 1 and 2: their spread is the run-to-run noise the table is read against) -> the teacher's
# test translation, its offline top-k cache and its greedy translations of the training source
# (CTranslate2) -> one student per KD criterion -> the test set translated by every model -> the
# sacreBLEU table (WORK/results.md) -> the deployment table (WORK/deployment.md: the teacher and the
# best KD student as fairseq fp32 and as CTranslate2 int8, BLEU, size, one-thread speed).
# Two training processes run at a time (one intra-op thread each). A finished stage is skipped on a
# re-run; an interrupted fairseq-train resumes from its checkpoint_last.pt.
#
# --size demo (default): all 29k pairs, a 128-dim teacher and 64-dim students, in minutes on 2 CPU
# cores (README.md gives the time and the table).  --size full: larger models trained longer (hours
# on a CPU).  --size tiny: a few hundred pairs, for the test.  --data-root is the folder holding multi30k_en_de/ (default ../shared/data next to the
# checkout); when the corpus is not there it is downloaded from the official Multi30k repository and
# its checksums are verified.  Needs CTranslate2: pip install -e '.[ct2]'.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
SIZE=demo
DATA_ROOT=$REPO/../shared/data
WORK=
PYTHON=${PYTHON:-python}
SRC=en
TGT=de

while [ $# -gt 0 ]; do
    case $1 in
        --size) SIZE=$2; shift 2 ;;
        --data-root) DATA_ROOT=$2; shift 2 ;;
        --work) WORK=$2; shift 2 ;;
        -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
        *) echo "run.sh: error: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

VALID_LINES=; TEST_LINES=
case $SIZE in
    demo)
        TRAIN_LINES=; VOCAB=4000
        TEACHER_ARCH="--encoder-embed-dim 128 --decoder-embed-dim 128 --encoder-ffn-embed-dim 512 --decoder-ffn-embed-dim 512 --encoder-layers 2 --decoder-layers 2 --encoder-attention-heads 4 --decoder-attention-heads 4 --dropout 0.1"
        STUDENT_ARCH="--encoder-embed-dim 64 --decoder-embed-dim 64 --encoder-ffn-embed-dim 256 --decoder-ffn-embed-dim 256 --encoder-layers 2 --decoder-layers 2 --encoder-attention-heads 4 --decoder-attention-heads 4 --dropout 0.1"
        TEACHER_UPDATES=250; STUDENT_UPDATES=200; LR=0.003; WARMUP=100; MAX_TOKENS=4096
        TEST_BEAM=4
        ;;
    full)
        TRAIN_LINES=; VOCAB=8000
        TEACHER_ARCH="--encoder-embed-dim 256 --decoder-embed-dim 256 --encoder-ffn-embed-dim 1024 --decoder-ffn-embed-dim 1024 --encoder-layers 3 --decoder-layers 3 --encoder-attention-heads 4 --decoder-attention-heads 4 --dropout 0.3"
        STUDENT_ARCH="--encoder-embed-dim 128 --decoder-embed-dim 128 --encoder-ffn-embed-dim 512 --decoder-ffn-embed-dim 512 --encoder-layers 2 --decoder-layers 2 --encoder-attention-heads 4 --decoder-attention-heads 4 --dropout 0.1"
        TEACHER_UPDATES=6000; STUDENT_UPDATES=4000; LR=0.001; WARMUP=1000; MAX_TOKENS=4096
        TEST_BEAM=5
        ;;
    tiny)  # a few hundred lines and a few updates: the job's test (tests/test_main_job.py)
        TRAIN_LINES=300; VALID_LINES=40; TEST_LINES=30; VOCAB=400
        TEACHER_ARCH="--encoder-embed-dim 32 --decoder-embed-dim 32 --encoder-ffn-embed-dim 64 --decoder-ffn-embed-dim 64 --encoder-layers 1 --decoder-layers 1 --encoder-attention-heads 2 --decoder-attention-heads 2"
        STUDENT_ARCH="--encoder-embed-dim 16 --decoder-embed-dim 16 --encoder-ffn-embed-dim 32 --decoder-ffn-embed-dim 32 --encoder-layers 1 --decoder-layers 1 --encoder-attention-heads 2 --decoder-attention-heads 2"
        TEACHER_UPDATES=6; STUDENT_UPDATES=2; LR=0.003; WARMUP=2; MAX_TOKENS=2000
        TEST_BEAM=2
        ;;
    *) echo "run.sh: error: --size must be demo, full or tiny, got $SIZE" >&2; exit 2 ;;
esac

# ---- the shared pipeline (scripts/lib/pipeline.sh) with this preset ------------------------------
RECIPE=run.sh
WORK=${WORK:-$REPO/work/multi30k_${SRC}_${TGT}_$SIZE}
CORPUS=multi30k_${SRC}_${TGT}
TEST_FROM_VALID=; WORKERS=1
TRAIN_ARGS="--share-all-embeddings --optimizer adam --adam-betas (0.9,0.98)
    --lr-scheduler inverse_sqrt --warmup-updates $WARMUP --warmup-init-lr 1e-07 --clip-norm 1.0
    --max-tokens $MAX_TOKENS --seed 1 --no-epoch-checkpoints --keep-last-epochs 1 --patience -1
    --num-workers 0 --log-interval 50 --log-format simple --no-progress-bar"
TEACHER_ARGS="--arch transformer $TEACHER_ARCH --lr $LR"
STUDENT_ARGS="--arch transformer $STUDENT_ARCH --lr $LR"
STUDENTS=baseline
STUDENT_AVERAGE=0; AVERAGE_UPPER_BOUND=
# the Seq-KD data: the teacher's greedy translations by the CTranslate2 backend (several times faster
# than fairseq on the CPU, docs/performance.md); the token-level students read the offline top-k cache
TRAIN_BEAM=1; DECODE_SHARDS=1; DECODE_PARALLEL=1; DECODE_ARGS="--backend ctranslate2 --max-len-a 1.2 --max-len-b 10"
TEST_DECODE_ARGS="--max-len-a 1.2 --max-len-b 10"
LENPEN=1; TEST_BATCH=128; FP16=0
TEACHER_CACHE=1

# shellcheck source=../../scripts/lib/pipeline.sh
source "$REPO/scripts/lib/pipeline.sh"
pipeline_setup
"$PYTHON" -c "import ctranslate2" 2>/dev/null \
    || die "the main job decodes with CTranslate2: pip install -e '${REPO}[ct2]'"

# ---- the rows -------------------------------------------------------------------------------------
# every criterion of the project's papers with its defaults and --kd-alpha 0.5; tie_kd is its ranking
# term with one pass (--tie-iterations 1, which reads the cache: the iterations on the student's own
# prefixes need the live teacher and cost several students, see the study)
ROWS="baseline_s1 baseline_s2 word_kd seq_kd tie_kd self_evolution_kd hybrid_gated_kd"
row_flags() {  # row_flags ROW: the fairseq-train flags of a row (into the array `flags`)
    local cached=(--task distillation_translation --teacher-cache "$WORK/teacher_cache")
    case ${1%_s[0-9]} in
        baseline) flags=(--task distillation_translation --criterion label_smoothed_cross_entropy --label-smoothing 0.1) ;;
        word_kd) flags=("${cached[@]}" --criterion word_kd --kd-alpha 0.5) ;;
        seq_kd) flags=(--task distillation_translation --teacher-target-subset train_teacher --criterion seq_kd) ;;
        tie_kd) flags=("${cached[@]}" --criterion tie_kd --kd-alpha 0.5 --tie-topk 5 --tie-iterations 1) ;;
        self_evolution_kd) flags=("${cached[@]}" --criterion self_evolution_kd --kd-alpha 0.5) ;;
        hybrid_gated_kd) flags=("${cached[@]}" --teacher-target-subset train_teacher --criterion hybrid_gated_kd --hybrid-sent-target offline --kd-alpha 0.5) ;;
    esac
    if [[ $1 == *_s[0-9] ]]; then flags+=(--seed "${1##*_s}"); fi
}
row_deps() {  # row_deps ROW: the stages a row's training reads
    case ${1%_s[0-9]} in
        baseline) echo prepare ;;
        seq_kd) echo decode_train_with_teacher ;;
        hybrid_gated_kd) echo "teacher_cache decode_train_with_teacher" ;;
        *) echo teacher_cache ;;
    esac
}
train_row() {  # train_row ROW
    local flags
    row_flags "$1"
    train "student_$1" "$STUDENT_UPDATES" student_args "${flags[@]}"
}

ALL_STAGES="prepare teacher translate_teacher teacher_cache decode_train_with_teacher"
for r in $ROWS; do ALL_STAGES+=" student_$r translate_student_$r"; done
ALL_STAGES+=" score deployment"
read -r -a ALL_STAGES <<< "$ALL_STAGES"
job_stage() {  # job_stage NAME DEPS CMD...: stage k/N of ALL_STAGES
    local i
    for i in "${!ALL_STAGES[@]}"; do [[ ${ALL_STAGES[i]} == "$1" ]] && break; done
    stage $((i + 1)) "${#ALL_STAGES[@]}" "$@"
}
lane() {  # lane ROW...: train and translate the rows one after the other
    local r
    for r in "$@"; do
        job_stage "student_$r" "$(row_deps "$r")" train_row "$r"
        job_stage "translate_student_$r" "student_$r" translate "student_$r"
    done
}
two_lanes() {  # two_lanes NAME_A "ROWS_A" NAME_B "ROWS_B": two lanes side by side, each logged to WORK/lane_NAME.log
    local a b rows_a rows_b
    read -r -a rows_a <<< "$2"
    read -r -a rows_b <<< "$4"
    ( lane "${rows_a[@]}" ) > "$WORK/lane_$1.log" 2>&1 &
    a=$!
    ( lane "${rows_b[@]}" ) > "$WORK/lane_$3.log" 2>&1 &
    b=$!
    wait "$a" || die "a stage failed: see $WORK/lane_$1.log"
    wait "$b" || die "a stage failed: see $WORK/lane_$3.log"
    cat "$WORK/lane_$1.log" "$WORK/lane_$3.log" | grep '^== stage' || true
}

deployment() {
    local candidates=() r
    for r in $ROWS; do
        [[ $r == baseline* ]] || candidates+=(--candidate "student $r=$(checkpoint_of "student_$r")=$WORK/student_$r.test.hyp")
    done
    run "$PYTHON" -m fairseq_kd.deployment --data "$BIN" --src-text "$DATA/raw/test.$SRC" --ref "$DATA/raw/test.$TGT" \
        --model "teacher=$TEACHER_CKPT" "${candidates[@]}" --beam "$TEST_BEAM" --lenpen "$LENPEN" \
        --max-len-a 1.2 --max-len-b 10 --threads 1 --out-dir "$WORK/deployment" --markdown "$WORK/deployment.md" \
        --json "$WORK/deployment.json"
}
score_rows() {
    local systems=(--system "teacher=$WORK/teacher.test.hyp") r
    for r in $ROWS; do systems+=(--system "student $r=$WORK/student_$r.test.hyp"); done
    run "$PYTHON" -m fairseq_kd.scoring table --ref "$DATA/raw/test.$TGT" --lang "$TGT" --tokenized --compound-split \
        "${systems[@]}" --markdown "$WORK/results.md"
}

# ---- stages ---------------------------------------------------------------------------------------
JOB_START=$SECONDS
job_stage prepare "" prepare
# the teacher on one core, the two baseline seeds (they need no teacher) on the other
( job_stage teacher prepare train_teacher ) > "$WORK/lane_teacher.log" 2>&1 &
teacher_pid=$!
( lane baseline_s1 baseline_s2 ) > "$WORK/lane_baselines.log" 2>&1 &
baseline_pid=$!
wait "$teacher_pid" || die "the teacher stage failed: see $WORK/lane_teacher.log"
wait "$baseline_pid" || die "a baseline stage failed: see $WORK/lane_baselines.log"
grep -h '^== stage' "$WORK/lane_teacher.log" "$WORK/lane_baselines.log" || true
# what the students read from the teacher: its cache beside its Seq-KD translations, then its test translation
( job_stage teacher_cache teacher build_teacher_cache ) > "$WORK/lane_cache.log" 2>&1 &
cache_pid=$!
job_stage decode_train_with_teacher teacher decode_train_with_teacher
job_stage translate_teacher teacher translate teacher
wait "$cache_pid" || die "the teacher cache stage failed: see $WORK/lane_cache.log"
grep -h '^== stage' "$WORK/lane_cache.log" || true
two_lanes a "word_kd self_evolution_kd tie_kd" b "hybrid_gated_kd seq_kd"
scored=translate_teacher
for r in $ROWS; do scored+=" translate_student_$r"; done
job_stage score "$scored" score_rows
job_stage deployment "$scored" deployment
[[ $DRY_RUN == 1 ]] || {
    cat "$WORK/results.md" "$WORK/deployment.md"
    echo "main job: $(( (SECONDS - JOB_START) / 60 )) min $(( (SECONDS - JOB_START) % 60 )) s"
    echo "results: $WORK/results.md and $WORK/deployment.md"
}
