#!/usr/bin/env bash
# The distillation study on Multi30k English->German: one teacher, every KD method, seeds, scores, plots.
#
#   bash examples/multi30k/study.sh [--size study|tiny] [--data-root DIR] [--work DIR]
#        [--extra-test NAME=SRC_FILE,REF_FILE]...
#
# Rows (one student architecture, the same number of updates): baseline and word_kd (from the offline
# teacher cache) with 3 seeds, word_kd with the live teacher, seq_kd on the teacher's beam-5
# translations (decoded by CTranslate2), Word-KD + Seq-KD, tie_kd, self_evolution_kd,
# hybrid_gated_kd (offline sentence targets), selective_kd, word_kd with the reverse KL.  Every row
# is scored on test_2016_flickr (the corpus' test split), the validation split and every
# --extra-test with sacreBLEU BLEU/chrF, paired bootstrap against the baseline; the teacher
# analysis (fairseq-kd-analyze-teacher) runs on the validation split.  Outputs in
# examples/multi30k/results/ (--size study) or WORK/results (--size tiny): study.md, the PNG plots,
# valid_curves.csv.  Every stage is resumable (WORK/stages); two KD students train at a time.
# Needs the study extra (ctranslate2, matplotlib): pip install -e '.[study]'.
#
# Sizing (--size study), from the committed run (examples/multi30k/results/study.md: 97 min on 2 cores,
# one intra-op thread per process, two processes at a time, --max-tokens 4096 = ~3,300 target tokens per
# update, SentencePiece 4k, 29k pairs = 152 updates per epoch).  Wall seconds per update measured there:
#   teacher 256-dim 3+3 (ffn 1024), LS-CE:        4.4 s      student 128-dim 2+2 (ffn 512), LS-CE: 1.25 s
#   word_kd / self_evolution_kd / selective_kd / reverse KL from the cache: 1.3-1.4 s; seq_kd 1.3 s
#   hybrid_gated_kd (cache + offline sentence targets): 1.8 s; word_kd, live teacher: 2.7 s;
#   Word-KD + Seq-KD (live): 2.5 s; tie_kd (3 iterations, live): 10.3 s
#   CTranslate2 beam-5 decoding of the 29k training sources: ~20 min; a beam-5 test/valid decode ~1 min
# With TEACHER_UPDATES=450 and STUDENT_UPDATES=180:
#   phase 1: teacher 450 x 4.4 = 33 min; the 3 baselines (3 x 180 x 1.25 = 11 min) on the other core
#   phase 2: tie_kd (31 min) next to the Seq-KD decoding, the cache (~2 min), the analysis and word_kd_live
#   phase 3: the 10 other students, two at a time (~40 min with their translations); report ~1 min
# The teacher (4.6x the student's parameters, 3 epochs) scores 11 BLEU above the baseline students
# (1.2 epochs): the study is about what KD adds to an under-trained small student.
# --size tiny: a few hundred lines and a few updates, for the test (tests/test_study.py).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
SIZE=study
DATA_ROOT=$REPO/../shared/data
WORK=
PYTHON=${PYTHON:-python}
SRC=en
TGT=de
EXTRA_TESTS=()
COMMAND="bash examples/multi30k/study.sh $*"

while [ $# -gt 0 ]; do
    case $1 in
        --size) SIZE=$2; shift 2 ;;
        --data-root) DATA_ROOT=$2; shift 2 ;;
        --work) WORK=$2; shift 2 ;;
        --extra-test) EXTRA_TESTS+=("$2"); shift 2 ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) echo "study.sh: error: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

case $SIZE in
    study)
        TRAIN_LINES=; VALID_LINES=; TEST_LINES=; VOCAB=4000
        TEACHER_ARCH="--encoder-embed-dim 256 --decoder-embed-dim 256 --encoder-ffn-embed-dim 1024 --decoder-ffn-embed-dim 1024 --encoder-layers 3 --decoder-layers 3 --encoder-attention-heads 4 --decoder-attention-heads 4 --dropout 0.3"
        STUDENT_ARCH="--encoder-embed-dim 128 --decoder-embed-dim 128 --encoder-ffn-embed-dim 512 --decoder-ffn-embed-dim 512 --encoder-layers 2 --decoder-layers 2 --encoder-attention-heads 4 --decoder-attention-heads 4 --dropout 0.1"
        TEACHER_UPDATES=450; STUDENT_UPDATES=180; LR=0.002; WARMUP=200; STUDENT_WARMUP=90; MAX_TOKENS=4096; VALIDATE=50
        TRAIN_BEAM=5; TEST_BEAM=5; BOOTSTRAP=1000
        RESULTS=${RESULTS:-$REPO/examples/multi30k/results}
        ;;
    tiny)
        TRAIN_LINES=300; VALID_LINES=40; TEST_LINES=30; VOCAB=400
        TEACHER_ARCH="--encoder-embed-dim 32 --decoder-embed-dim 32 --encoder-ffn-embed-dim 64 --decoder-ffn-embed-dim 64 --encoder-layers 1 --decoder-layers 1 --encoder-attention-heads 2 --decoder-attention-heads 2"
        STUDENT_ARCH="--encoder-embed-dim 16 --decoder-embed-dim 16 --encoder-ffn-embed-dim 32 --decoder-ffn-embed-dim 32 --encoder-layers 1 --decoder-layers 1 --encoder-attention-heads 2 --decoder-attention-heads 2"
        TEACHER_UPDATES=6; STUDENT_UPDATES=2; LR=0.003; WARMUP=2; STUDENT_WARMUP=1; MAX_TOKENS=2000; VALIDATE=2
        TRAIN_BEAM=2; TEST_BEAM=1; BOOTSTRAP=50
        RESULTS=${RESULTS:-}
        ;;
    *) echo "study.sh: error: --size must be study or tiny, got $SIZE" >&2; exit 2 ;;
esac

RECIPE=study.sh
WORK=${WORK:-$REPO/work/multi30k_${SRC}_${TGT}_study_$SIZE}
RESULTS=${RESULTS:-$WORK/results}
CORPUS=multi30k_${SRC}_${TGT}
TEST_FROM_VALID=; WORKERS=1
TRAIN_ARGS="--share-all-embeddings --optimizer adam --adam-betas (0.9,0.98)
    --lr-scheduler inverse_sqrt --warmup-updates $WARMUP --warmup-init-lr 1e-07 --clip-norm 1.0
    --max-tokens $MAX_TOKENS --seed 1 --no-epoch-checkpoints --keep-last-epochs 1 --patience -1
    --num-workers 0 --log-interval 10 --log-format simple --no-progress-bar
    --validate-interval-updates $VALIDATE --save-interval-updates $VALIDATE --keep-interval-updates 1"
TEACHER_ARGS="--arch transformer $TEACHER_ARCH --lr $LR"
STUDENT_ARGS="--arch transformer $STUDENT_ARCH --lr $LR --warmup-updates $STUDENT_WARMUP"
STUDENTS=baseline
STUDENT_AVERAGE=0; AVERAGE_UPPER_BOUND=
# the Seq-KD data by the CTranslate2 backend (docs/performance.md: same BLEU, several times faster on the CPU)
DECODE_SHARDS=1; DECODE_PARALLEL=1; DECODE_ARGS="--backend ctranslate2 --max-len-a 1.2 --max-len-b 10"
LENPEN=1; TEST_BATCH=128; FP16=0

# shellcheck source=../../scripts/lib/pipeline.sh
source "$REPO/scripts/lib/pipeline.sh"
pipeline_setup
"$PYTHON" -c "import ctranslate2, matplotlib" 2>/dev/null \
    || die "the study decodes with ctranslate2 and plots with matplotlib: pip install -e '${REPO}[study]'"
# the study's time: the wall time of every invocation (a run split over two invocations adds both)
STUDY_START=$(date +%s)
trap 'echo $(( $(date +%s) - STUDY_START )) >> "$WORK/study.invocations"' EXIT
study_seconds() {  # this invocation's wall time plus that of the earlier ones
    local total=$(( $(date +%s) - STUDY_START )) s
    if [[ -f $WORK/study.invocations ]]; then
        while read -r s; do total=$((total + s)); done < "$WORK/study.invocations"
    fi
    echo "$total"
}

# ---- the rows -------------------------------------------------------------------------------------
# word_kd's three seeds and the other token-level rows read the offline teacher cache (top-8 + tail
# bucket, built once); word_kd_live is the same student with the live teacher, so the table shows what
# the cache costs in BLEU.  tie_kd (3 iterations on the student's own prefixes) and Word-KD + Seq-KD
# (teacher distributions on the teacher's translations) need the live teacher: no cache holds them.
ROWS="baseline_s1 baseline_s2 baseline_s3 word_kd_s1 word_kd_s2 word_kd_s3 word_kd_live seq_kd word_seq_kd
    tie_kd self_evolution_kd hybrid_gated_kd selective_kd word_kd_rkl"

row_flags() {  # row_flags ROW: the fairseq-train flags of a row (into the array `flags`)
    local live=(--task distillation_translation --teacher-path "$TEACHER_CKPT")
    local cached=(--task distillation_translation --teacher-cache "$WORK/teacher_cache")
    case ${1%_s[0-9]} in
        baseline) flags=(--task distillation_translation --criterion label_smoothed_cross_entropy --label-smoothing 0.1) ;;
        word_kd) flags=("${cached[@]}" --criterion word_kd --kd-alpha 0.5) ;;
        word_kd_live) flags=("${live[@]}" --criterion word_kd --kd-alpha 0.5) ;;
        seq_kd) flags=(--task distillation_translation --teacher-target-subset train_teacher --criterion seq_kd) ;;
        word_seq_kd) flags=("${live[@]}" --teacher-target-subset train_teacher --criterion seq_kd --kd-alpha 0.5) ;;
        tie_kd) flags=("${live[@]}" --criterion tie_kd --kd-alpha 0.5 --tie-topk 5 --tie-iterations 3 --ddp-backend legacy_ddp) ;;
        self_evolution_kd) flags=("${cached[@]}" --criterion self_evolution_kd --kd-alpha 0.5) ;;
        hybrid_gated_kd) flags=("${cached[@]}" --teacher-target-subset train_teacher --criterion hybrid_gated_kd --hybrid-sent-target offline --kd-alpha 0.5) ;;
        selective_kd) flags=("${cached[@]}" --criterion selective_kd) ;;
        word_kd_rkl) flags=("${cached[@]}" --criterion word_kd --kd-alpha 0.5 --kd-divergence rkl) ;;
    esac
    if [[ $1 == *_s[0-9] ]]; then
        flags+=(--seed "${1##*_s}")
    fi
}

row_deps() {  # row_deps ROW: the stages a row's training reads
    local flags deps
    row_flags "$1"
    case ${1%_s[0-9]} in
        baseline) deps=prepare ;;
        seq_kd) deps=decode_train_with_teacher ;;
        word_seq_kd|hybrid_gated_kd) deps="teacher decode_train_with_teacher" ;;
        *) deps=teacher ;;
    esac
    [[ " ${flags[*]} " == *" --teacher-cache "* ]] && deps+=" teacher_cache"
    echo "$deps"
}

train_row() {  # train_row ROW
    local flags
    row_flags "$1"
    timed "student_$1" train "student_$1" "$STUDENT_UPDATES" student_args "${flags[@]}"
}

translate_row() {  # translate_row NAME: test, valid and every extra test set
    local spec
    translate_split "$1" test
    translate_split "$1" valid
    for spec in "${EXTRA_TESTS[@]}"; do
        translate_split "$1" test "$WORK/extra/${spec%%=*}/bin" "${spec%%=*}"
    done
}

# the stages in order (for "== stage k/N"): a finished stage is skipped, a changed one redone
EXTRA_STAGES=
for spec in "${EXTRA_TESTS[@]}"; do EXTRA_STAGES+=" extra_test_${spec%%=*}"; done
ALL_STAGES="prepare$EXTRA_STAGES teacher translate_teacher decode_train_with_teacher teacher_cache teacher_analysis"
for r in $ROWS; do ALL_STAGES+=" student_$r translate_student_$r"; done
read -r -a ALL_STAGES <<< "$ALL_STAGES"
study_stage() {  # study_stage NAME DEPS CMD...: stage k/N of ALL_STAGES
    local i
    for i in "${!ALL_STAGES[@]}"; do [[ ${ALL_STAGES[i]} == "$1" ]] && break; done
    stage $((i + 1)) "${#ALL_STAGES[@]}" "$@"
}

lane() {  # lane ROW...: train and translate the rows one after the other
    local r
    for r in "$@"; do
        study_stage "student_$r" "$(row_deps "$r")" train_row "$r"
        study_stage "translate_student_$r" "student_$r$EXTRA_STAGES" translate_row "student_$r"
    done
}

# ---- stages ---------------------------------------------------------------------------------------
for spec in "${EXTRA_TESTS[@]}"; do  # before any stage: a run that would be refused later is refused now
    name=${spec%%=*}; files=${spec#*=}
    [[ $spec == *=*,* && $name =~ ^[A-Za-z0-9_]+$ ]] || die "--extra-test $spec: expected NAME=SRC_FILE,REF_FILE (NAME letters, digits, _)"
    check_extra_test "$name" "${files%%,*}" "${files#*,}"
done
study_stage prepare "" prepare
for spec in "${EXTRA_TESTS[@]}"; do
    name=${spec%%=*}; files=${spec#*=}
    study_stage "extra_test_$name" prepare prepare_extra_test "$name" "${files%%,*}" "${files#*,}"
done
# phase 1: the teacher on one core, the baselines (no teacher needed) on the other
( study_stage teacher prepare timed teacher train_teacher ) > "$WORK/lane_teacher.log" 2>&1 &
teacher_pid=$!
( lane baseline_s1 baseline_s2 baseline_s3 ) > "$WORK/lane_baselines.log" 2>&1 &
baseline_pid=$!
wait "$teacher_pid" || die "the teacher stage failed: see $WORK/lane_teacher.log"
wait "$baseline_pid" || die "a baseline stage failed: see $WORK/lane_baselines.log"
# phase 2: tie_kd (the longest row, live teacher only) on one core; on the other what the other
# students read from the teacher (test translation, Seq-KD data, cache, analysis), then word_kd_live
teacher_products() {
    study_stage translate_teacher "teacher$EXTRA_STAGES" translate_row teacher
    study_stage decode_train_with_teacher teacher decode_train_with_teacher
    study_stage teacher_cache teacher build_teacher_cache
    study_stage teacher_analysis teacher run "$PYTHON" -m fairseq_kd.study.teacher_analysis "$BIN" \
        --path "$TEACHER_CKPT" --subset valid --topk 5 --json "$WORK/teacher_analysis.json"
    lane word_kd_live
}
( lane tie_kd ) > "$WORK/lane_a.log" 2>&1 &
lane_a=$!
( teacher_products ) > "$WORK/lane_b.log" 2>&1 &
lane_b=$!
wait "$lane_a" || die "a student stage failed: see $WORK/lane_a.log"
wait "$lane_b" || die "a teacher or student stage failed: see $WORK/lane_b.log"
# phase 3: the other students, two at a time
( lane word_seq_kd word_kd_s1 word_kd_s2 seq_kd ) >> "$WORK/lane_a.log" 2>&1 &
lane_a=$!
( lane word_kd_s3 word_kd_rkl self_evolution_kd selective_kd hybrid_gated_kd ) >> "$WORK/lane_b.log" 2>&1 &
lane_b=$!
wait "$lane_a" || die "a student stage failed: see $WORK/lane_a.log"
wait "$lane_b" || die "a student stage failed: see $WORK/lane_b.log"

# ---- report ---------------------------------------------------------------------------------------
mkdir -p "$RESULTS"
rows_file=$WORK/rows.tsv
: > "$rows_file.tmp"
testsets=(--testset "test=$DATA/raw/test.$TGT" --testset "valid=$DATA/raw/valid.$TGT")
for spec in "${EXTRA_TESTS[@]}"; do
    files=${spec#*=}
    testsets+=(--testset "${spec%%=*}=${files#*,}")
done
logs=()
printf 'teacher\tteacher\t1\t%s\t%s\t%s\tok\t%s\n' "$WORK/teacher" "$(checkpoint_of teacher)" \
    "$(cat "$WORK/teacher.seconds")" "--arch transformer $TEACHER_ARCH --criterion label_smoothed_cross_entropy --label-smoothing 0.1 --max-update $TEACHER_UPDATES" >> "$rows_file.tmp"
for r in $ROWS; do
    method=${r%_s[0-9]}; seed=1
    [[ $r == *_s[0-9] ]] && seed=${r##*_s}
    row_flags "$r"
    printf '%s\t%s\t%s\t%s\t%s\t%s\tok\t%s\n' "$r" "$method" "$seed" "$WORK/student_$r" \
        "$(checkpoint_of "student_$r")" "$(cat "$WORK/student_$r.seconds")" "${flags[*]//$WORK\//WORK/}" >> "$rows_file.tmp"
    logs+=("$r=$WORK/student_$r.train.log")
done
mv "$rows_file.tmp" "$rows_file"
"$PYTHON" -m fairseq_kd.study.report --rows "$rows_file" "${testsets[@]}" --analysis "$WORK/teacher_analysis.json" \
    --curves "$RESULTS/valid_curves.csv" --plots "$RESULTS" \
    --bootstrap-samples "$BOOTSTRAP" --command "$COMMAND" \
    --total-seconds "$(study_seconds)" \
    --student-args "--arch transformer $STUDENT_ARCH --max-update $STUDENT_UPDATES" \
    --out "$RESULTS/study.md" "${logs[@]/#/--log=}"
echo "results: $RESULTS/study.md"
