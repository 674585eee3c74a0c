# shellcheck shell=bash
# Stages that know what they did, shared by the recipes: source this file, then set STAGE_DIR.
#
#   plan NAME DEPS CMD [ARGS...]   append a stage to the plan (DEPS: the stages it reads, space-separated;
#                                  "always": no marker, the command runs every time and skips its own work)
#   run_plan                       run the plan: "== stage k/N NAME" with its elapsed time, then a summary
#   run CMD [ARGS...]              inside a stage: run CMD, or print it under --dry-run (DRY_RUN=1)
#   run_to FILE CMD [ARGS...]      run CMD > FILE (through FILE.tmp, renamed when CMD succeeded)
#   run_log LOG CMD [ARGS...]      run CMD, its output also appended to LOG
#   note TEXT                      a line that is part of the stage's fingerprint (e.g. its inputs' digests)
#   file_digests FILE...           "NAME:SHA256 ..." by content (text.sh; cached in STAGE_DIR/digests)
#   require_file PATH HINT         exit with a one-line error unless PATH exists
#   assert_lines FILE N            exit with a one-line error unless FILE has exactly N lines (count_lines)
#
# A finished stage leaves STAGE_DIR/NAME.done recording the fingerprint it ran with: a hash of the
# commands it runs (the stage function under DRY_RUN=1: every setting that reaches a command line) and
# of the markers of the stages it depends on.  A re-run skips a stage whose fingerprint is unchanged;
# a changed setting redoes the stage, and since its new marker changes the fingerprint of every stage
# downstream, those are redone too (each says why).  REDO="NAME ..." (run.sh --redo) redoes stages on
# request, and so their downstream.  DRY_RUN=1 prints every command of every stage without running it.
# A redone stage first moves its previous outputs aside (move_aside; the recipe says which they are in a
# function stage_outputs NAME that prints one path per line); NAME.started records the fingerprint of a
# stage that has not finished, so that an interrupted stage resumes only under the same settings.
# STAGE_CURRENT: the stage running (nodes.sh names it in a failure).
# STAGE_ROLE [] lead | follow: several nodes share the plan (scripts/lib/nodes.sh): the lead (node 0) runs
# it and announces its distributed stages, a follower joins those only.

# shellcheck source=text.sh
source "$(dirname "${BASH_SOURCE[0]}")/text.sh"

STAGE_NAMES=()
STAGE_DEPS=()
STAGE_CMDS=()
STAGE_TIMES=()
export STAGE_CURRENT=''
declare -A STAGE_PENDING=()
DRY_RUN=${DRY_RUN:-0}
REDO=${REDO:-}

plan() {
    local name=$1 deps=$2
    shift 2
    STAGE_NAMES+=("$name")
    STAGE_DEPS+=("$deps")
    STAGE_CMDS+=("$(printf '%q ' "$@")")
}

run() {
    if [[ $DRY_RUN == 1 ]]; then
        printf '    %s\n' "$(printf '%q ' "$@")"
    else
        "$@"
    fi
}

run_to() {
    local out=$1
    shift
    if [[ $DRY_RUN == 1 ]]; then
        printf '    %s> %q\n' "$(printf '%q ' "$@")" "$out"
    else
        "$@" > "$out.tmp"
        mv "$out.tmp" "$out"
    fi
}

run_log() {
    local log=$1
    shift
    if [[ $DRY_RUN == 1 ]]; then
        printf '    %s2>&1 | tee -a %q\n' "$(printf '%q ' "$@")" "$log"
    else
        "$@" 2>&1 | tee -a "$log"
    fi
}

note() {
    if [[ $DRY_RUN == 1 ]]; then printf '    # %s\n' "$*"; fi
}

# the marker line a downstream stage's fingerprint includes: its run id (changes whenever it is redone)
stage_record() {
    local marker=$STAGE_DIR/$1.done
    if [[ -n ${STAGE_PENDING[$1]:-} ]]; then
        echo "pending"
    elif [[ -f $marker ]]; then
        sed -n 's/^run //p' "$marker"
    else
        echo "absent"
    fi
}

# fingerprint NAME DEPS CMD...: "OWN FULL" -- the hash of the stage's commands, and that with its dependencies
fingerprint() {
    local name=$1 deps=$2 own dep dry
    shift 2
    dry=$(DRY_RUN=1 "$@") || exit $?  # a stage its own dry run refuses (the error is printed) is refused now
    own=$(printf '%s' "$dry${dry:+$'\n'}" | sha256sum | cut -c1-16)  # the hash of the printed lines
    {
        echo "$name $own"
        for dep in $deps; do echo "after $dep $(stage_record "$dep")"; done
    } | sha256sum | cut -c1-16 | sed "s/^/$own /"
}

# why_redo MARKER OWN FULL: empty when the stage is up to date, else the reason
why_redo() {
    local marker=$1 own=$2 full=$3 name=$4 old_own old_full dep changed=()
    old_full=$(sed -n 's/^key //p' "$marker")
    old_own=$(sed -n 's/^own //p' "$marker")
    [[ " $REDO " == *" $name "* ]] && { echo "redone on request (--redo $name)"; return; }
    [[ -z $old_full || $old_full == "$full" ]] && return
    if [[ $old_own != "$own" ]]; then
        echo "its settings changed since it ran (see $marker and --dry-run)"
        return
    fi
    for dep in ${STAGE_DEPS_OF:-}; do
        [[ $(sed -n "s/^after $dep //p" "$marker") == "$(stage_record "$dep")" ]] || changed+=("$dep")
    done
    echo "a stage it depends on was redone (${changed[*]:-upstream})"
}

stage() {  # stage K N NAME DEPS CMD...
    local k=$1 n=$2 name=$3 deps=$4 marker started own full why dep fp
    shift 4
    marker="$STAGE_DIR/$name.done"
    if [[ $deps == always ]]; then
        echo "== stage $k/$n $name (started $(date '+%H:%M:%S'); skips its own finished work)"
        started=$SECONDS
        STAGE_CURRENT=$name
        "$@"
        STAGE_TIMES+=("$name $((SECONDS - started))")
        return 0
    fi
    if [[ ${STAGE_FOLLOWER:-0} == 1 ]]; then  # a dry run of a node > 0 (nodes.sh): what it would join
        if [[ $name =~ ${NODES_SHARED:-^$} ]]; then
            echo "== stage $k/$n $name (would run with node 0, when node 0 announces it)"
            "$@"
        else
            echo "== stage $k/$n $name: node 0 runs it"
        fi
        return 0
    fi
    fp=$(fingerprint "$name" "$deps" "$@") || exit $?
    read -r own full <<< "$fp"
    if [[ -f $marker ]]; then
        STAGE_DEPS_OF=$deps
        why=$(why_redo "$marker" "$own" "$full" "$name")
        if [[ -z $why ]]; then
            echo "== stage $k/$n $name: up to date, skipped"
            if [[ $DRY_RUN == 1 ]]; then "$@"; fi  # its commands, for the record
            [[ $DRY_RUN == 1 || -n $(sed -n 's/^key //p' "$marker") ]] || stage_mark "$marker" "$own" "$full" "$deps"
            STAGE_TIMES+=("$name skipped")
            return 0
        fi
        echo "== stage $k/$n $name: $why: redoing it and every stage after it that depends on it"
    fi
    if [[ $DRY_RUN == 1 ]]; then
        echo "== stage $k/$n $name (would run)"
        "$@"
        STAGE_PENDING[$name]=1
        return 0
    fi
    echo "== stage $k/$n $name (started $(date '+%H:%M:%S'))"
    mkdir -p "$STAGE_DIR"
    # a redone stage (or one interrupted under other settings) starts from nothing: its previous outputs,
    # fairseq checkpoints included, are moved aside so that neither it nor a stage after it reads them;
    # a stage interrupted under the same settings resumes (fairseq-train from its checkpoint_last.pt)
    if [[ -f $marker ]] || { [[ -f $STAGE_DIR/$name.started ]] && [[ $(sed -n 's/^key //p' "$STAGE_DIR/$name.started") != "$full" ]]; }; then
        move_aside "$name"
    fi
    rm -f "$marker"
    echo "key $full" > "$STAGE_DIR/$name.started"
    started=$SECONDS
    STAGE_CURRENT=$name
    if [[ ${STAGE_ROLE:-} == lead ]]; then nodes_announce "$name"; fi
    "$@"
    if [[ ${STAGE_ROLE:-} == lead ]]; then nodes_step_end "$name"; fi
    stage_mark "$marker" "$own" "$full" "$deps"
    rm -f "$STAGE_DIR/$name.started"
    STAGE_TIMES+=("$name $((SECONDS - started))")
    echo "== stage $k/$n $name done in $(hms $((SECONDS - started)))"
}

# move_aside NAME: the outputs the recipe's stage_outputs NAME lists (one path per line), moved into
# STAGE_DIR/stale/NAME.TIME/ (a rename: nothing is copied, and nothing of the user's is deleted)
move_aside() {
    local name=$1 dest path moved=0
    declare -F stage_outputs >/dev/null || return 0
    dest=$STAGE_DIR/stale/$name.$(date '+%Y%m%dT%H%M%S')-$$
    while IFS= read -r path; do
        [[ -n $path && -e $path ]] || continue
        mkdir -p "$dest"
        mv "$path" "$dest/"
        moved=$((moved + 1))
    done < <(stage_outputs "$name")
    if (( moved > 0 )); then
        echo "   $name: its previous outputs ($moved) moved aside to $dest (delete the folder when not needed)"
    fi
}

stage_mark() {
    local marker=$1 own=$2 full=$3 deps=$4 dep
    {
        echo "key $full"
        echo "own $own"
        for dep in $deps; do echo "after $dep $(stage_record "$dep")"; done
        echo "run $(date '+%Y%m%dT%H%M%S')-$$-$RANDOM"
    } > "$marker.tmp"
    mv "$marker.tmp" "$marker"
}

hms() { printf '%d:%02d:%02d' $(($1 / 3600)) $(($1 % 3600 / 60)) $(($1 % 60)); }

run_plan() {
    local i n=${#STAGE_NAMES[@]} entry
    local -a cmd
    if [[ ${STAGE_ROLE:-} == follow && $DRY_RUN == 0 ]]; then nodes_follow; return 0; fi
    if [[ ${STAGE_ROLE:-} == lead && $DRY_RUN == 0 ]]; then nodes_lead; fi
    for ((i = 0; i < n; i++)); do
        eval "cmd=(${STAGE_CMDS[i]})"
        stage $((i + 1)) "$n" "${STAGE_NAMES[i]}" "${STAGE_DEPS[i]}" "${cmd[@]}"
    done
    [[ $DRY_RUN == 1 ]] && return 0
    if [[ ${STAGE_ROLE:-} == lead ]]; then nodes_done; fi
    echo "== stage times"
    for entry in "${STAGE_TIMES[@]}"; do
        if [[ ${entry#* } == skipped ]]; then
            printf '   %-36s %s\n' "${entry% *}" "up to date"
        else
            printf '   %-36s %s\n' "${entry% *}" "$(hms "${entry#* }")"
        fi
    done
}

require_file() {
    [[ $DRY_RUN == 1 ]] && return 0
    if [ ! -e "$1" ]; then
        echo "$(basename "$0"): error: $1 not found: $2" >&2
        exit 1
    fi
}

assert_lines() {
    [[ $DRY_RUN == 1 ]] && return 0
    local file=$1 expected=$2 got
    got=$(count_lines "$file")
    if [ "$got" -ne "$expected" ]; then
        echo "$(basename "$0"): error: $file has $got lines, expected $expected; one line per sentence:" \
            "correct the input it comes from, or re-run the stage that wrote it" >&2
        exit 1
    fi
}

# lines FILE: its line count, or a placeholder under --dry-run (the file may not exist yet)
lines() {
    if [[ $DRY_RUN == 1 ]]; then echo "N($(basename "$1"))"; else count_lines "$1"; fi
}
