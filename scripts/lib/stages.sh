# Helpers shared by the recipes: source this file, then set STAGE_DIR.
#
#   stage NAME CMD [ARGS...]  run CMD unless stage NAME finished before; mark it finished on success
#   require_file PATH HINT    exit with a one-line error unless PATH exists
#   assert_lines FILE N       exit with a one-line error unless FILE has exactly N lines

stage() {
    local name=$1
    shift
    local marker="$STAGE_DIR/$name.done"
    if [ -f "$marker" ]; then
        echo "== [$name] finished before, skipped (remove $marker to redo it)"
        return 0
    fi
    echo "== [$name] $(date '+%H:%M:%S')"
    mkdir -p "$STAGE_DIR"
    "$@"
    touch "$marker"
}

require_file() {
    if [ ! -e "$1" ]; then
        echo "$(basename "$0"): error: $1 not found: $2" >&2
        exit 1
    fi
}

assert_lines() {
    local file=$1 expected=$2 got
    got=$(wc -l < "$file")
    if [ "$got" -ne "$expected" ]; then
        echo "$(basename "$0"): error: $file has $got lines, expected $expected; delete it and re-run" >&2
        exit 1
    fi
}
