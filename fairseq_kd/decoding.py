"""Sequence-level KD data: decode the training sources with the teacher, merge, binarize.

Three stages, each a subcommand (``python -m fairseq_kd.decoding STAGE ...``)
and a function of this module:

``decode``
    Beam-search the source side of a binarized split (``--data DIR --split
    train``) or of a plain-text, already-BPE'd file (``--input FILE``) with the
    teacher (``--path a.pt``, or ``a.pt:b.pt`` for an ensemble), through
    fairseq's ``SequenceGenerator`` (``task.build_generator``) on models read
    by the safe checkpoint loader.  The examples are cut into ``--num-shards``
    contiguous shards; ``--shard-id I`` decodes one of them (so shards can run
    as separate processes or on separate machines sharing ``--out-dir``),
    without it every shard is decoded in turn.  A shard is written to
    ``shardIII-of-NNN.jsonl.tmp`` and renamed to ``shardIII-of-NNN.jsonl``
    when complete: a re-run skips complete shards and redoes incomplete ones.
    Each line holds one example: its id, source and reference (BPE'd, as in
    the data) and the teacher's ``--nbest`` hypotheses, BPE'd tokens kept.

``merge``
    Reads every shard, restores the original order by example id, checks that
    each example has exactly one record, picks one hypothesis per example (the
    teacher's best, or with ``--select bleu`` the n-best entry with the highest
    smoothed sentence BLEU against the reference: Seq-Inter) and flags
    degenerate ones (empty, longer than ``a * len(src) + b`` tokens, or looping
    on a repeated n-gram).  ``--on-degenerate keep|drop|reference`` keeps them,
    writes an empty line (the distillation task leaves such examples out of
    training) or substitutes the reference.  Writes one BPE'd line per source
    line, plus ``OUTPUT.report.json``.

``binarize``
    Binarizes the merged file with the data directory's own target dictionary
    into the same directory under a new subset name
    (``DATA/NAME.src-tgt.tgt.{bin,idx}``), after checking that it has as many
    lines as the split's source side.  Train on it with ``--task
    distillation_translation --teacher-target-subset NAME --criterion seq_kd``.

Every output is written under a temporary name and renamed when complete.
See ``docs/seq_kd.md`` for the full recipe.
"""

import argparse
import json
import logging
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from fairseq_kd.errors import DistillationError
from fairseq_kd.textio import count_lines, write_lines_atomic  # noqa: F401  (re-exported)

logger = logging.getLogger("fairseq_kd.decoding")

MANIFEST = "manifest.json"

#: a translation function: collated batch -> per example (in batch order) a list
#: of (BPE'd hypothesis text, score) pairs, best first
Translator = Callable[[dict], List[List[Tuple[str, float]]]]


# ---------------------------------------------------------------------------
# Shards
# ---------------------------------------------------------------------------


def shard_range(num_examples: int, num_shards: int, shard_id: int) -> Tuple[int, int]:
    """``[start, end)`` of the example ids of shard ``shard_id`` (contiguous, sizes differ by <= 1)."""
    if num_shards < 1:
        raise DistillationError(f"--num-shards must be >= 1, got {num_shards}")
    if not 0 <= shard_id < num_shards:
        raise DistillationError(f"--shard-id must be in [0, {num_shards}), got {shard_id}")
    return num_examples * shard_id // num_shards, num_examples * (shard_id + 1) // num_shards


def shard_path(out_dir: str, shard_id: int, num_shards: int) -> str:
    return os.path.join(out_dir, f"shard{shard_id:03d}-of-{num_shards:03d}.jsonl")


def write_json_atomic(path: str, obj) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------
# What is decoded
# ---------------------------------------------------------------------------


@dataclass
class Corpus:
    """Source sentences (token ids) and, when known, their references (BPE'd text)."""

    dataset: object  # fairseq LanguagePairDataset over the source side only
    src_dict: object
    references: Optional[Callable[[int], str]]
    description: str

    def __len__(self) -> int:
        return len(self.dataset)

    def source_text(self, index: int) -> str:
        return self.src_dict.string(self.dataset.src[index])

    def reference_text(self, index: int) -> Optional[str]:
        return self.references(index) if self.references is not None else None

    @classmethod
    def from_lines(cls, src_lines: Sequence[str], ref_lines: Optional[Sequence[str]], src_dict, tgt_dict, description):
        from fairseq.data import LanguagePairDataset

        src = [src_dict.encode_line(line, add_if_not_exist=False, append_eos=True).long() for line in src_lines]
        sizes = np.array([len(s) for s in src], dtype=np.int64)
        dataset = LanguagePairDataset(src, sizes, src_dict, tgt_dict=tgt_dict, shuffle=False)
        refs = None
        if ref_lines is not None:
            ref_lines = [line.strip() for line in ref_lines]
            refs = ref_lines.__getitem__
        return cls(dataset, src_dict, refs, description)


def read_text_lines(path: str) -> List[str]:
    if not os.path.isfile(path):
        raise DistillationError(f"{path} not found")
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def corpus_from_text(input_path: str, reference_path: Optional[str], src_dict, tgt_dict) -> Corpus:
    """A plain-text, already-BPE'd source file (and optionally its BPE'd references)."""
    src_lines = read_text_lines(input_path)
    ref_lines = None
    if reference_path:
        ref_lines = read_text_lines(reference_path)
        if len(ref_lines) != len(src_lines):
            raise DistillationError(
                f"{reference_path} has {len(ref_lines)} lines but {input_path} has {len(src_lines)}; "
                f"the references must be aligned with the source line by line"
            )
    return Corpus.from_lines(src_lines, ref_lines, src_dict, tgt_dict, os.path.abspath(input_path))


def corpus_from_split(data: str, split: str, src: str, tgt: str, src_dict, tgt_dict) -> Corpus:
    """The source side (and gold target, as references) of a binarized split."""
    from fairseq.data import LanguagePairDataset, data_utils, indexed_dataset

    prefix = None
    for a, b in ((src, tgt), (tgt, src)):
        candidate = os.path.join(data, f"{split}.{a}-{b}.")
        if indexed_dataset.dataset_exists(candidate + src, impl=None):
            prefix = candidate
            break
    if prefix is None:
        raise DistillationError(
            f"binarized split {os.path.join(data, f'{split}.{src}-{tgt}.{src}')}.bin/.idx not found; "
            f"check --data, --split and --source-lang/--target-lang"
        )
    src_ds = data_utils.load_indexed_dataset(prefix + src, src_dict, None)
    tgt_ds = data_utils.load_indexed_dataset(prefix + tgt, tgt_dict, None)
    if tgt_ds is not None and len(tgt_ds) != len(src_ds):
        raise DistillationError(
            f"{prefix + tgt}.bin has {len(tgt_ds)} lines but {prefix + src}.bin has {len(src_ds)}"
        )
    dataset = LanguagePairDataset(src_ds, src_ds.sizes, src_dict, tgt_dict=tgt_dict, shuffle=False)
    refs = (lambda i: tgt_dict.string(tgt_ds[i])) if tgt_ds is not None else None
    return Corpus(dataset, src_dict, refs, os.path.abspath(prefix + src))


# ---------------------------------------------------------------------------
# Decoding one shard
# ---------------------------------------------------------------------------


def decode_shard(
    corpus: Corpus,
    translate: Translator,
    out_dir: str,
    shard_id: int,
    num_shards: int,
    max_tokens: Optional[int] = 4096,
    max_sentences: Optional[int] = None,
    max_source_len: Optional[int] = None,
    progress: bool = True,
) -> bool:
    """Decode shard ``shard_id`` unless it is already complete.

    Returns True when the shard was decoded now, False when it was skipped.
    Sources longer than ``max_source_len`` are not decoded: their record has
    no hypothesis text (``"skipped": "too_long"``) and ``merge`` flags it as
    empty.
    """
    from tqdm import tqdm

    final = shard_path(out_dir, shard_id, num_shards)
    if os.path.exists(final):
        logger.info("shard %d/%d is complete (%s): skipped", shard_id, num_shards, final)
        return False
    tmp = final + ".tmp"
    if os.path.exists(tmp):
        logger.info("shard %d/%d: incomplete %s from an earlier run is redone", shard_id, num_shards, tmp)
    start, end = shard_range(len(corpus), num_shards, shard_id)
    indices = np.arange(start, end, dtype=np.int64)
    dataset = corpus.dataset
    sizes = np.asarray(dataset.src_sizes)
    too_long = np.zeros(len(indices), dtype=bool)
    if max_source_len is not None and len(indices):
        too_long = sizes[indices] > max_source_len
    todo = indices[~too_long]
    todo = todo[np.argsort(sizes[todo], kind="mergesort")]
    batches = dataset.batch_by_size(todo, max_tokens=max_tokens, max_sentences=max_sentences) if len(todo) else []

    def record(index: int, hyps, skipped=None) -> str:
        rec = {
            "id": int(index),
            "src": corpus.source_text(index),
            "ref": corpus.reference_text(index),
            "hyps": [{"text": text, "score": round(float(score), 5)} for text, score in hyps],
        }
        if skipped:
            rec["skipped"] = skipped
        return json.dumps(rec, ensure_ascii=False)

    os.makedirs(out_dir, exist_ok=True)
    with open(tmp, "w", encoding="utf-8") as f, tqdm(
        total=len(indices), unit="sent", desc=f"shard {shard_id}/{num_shards}",
        disable=not progress, dynamic_ncols=True, file=sys.stderr,
    ) as bar:
        for index in indices[too_long]:
            f.write(record(index, [], skipped="too_long") + "\n")
        bar.update(int(too_long.sum()))
        for batch in batches:
            sample = dataset.collater([dataset[int(i)] for i in batch])
            results = translate(sample)
            for index, hyps in zip(sample["id"].tolist(), results):
                f.write(record(index, hyps) + "\n")
            bar.update(len(batch))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    if too_long.any():
        logger.warning(
            "shard %d/%d: %d sources longer than %d tokens were not decoded",
            shard_id, num_shards, int(too_long.sum()), max_source_len,
        )
    logger.info("shard %d/%d complete: %d examples -> %s", shard_id, num_shards, len(indices), final)
    return True


def write_manifest(out_dir: str, manifest: Dict) -> None:
    """Record what ``out_dir`` holds; refuse to mix shards of different decodes."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, MANIFEST)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        if old != manifest:
            changed = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
            raise DistillationError(
                f"{path} records a different decode ({', '.join(changed)} differ); "
                f"use a new --out-dir or delete {out_dir}"
            )
        return
    write_json_atomic(path, manifest)


def read_manifest(out_dir: str) -> Dict:
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.isfile(path):
        raise DistillationError(f"{path} not found; run `python -m fairseq_kd.decoding decode --out-dir {out_dir}` first")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def decode_corpus(
    corpus: Corpus,
    translate: Translator,
    out_dir: str,
    num_shards: int = 1,
    shard_ids: Optional[Sequence[int]] = None,
    settings: Optional[Dict] = None,
    **shard_kwargs,
) -> List[int]:
    """Write the manifest and decode ``shard_ids`` (default: all); returns the
    ids of the shards decoded now (complete shards are skipped)."""
    if shard_ids is None:
        shard_ids = range(num_shards)
    for shard_id in shard_ids:
        shard_range(len(corpus), num_shards, shard_id)  # validates the id
    manifest = {
        "num_examples": len(corpus),
        "num_shards": num_shards,
        "source": corpus.description,
        "has_references": corpus.references is not None,
        "settings": settings or {},
    }
    write_manifest(out_dir, manifest)
    return [
        s for s in shard_ids
        if decode_shard(corpus, translate, out_dir, s, num_shards, **shard_kwargs)
    ]


# ---------------------------------------------------------------------------
# The teacher as a translator
# ---------------------------------------------------------------------------


def build_task(data: str, src: Optional[str], tgt: Optional[str]):
    from fairseq.data import data_utils
    from fairseq.tasks.translation import TranslationConfig, TranslationTask

    if not os.path.isdir(data):
        raise DistillationError(f"data directory {data} not found (--data)")
    if src is None or tgt is None:
        src, tgt = data_utils.infer_language_pair(data)
        if src is None:
            raise DistillationError(f"cannot infer the language pair of {data}: pass --source-lang and --target-lang")
    for lang in (src, tgt):
        path = os.path.join(data, f"dict.{lang}.txt")
        if not os.path.isfile(path):
            raise DistillationError(f"{path} not found; --data must be the binarized data directory (fairseq-preprocess output)")
    return TranslationTask.setup_task(TranslationConfig(data=data, source_lang=src, target_lang=tgt))


def resolve_device(device: Optional[str], cpu: bool):
    import torch

    if cpu:
        return torch.device("cpu")
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def generation_settings(args) -> Dict:
    return {
        "beam": args.beam,
        "nbest": args.nbest,
        "max_len_a": args.max_len_a,
        "max_len_b": args.max_len_b,
        "min_len": args.min_len,
        "lenpen": args.lenpen,
        "unkpen": args.unkpen,
        "teacher": [os.path.abspath(p) for p in args.path.split(":") if p],
    }


def teacher_translator(task, teacher_paths: str, settings: Dict, device, precision="fp32", teacher_data_dir=None):
    """Load the teacher (safe loader, dictionary check) and return
    ``(translate, max_source_len)`` running fairseq's ``SequenceGenerator``."""
    import torch
    from fairseq import utils
    from fairseq.dataclass.configs import GenerationConfig

    from fairseq_kd.teacher import load_teacher, split_paths

    if settings["nbest"] > settings["beam"]:
        raise DistillationError(f"--nbest {settings['nbest']} cannot exceed --beam {settings['beam']}")
    teacher = load_teacher(split_paths(teacher_paths), task, precision=precision, teacher_data_dir=teacher_data_dir)
    teacher.to(device)
    models = list(teacher.models)
    gen_cfg = GenerationConfig(**{k: v for k, v in settings.items() if k != "teacher"})
    generator = task.build_generator(models, gen_cfg)
    max_positions = utils.resolve_max_positions(task.max_positions(), *[m.max_positions() for m in models])
    tgt_dict = task.target_dictionary
    nbest = settings["nbest"]

    def translate(sample):
        sample = utils.apply_to_sample(lambda t: t.to(device), sample)
        with torch.no_grad():
            hypos = task.inference_step(generator, models, sample)
        return [
            [(tgt_dict.string(h["tokens"].int().cpu()), float(h["score"])) for h in sent[:nbest]]
            for sent in hypos
        ]

    return translate, max_positions[0]


def decode(args) -> List[int]:
    """The ``decode`` subcommand."""
    task = build_task(args.data, args.source_lang, args.target_lang)
    if args.input:
        corpus = corpus_from_text(args.input, args.reference, task.source_dictionary, task.target_dictionary)
    else:
        corpus = corpus_from_split(
            args.data, args.split, task.cfg.source_lang, task.cfg.target_lang,
            task.source_dictionary, task.target_dictionary,
        )
    settings = generation_settings(args)
    shard_ids = list(range(args.num_shards)) if args.shard_id is None else [args.shard_id]
    if all(os.path.exists(shard_path(args.out_dir, s, args.num_shards)) for s in shard_ids):
        # nothing to decode: check the manifest, do not load the teacher
        return decode_corpus(corpus, None, args.out_dir, args.num_shards, shard_ids, settings=settings)
    device = resolve_device(args.device, args.cpu)
    translate, max_source_len = teacher_translator(
        task, args.path, settings, device, precision=args.teacher_precision,
        teacher_data_dir=args.teacher_data_dir,
    )
    logger.info(
        "decoding %d examples of %s in %d shard(s) on %s (beam %d, nbest %d)",
        len(corpus), corpus.description, args.num_shards, device, args.beam, args.nbest,
    )
    return decode_corpus(
        corpus, translate, args.out_dir, args.num_shards, shard_ids, settings=settings,
        max_tokens=args.max_tokens, max_sentences=args.batch_size,
        max_source_len=max_source_len, progress=not args.no_progress_bar,
    )


# ---------------------------------------------------------------------------
# Hypothesis selection and degenerate output
# ---------------------------------------------------------------------------


def remove_bpe(text: str, bpe: str = "auto") -> str:
    """Undo the subword segmentation (``auto`` recognises SentencePiece's ``▁``
    and subword-nmt's ``@@ ``)."""
    from fairseq.data.data_utils import post_process

    if bpe == "auto":
        if "\u2581" in text:
            bpe = "sentencepiece"
        elif "@@" in text:
            bpe = "subword_nmt"
        else:
            bpe = "none"
    return post_process(text, bpe)


def sentence_bleu(hypothesis: str, reference: str, bpe: str = "auto") -> float:
    """Smoothed sentence BLEU (sacrebleu defaults) of de-BPE'd text."""
    import sacrebleu

    return sacrebleu.sentence_bleu(remove_bpe(hypothesis, bpe), [remove_bpe(reference, bpe)]).score


def select_by_bleu(hypotheses: Sequence[str], reference: str, bpe: str = "auto") -> int:
    """Seq-Inter (Kim & Rush, 2016): index of the n-best entry closest to the
    reference by smoothed sentence BLEU; ties go to the teacher's better-ranked one."""
    if not hypotheses:
        raise ValueError("empty n-best list")
    scores = [sentence_bleu(h, reference, bpe) for h in hypotheses]
    return int(np.argmax(scores))  # argmax returns the first maximum


def repeated_ngram(tokens: Sequence[str], max_order: int = 4, min_repeats: int = 4) -> Optional[Tuple[str, ...]]:
    """The first n-gram (``n <= max_order``) that occurs ``min_repeats`` times in a
    row (a decoding loop such as ``a b a b a b a b``), or None."""
    length = len(tokens)
    for n in range(1, max_order + 1):
        span = n * min_repeats
        for i in range(0, length - span + 1):
            gram = tuple(tokens[i:i + n])
            if all(tuple(tokens[i + k * n:i + (k + 1) * n]) == gram for k in range(1, min_repeats)):
                return gram
    return None


@dataclass
class DegenerateCheck:
    """Rules for flagging a hypothesis (token counts are BPE'd tokens)."""

    len_a: float = 2.0
    len_b: int = 10
    max_order: int = 4
    min_repeats: int = 4

    def __call__(self, hypothesis: str, source: str) -> Optional[str]:
        """``"empty"``, ``"too_long"``, ``"repetition"`` or None (fine)."""
        tokens = hypothesis.split()
        if not tokens:
            return "empty"
        if len(tokens) > self.len_a * len(source.split()) + self.len_b:
            return "too_long"
        if self.min_repeats > 1 and repeated_ngram(tokens, self.max_order, self.min_repeats) is not None:
            return "repetition"
        return None


DEGENERATE_KINDS = ("empty", "too_long", "repetition")


# ---------------------------------------------------------------------------
# Merge
# ---------------------------------------------------------------------------


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
        state = ["incomplete" if os.path.exists(shard_path(out_dir, s, num_shards) + ".tmp") else "missing" for s in missing]
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


# ---------------------------------------------------------------------------
# Binarize
# ---------------------------------------------------------------------------


def binarize(
    input_path: str,
    data: str,
    name: str,
    src: Optional[str] = None,
    tgt: Optional[str] = None,
    split: str = "train",
    workers: int = 1,
    dataset_impl: str = "mmap",
) -> str:
    """Binarize ``input_path`` (BPE'd teacher targets of ``split``) with
    ``DATA/dict.TGT.txt`` into ``DATA/NAME.SRC-TGT.TGT.{bin,idx}``; returns the prefix."""
    from fairseq.data import Dictionary, data_utils

    from fairseq_kd.data.binarize import binarize_text
    from fairseq_kd.data.teacher_target import gold_target_prefix, teacher_target_prefix

    task_src, task_tgt = src, tgt
    if task_src is None or task_tgt is None:
        task_src, task_tgt = data_utils.infer_language_pair(data)
        if task_src is None:
            raise DistillationError(f"cannot infer the language pair of {data}: pass --source-lang and --target-lang")
    if name == split or "." in name:
        raise DistillationError(f"--name {name!r} must differ from the split name and contain no '.'")
    if not os.path.isfile(input_path):
        raise DistillationError(f"{input_path} not found; run `python -m fairseq_kd.decoding merge` first")
    dict_path = os.path.join(data, f"dict.{task_tgt}.txt")
    if not os.path.isfile(dict_path):
        raise DistillationError(f"{dict_path} not found; --data must be the binarized data directory")
    tgt_dict = Dictionary.load(dict_path)
    n_lines = count_lines(input_path)
    gold = gold_target_prefix(data, split, task_src, task_tgt)
    src_prefix = gold[: -len(task_tgt)] + task_src
    src_ds = data_utils.load_indexed_dataset(src_prefix, None, None)
    if src_ds is None:
        raise DistillationError(f"{src_prefix}.bin/.idx not found; --split must name the decoded split of --data")
    if len(src_ds) != n_lines:
        raise DistillationError(
            f"{input_path} has {n_lines} lines but the {split} source {src_prefix}.bin has {len(src_ds)}; "
            f"merge the teacher's translations of exactly this split"
        )
    prefix = teacher_target_prefix(data, name, task_src, task_tgt)
    summary = binarize_text(input_path, tgt_dict, prefix, workers=workers, dataset_impl=dataset_impl)
    logger.info("binarized %s -> %s.{bin,idx}: %s", input_path, prefix, summary)
    return prefix


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fairseq_kd.decoding",
        description="Sequence-level KD data: decode the training sources with the teacher (sharded, "
        "resumable), merge the shards in order, binarize the result next to the gold data.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    dec = sub.add_parser("decode", help="beam-search a split (or a BPE'd text file) with the teacher, in shards")
    dec.add_argument("--data", required=True, help="binarized data directory (dictionaries; the split to decode)")
    dec.add_argument("--split", default="train", help="binarized split to decode (default: train)")
    dec.add_argument("--input", help="decode this plain-text, already-BPE'd source file instead of --split")
    dec.add_argument("--reference", help="BPE'd references aligned with --input (for Seq-Inter and --on-degenerate reference)")
    dec.add_argument("-s", "--source-lang", help="source language (default: inferred from --data)")
    dec.add_argument("-t", "--target-lang", help="target language (default: inferred from --data)")
    dec.add_argument("--path", required=True, help="teacher checkpoint, or several separated by ':' (an ensemble)")
    dec.add_argument("--teacher-data-dir", help="directory with the teacher's dictionaries, if its recorded data directory moved")
    dec.add_argument("--teacher-precision", default="fp32", choices=["fp32", "fp16", "bf16"], help="dtype of the teacher")
    dec.add_argument("--out-dir", required=True, help="directory of the shard files and manifest")
    dec.add_argument("--num-shards", type=int, default=1, help="number of shards the examples are cut into")
    dec.add_argument("--shard-id", type=int, help="decode only this shard (default: every shard in turn)")
    dec.add_argument("--beam", type=int, default=5, help="beam size")
    dec.add_argument("--nbest", type=int, default=1, help="hypotheses kept per sentence (> 1 for Seq-Inter)")
    dec.add_argument("--max-len-a", type=float, default=0.0, help="max length = a * source length + b")
    dec.add_argument("--max-len-b", type=int, default=200, help="see --max-len-a")
    dec.add_argument("--min-len", type=int, default=1, help="minimum hypothesis length")
    dec.add_argument("--lenpen", type=float, default=1.0, help="length penalty (fairseq's)")
    dec.add_argument("--unkpen", type=float, default=0.0, help="unknown-word penalty (fairseq's)")
    dec.add_argument("--max-tokens", type=int, default=4096, help="source tokens per batch")
    dec.add_argument("--batch-size", type=int, help="sentences per batch (default: no limit)")
    dec.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    dec.add_argument("--cpu", action="store_true", help="decode on the CPU")
    dec.add_argument("--no-progress-bar", action="store_true", help="no tqdm progress bar")

    mrg = sub.add_parser("merge", help="merge the shards in source order, select and check the hypotheses")
    mrg.add_argument("--out-dir", required=True, help="the --out-dir of decode")
    mrg.add_argument("--output", required=True, help="merged teacher targets, one BPE'd line per source line")
    mrg.add_argument("--select", default="top", choices=["top", "bleu"],
                     help="top: the teacher's best hypothesis; bleu: Seq-Inter, the n-best entry with the "
                     "highest smoothed sentence BLEU against the reference")
    mrg.add_argument("--on-degenerate", default="keep", choices=["keep", "drop", "reference"],
                     help="what to write for a degenerate hypothesis: keep it, an empty line (left out of "
                     "training), or the reference")
    mrg.add_argument("--remove-bpe", default="auto", choices=["auto", "sentencepiece", "subword_nmt", "none"],
                     help="subword scheme undone before sentence BLEU")
    mrg.add_argument("--degenerate-len-a", type=float, default=2.0,
                     help="a hypothesis longer than a * source length + b tokens is degenerate")
    mrg.add_argument("--degenerate-len-b", type=int, default=10, help="see --degenerate-len-a")
    mrg.add_argument("--degenerate-ngram", type=int, default=4, help="longest n-gram checked for loops")
    mrg.add_argument("--degenerate-repeats", type=int, default=4,
                     help="an n-gram repeated this many times in a row is a loop (0 or 1: no check)")
    mrg.add_argument("--report", help="JSON report (default: OUTPUT.report.json)")
    mrg.add_argument("--no-progress-bar", action="store_true", help="no tqdm progress bar")

    bnz = sub.add_parser("binarize", help="binarize the merged targets into the data directory under a new name")
    bnz.add_argument("--data", required=True, help="binarized data directory holding dict.TGT.txt and the split")
    bnz.add_argument("--input", required=True, help="the merged teacher targets (output of merge)")
    bnz.add_argument("--name", default="train_teacher", help="subset name for --teacher-target-subset (default: train_teacher)")
    bnz.add_argument("--split", default="train", help="the split the targets translate (line counts are checked against it)")
    bnz.add_argument("-s", "--source-lang", help="source language (default: inferred from --data)")
    bnz.add_argument("-t", "--target-lang", help="target language (default: inferred from --data)")
    bnz.add_argument("--workers", type=int, default=1, help="binarization processes")
    bnz.add_argument("--dataset-impl", default="mmap", help="fairseq dataset format (default: mmap)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    logging.basicConfig(
        format="%(asctime)s | %(levelname)s | %(name)s | %(message)s",
        level=os.environ.get("LOGLEVEL", "INFO").upper(),
        stream=sys.stderr,
        force=True,  # fairseq's import already configured the root logger
    )
    args = build_parser().parse_args(argv)
    import fairseq_kd  # noqa: F401  (safe checkpoint loading, registrations)

    if args.command == "decode":
        decode(args)
    elif args.command == "merge":
        merge(
            args.out_dir, args.output, select=args.select, on_degenerate=args.on_degenerate,
            check=DegenerateCheck(args.degenerate_len_a, args.degenerate_len_b, args.degenerate_ngram, args.degenerate_repeats),
            bpe=args.remove_bpe, report_path=args.report, progress=not args.no_progress_bar,
        )
    elif args.command == "binarize":
        binarize(
            args.input, args.data, args.name, args.source_lang, args.target_lang,
            split=args.split, workers=args.workers, dataset_impl=args.dataset_impl,
        )


if __name__ == "__main__":
    main()
