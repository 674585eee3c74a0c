"""Sequence-level KD: sharded teacher decoding, merge, binarize, the task's
teacher-target side and the ``seq_kd`` criterion (in-memory and tmp-dir data,
fake translators; the real teacher runs in test_end_to_end_seq_kd.py)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from fairseq.binarizer import FileBinarizer, VocabularyDatasetBinarizer
from fairseq.criterions.label_smoothed_cross_entropy import LabelSmoothedCrossEntropyCriterion
from fairseq.data import LanguagePairDataset
from omegaconf import OmegaConf

from fairseq_kd import decoding, losses
from fairseq_kd.decoding.shards import partial_shards
from fairseq_kd.criterions.seq_kd import SeqKDConfig, SeqKDCriterion
from fairseq_kd.criterions.word_kd import WordKDConfig, WordKDCriterion
from fairseq_kd.data.teacher_target import TeacherTargetDataset
from fairseq_kd.errors import DistillationError
from fairseq_kd.tasks.distillation_translation import (
    DistillationTranslationConfig,
    DistillationTranslationTask,
)
from tests import toy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def words(*ids):
    return " ".join(f"w{i}" for i in ids)


# lengths 3 2 1 4 3 2 1 4 ...: a shard sorted by length is not in id order
SOURCES = [words(*range(i % 5 + 1, i % 5 + 2 + (10 - i) % 4)) for i in range(11)]
REFERENCES = [words(*range(i % 7, i % 7 + 3)) for i in range(11)]


def echo_translator(calls=None, fail_after=None):
    """Translates a sentence into ``w1 <source>``; counts the sentences it saw
    and raises (a "killed" process) after ``fail_after`` batches."""
    d = toy.make_dictionary()
    state = {"batches": 0}

    def translate(sample):
        if fail_after is not None and state["batches"] >= fail_after:
            raise KeyboardInterrupt("killed")
        state["batches"] += 1
        out = []
        for row, sid in zip(sample["net_input"]["src_tokens"], sample["id"].tolist()):
            if calls is not None:
                calls.append(sid)
            out.append([("w1 " + d.string(row[row.ne(d.pad())]), -0.5)])
        return out

    return translate


def corpus(sources=SOURCES, references=REFERENCES):
    d = toy.make_dictionary()
    return decoding.Corpus.from_lines(sources, references, d, d, "toy")


def write_shard(out_dir, shard_id, num_shards, records):
    with open(decoding.shard_path(out_dir, shard_id, num_shards), "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")


def hand_made_decode(out_dir, records, num_shards=1, has_references=True):
    """Shards written by hand: ``records`` in id order, cut like decode cuts them."""
    os.makedirs(out_dir, exist_ok=True)
    decoding.write_manifest(out_dir, {
        "num_examples": len(records), "num_shards": num_shards, "source": "hand",
        "has_references": has_references, "settings": {},
    })
    for s in range(num_shards):
        start, end = decoding.shard_range(len(records), num_shards, s)
        write_shard(out_dir, s, num_shards, records[start:end][::-1])


def binarize_lines(lines, prefix, d):
    path = prefix + ".txt"
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))
    FileBinarizer.multiprocess_dataset(
        path, "mmap", VocabularyDatasetBinarizer(d, append_eos=True), prefix, vocab_size=len(d)
    )
    os.remove(path)


@pytest.fixture
def data_dir(tmp_path):
    """A binarized toy data directory: train/valid splits of src-tgt, toy dictionaries."""
    d = toy.make_dictionary()
    data = str(tmp_path / "bin")
    os.makedirs(data)
    for lang in ("src", "tgt"):
        d.save(os.path.join(data, f"dict.{lang}.txt"))
    binarize_lines(SOURCES, os.path.join(data, "train.src-tgt.src"), d)
    binarize_lines(REFERENCES, os.path.join(data, "train.src-tgt.tgt"), d)
    binarize_lines(SOURCES[:4], os.path.join(data, "valid.src-tgt.src"), d)
    binarize_lines(REFERENCES[:4], os.path.join(data, "valid.src-tgt.tgt"), d)
    return data


def make_task(data, **overrides):
    cfg = DistillationTranslationConfig(
        data=data, source_lang="src", target_lang="tgt", dataset_impl="mmap",
        train_subset="train", required_seq_len_multiple=1, **overrides,
    )
    return DistillationTranslationTask.setup_task(cfg)


def first_batch(task, split="train", max_sentences=100):
    itr = task.get_batch_iterator(
        task.dataset(split), max_tokens=1000, max_sentences=max_sentences, seed=1
    ).next_epoch_itr(shuffle=False)
    return next(iter(itr))


def seq_kd(task, **cfg):
    return SeqKDCriterion(task, SeqKDConfig(sentence_avg=False, **cfg))


# ---------------------------------------------------------------------------
# decoding: shards, resume, merge order
# ---------------------------------------------------------------------------


def test_shard_ranges_cover_every_example_once():
    for n, k in ((11, 3), (2, 5), (0, 2), (100, 7)):
        ids = [i for s in range(k) for i in range(*decoding.shard_range(n, k, s))]
        assert ids == list(range(n))
    with pytest.raises(DistillationError, match="--shard-id"):
        decoding.shard_range(10, 2, 2)


def test_merge_restores_order_after_shards_finish_out_of_order(tmp_path):
    out = str(tmp_path / "dec")
    c = corpus()
    translate = echo_translator()
    # the shards finish in the order 2, 0, 1; inside a shard batches go by length
    for shard_id in (2, 0, 1):
        decoding.decode_corpus(c, translate, out, num_shards=3, shard_ids=[shard_id], max_sentences=2, progress=False)
    shard_ids = [[json.loads(line)["id"] for line in open(decoding.shard_path(out, s, 3))] for s in range(3)]
    assert any(ids != sorted(ids) for ids in shard_ids)  # inside a shard, batches go by length
    assert os.stat(decoding.shard_path(out, 2, 3)).st_mtime_ns <= os.stat(decoding.shard_path(out, 0, 3)).st_mtime_ns
    merged = str(tmp_path / "teacher.txt")
    report = decoding.merge(out, merged, progress=False)
    lines = open(merged, encoding="utf-8").read().splitlines()
    assert lines == ["w1 " + s for s in SOURCES]
    assert report.num_examples == len(SOURCES) and report.num_degenerate == 0
    assert not [p for p in os.listdir(out) if ".tmp" in p or p.endswith(".lock")]


def test_killed_shard_is_redone_and_finished_shards_are_not(tmp_path):
    out = str(tmp_path / "dec")
    c = corpus()
    decoding.decode_corpus(c, echo_translator(), out, num_shards=2, shard_ids=[0], max_sentences=2, progress=False)
    shard0 = decoding.shard_path(out, 0, 2)
    shard1 = decoding.shard_path(out, 1, 2)
    # shard 1 is killed after one batch: a partial temp file, no final file
    with pytest.raises(KeyboardInterrupt):
        decoding.decode_corpus(c, echo_translator(fail_after=1), out, num_shards=2, shard_ids=[1],
                               max_sentences=2, progress=False)
    assert not os.path.exists(shard1)
    [partial] = partial_shards(shard1)  # shardIII-of-NNN.jsonl.tmp<pid>-<random>
    assert len(open(partial).read().splitlines()) == 2
    with pytest.raises(DistillationError, match=r"shard\(s\) 1 \(incomplete\) of 2"):
        decoding.merge(out, str(tmp_path / "t.txt"), progress=False)

    os.utime(shard0, (1_000_000, 1_000_000))
    calls = []
    decoded = decoding.decode_corpus(c, echo_translator(calls), out, num_shards=2, max_sentences=2, progress=False)
    assert decoded == [1]
    assert os.stat(shard0).st_mtime == 1_000_000  # not rewritten
    start, end = decoding.shard_range(len(SOURCES), 2, 1)
    assert sorted(calls) == list(range(start, end))  # only shard 1 translated, each sentence once
    assert not partial_shards(shard1) and not os.path.exists(shard1 + ".lock")
    decoding.merge(out, str(tmp_path / "t.txt"), progress=False)
    assert len(open(tmp_path / "t.txt").read().splitlines()) == len(SOURCES)
    # a third run decodes nothing
    assert decoding.decode_corpus(c, echo_translator(), out, num_shards=2, progress=False) == []


def test_decode_a_plain_text_bpe_file(tmp_path):
    d = toy.make_dictionary()
    src, ref = tmp_path / "train.bpe.src", tmp_path / "train.bpe.tgt"
    src.write_text("".join(s + "\n" for s in SOURCES[:5]))
    ref.write_text("".join(r + "\n" for r in REFERENCES[:5]))
    c = decoding.corpus_from_text(str(src), str(ref), d, d)
    out = str(tmp_path / "dec")
    decoding.decode_corpus(c, echo_translator(), out, num_shards=2, progress=False)
    decoding.merge(out, str(tmp_path / "t.txt"), on_degenerate="reference", progress=False)
    assert open(tmp_path / "t.txt").read().splitlines() == ["w1 " + s for s in SOURCES[:5]]
    records = decoding.read_shards(out, decoding.read_manifest(out))
    assert [records[i]["ref"] for i in range(5)] == REFERENCES[:5]
    ref.write_text("w1\n")
    with pytest.raises(DistillationError, match=r"train.bpe.tgt has 1 lines but .*train.bpe.src has 5"):
        decoding.corpus_from_text(str(src), str(ref), d, d)


def test_decode_refuses_to_mix_different_runs(tmp_path):
    out = str(tmp_path / "dec")
    decoding.decode_corpus(corpus(), echo_translator(), out, num_shards=2, progress=False)
    with pytest.raises(DistillationError, match="num_shards"):
        decoding.decode_corpus(corpus(), echo_translator(), out, num_shards=3, progress=False)


def test_too_long_sources_are_recorded_empty(tmp_path):
    out = str(tmp_path / "dec")
    decoding.decode_corpus(corpus(), echo_translator(), out, max_source_len=3, progress=False)
    report = decoding.merge(out, str(tmp_path / "t.txt"), progress=False)
    too_long = [i for i, s in enumerate(SOURCES) if len(s.split()) + 1 > 3]
    assert report.degenerate["empty"] == too_long


def test_merge_checks_every_example_has_exactly_one_record(tmp_path):
    out = str(tmp_path / "dec")
    records = [{"id": i, "src": "w3", "ref": "w4", "hyps": [{"text": "w5", "score": 0.0}]} for i in range(4)]
    hand_made_decode(out, records, num_shards=2)
    write_shard(out, 1, 2, [records[2], records[2], records[3]])
    with pytest.raises(DistillationError, match="example 2 has a second record"):
        decoding.merge(out, str(tmp_path / "t.txt"), progress=False)
    write_shard(out, 1, 2, [records[3]])
    with pytest.raises(DistillationError, match=r"1 of 4 examples have no hypothesis \(first ids \[2\]\)"):
        decoding.merge(out, str(tmp_path / "t.txt"), progress=False)
    assert not os.path.exists(tmp_path / "t.txt")


# ---------------------------------------------------------------------------
# degenerate hypotheses and Seq-Inter
# ---------------------------------------------------------------------------


def test_degenerate_detection_on_hand_made_hypotheses():
    check = decoding.DegenerateCheck(len_a=2.0, len_b=3, max_order=4, min_repeats=4)
    src = "a b c d"
    assert check("", src) == "empty"
    assert check("   ", src) == "empty"
    assert check(" ".join(["x"] * 12), src) == "too_long"  # > 2 * 4 + 3 = 11
    assert check(" ".join(f"t{i}" for i in range(11)), src) is None  # exactly the limit
    assert check("x the the the the y", src) == "repetition"  # unigram x4
    assert check("▁a ▁b ▁a ▁b ▁a ▁b ▁a ▁b", src) == "repetition"  # bigram loop x4
    assert check("p q r s p q r s p q r s", "a " * 10) is None  # 4-gram only x3
    assert check("the the the house", src) is None  # x3 is fine
    assert check("▁Ein ▁Mann ▁fährt ▁Fahrrad .", src) is None
    assert decoding.repeated_ngram("a b c a b c a b c a b c".split(), max_order=3) == ("a", "b", "c")
    assert decoding.repeated_ngram("a b c a b c a b c a b c".split(), max_order=2) is None


def test_seq_inter_picks_the_max_bleu_hypothesis():
    reference = "▁the ▁cat ▁sat ▁on ▁the ▁mat"
    nbest = [
        "▁a ▁dog ▁stood ▁on ▁a ▁rug",        # teacher's best, far from the reference
        "▁the ▁cat ▁sat ▁on ▁the ▁mat ▁.",    # closest
        "▁the ▁cat ▁sat ▁on ▁a ▁rug",
        "",
    ]
    assert decoding.select_by_bleu(nbest, reference) == 1
    scores = [decoding.sentence_bleu(h, reference) for h in nbest]
    assert scores[1] == max(scores) and scores[1] > scores[2] > scores[0]
    # BLEU is computed on de-BPE'd text: the subword split does not matter
    assert decoding.remove_bpe("▁the ▁c at") == "the cat"
    assert decoding.remove_bpe("the c@@ at") == "the cat"
    assert decoding.sentence_bleu("▁the ▁c at ▁sat", "▁the ▁cat ▁sat") == pytest.approx(100.0)
    # ties go to the teacher's better-ranked hypothesis
    assert decoding.select_by_bleu(["▁x ▁y", "▁x ▁y"], "▁x ▁y") == 0


def test_merge_with_seq_inter_and_degenerate_actions(tmp_path):
    out = str(tmp_path / "dec")
    records = [
        {"id": 0, "src": "▁a ▁b", "ref": "▁the ▁cat ▁sat",
         "hyps": [{"text": "▁a ▁dog ▁sat", "score": -0.1}, {"text": "▁the ▁cat ▁sat", "score": -0.2}]},
        {"id": 1, "src": "▁a ▁b", "ref": "▁good ▁ref", "hyps": [{"text": "", "score": -0.1}]},
        {"id": 2, "src": "▁a", "ref": "▁ok", "hyps": [{"text": "▁la " * 6, "score": -0.1}]},
        {"id": 3, "src": "▁a ▁b ▁c", "ref": "▁fine ▁ref", "hyps": [{"text": "▁fine ▁hyp", "score": -0.1}]},
    ]
    hand_made_decode(out, records, num_shards=2)
    top = str(tmp_path / "top.txt")
    report = decoding.merge(out, top, progress=False)
    assert open(top).read().splitlines() == ["▁a ▁dog ▁sat", "", ("▁la " * 6).strip(), "▁fine ▁hyp"]
    assert report.degenerate == {"empty": [1], "too_long": [], "repetition": [2]}
    saved = json.load(open(top + ".report.json"))
    assert saved["degenerate"]["repetition"] == [2]

    inter = str(tmp_path / "inter.txt")
    report = decoding.merge(out, inter, select="bleu", on_degenerate="reference", progress=False)
    assert open(inter).read().splitlines() == ["▁the ▁cat ▁sat", "▁good ▁ref", "▁ok", "▁fine ▁hyp"]
    assert report.changed_by_selection == 1

    dropped = str(tmp_path / "drop.txt")
    decoding.merge(out, dropped, on_degenerate="drop", progress=False)
    assert open(dropped).read().splitlines() == ["▁a ▁dog ▁sat", "", "", "▁fine ▁hyp"]


def test_seq_inter_needs_references(tmp_path):
    out = str(tmp_path / "dec")
    hand_made_decode(out, [{"id": 0, "src": "▁a", "ref": None, "hyps": [{"text": "▁b", "score": 0}]}],
                     has_references=False)
    with pytest.raises(DistillationError, match="without references"):
        decoding.merge(out, str(tmp_path / "t.txt"), select="bleu", progress=False)


# ---------------------------------------------------------------------------
# binarize and the task's teacher-target side
# ---------------------------------------------------------------------------


def teacher_lines():
    return ["w1 " + s for s in SOURCES]


def write_teacher_subset(data, lines, tmp_path, name="train_teacher"):
    path = str(tmp_path / f"{name}.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))
    return decoding.binarize(path, data, name, "src", "tgt")


def test_binarize_writes_the_subset_with_the_data_dictionary(data_dir, tmp_path):
    prefix = write_teacher_subset(data_dir, teacher_lines(), tmp_path)
    assert prefix == os.path.join(data_dir, "train_teacher.src-tgt.tgt")
    assert os.path.exists(prefix + ".bin") and os.path.exists(prefix + ".idx")
    assert not [p for p in os.listdir(data_dir) if ".tmp" in p]
    task = make_task(data_dir, teacher_target_subset="train_teacher")
    task.load_dataset("train")
    d = task.target_dictionary
    ds = task.dataset("train")
    assert [d.string(ds.teacher_target[i]) for i in range(len(ds))] == teacher_lines()


def test_binarize_rejects_a_line_count_mismatch(data_dir, tmp_path):
    with pytest.raises(DistillationError) as err:
        write_teacher_subset(data_dir, teacher_lines()[:-1], tmp_path)
    message = str(err.value)
    assert "train_teacher.txt has 10 lines" in message
    assert os.path.join(data_dir, "train.src-tgt.src") + ".bin has 11" in message
    assert not os.path.exists(os.path.join(data_dir, "train_teacher.src-tgt.tgt.idx"))


def test_task_rejects_a_line_count_mismatch_naming_both_files(data_dir):
    d = toy.make_dictionary()
    binarize_lines(teacher_lines()[:7], os.path.join(data_dir, "train_teacher.src-tgt.tgt"), d)
    task = make_task(data_dir, teacher_target_subset="train_teacher")
    with pytest.raises(DistillationError) as err:
        task.load_dataset("train")
    message = str(err.value)
    assert "\n" not in message
    assert os.path.join(data_dir, "train_teacher.src-tgt.tgt.bin") + " has 7 lines" in message
    assert os.path.join(data_dir, "train.src-tgt.tgt.bin") + " has 11" in message


def test_task_names_a_missing_teacher_subset(data_dir):
    task = make_task(data_dir, teacher_target_subset="nope")
    with pytest.raises(DistillationError, match=r"nope\.src-tgt\.tgt\.bin/\.idx not found"):
        task.load_dataset("train")


def test_batches_carry_gold_and_teacher_targets(data_dir, tmp_path):
    write_teacher_subset(data_dir, teacher_lines(), tmp_path)
    task = make_task(data_dir, teacher_target_subset="train_teacher")
    task.load_dataset("train")
    task.load_dataset("valid")
    assert "teacher_target" not in first_batch(task, "valid")  # only the training split
    batch = first_batch(task, "train")
    d = task.target_dictionary
    pad, eos = d.pad(), d.eos()
    tt, tprev = batch["teacher_target"], batch["teacher_prev_output_tokens"]
    assert tt.shape == tprev.shape and tt.size(0) == batch["target"].size(0)
    for row, sid in enumerate(batch["id"].tolist()):
        assert d.string(tt[row][tt[row].ne(pad)]) == teacher_lines()[sid]
        gold = batch["target"][row]
        assert d.string(gold[gold.ne(pad)]) == REFERENCES[sid]
        n = int(tt[row].ne(pad).sum())
        assert tt[row, n - 1] == eos and (tt[row, n:] == pad).all()  # right-padded, ends in EOS
        assert tprev[row, 0] == eos and torch.equal(tprev[row, 1:n], tt[row, : n - 1])
    assert batch["teacher_ntokens"] == int(tt.ne(pad).sum())
    assert batch["ntokens"] == int(batch["target"].ne(pad).sum())
    assert torch.equal(batch["net_input"]["prev_output_tokens"][:, 0], torch.full_like(batch["id"], eos))


def test_teacher_target_sizes_count_for_batching_and_filtering():
    d = toy.make_dictionary()
    t = lambda *ids: torch.tensor(list(ids) + [d.eos()])  # noqa: E731
    src = [t(5, 6), t(5), t(7, 8, 9)]
    tgt = [t(5), t(6), t(7)]
    teacher = [t(5, 6, 7, 8, 9, 10), torch.tensor([d.eos()]), t(9)]

    class Listed(list):
        sizes = np.array([len(x) for x in teacher])

    pair = LanguagePairDataset(src, [len(s) for s in src], d, tgt, [len(x) for x in tgt], d, shuffle=False)
    ds = TeacherTargetDataset(pair, Listed(teacher))
    assert ds.num_tokens(0) == 7 and list(ds.num_tokens_vec(np.arange(3))) == [7, 2, 4]
    assert ds.size(0) == (3, 7)
    indices, ignored = ds.filter_indices_by_size(np.arange(3), (10, 5))
    assert list(indices) == [2]  # 0: teacher target too long, 1: empty teacher target (dropped)
    assert list(ignored) == [0]


def test_plain_and_kd_criterions_work_with_and_without_the_teacher_side(data_dir, tmp_path):
    write_teacher_subset(data_dir, teacher_lines(), tmp_path)
    for subset in (None, "train_teacher"):
        task = make_task(data_dir, teacher_target_subset=subset)
        task.load_dataset("train")
        batch = first_batch(task)
        model = toy.make_model(task)
        teacher = toy.make_teacher(task)
        ls = LabelSmoothedCrossEntropyCriterion(task, False, 0.1)
        loss, sample_size, _ = ls(model, batch)
        assert sample_size == batch["ntokens"] and torch.isfinite(loss)
        word = WordKDCriterion(task, WordKDConfig(sentence_avg=False))
        loss, _, log = word(model, batch, teacher=teacher)
        assert torch.isfinite(loss) and "kd_loss" in log
        loss.backward()


# ---------------------------------------------------------------------------
# the seq_kd criterion
# ---------------------------------------------------------------------------


def with_teacher_target(sample, teacher_sample=None):
    """``sample`` plus the target side of ``teacher_sample`` (itself by default) as teacher target."""
    teacher_sample = teacher_sample or sample
    sample = dict(sample)
    sample["teacher_target"] = teacher_sample["target"]
    sample["teacher_prev_output_tokens"] = teacher_sample["net_input"]["prev_output_tokens"]
    sample["teacher_ntokens"] = teacher_sample["ntokens"]
    return sample


def grads(model):
    return [p.grad.clone() for p in model.parameters()]


def test_seq_kd_on_gold_teacher_targets_equals_label_smoothed_cross_entropy():
    task = toy.make_task()
    sample = with_teacher_target(toy.make_sample(task, batch_size=4, seed=3))
    model = toy.make_model(task, dropout=0.0)
    model.train()

    reference = LabelSmoothedCrossEntropyCriterion(task, False, 0.1)
    ref_loss, ref_size, ref_log = reference(model, sample)
    ref_loss.backward()
    ref_grads = grads(model)
    model.zero_grad()

    criterion = seq_kd(task)
    assert criterion.needs_teacher is False and criterion.alpha == 0.0
    loss, size, log = criterion(model, sample)
    loss.backward()
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    assert size == ref_size == sample["ntokens"]
    assert log["nll_loss"].item() == pytest.approx(ref_log["nll_loss"].item(), rel=1e-6)
    for g, r in zip(grads(model), ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)


def test_seq_kd_trains_on_the_teacher_target_and_adds_the_gold_term():
    task = toy.make_task()
    gold = toy.make_sample(task, batch_size=3, seed=1)
    other = toy.make_sample(task, batch_size=3, seed=2)
    sample = with_teacher_target(gold, other)
    model = toy.make_model(task)
    model.train()
    pad = task.target_dictionary.pad()

    def ls(s):
        logits = model(**dict(s["net_input"]))[0]
        return losses.label_smoothed_nll(logits, s["target"], pad, 0.1)

    # same source, teacher's targets
    teacher_side = dict(gold, target=other["target"],
                        net_input=dict(gold["net_input"], prev_output_tokens=other["net_input"]["prev_output_tokens"]))
    teacher_loss, teacher_nll = ls(teacher_side)
    gold_loss, gold_nll = ls(gold)

    loss, size, log = seq_kd(task)(model, sample)
    assert loss.item() == pytest.approx(teacher_loss.item(), rel=1e-6)
    assert size == other["ntokens"] and log["ntokens"] == other["ntokens"]
    assert "gold_nll_loss" not in log

    loss, size, log = seq_kd(task, seq_kd_gold_weight=0.5)(model, sample)
    assert loss.item() == pytest.approx(teacher_loss.item() + 0.5 * gold_loss.item(), rel=1e-6)
    assert log["nll_loss"].item() == pytest.approx(teacher_nll.item(), rel=1e-6)
    assert log["gold_nll_loss"].item() == pytest.approx(gold_nll.item(), rel=1e-6)
    assert log["gold_ntokens"] == gold["ntokens"]


def test_seq_kd_with_word_kd_uses_the_teacher_on_teacher_prefixes():
    task = toy.make_task()
    gold = toy.make_sample(task, batch_size=3, seed=1)
    other = toy.make_sample(task, batch_size=3, seed=2)
    sample = with_teacher_target(gold, other)
    model, teacher = toy.make_model(task), toy.make_teacher(task)
    criterion = seq_kd(task, kd_alpha=0.3)
    assert criterion.needs_teacher is True
    loss, _, log = criterion(model, sample, teacher=teacher)

    net_input = dict(gold["net_input"], prev_output_tokens=other["net_input"]["prev_output_tokens"])
    expected, _, kd = losses.word_kd_loss(
        model(**net_input)[0], losses.DenseTeacher.from_logits(teacher(net_input)), other["target"], task.target_dictionary.pad(),
        epsilon=0.1, alpha=0.3,
    )
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert log["kd_loss"].item() == pytest.approx(kd.item(), rel=1e-6)
    assert 0 <= log["kd_agree"] <= log["kd_tokens"] == other["ntokens"]
    with pytest.raises(DistillationError, match="needs a live teacher"):
        criterion(model, sample)


def test_seq_kd_validation_is_gold_label_smoothed_nll():
    task = toy.make_task()
    sample = toy.make_sample(task)
    model = toy.make_model(task)
    model.eval()
    loss, size, log = seq_kd(task, seq_kd_gold_weight=1.0)(model, sample)
    ref_loss, ref_size, _ = LabelSmoothedCrossEntropyCriterion(task, False, 0.1)(model, sample)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6) and size == ref_size
    assert "kd_loss" not in log and "gold_nll_loss" not in log
    model.train()
    with pytest.raises(DistillationError, match="no teacher_target"):
        seq_kd(task)(model, sample)


def test_seq_kd_reduce_metrics_logs_both_losses():
    from fairseq.logging import metrics

    logs = [
        {"loss": 10.0, "nll_loss": 8.0, "ntokens": 4, "nsentences": 1, "sample_size": 4,
         "gold_nll_loss": 9.0, "gold_ntokens": 5},
        {"loss": 6.0, "nll_loss": 4.0, "ntokens": 4, "nsentences": 1, "sample_size": 4,
         "gold_nll_loss": 6.0, "gold_ntokens": 5},
    ]
    with metrics.aggregate() as agg:
        SeqKDCriterion.reduce_metrics(logs)
    values = agg.get_smoothed_values()
    assert values["nll_loss"] == pytest.approx(12 / 8 / np.log(2), abs=1e-3)
    assert values["gold_nll_loss"] == pytest.approx(15 / 10 / np.log(2), abs=1e-3)


def test_task_builds_seq_kd_without_a_live_teacher(data_dir, tmp_path):
    write_teacher_subset(data_dir, teacher_lines(), tmp_path)
    def criterion_cfg(**kwargs):
        cfg = OmegaConf.structured(SeqKDConfig(sentence_avg=False, **kwargs))
        cfg._name = "seq_kd"
        return cfg

    cfg = criterion_cfg()
    task = make_task(data_dir)
    with pytest.raises(DistillationError, match="--teacher-target-subset NAME"):
        task.build_criterion(cfg)
    task = make_task(data_dir, teacher_target_subset="train_teacher")
    criterion = task.build_criterion(cfg)
    assert task.teacher is None and task.criterion_kwargs(criterion, None, None) == {}
    assert isinstance(criterion, SeqKDCriterion) and criterion.alpha == 0.0
    with pytest.raises(DistillationError, match="--teacher-path"):
        task.build_criterion(criterion_cfg(kd_alpha=0.5))


def test_cli_errors_are_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "fairseq_kd.decoding", "merge", "--out-dir", str(tmp_path / "nothing"),
         "--output", str(tmp_path / "t.txt")],
        capture_output=True, text=True, cwd=REPO,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("fairseq-kd: error: ")
    assert "manifest.json not found" in proc.stderr and "Traceback" not in proc.stderr
