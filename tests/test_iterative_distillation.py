"""``iterative_distillation``: bitext mixed with source-only text, and the
round pipeline ``scripts/iterate.sh``.

Unit tests run the task on in-memory toy batches (tests/toy.py) and check
values against independent computations: the greedy prefixes against a plain
argmax loop, the loss against the criterion called on hand-built batches.
The end-to-end tests (marked ``e2e``) run the pipeline on the Multi30k slice
with source-only lines taken from the rest of its training file, kill it in
the middle of round 2 and resume it.
"""

import gzip
import math
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from fairseq.criterions.label_smoothed_cross_entropy import LabelSmoothedCrossEntropyCriterion
from fairseq.data import LanguagePairDataset, ListDataset
from fairseq.logging import metrics

from fairseq_kd import losses
from fairseq_kd.criterions.self_evolution_kd import SelfEvolutionKDConfig, SelfEvolutionKDCriterion
from fairseq_kd.criterions.seq_kd import SeqKDConfig, SeqKDCriterion
from fairseq_kd.criterions.tie_kd import TieKDConfig, TieKDCriterion
from fairseq_kd.criterions.word_kd import WordKDConfig, WordKDCriterion
from fairseq_kd.data.mixed_source import MixedSourceDataset, source_only_dataset, with_prefixes
from fairseq_kd.errors import DistillationError
from fairseq_kd.tasks.iterative_distillation import IterativeDistillationConfig, IterativeDistillationTask
from fairseq_kd.tasks.source_only import check_source_only_criterion
from fairseq_kd.unlabeled import binarize_source, prepare_unlabeled
from tests import cli, toy

MAX_LEN = 6  # greedy prefixes: at most 6 tokens + EOS (prefix_max_len_a = 0)


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def make_task(prefix_source="teacher", **overrides):
    d = toy.make_dictionary()
    options = dict(
        data="toy", source_lang="src", target_lang="tgt", unlabeled_subset="mono",
        prefix_source=prefix_source, prefix_max_len_a=0.0, prefix_max_len_b=MAX_LEN,
    )
    if prefix_source == "offline":
        options["unlabeled_target_subset"] = "mono_labels"
    if "data" in overrides:  # loading files: the values fairseq's config interpolation would give
        options.update(train_subset="train", dataset_impl="mmap", required_seq_len_multiple=1)
    options.update(overrides)
    return IterativeDistillationTask(IterativeDistillationConfig(**options), d, d)


def sentences(d, n, seed, min_len=2, max_len=6):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        body = torch.randint(d.nspecial, len(d), (length,), generator=g)
        out.append(torch.cat([body, torch.tensor([d.eos()])]))
    return out


def bitext_dataset(d, n=4, seed=0):
    src, tgt = sentences(d, n, seed), sentences(d, n, seed + 100)
    return LanguagePairDataset(src, [len(s) for s in src], d, tgt, [len(t) for t in tgt], d, shuffle=False)


def source_dataset(d, n=3, seed=50):
    src = sentences(d, n, seed, min_len=3, max_len=8)
    return LanguagePairDataset(src, [len(s) for s in src], d, shuffle=False)


def labels_for(d, n, seed=200):
    rows = sentences(d, n, seed)
    return ListDataset(rows, np.array([len(r) for r in rows]))


def mixed(task, n_bitext=4, n_source=3, labels=None):
    d = task.target_dictionary
    bitext = bitext_dataset(d, n_bitext) if n_bitext else None
    source = source_dataset(d, n_source)
    if bitext is None:  # a bitext part with no example
        bitext = LanguagePairDataset([], np.array([], dtype=np.int64), d, [], np.array([], dtype=np.int64), d, shuffle=False)
    return MixedSourceDataset(bitext, source_only_dataset(source, labels, d))


def collate_all(dataset):
    return dataset.collater([dataset[i] for i in range(len(dataset))])


def reference_greedy(decode, src_tokens, d, max_len=MAX_LEN, min_len=1):
    """Greedy decoding of one unpadded source by full re-decoding (no
    incremental state, no SequenceGenerator): ``decode(src, prev)`` returns
    log-probs ``[1, T, V]``; pad is never chosen, EOS not before ``min_len``
    tokens, and forced after ``max_len``."""
    prev = torch.tensor([[d.eos()]])
    out = []
    for step in range(max_len + 1):
        lprobs = decode(src_tokens, prev)[0, -1].clone()
        lprobs[d.pad()] = -math.inf
        if step < min_len:
            lprobs[d.eos()] = -math.inf
        token = d.eos() if step == max_len else int(lprobs.argmax())
        out.append(token)
        if token == d.eos():
            break
        prev = torch.cat([prev, torch.tensor([[token]])], dim=1)
    return torch.tensor(out)


def teacher_decoder(teacher):
    def decode(src, prev):
        net_input = {"src_tokens": src.unsqueeze(0), "src_lengths": torch.tensor([src.numel()])}
        return teacher(net_input, prev)
    return decode


def student_decoder(model):
    def decode(src, prev):
        with torch.no_grad():
            logits = model(src.unsqueeze(0), torch.tensor([src.numel()]), prev)[0]
        return torch.log_softmax(logits.float(), dim=-1)
    return decode


def pair_batch(d, sources, targets):
    """The batch fairseq collates from these (source, target) pairs alone."""
    ds = LanguagePairDataset(
        sources, [len(s) for s in sources], d, targets, [len(t) for t in targets], d, shuffle=False
    )
    return ds.collater([ds[i] for i in range(len(ds))])


class BackwardOnly:
    """The part of fairseq's optimizer that ``train_step`` uses."""

    def backward(self, loss):
        loss.backward()


def gradients(model):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


def word_kd(task, **overrides):
    return WordKDCriterion(task, WordKDConfig(sentence_avg=False, **overrides))


def kd_sum(model, teacher, batch, pad):
    student_logits = model(**batch["net_input"])[0]
    return losses.kl_divergence(student_logits, teacher(batch["net_input"]), batch["target"], pad)


# ---------------------------------------------------------------------------
# the mixed dataset and the batch surgery
# ---------------------------------------------------------------------------


def test_mixed_batch_marks_the_rows_with_a_reference():
    task = make_task()
    dataset = mixed(task)
    batch = collate_all(dataset)
    pad = task.target_dictionary.pad()
    # fairseq sorts a batch by source length: the marker follows the ids
    assert batch["has_reference"].tolist() == [i < 4 for i in batch["id"].tolist()]
    gold = batch["target"][batch["has_reference"]]
    assert batch["ntokens"] == int(gold.ne(pad).sum())
    # source-only rows without labels: placeholder [EOS] targets
    placeholders = batch["target"][~batch["has_reference"]]
    assert placeholders[:, 0].eq(task.target_dictionary.eos()).all()
    assert placeholders[:, 1:].eq(pad).all()
    assert sorted(dataset.ordered_indices().tolist()) == list(range(7))


def test_select_rows_is_the_batch_of_those_examples_alone():
    task = make_task("offline")
    d = task.target_dictionary
    labels = labels_for(d, 3)
    dataset = mixed(task, labels=labels)
    batch = collate_all(dataset)
    bitext, source_only = task.split_batch(batch)
    bd, sd = bitext_dataset(d), source_dataset(d)
    expected_bitext = pair_batch(d, [bd.src[i] for i in range(4)], [bd.tgt[i] for i in range(4)])
    expected_source = pair_batch(d, [sd.src[i] for i in range(3)], [labels[i] for i in range(3)])
    for got, expected, offset in ((bitext, expected_bitext, 0), (source_only, expected_source, 4)):
        assert (got["id"] - offset).tolist() == expected["id"].tolist()
        for key in ("src_tokens", "src_lengths", "prev_output_tokens"):
            assert torch.equal(got["net_input"][key], expected["net_input"][key]), key
        assert torch.equal(got["target"], expected["target"])
        assert got["ntokens"] == expected["ntokens"] and got["nsentences"] == expected["nsentences"]
        assert "has_reference" not in got


def test_with_prefixes_builds_teacher_forcing_inputs():
    d = toy.make_dictionary()
    sample = pair_batch(d, sentences(d, 2, 0), sentences(d, 2, 1))
    prefixes = [torch.tensor([5, 6, d.eos()]), torch.tensor([7, d.eos()])]
    out = with_prefixes(sample, prefixes, d.pad(), d.eos())
    assert out["target"].tolist() == [[5, 6, d.eos()], [7, d.eos(), d.pad()]]
    assert out["net_input"]["prev_output_tokens"].tolist() == [[d.eos(), 5, 6], [d.eos(), 7, d.pad()]]
    assert out["ntokens"] == 5
    assert sample["target"].tolist() != out["target"].tolist()  # the input is not modified
    with pytest.raises(ValueError):
        with_prefixes(sample, [torch.tensor([5, 6]), torch.tensor([7, d.eos()])], d.pad(), d.eos())


def test_size_filter_and_empty_labels():
    task = make_task("offline")
    d = task.target_dictionary
    rows = [torch.tensor([d.eos()]), torch.tensor([5, d.eos()]), torch.tensor([6, 7, d.eos()])]
    dataset = mixed(task, labels=ListDataset(rows, np.array([1, 2, 3])))
    kept, ignored = dataset.filter_indices_by_size(np.arange(len(dataset)), (64, 64))
    assert 4 not in kept.tolist() and len(kept) == 6  # the empty label (EOS only) is left out
    # without labels a source-only example is filtered on its source only
    dataset = mixed(make_task())
    kept, ignored = dataset.filter_indices_by_size(np.arange(len(dataset)), (4, 1))
    too_long_sources = [i for i in range(len(dataset)) if dataset.src_sizes[i] > 4]
    assert set(ignored) >= set(too_long_sources)
    assert all(i >= 4 for i in kept.tolist())  # bitext targets (> 1 token) are all too long


# ---------------------------------------------------------------------------
# the loss of a mixed batch
# ---------------------------------------------------------------------------


def test_teacher_prefixes_are_the_teachers_greedy_translations():
    task = make_task("teacher")
    d = task.target_dictionary
    task.teacher = toy.make_teacher(task)
    model = toy.make_model(task)
    _, source_only = task.split_batch(collate_all(mixed(task)))
    prefixes = task.generate_prefixes(source_only, model)
    decode = teacher_decoder(task.teacher)
    for row, prefix in zip(source_only["net_input"]["src_tokens"], prefixes):
        src = row[row.ne(d.pad())]
        assert prefix.tolist() == reference_greedy(decode, src, d).tolist()


def test_student_prefixes_are_decoded_in_eval_mode():
    task = make_task("student")
    d = task.target_dictionary
    task.teacher = toy.make_teacher(task)
    model = toy.make_model(task, dropout=0.5)
    model.train()
    _, source_only = task.split_batch(collate_all(mixed(task)))
    prefixes = task.generate_prefixes(source_only, model)
    assert model.training  # put back in training mode
    model.eval()
    decode = student_decoder(model)
    for row, prefix in zip(source_only["net_input"]["src_tokens"], prefixes):
        src = row[row.ne(d.pad())]
        assert prefix.tolist() == reference_greedy(decode, src, d).tolist()
    # twice the same: no dropout in the decoding
    model.train()
    again = task.generate_prefixes(source_only, model)
    assert [p.tolist() for p in again] == [p.tolist() for p in prefixes]


@pytest.mark.parametrize("alpha,weight", [(0.5, 1.0), (0.0, 0.3)])
def test_loss_is_criterion_on_bitext_plus_kd_on_teacher_prefixes(alpha, weight):
    """Bitext rows: word_kd as usual; source-only rows: word_kd's KD term on
    the teacher's greedy prefixes, times --unlabeled-weight, and no NLL."""
    task = make_task("teacher", unlabeled_weight=weight)
    d = task.target_dictionary
    task.teacher = teacher = toy.make_teacher(task)
    model = toy.make_model(task)
    criterion = word_kd(task, kd_alpha=alpha)
    dataset = mixed(task)
    sample = collate_all(dataset)

    model.zero_grad()
    loss, sample_size, log = task.train_step(sample, model, criterion, BackwardOnly(), update_num=0)
    got_grads = gradients(model)

    # independent expectation, from batches built by hand
    bd, sd = dataset.bitext, dataset.source_only
    bitext = pair_batch(d, [bd.src[i] for i in range(4)], [bd.tgt[i] for i in range(4)])
    decode = teacher_decoder(teacher)
    sources = [sd.src[i] for i in range(3)]
    prefix_batch = pair_batch(d, sources, [reference_greedy(decode, s, d) for s in sources])
    model.zero_grad()
    b_loss, b_size, b_log = word_kd(task, kd_alpha=alpha)(model, bitext, teacher=teacher)
    u_kd = kd_sum(model, teacher, prefix_batch, d.pad())
    expected = b_loss + weight * u_kd
    expected.backward()
    expected_grads = gradients(model)

    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-5, atol=1e-5)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
    assert sample_size == bitext["ntokens"] + prefix_batch["ntokens"]
    # gold metrics are bitext-only; the source-only KD is logged apart
    assert log["ntokens"] == bitext["ntokens"]
    torch.testing.assert_close(log["nll_loss"], b_log["nll_loss"])
    torch.testing.assert_close(log["kd_loss"], b_log["kd_loss"])
    torch.testing.assert_close(log["unl_kd_loss"], u_kd.detach(), rtol=1e-5, atol=1e-5)
    assert log["unl_ntokens"] == prefix_batch["ntokens"]
    assert log["nsentences"] == 7
    assert criterion.alpha == alpha  # untouched by the source-only call


def test_offline_labels_are_the_prefixes(monkeypatch):
    task = make_task("offline")
    d = task.target_dictionary
    task.teacher = teacher = toy.make_teacher(task)
    model = toy.make_model(task)
    labels = labels_for(d, 3)
    dataset = mixed(task, labels=labels)
    monkeypatch.setattr(task, "generate_prefixes", lambda *a: pytest.fail("offline labels are not decoded"))
    loss, sample_size, log = task.mixed_loss(collate_all(dataset), model, word_kd(task), teacher=teacher)
    sd = dataset.source_only
    label_batch = pair_batch(d, [sd.src[i] for i in range(3)], [labels[i] for i in range(3)])
    b_loss, _, _ = word_kd(task)(model, pair_batch(
        d, [dataset.bitext.src[i] for i in range(4)], [dataset.bitext.tgt[i] for i in range(4)]
    ), teacher=teacher)
    torch.testing.assert_close(loss, b_loss + kd_sum(model, teacher, label_batch, d.pad()), rtol=1e-5, atol=1e-5)
    assert log["unl_ntokens"] == label_batch["ntokens"]


def test_tie_kd_on_source_only_rows_is_its_distillation_term():
    """Any KD criterion works: tie_kd's KL + ranking over its in-batch
    iterations, computed on the labels, with the NLL weight zeroed."""
    task = make_task("offline")
    d = task.target_dictionary
    task.teacher = teacher = toy.make_teacher(task)
    model = toy.make_model(task)
    labels = labels_for(d, 3)
    dataset = mixed(task, n_bitext=0, labels=labels)
    criterion = TieKDCriterion(task, TieKDConfig(sentence_avg=False, kd_alpha=0.5, tie_iterations=2))
    loss, sample_size, log = task.mixed_loss(collate_all(dataset), model, criterion, teacher=teacher)
    sd = dataset.source_only
    label_batch = pair_batch(d, [sd.src[i] for i in range(3)], [labels[i] for i in range(3)])
    kd_only = TieKDCriterion(task, TieKDConfig(sentence_avg=False, kd_alpha=1.0, tie_iterations=2))
    expected, expected_size, expected_log = kd_only(model, label_batch, teacher=teacher)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    assert sample_size == expected_size
    assert log["ntokens"] == 0 and log["unl_ntokens"] == label_batch["ntokens"]
    torch.testing.assert_close(log["unl_rank_loss"], expected_log["rank_loss"])
    assert criterion.alpha == 0.5


def test_update_of_source_only_rows_reduces_without_gold_tokens():
    task = make_task("teacher")
    task.teacher = toy.make_teacher(task)
    model = toy.make_model(task)
    criterion = word_kd(task)
    _, _, log = task.mixed_loss(collate_all(mixed(task, n_bitext=0)), model, criterion, teacher=task.teacher)
    assert log["ntokens"] == 0 and log["sample_size"] == log["unl_ntokens"] > 0
    with metrics.aggregate(new_root=True) as agg:
        task.reduce_metrics([log], criterion)
    values = agg.get_smoothed_values()
    assert values["loss"] == pytest.approx(float(log["loss"]) / log["sample_size"] / math.log(2), abs=1e-3)
    assert values["unl_kd_loss"] == pytest.approx(float(log["unl_kd_loss"]) / log["unl_ntokens"], abs=1e-4)
    assert "nll_loss" not in values
    # a mixed update logs the gold metrics as usual next to the unl_ ones
    _, _, mixed_log = task.mixed_loss(collate_all(mixed(task)), model, criterion, teacher=task.teacher)
    with metrics.aggregate(new_root=True) as agg:
        task.reduce_metrics([mixed_log, log], criterion)
    values = agg.get_smoothed_values()
    assert values["nll_loss"] == pytest.approx(float(mixed_log["nll_loss"]) / mixed_log["ntokens"] / math.log(2), abs=1e-3)
    assert values["unl_wpb"] == mixed_log["unl_ntokens"] + log["unl_ntokens"]
    assert "unl_kd_top1_agree" in values


def test_batch_without_marker_trains_like_distillation_translation():
    task = make_task("teacher")
    task.teacher = teacher = toy.make_teacher(task)
    model = toy.make_model(task)
    sample = toy.make_sample(task)
    loss, size, log = task.train_step(sample, model, word_kd(task), BackwardOnly(), update_num=0)
    expected, expected_size, _ = word_kd(task)(model, sample, teacher=teacher)
    torch.testing.assert_close(loss, expected)
    assert size == expected_size and "unl_ntokens" not in log


def every_kd_criterion(task):
    """Every criterion that distils source-only rows, with their extra gold terms switched on."""
    from fairseq_kd.criterions.hybrid_gated_kd import HybridGatedKDConfig, HybridGatedKDCriterion
    from fairseq_kd.criterions.on_policy_kd import OnPolicyKDConfig, OnPolicyKDCriterion
    from fairseq_kd.criterions.selective_kd import SelectiveKDConfig, SelectiveKDCriterion

    base = dict(sentence_avg=False, kd_alpha=0.5)
    return {
        "word_kd": word_kd(task, kd_alpha=0.5),
        "on_policy_kd": OnPolicyKDCriterion(task, OnPolicyKDConfig(
            **base, seed=1, on_policy_lambda=0.5, on_policy_unit="sentence", on_policy_generation="greedy")),
        "selective_kd": SelectiveKDCriterion(task, SelectiveKDConfig(
            **base, selective_strategy="global_level", selective_ratio=0.5)),
        "self_evolution_kd": SelfEvolutionKDCriterion(task, SelfEvolutionKDConfig(**base, sekd_nll_weight=0.3)),
        "tie_kd": TieKDCriterion(task, TieKDConfig(**base, tie_iterations=2)),
        "hybrid_gated_kd": HybridGatedKDCriterion(task, HybridGatedKDConfig(
            **base, gate="fixed", gate_fixed_value=0.5)),
    }


def distillation_term(name, log):
    """What the source-only rows' loss must be: the criterion's distillation term alone (at tau = 1)."""
    if name == "tie_kd":
        return log["kd_loss"] + log["rank_loss"]
    if name == "hybrid_gated_kd":
        return 0.5 * log["tok_loss"] + 0.5 * log["sent_loss"]
    return log["kd_loss"]


@pytest.mark.parametrize("name", ["word_kd", "on_policy_kd", "selective_kd", "self_evolution_kd", "tie_kd",
                                  "hybrid_gated_kd"])
def test_every_criterion_on_mixed_batches_distils_source_only_rows_without_gold_terms(name):
    """On the task's mixed batches every criterion's source-only loss is its distillation term alone (no
    NLL of a prefix: selective_kd's LS + a*KD and self_evolution_kd's extra NLL included), at
    --unlabeled-weight; the per-pass backward (tie_kd, hybrid_gated_kd) gives the one-graph gradients."""
    weight = 0.7
    task = make_task("teacher", unlabeled_weight=weight)
    task.teacher = toy.make_teacher(task)
    model = toy.make_model(task)
    sample = collate_all(mixed(task))
    criterion = every_kd_criterion(task)[name]
    state = criterion.kd_state_dict()
    results = []
    for per_pass in (True, False):
        criterion.load_kd_state_dict(state)
        if not per_pass:
            criterion.backward_per_pass = False
        model.zero_grad()
        loss, sample_size, log = task.train_step(sample, model, criterion, BackwardOnly(), update_num=0)
        criterion.__dict__.pop("backward_per_pass", None)
        results.append((loss.detach(), log, gradients(model)))
        unlabeled = {k[len("unl_"):]: v for k, v in log.items() if k.startswith("unl_")}
        torch.testing.assert_close(torch.as_tensor(unlabeled["loss"], dtype=torch.float32),
                                   torch.as_tensor(distillation_term(name, unlabeled), dtype=torch.float32),
                                   rtol=1e-5, atol=1e-6)
        assert float(unlabeled["loss"]) > 0 and unlabeled["ntokens"] > 0
        if name == "selective_kd":  # the queue holds the bitext tokens' difficulties only
            assert criterion.history.numel() == log["ntokens"]
    (loss_a, log_a, grads_a), (loss_b, log_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in grads_a)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------
# checks: criterion, flags, files
# ---------------------------------------------------------------------------


def test_criterions_without_a_source_only_kd_term_are_refused():
    task = make_task()
    ls = LabelSmoothedCrossEntropyCriterion(task, 0.0, 0.1)
    with pytest.raises(DistillationError, match="no distillation term"):
        check_source_only_criterion(ls, "label_smoothed_cross_entropy")
    with pytest.raises(DistillationError, match="no distillation term"):  # seq_kd without a live teacher
        check_source_only_criterion(SeqKDCriterion(task, SeqKDConfig(sentence_avg=False)), "seq_kd")
    with pytest.raises(DistillationError, match="teacher targets"):
        check_source_only_criterion(SeqKDCriterion(task, SeqKDConfig(sentence_avg=False, kd_alpha=0.5)), "seq_kd")
    # an extra gold term is the criterion's to drop on source-only rows (reference=False)
    sekd = SelfEvolutionKDCriterion(task, SelfEvolutionKDConfig(sentence_avg=False, sekd_nll_weight=0.2))
    for ok in (word_kd(task), sekd, SelfEvolutionKDCriterion(task, SelfEvolutionKDConfig(sentence_avg=False)),
               TieKDCriterion(task, TieKDConfig(sentence_avg=False))):
        check_source_only_criterion(ok, "ok")


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (dict(prefix_source="offline", unlabeled_target_subset=None), "--unlabeled-target-subset NAME"),
        (dict(unlabeled_target_subset="labels"), "only read with --prefix-source offline"),
        (dict(unlabeled_subset=None, prefix_source="offline"), "pass --unlabeled-subset"),
        (dict(unlabeled_weight=-1.0), "--unlabeled-weight"),
        (dict(prefix_max_len_b=0), "--prefix-max-len-b"),
        (dict(teacher_target_subset="train_teacher"), "--teacher-target-subset cannot"),
    ],
)
def test_bad_flags(overrides, needle):
    with pytest.raises(DistillationError) as info:
        make_task(**overrides)
    assert needle in str(info.value)


def _write_split(data, split, lang_pair, lang, lines):
    text = os.path.join(data, f"{split}.txt.{lang}")
    with open(text, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    binarize_source(text, os.path.join(data, "dict.src.txt"), os.path.join(data, f"{split}.{lang_pair}.{lang}"))


@pytest.fixture
def toy_data(tmp_path):
    data = tmp_path / "bin"
    data.mkdir()
    d = toy.make_dictionary()
    for lang in ("src", "tgt"):
        d.save(str(data / f"dict.{lang}.txt"))
    bitext = [" ".join(f"w{(i + j) % 20}" for j in range(2 + i % 3)) for i in range(5)]
    _write_split(str(data), "train", "src-tgt", "src", bitext)
    _write_split(str(data), "train", "src-tgt", "tgt", bitext[::-1])
    mono = tmp_path / "mono.txt"
    mono.write_text("w1 w2 w3\n\nw4 w5\nw6\n", encoding="utf-8")
    return str(data), str(mono)


def test_load_dataset_mixes_the_source_only_split(toy_data, tmp_path):
    data, mono = toy_data
    dest = str(tmp_path / "work_data")
    assert prepare_unlabeled(data, mono, dest, name="mono", progress=False) == 3  # the empty line is dropped
    assert os.path.islink(os.path.join(dest, "train.src-tgt.src.bin"))
    assert not os.path.exists(os.path.join(data, "mono.src-tgt.src.bin"))  # --data is not written to
    task = make_task("teacher", data=dest)
    task.load_dataset("train")
    dataset = task.datasets["train"]
    assert isinstance(dataset, MixedSourceDataset) and dataset.num_bitext == 5 and len(dataset) == 8
    batch = collate_all(dataset)
    assert int((~batch["has_reference"]).sum()) == 3

    # offline labels: binarized next to the split, line counts checked
    _write_split(dest, "mono_labels", "src-tgt", "tgt", ["w7 w8", "w9"])
    task = make_task("offline", data=dest)
    with pytest.raises(DistillationError) as info:
        task.load_dataset("train")
    assert "mono_labels.src-tgt.tgt.bin have 2 lines" in str(info.value) and "has 3" in str(info.value)
    _write_split(dest, "mono_labels", "src-tgt", "tgt", ["w7 w8", "w9", "w10 w11 w12"])
    task.load_dataset("train")
    assert task.datasets["train"].has_labels

    with pytest.raises(DistillationError, match=r"absent\.src-tgt\.src\.bin/\.idx not found"):
        make_task("teacher", data=dest, unlabeled_subset="absent").load_dataset("train")
    with pytest.raises(DistillationError, match="not found"):
        prepare_unlabeled(data, str(tmp_path / "nothing.txt"), dest, progress=False)


# ---------------------------------------------------------------------------
# end to end: fairseq-train on the fly, and the round pipeline
# ---------------------------------------------------------------------------

PIPELINE = os.path.join(cli.REPO, "scripts", "iterate.sh")
SOURCE_ONLY_LINES = (1500, 1700)  # lines of train.en.gz after the slice's 1500 bitext pairs


@pytest.fixture(scope="module")
def source_only_text(prepared, tmp_path_factory):
    """English training sentences of Multi30k that are not in the slice."""
    start, end = SOURCE_ONLY_LINES
    with gzip.open(os.path.join(cli.SHARED_DATA, "multi30k_en_de", "train.en.gz"), "rt", encoding="utf-8") as f:
        lines = [line for i, line in enumerate(f) if start <= i < end]
    with open(os.path.join(prepared.raw, "train.en"), encoding="utf-8") as f:
        bitext = set(f)
    lines = [line for line in lines if line not in bitext]
    path = str(tmp_path_factory.mktemp("source_only") / "mono.en")
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(lines)
    return path, len(lines)


@pytest.mark.e2e
def test_fairseq_train_with_on_policy_prefixes(prepared, teacher_ckpt, source_only_text, tmp_path):
    mono, n = source_only_text
    data = str(tmp_path / "data")
    assert prepare_unlabeled(prepared.bin, mono, data, spm_model=prepared.spm_model, progress=False) == n
    common = ["--user-dir", cli.USER_DIR, "--task", "iterative_distillation", "--unlabeled-subset",
              "unlabeled", "--teacher-path", teacher_ckpt, "--max-update", "4", "--log-interval", "1"]
    proc = cli.train(data, str(tmp_path / "student"), *common, "--prefix-source", "student",
                     "--criterion", "word_kd", "--kd-alpha", "0.5")
    log = proc.stdout + proc.stderr
    assert re.search(r"train: \d+ bitext \+ %d source-only examples" % n, log)
    kd = [float(v) for v in re.findall(r"unl_kd_loss[ =](\d+\.\d+)", log)]
    assert kd and all(v > 0 for v in kd)
    assert os.path.exists(tmp_path / "student" / "checkpoint_last.pt")
    # a criterion without a KD term: one line, naming the fix
    proc = cli.train(data, str(tmp_path / "s2"), *common, "--criterion", "label_smoothed_cross_entropy",
                     check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "fairseq-kd: error: criterion label_smoothed_cross_entropy has no distillation term" in proc.stderr


def _pipeline_env(prepared, teacher_ckpt, mono, work):
    env = dict(os.environ)
    env.update(
        PYTHON=sys.executable, OMP_NUM_THREADS="1",
        DATA=prepared.bin, UNLABELED=mono, SPM_MODEL=prepared.spm_model, TEACHER=teacher_ckpt,
        VALID_REF=os.path.join(prepared.raw, "valid.de"), WORK=work, SRC="en", TGT="de",
        ROUNDS="2", UPDATES_PER_ROUND="30", CPU="1",
        ARCH_ARGS=" ".join(cli.TINY_ARCH),
        # mid-round checkpoints, so that a kill inside round 2's training is resumed from one
        TRAIN_ARGS=" ".join(a for a in cli.TINY_OPTIM if a != "--cpu")
        + " --save-interval-updates 10 --keep-interval-updates 1",
        CRITERION="word_kd", CRITERION_ARGS="--kd-alpha 0.5 --label-smoothing 0.1",
        LABEL_BEAM="2", VALID_BEAM="2", DECODE_ARGS="--max-len-a 1.2 --max-len-b 10",
        ON_DEGENERATE="keep",  # the tiny students loop: keep their labels so that round 2 uses them
    )
    return env


def _read_state(work):
    with open(os.path.join(work, "state"), encoding="utf-8") as f:
        return [line.split() for line in f if line.strip() and not line.startswith("#")]


@pytest.mark.e2e
def test_pipeline_two_rounds_killed_in_round_2_resumes(prepared, teacher_ckpt, source_only_text, tmp_path):
    mono, n = source_only_text
    work = str(tmp_path / "work")
    env = _pipeline_env(prepared, teacher_ckpt, mono, work)
    round2_log = os.path.join(work, "round2", "train.log")

    # run 1: killed (SIGKILL, the whole process group) once round 2 has saved a mid-round checkpoint
    with open(tmp_path / "run1.log", "w") as out:
        proc = subprocess.Popen(["bash", PIPELINE], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=str(tmp_path))
        deadline = time.time() + 300
        try:
            while True:
                assert proc.poll() is None, "the pipeline ended before it could be killed:\n" + (tmp_path / "run1.log").read_text()[-3000:]
                assert time.time() < deadline, "round 2 never started training"
                if os.path.exists(round2_log) and "Saved checkpoint" in open(round2_log).read():
                    break
                time.sleep(0.05)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    state = _read_state(work)
    assert ["2", "label"] in state and ["2", "train"] not in state
    assert [r for r, _ in state].count("1") == 4  # label, train, eval, table

    round1 = [os.path.join(work, "round1", f) for f in ("student.pt", "valid.hyp", "labels.de", "train.log")]
    round1 += [os.path.join(work, "data", f) for f in ("unlabeled.en-de.en.bin", "unlabeled_r1.en-de.de.bin")]
    round2_labels = [os.path.join(work, "round2", "labels.de"), os.path.join(work, "data", "unlabeled_r2.en-de.de.bin")]
    before = {p: os.stat(p).st_mtime_ns for p in round1 + round2_labels}

    # run 2: resumes inside round 2's training
    proc = subprocess.run(["bash", PIPELINE], env=env, capture_output=True, text=True, cwd=str(tmp_path), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert {p: os.stat(p).st_mtime_ns for p in before} == before  # round 1 and round 2's labels untouched
    assert "round 1 label: done, skipped" in proc.stderr and "round 2 label: done, skipped" in proc.stderr
    resumed = open(round2_log).read().split("==== attempt")[-1]
    found = re.search(r"Loaded checkpoint \S*round2/checkpoints/checkpoint_last\.pt \(epoch \d+ @ (\d+) updates\)", resumed)
    assert found and 0 < int(found.group(1)) < 30, resumed[:3000]  # mid-round, not from scratch
    for r in (1, 2):  # both rounds trained on the source-only text, labelled for the round
        train_log = open(os.path.join(work, f"round{r}", "train.log")).read()
        assert f"+ {n} source-only examples (unlabeled), prefixes: offline unlabeled_r{r}" in train_log
        assert re.search(r"unl_kd_loss=\d+\.\d+", train_log)

    state = _read_state(work)
    expected = [["0", "data"], ["0", "eval"]] + [[str(r), s] for r in (1, 2) for s in ("label", "train", "eval", "table")]
    assert state == expected  # every stage once, in order
    # labels: one line per source-only line, checked after every decode
    for r in (1, 2):
        with open(os.path.join(work, f"round{r}", "labels.de"), encoding="utf-8") as f:
            assert sum(1 for _ in f) == n
    table = open(os.path.join(work, "bleu.md"), encoding="utf-8").read()
    rows = dict(re.findall(r"^\| (\w+) \| (\d+\.\d+) \|", table, flags=re.M))
    assert set(rows) == {"teacher", "round1", "round2"}
    assert all(0.0 <= float(v) <= 100.0 for v in rows.values())

    # a finished pipeline re-runs as a no-op; changed settings are refused
    proc = subprocess.run(["bash", PIPELINE], env=env, capture_output=True, text=True, cwd=str(tmp_path))
    assert proc.returncode == 0 and "round 2 table: done, skipped" in proc.stderr
    proc = subprocess.run(["bash", PIPELINE], env=dict(env, CRITERION="tie_kd"), capture_output=True,
                          text=True, cwd=str(tmp_path))
    assert proc.returncode != 0 and "CRITERION" in proc.stderr
    # the source-only text edited in place, same size and name: refused, naming the file
    with open(mono, encoding="utf-8") as f:
        text = f.read()
    edited = text.replace("a", "e", 1)
    assert edited != text and len(edited) == len(text)
    with open(mono, "w", encoding="utf-8") as f:
        f.write(edited)
    proc = subprocess.run(["bash", PIPELINE], env=env, capture_output=True, text=True, cwd=str(tmp_path))
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode != 0 and errors == [
        f"iterate.sh: error: {work} was started with other settings or input files (sha256 of {mono}); "
        f"restore them (see {work}/settings) or use a new WORK"], proc.stderr[-2000:]
    with open(mono, "w", encoding="utf-8") as f:  # restored: the content is what counts, not the time
        f.write(text)
    proc = subprocess.run(["bash", PIPELINE], env=env, capture_output=True, text=True, cwd=str(tmp_path))
    assert proc.returncode == 0 and "round 2 table: done, skipped" in proc.stderr
