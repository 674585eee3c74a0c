"""The valid and test sets, from sacrebleu's own downloader (which verifies its md5 checksums)."""

import os
import shlex
import subprocess

from fairseq_kd.errors import DistillationError
from fairseq_kd.stamps import Stamps
from fairseq_kd.textio import count_lines
from fairseq_kd.wmt.archives import Pair, TestSet
from fairseq_kd.wmt.log import log


def fetch_test_set(pair: Pair, split: str, test_set: TestSet, out: str, sacrebleu: str) -> None:
    """``OUT/{split}.{src,tgt}`` from ``sacrebleu -t NAME -l SRC-TGT --echo src|ref``."""
    dest = {pair.src: os.path.join(out, f"{split}.{pair.src}"), pair.tgt: os.path.join(out, f"{split}.{pair.tgt}")}
    langpair = f"{pair.src}-{pair.tgt}"
    stamps = Stamps(out)
    stamp = stamps.make(f"testset.{split}", {"sacrebleu": test_set.sacrebleu, "langpair": langpair,
                                             "lines": test_set.lines})
    if stamps.current(f"testset.{split}", stamp, dest.values()):
        log(f"{split} ({test_set.label}): fetched before, skipped")
        return
    stamps.invalidate(f"testset.{split}", list(dest.values()))
    for lang, side in ((pair.src, "src"), (pair.tgt, "ref")):
        cmd = shlex.split(sacrebleu) + ["-t", test_set.sacrebleu, "-l", langpair, "--echo", side]
        tmp = dest[lang] + ".tmp"
        log(f"{split}.{lang}: {test_set.label} from {' '.join(cmd)}")
        try:
            with open(tmp, "wb") as f:
                proc = subprocess.run(cmd, stdout=f, stderr=subprocess.PIPE)
        except FileNotFoundError:
            raise DistillationError(f"{cmd[0]!r} not found; pip install sacrebleu (or set SACREBLEU)")
        if proc.returncode != 0:
            reason = (proc.stderr.decode("utf-8", "replace").strip().splitlines() or ["no message"])[-1]
            raise DistillationError(
                f"{' '.join(cmd)} failed ({reason}); check the network (sacrebleu caches test sets in ~/.sacrebleu) and re-run"
            )
        n = count_lines(tmp)
        if n != test_set.lines:
            raise DistillationError(
                f"{tmp}: {' '.join(cmd)} gave {n} lines, but {test_set.label} {langpair} has {test_set.lines}; "
                f"remove sacrebleu's cached copy (~/.sacrebleu/{test_set.sacrebleu.split('/')[0]}) and re-run"
            )
    for lang in (pair.src, pair.tgt):
        os.replace(dest[lang] + ".tmp", dest[lang])
    stamps.record(f"testset.{split}", stamp)
