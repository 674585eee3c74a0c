# shellcheck shell=bash
# WMT'14 German-English: En-De's data and settings the other way round (presets/en-de.sh), the pair of
# fairseq's published WMT'19 De-En teacher (run.sh --pair de-en --teacher-dir DIR).  The KD papers'
# numbers in the other presets are for the English-source directions; none is given here.
# shellcheck disable=SC2034  # every variable here is read by run.sh

# shellcheck source=en-de.sh
source "$(dirname "${BASH_SOURCE[0]}")/en-de.sh"

PAPER_NOTE="no KD paper number for De-En in the project's sources"
