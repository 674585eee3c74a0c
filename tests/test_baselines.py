"""Reverse KL, skew KL / skew reverse KL and Selective KD against the spec's vectors."""

import math

import pytest
import torch

from fairseq_kd import losses
from fairseq_kd.criterions.selective_kd import SelectiveKDConfig, SelectiveKDCriterion
from fairseq_kd.criterions.word_kd import WordKDConfig, WordKDCriterion
from fairseq_kd.errors import DistillationError
from tests import spec_vectors as sv
from tests import toy

N_TOKENS = 7


def _lp(batch):
    student, teacher, target = batch
    return losses.log_probs(student), losses.log_probs(teacher), target.ne(sv.PAD)


def test_reverse_kl_matches_spec_mean():
    s, t, mask = _lp(sv.spec_batch())
    rkl = losses.reverse_kl_from_log_probs(s, t, mask).sum() / N_TOKENS
    assert rkl.item() == pytest.approx(sv.RKL_MEAN, rel=1e-6)


def test_skew_kl_is_the_true_kl_and_differs_from_distillms_ce_by_the_entropy():
    s, t, mask = _lp(sv.spec_batch())
    skl = losses.skew_kl_from_log_probs(s, t, mask, 0.1).sum()
    teacher_entropy = (-(t.exp() * t).sum(-1) * mask).sum()
    assert ((skl + teacher_entropy) / N_TOKENS).item() == pytest.approx(sv.SKL_MEAN, rel=1e-6)


def test_skew_reverse_kl_matches_spec_mean():
    s, t, mask = _lp(sv.spec_batch())
    srkl = losses.skew_kl_from_log_probs(s, t, mask, 0.1, reverse=True).sum() / N_TOKENS
    assert srkl.item() == pytest.approx(sv.SRKL_MEAN, rel=1e-6)


def test_divergence_limits():
    s, t, mask = _lp(sv.spec_batch())
    kl = losses.kl_from_log_probs(s, t, mask)
    assert torch.allclose(losses.skew_kl_from_log_probs(s, t, mask, 0.0), kl)
    assert torch.allclose(
        losses.skew_kl_from_log_probs(s, t, mask, 0.0, reverse=True), losses.reverse_kl_from_log_probs(s, t, mask)
    )
    for kind in losses.DIVERGENCES:
        same = losses.divergence_from_log_probs(s, s.clone(), mask, kind)
        assert same.abs().max().item() < 1e-12, kind
        assert (losses.divergence_from_log_probs(s, t, mask, kind) >= -1e-12).all(), kind
    with pytest.raises(ValueError):
        losses.divergence_from_log_probs(s, t, mask, "js")


def test_reverse_kl_with_zero_teacher_probability_is_finite():
    student, teacher, target = sv.spec_batch()
    teacher[..., 3] = float("-inf")
    s, t, mask = _lp((student, teacher, target))
    assert torch.isfinite(losses.reverse_kl_from_log_probs(s, t, mask)).all()
    assert torch.isfinite(losses.skew_kl_from_log_probs(s, t, mask, 0.1, reverse=True)).all()


@pytest.mark.parametrize("kind", losses.DIVERGENCES)
def test_gradcheck_divergences(kind):
    torch.manual_seed(0)
    student = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 3, 5, dtype=torch.float64)
    target = torch.tensor([[1, 2, 0], [3, 0, 0]])
    assert torch.autograd.gradcheck(
        lambda x: losses.word_kd_loss(x, losses.DenseTeacher.from_logits(teacher), target, 0, 0.1, 0.5, 1.5, True, kind, 0.2)[0], (student,)
    )


def test_word_kd_divergence_flag():
    task = toy.make_task()
    sample = toy.make_sample(task, seed=5)
    student, teacher = toy.make_model(task), toy.make_teacher(task, seeds=(2,))
    pad = task.target_dictionary.pad()
    logits = student(**sample["net_input"])[0]
    s, t = losses.log_probs(logits), teacher(sample["net_input"])
    mask = sample["target"].ne(pad)
    for kind in losses.DIVERGENCES:
        cfg = WordKDConfig(sentence_avg=False, kd_divergence=kind, skew_lambda=0.2)
        _, _, log = WordKDCriterion(task, cfg)(student, sample, teacher=teacher)
        expected = losses.divergence_from_log_probs(s, t, mask, kind, 0.2).sum()
        assert log["kd_loss"].item() == pytest.approx(expected.item(), rel=1e-5), kind
    with pytest.raises(DistillationError, match="--skew-lambda"):
        WordKDCriterion(task, WordKDConfig(sentence_avg=False, skew_lambda=1.0))


def test_selective_kd_batch_level_matches_spec():
    student, teacher, target = sv.spec_batch()
    ls_old, _ = losses.legacy_label_smoothed_nll(student, target, sv.PAD, 0.1)
    s, t, mask = _lp((student, teacher, target))
    nll = -s.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    selected = losses.select_hard_tokens(nll, mask, 0.5)
    assert selected[mask].int().tolist() == [1, 0, 1, 0, 1, 1, 0]
    total = ls_old + losses.kl_from_log_probs(s, t, selected).sum()
    assert total.item() == pytest.approx(34.453591, rel=1e-6)


def test_legacy_label_smoothing_by_hand():
    # p = [.5, .25, .25], gold 0, eps = .1, V = 3: (1-.1) ln2 + (.1/3)(ln2 + 2 ln4) = (0.9 + 0.5/3) ln2
    logits = torch.tensor([[[0.5, 0.25, 0.25]]], dtype=torch.float64).log()
    loss, nll = losses.legacy_label_smoothed_nll(logits, torch.tensor([[0]]), 99, 0.1)
    assert loss.item() == pytest.approx((0.9 + 0.5 / 3) * math.log(2), rel=1e-9)
    assert nll.item() == pytest.approx(math.log(2), rel=1e-9)


def test_selection_threshold_and_history():
    difficulty = torch.tensor([[3.0, 1.0, 2.0, 5.0]])
    mask = torch.tensor([[True, True, True, False]])
    # batch level: ceil(3 * .5) = 2nd largest of [3, 1, 2] = 2 -> tokens 0 and 2
    assert losses.select_hard_tokens(difficulty, mask, 0.5).tolist() == [[True, False, True, False]]
    # global level: threshold over the queue: ceil(5 * .4) = 2nd largest of [10, 9, 3, 1, 2] = 9
    history = torch.tensor([10.0, 9.0, 3.0, 1.0, 2.0])
    assert losses.select_hard_tokens(difficulty, mask, 0.4, history).tolist() == [[False] * 4]
    # ties at the threshold are all selected
    ties = torch.tensor([[2.0, 2.0, 2.0]])
    assert losses.select_hard_tokens(ties, torch.ones(1, 3, dtype=torch.bool), 0.3).all()


def test_selective_kd_criterion_batch_and_global_level():
    task = toy.make_task()
    sample = toy.make_sample(task, batch_size=4, seed=8)
    student, teacher = toy.make_model(task), toy.make_teacher(task, seeds=(4,))
    pad = task.target_dictionary.pad()
    logits = student(**sample["net_input"])[0]
    s, t = losses.log_probs(logits), teacher(sample["net_input"])
    target = sample["target"]
    mask = target.ne(pad)
    nll = -s.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    ls, _ = losses.label_smoothed_nll(logits, target, pad, 0.1)

    crit = SelectiveKDCriterion(task, SelectiveKDConfig(sentence_avg=False, selective_ratio=0.5))
    loss, _, log = crit(student, sample, teacher=teacher)
    selected = losses.select_hard_tokens(nll, mask, 0.5)
    kd = losses.kl_from_log_probs(s, t, selected).sum()
    assert log["kd_selected"] == selected.sum().item() == math.ceil(mask.sum().item() * 0.5)
    assert loss.item() == pytest.approx((ls + kd).item(), rel=1e-5)

    glob = SelectiveKDCriterion(
        task, SelectiveKDConfig(sentence_avg=False, selective_strategy="global_level", selective_queue_size=20)
    )
    glob(student, sample, teacher=teacher)  # fills the queue with this batch's tokens
    _, _, log2 = glob(student, sample, teacher=teacher)
    assert glob.history.numel() == min(20, 2 * mask.sum().item())
    expected = losses.select_hard_tokens(nll, mask, 0.5, glob.history).sum().item()
    assert log2["kd_selected"] == expected
    # validation: plain LS-NLL
    val_loss, _, val_log = crit(student, sample)
    assert val_loss.item() == pytest.approx(ls.item(), rel=1e-6) and "kd_loss" not in val_log
