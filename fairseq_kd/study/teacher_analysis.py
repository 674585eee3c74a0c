"""The TIE-KD paper's teacher analysis on a binarized split (Zhang et al., ACL 2023, §3).

::

    python -m fairseq_kd.study.teacher_analysis DATA_BIN --path teacher/checkpoint_best.pt \\
        --subset valid --topk 5 [--json analysis.json]

(also ``fairseq-kd-analyze-teacher`` and ``scripts/analyze_teacher.py``).  The
teacher reads the split teacher-forced on the gold prefixes and, over every
non-pad target position (EOS included), reports

* ``top1_gold_rate``: the share of positions where its top-1 token is the gold token;
* ``top1_mass``: its mean probability of its top-1 token;
* ``topk_mass``: its mean probability summed over its top-k tokens;
* ``gold_mass``: its mean probability of the gold token.
"""

import argparse
import json
from typing import Dict, List, Optional

import torch
from torch import Tensor

from fairseq_kd.errors import DistillationError, exit_on_error
from fairseq_kd.textio import write_lines_atomic


def topk_counts(teacher_lprobs: Tensor, target: Tensor, padding_idx: int, k: int) -> Dict[str, float]:
    """Sums over the non-pad positions of one batch: ``tokens``, ``top1_gold``
    (positions whose argmax is the gold token), ``top1_mass``, ``topk_mass``, ``gold_mass``."""
    if k < 1 or k > teacher_lprobs.size(-1):
        raise ValueError(f"k must be in [1, {teacher_lprobs.size(-1)}], got {k}")
    mask = target.ne(padding_idx)
    p = teacher_lprobs.float().exp()
    top_p, top_id = p.topk(k, dim=-1)
    gold_p = p.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return {
        "tokens": float(mask.sum()),
        "top1_gold": float((top_id[..., 0].eq(target) & mask).sum()),
        "top1_mass": float(top_p[..., 0][mask].sum()),
        "topk_mass": float(top_p.sum(-1)[mask].sum()),
        "gold_mass": float(gold_p[mask].sum()),
    }


def rates(counts: Dict[str, float], k: int) -> Dict[str, float]:
    n = counts["tokens"]
    if n == 0:
        raise DistillationError("the split has no target tokens; analyse a split with targets")
    return {
        "tokens": int(n),
        "k": k,
        "top1_gold_rate": counts["top1_gold"] / n,
        "top1_mass": counts["top1_mass"] / n,
        "topk_mass": counts["topk_mass"] / n,
        "gold_mass": counts["gold_mass"] / n,
    }


def analyze(data: str, paths: str, subset: str = "valid", k: int = 5, max_tokens: int = 4096,
            source_lang: Optional[str] = None, target_lang: Optional[str] = None) -> Dict[str, float]:
    """Run the teacher (one checkpoint, or several joined by ``:``) over ``subset`` of ``data``."""
    from fairseq.tasks.translation import TranslationConfig, TranslationTask

    from fairseq_kd.teacher import load_teacher

    cfg = TranslationConfig(
        data=data, source_lang=source_lang, target_lang=target_lang,
        train_subset="train", dataset_impl="mmap", required_seq_len_multiple=1,
    )
    task = TranslationTask.setup_task(cfg)
    try:
        task.load_dataset(subset)
    except FileNotFoundError as e:
        raise DistillationError(f"{data}: no binarized split {subset!r} ({e}); pick --subset from the files there")
    teacher = load_teacher(paths, task).to("cpu")
    dataset = task.dataset(subset)
    itr = task.get_batch_iterator(
        dataset, max_tokens=max_tokens, max_positions=None, ignore_invalid_inputs=False,
        required_batch_size_multiple=1, seed=1,
    ).next_epoch_itr(shuffle=False)
    pad = task.target_dictionary.pad()
    totals = {"tokens": 0.0, "top1_gold": 0.0, "top1_mass": 0.0, "topk_mass": 0.0, "gold_mass": 0.0}
    with torch.no_grad():
        for sample in itr:
            if not sample:
                continue
            counts = topk_counts(teacher(sample["net_input"]), sample["target"], pad, k)
            for key, value in counts.items():
                totals[key] += value
    result = rates(totals, k)
    result.update(subset=subset, teacher=paths)
    return result


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="fairseq-kd-analyze-teacher", description=__doc__.split("\n\n")[0])
    parser.add_argument("data", help="fairseq binarized data directory")
    parser.add_argument("--path", required=True, help="teacher checkpoint (several joined by ':' for an ensemble)")
    parser.add_argument("--subset", default="valid", help="binarized split to read (default: valid)")
    parser.add_argument("--topk", type=int, default=5, help="k of the top-k mass (default 5, TIE-KD's k)")
    parser.add_argument("--max-tokens", type=int, default=4096, help="tokens per batch")
    parser.add_argument("--source-lang", default=None)
    parser.add_argument("--target-lang", default=None)
    parser.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)
    with exit_on_error(parser.prog):
        result = analyze(args.data, args.path, args.subset, args.topk, args.max_tokens,
                         args.source_lang, args.target_lang)
        text = json.dumps(result, indent=2, sort_keys=True)
        print(text)
        if args.json:
            write_lines_atomic(args.json, text.split("\n"))


if __name__ == "__main__":
    main()
