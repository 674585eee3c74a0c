# shellcheck shell=bash
# Settings checked before anything runs: a numeric setting (from --set, an option or the environment) must
# be a number before bash arithmetic (( )), $(( )) or [[ -gt ]] sees it, since those evaluate their operands
# and would run a command substitution hidden in a value.  Sourced by scripts/lib/pipeline.sh and by the
# recipes before their first arithmetic.
#
#   check_settings            every name below that is set and not empty must match its pattern;
#                             a one-line error naming the setting, its value and what it takes otherwise

# integers (counts, sizes, ports, 0/1 switches)
SETTINGS_INTEGER="TRAIN_LINES VALID_LINES TEST_LINES TEST_FROM_VALID VOCAB WORKERS BPE_MERGES TEACHER_UPDATES
    STUDENT_UPDATES STUDENT_AVERAGE AVERAGE_UPPER_BOUND TRAIN_BEAM TEST_BEAM TEST_BATCH DECODE_SHARDS
    DECODE_PARALLEL DECODE_CHUNK CLAIM_TIMEOUT FP16 TEACHER_CACHE NODES NPROC NODE_RANK MASTER_PORT UPDATE_FREQ
    TOKENS_PER_UPDATE MAX_TOKENS TRAIN_CPUS DECODE_CPUS NODE_TIMEOUT ROUNDS ALLOW_CPU
    DRY_RUN"
# decimal numbers (a length penalty; seconds that only `sleep` reads)
SETTINGS_DECIMAL="LENPEN NODE_HEARTBEAT NODE_POLL"

check_settings() {
    local name value
    for name in $SETTINGS_INTEGER; do
        value=${!name-}
        [[ -z $value || $value =~ ^[0-9]+$ ]] \
            || { echo "${RECIPE:-$(basename "$0")}: error: $name must be a whole number, got '$value'" >&2; exit 2; }
    done
    for name in $SETTINGS_DECIMAL; do
        value=${!name-}
        [[ -z $value || $value =~ ^-?[0-9]+(\.[0-9]+)?$ ]] \
            || { echo "${RECIPE:-$(basename "$0")}: error: $name must be a number, got '$value'" >&2; exit 2; }
    done
}
