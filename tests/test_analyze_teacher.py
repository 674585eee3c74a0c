"""The TIE-KD teacher analysis command and word_kd's top-1 ablations (--kd-topk-mode)."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from fairseq_kd import losses
from fairseq_kd.criterions.word_kd import WordKDConfig, WordKDCriterion
from fairseq_kd.losses.topk_ablation import top1_only_per_position, without_top1_log_probs, word_kd_ablation_loss
from fairseq_kd.study.teacher_analysis import analyze, topk_counts
from tests import cli, toy

PAD = 1


def _batch(seed=0, b=2, t=4, v=10):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(b, t, v, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(b, t, v, generator=g, dtype=torch.float64) * 3
    target = torch.tensor([[4, 7, 2, 2], [5, 9, 2, PAD]])
    return student, teacher, target


# ---- the ablations --------------------------------------------------------------------------------

def test_no_top1_moves_the_top_probability_onto_gold():
    lp = torch.tensor([[[0.5, 0.2, 0.3]]]).log()
    moved = without_top1_log_probs(lp, torch.tensor([[2]])).exp()
    assert torch.allclose(moved, torch.tensor([[[0.0, 0.2, 0.8]]]))
    same = without_top1_log_probs(lp, torch.tensor([[0]])).exp()  # argmax already gold: unchanged
    assert torch.allclose(same, lp.exp())


def test_no_top1_with_all_teacher_mass_on_top1_leaves_nothing_beyond_gold():
    # all the teacher's mass on its top-1 -> the ablated target is the one-hot gold token,
    # so the KD term minus the gold NLL is 0 (whether or not the top-1 was gold)
    student, _, target = _batch(1)
    teacher = torch.full_like(student, -200.0)
    teacher[..., 3] = 0.0  # top-1 = token 3, never the gold token here
    _, nll, kd = word_kd_ablation_loss(student, losses.DenseTeacher.from_logits(teacher), target, PAD, 0.1, 0.5, topk_mode="no-top1")
    assert kd.item() - nll.item() == pytest.approx(0.0, abs=1e-9)
    teacher_gold = torch.full_like(student, -200.0).scatter(-1, target.unsqueeze(-1), 0.0)
    _, nll, kd = word_kd_ablation_loss(student, losses.DenseTeacher.from_logits(teacher_gold), target, PAD, 0.1, 0.5, topk_mode="no-top1")
    assert kd.item() - nll.item() == pytest.approx(0.0, abs=1e-9)


def test_top1_only_matches_a_hand_computation():
    student = torch.tensor([[[1.0, 2.0, 0.0]]], dtype=torch.float64)
    teacher = torch.tensor([[[0.2, 0.1, 0.7]]], dtype=torch.float64).log()
    target = torch.tensor([[0]])
    hand = -0.7 * (0.0 - math.log(math.exp(1) + math.exp(2) + 1))  # -max p_t * log p_s(argmax p_t = 2)
    loss, nll, kd = word_kd_ablation_loss(student, losses.DenseTeacher.from_logits(teacher), target, padding_idx=9, epsilon=0.0, alpha=0.5,
                                      topk_mode="top1-only")
    assert kd.item() == pytest.approx(hand, rel=1e-12)
    assert nll.item() == pytest.approx(-(1.0 - math.log(math.exp(1) + math.exp(2) + 1)), rel=1e-12)
    assert loss.item() == pytest.approx(0.5 * nll.item() + 0.5 * hand, rel=1e-12)
    mask = torch.tensor([[False]])
    assert top1_only_per_position(torch.log_softmax(student, -1), teacher, mask).item() == 0.0


def test_all_is_word_kd_and_pads_do_not_count():
    student, teacher, target = _batch(2)
    ours = word_kd_ablation_loss(student, losses.DenseTeacher.from_logits(teacher), target, PAD, 0.1, 0.5, topk_mode="all")
    ref = losses.word_kd_loss(student, losses.DenseTeacher.from_logits(teacher), target, PAD, 0.1, 0.5)
    assert all(a.item() == b.item() for a, b in zip(ours, ref))
    changed = teacher.clone()
    changed[1, 3] = torch.randn(changed.size(-1), dtype=torch.float64)  # the pad position
    for mode in ("no-top1", "top1-only"):
        a = word_kd_ablation_loss(student, losses.DenseTeacher.from_logits(teacher), target, PAD, 0.1, 0.5, topk_mode=mode)[0]
        b = word_kd_ablation_loss(student, losses.DenseTeacher.from_logits(changed), target, PAD, 0.1, 0.5, topk_mode=mode)[0]
        assert a.item() == pytest.approx(b.item(), rel=1e-12)
    with pytest.raises(ValueError, match="top1-only"):
        word_kd_ablation_loss(student, losses.DenseTeacher.from_logits(teacher), target, PAD, 0.1, 0.5, divergence="rkl", topk_mode="top1-only")


def test_ablations_are_differentiable():
    student, teacher, target = _batch(3)
    for mode in ("no-top1", "top1-only"):
        s = student.clone().requires_grad_(True)
        assert torch.autograd.gradcheck(
            lambda x: word_kd_ablation_loss(x, losses.DenseTeacher.from_logits(teacher), target, PAD, 0.1, 0.5, topk_mode=mode)[0], (s,)
        )


@pytest.mark.parametrize("mode", ["no-top1", "top1-only"])
def test_word_kd_criterion_passes_the_mode_on(mode):
    task = toy.make_task()
    sample = toy.make_sample(task, batch_size=4, seed=3)
    teacher = toy.make_teacher(task)
    model = toy.make_model(task, seed=0)
    cfg = WordKDConfig(sentence_avg=False, label_smoothing=0.1, kd_alpha=0.5, kd_topk_mode=mode)
    loss, _, log = WordKDCriterion(task, cfg)(model, sample, teacher=teacher)
    logits = model(**sample["net_input"])[0]
    ref, _, kd = word_kd_ablation_loss(logits, losses.DenseTeacher.from_logits(teacher(sample["net_input"])), sample["target"],
                                   task.target_dictionary.pad(), 0.1, 0.5, topk_mode=mode)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert log["kd_loss"].item() == pytest.approx(kd.item(), rel=1e-5)


# ---- the analysis ---------------------------------------------------------------------------------

def test_topk_counts_by_hand():
    lp = torch.tensor([[[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.3, 0.3, 0.4]]]).log()
    target = torch.tensor([[0, 2, 1]])  # last position is pad
    c = topk_counts(lp, target, padding_idx=1, k=2)
    assert c["tokens"] == 2 and c["top1_gold"] == 1
    assert c["top1_mass"] == pytest.approx(0.5 + 0.6)
    assert c["topk_mass"] == pytest.approx(0.8 + 0.9)
    assert c["gold_mass"] == pytest.approx(0.5 + 0.3)


def test_analysis_command_on_the_fixture_teacher(prepared, teacher_ckpt, tmp_path):
    out = tmp_path / "analysis.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(cli.REPO, "scripts", "analyze_teacher.py"), prepared.bin,
         "--path", teacher_ckpt, "--subset", "valid", "--topk", "5", "--json", str(out)],
        capture_output=True, text=True, cwd=cli.REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for key in ("top1_gold_rate", "top1_mass", "topk_mass", "gold_mass"):
        assert 0.0 <= result[key] <= 1.0, (key, result)
    assert result["top1_mass"] <= result["topk_mass"]

    # the top-1 agreement equals a direct computation over the valid split
    from fairseq.tasks.translation import TranslationConfig, TranslationTask

    from fairseq_kd.teacher import load_teacher

    task = TranslationTask.setup_task(TranslationConfig(
        data=prepared.bin, train_subset="train", dataset_impl="mmap", required_seq_len_multiple=1))
    task.load_dataset("valid")
    teacher = load_teacher(teacher_ckpt, task)
    dataset = task.dataset("valid")
    agree = total = 0
    for i in range(len(dataset)):
        sample = dataset.collater([dataset[i]])
        pred = teacher(sample["net_input"]).argmax(-1)
        agree += int(pred.eq(sample["target"]).sum())
        total += sample["target"].numel()
    assert result["tokens"] == total
    assert result["top1_gold_rate"] == pytest.approx(agree / total, abs=1e-9)
    assert analyze(prepared.bin, teacher_ckpt, "valid", 1)["topk_mass"] == pytest.approx(result["top1_mass"])


def test_analysis_of_a_missing_split_is_one_line(prepared, teacher_ckpt):
    proc = subprocess.run(
        [sys.executable, "-m", "fairseq_kd.study.teacher_analysis", prepared.bin, "--path", teacher_ckpt,
         "--subset", "nosuchsplit"],
        capture_output=True, text=True, cwd=cli.REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300,
    )
    assert proc.returncode != 0
    assert "nosuchsplit" in proc.stderr.strip().splitlines()[-1]
