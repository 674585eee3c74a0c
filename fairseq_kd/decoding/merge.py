"""Merge: read every complete shard, restore the source order by example id
(one record per example, checked), pick one hypothesis per example, flag
degenerate ones, write one BPE'd line per source line plus
``OUTPUT.report.json``."""

import json
import logging
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

from fairseq_kd.decoding.selection import DEGENERATE_KINDS, DegenerateCheck, select_by_bleu
from fairseq_kd.decoding.shards import partial_shards, read_manifest, shard_path, write_json_atomic
from fairseq_kd.errors import DistillationError
from fairseq_kd.textio import write_lines_atomic

logger = logging.getLogger("fairseq_kd.decoding")


@dataclass
class MergeReport:
    num_examples: int
    output: str
    select: str
    on_degenerate: str
    degenerate: Dict[str, List[int]] = field(default_factory=lambda: {k: [] for k in DEGENERATE_KINDS})
    changed_by_selection: int = 0

    @property
    def num_degenerate(self) -> int:
        return sum(len(v) for v in self.degenerate.values())

    def summary(self) -> str:
        counts = ", ".join(f"{k} {len(v)}" for k, v in self.degenerate.items())
        action = {"keep": "kept", "drop": "dropped (empty lines)", "reference": "replaced by the reference"}
        text = (
            f"merged {self.num_examples} examples into {self.output}; degenerate: {counts} "
            f"({action[self.on_degenerate]})"
        )
        if self.select == "bleu":
            text += f"; Seq-Inter chose a hypothesis other than the teacher's best for {self.changed_by_selection}"
        return text


def read_shards(out_dir: str, manifest: Dict) -> Dict[int, Dict]:
    """All records of the complete shards of ``out_dir`` by example id; raises
    when a shard is missing or incomplete, or an id is missing or repeated."""
    n, num_shards = manifest["num_examples"], manifest["num_shards"]
    missing = [s for s in range(num_shards) if not os.path.isfile(shard_path(out_dir, s, num_shards))]
    if missing:
        state = ["incomplete" if partial_shards(shard_path(out_dir, s, num_shards)) else "missing" for s in missing]
        listed = ", ".join(f"{s} ({st})" for s, st in zip(missing, state))
        raise DistillationError(
            f"{out_dir}: shard(s) {listed} of {num_shards} not complete; re-run "
            f"`python -m fairseq_kd.decoding decode --out-dir {out_dir} --num-shards {num_shards}` "
            f"(complete shards are skipped)"
        )
    records: Dict[int, Dict] = {}
    for s in range(num_shards):
        path = shard_path(out_dir, s, num_shards)
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                try:
                    rec = json.loads(line)
                    index = int(rec["id"])
                except (ValueError, KeyError, TypeError):
                    raise DistillationError(f"{path}:{line_no}: not a decoding record; delete the file and re-run decode")
                if index in records:
                    raise DistillationError(f"{path}: example {index} has a second record; delete {out_dir} and re-run decode")
                if not 0 <= index < n:
                    raise DistillationError(f"{path}: example id {index} out of range [0, {n}); delete {out_dir} and re-run decode")
                records[index] = rec
    if len(records) != n:
        absent = [i for i in range(n) if i not in records]
        raise DistillationError(
            f"{out_dir}: {len(absent)} of {n} examples have no hypothesis (first ids {absent[:5]}); "
            f"delete the shards holding them and re-run decode"
        )
    return records


def merge(
    out_dir: str,
    output: str,
    select: str = "top",
    on_degenerate: str = "keep",
    check: Optional[DegenerateCheck] = None,
    bpe: str = "auto",
    report_path: Optional[str] = None,
    progress: bool = True,
) -> MergeReport:
    """Merge the shards of ``out_dir`` into ``output`` (one BPE'd line per example, in order)."""
    from tqdm import tqdm

    if select not in ("top", "bleu"):
        raise DistillationError(f"--select must be top or bleu, got {select!r}")
    if on_degenerate not in ("keep", "drop", "reference"):
        raise DistillationError(f"--on-degenerate must be keep, drop or reference, got {on_degenerate!r}")
    manifest = read_manifest(out_dir)
    if (select == "bleu" or on_degenerate == "reference") and not manifest.get("has_references"):
        raise DistillationError(
            f"{out_dir} was decoded without references ({manifest['source']}); "
            f"--select bleu and --on-degenerate reference need them (decode a split with a target, or pass --reference)"
        )
    check = check or DegenerateCheck()
    records = read_shards(out_dir, manifest)
    n = manifest["num_examples"]
    report = MergeReport(n, output, select, on_degenerate)
    examples: Dict[str, List[Dict]] = {k: [] for k in DEGENERATE_KINDS}

    def lines():
        for index in tqdm(range(n), unit="sent", desc="merge", disable=not progress, file=sys.stderr):
            rec = records[index]
            hyps = [h["text"] for h in rec["hyps"]]
            choice = 0
            if select == "bleu" and len(hyps) > 1:
                choice = select_by_bleu(hyps, rec["ref"], bpe)
                report.changed_by_selection += int(choice != 0)
            text = hyps[choice] if hyps else ""
            kind = check(text, rec["src"])
            if kind is not None:
                report.degenerate[kind].append(index)
                if len(examples[kind]) < 3:
                    examples[kind].append({"id": index, "src": rec["src"], "hyp": text})
                if on_degenerate == "drop":
                    text = ""
                elif on_degenerate == "reference":
                    text = rec["ref"]
            # one line per example, whatever whitespace a hand-edited record holds
            yield " ".join(text.split())

    write_lines_atomic(output, lines())
    report_path = report_path or output + ".report.json"
    write_json_atomic(
        report_path,
        {
            "output": output,
            "num_examples": n,
            "select": select,
            "on_degenerate": on_degenerate,
            "changed_by_selection": report.changed_by_selection,
            "check": asdict(check),
            "degenerate": report.degenerate,
            "examples": examples,
            "decode": manifest,
        },
    )
    logger.info(report.summary())
    for kind, items in examples.items():
        for item in items:
            logger.info("  %s #%d: %s", kind, item["id"], item["hyp"][:200])
    return report
