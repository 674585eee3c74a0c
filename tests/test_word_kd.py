"""word_kd, the teacher ensemble and the distillation task, on in-memory toy batches."""

import pytest
import torch
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion,
)

from fairseq_kd import losses
from fairseq_kd.criterions.word_kd import WordKDConfig, WordKDCriterion
from fairseq_kd.errors import DistillationError
from fairseq_kd.teacher import TeacherEnsemble, compare_dictionaries
from tests import toy


def word_kd(task, **overrides):
    cfg = dict(sentence_avg=False, label_smoothing=0.1, kd_alpha=0.5, kd_temperature=1.0)
    cfg.update(overrides)
    return WordKDCriterion(task, WordKDConfig(**cfg))


def grads(model):
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_alpha_zero_equals_label_smoothed_cross_entropy():
    task = toy.make_task()
    sample = toy.make_sample(task, batch_size=4, seed=3)
    teacher = toy.make_teacher(task)

    model = toy.make_model(task, seed=0)
    loss, size, log = word_kd(task, kd_alpha=0.0)(model, sample, teacher=teacher)
    loss.backward()
    ours = grads(model)

    reference = toy.make_model(task, seed=0)
    ref_loss, ref_size, ref_log = LabelSmoothedCrossEntropyCriterion(task, False, 0.1)(reference, sample)
    ref_loss.backward()

    assert size == ref_size == sample["ntokens"]
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    assert log["nll_loss"].item() == pytest.approx(ref_log["nll_loss"].item(), rel=1e-6)
    assert len(ours) == len(grads(reference)) > 0
    for g, r in zip(ours, grads(reference)):
        assert torch.allclose(g, r, rtol=1e-5, atol=1e-7)
    assert log["kd_loss"].item() > 0  # the KD term is computed and logged even at alpha = 0


def test_identical_teacher_gives_zero_kd_loss():
    task = toy.make_task()
    sample = toy.make_sample(task, seed=1)
    student = toy.make_model(task, seed=5)
    teacher = TeacherEnsemble([toy.make_model(task, seed=5)])
    loss, _, log = word_kd(task, kd_alpha=0.5)(student, sample, teacher=teacher)
    assert log["kd_loss"].item() == pytest.approx(0.0, abs=1e-5)
    assert log["kd_agree"] == log["kd_tokens"] == sample["ntokens"]
    ls, _ = losses.label_smoothed_nll(student(**sample["net_input"])[0], sample["target"], task.target_dictionary.pad(), 0.1)
    assert loss.item() == pytest.approx(0.5 * ls.item(), rel=1e-5)


def test_loss_matches_pure_function_with_temperature():
    task = toy.make_task()
    sample = toy.make_sample(task, seed=2)
    student, teacher = toy.make_model(task, seed=0), toy.make_teacher(task, seeds=(7,))
    loss, _, log = word_kd(task, kd_alpha=0.3, kd_temperature=2.0)(student, sample, teacher=teacher)
    logits = student(**sample["net_input"])[0]
    t_lprobs = teacher(sample["net_input"])
    pad = task.target_dictionary.pad()
    ls, _ = losses.label_smoothed_nll(logits, sample["target"], pad, 0.1)
    kl = losses.kl_divergence(logits, t_lprobs, sample["target"], pad, temperature=2.0)
    assert log["kd_loss"].item() == pytest.approx(kl.item(), rel=1e-5)
    assert loss.item() == pytest.approx(0.7 * ls.item() + 0.3 * 4.0 * kl.item(), rel=1e-5)


def test_validation_without_teacher_is_plain_label_smoothed_nll():
    task = toy.make_task()
    sample = toy.make_sample(task, seed=4)
    model = toy.make_model(task)
    loss, _, log = word_kd(task, kd_alpha=0.9)(model, sample)
    ref_loss, _, _ = LabelSmoothedCrossEntropyCriterion(task, False, 0.1)(model, sample)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    assert "kd_loss" not in log


def test_ensemble_of_one_is_that_teacher_and_ensembles_average_probabilities():
    task = toy.make_task()
    sample = toy.make_sample(task, seed=6)
    net_input = sample["net_input"]
    a, b = toy.make_model(task, seed=1).eval(), toy.make_model(task, seed=2).eval()
    # the reference is the frozen model, as a teacher is: with every parameter's requires_grad off,
    # torch may take another (fused) attention kernel, whose output differs in the last float32 bit
    for p in list(a.parameters()) + list(b.parameters()):
        p.requires_grad_(False)
    with torch.no_grad():
        pa = a.get_normalized_probs(a(**net_input), log_probs=True)
        pb = b.get_normalized_probs(b(**net_input), log_probs=True)
    one = TeacherEnsemble([a])(net_input)
    assert torch.equal(one, pa)
    two = TeacherEnsemble([a, b])(net_input)
    assert torch.allclose(two.exp(), (pa.exp() + pb.exp()) / 2, atol=1e-6)
    assert torch.allclose(two.exp().sum(-1), torch.ones(two.shape[:-1]), atol=1e-5)


def test_teacher_is_frozen_in_eval_mode_and_gets_no_gradient():
    task = toy.make_task()
    sample = toy.make_sample(task)
    teacher = toy.make_teacher(task, dropout=0.3)
    assert not teacher.models.training
    assert all(not p.requires_grad for p in teacher.models.parameters())
    out1, out2 = teacher(sample["net_input"]), teacher(sample["net_input"])
    assert torch.equal(out1, out2)  # no dropout
    assert not out1.requires_grad
    student = toy.make_model(task)
    loss, _, _ = word_kd(task)(student, sample, teacher=teacher)
    loss.backward()
    assert all(p.grad is None for p in teacher.models.parameters())


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_reduced_precision_teacher_returns_float32_close_to_fp32(precision):
    task = toy.make_task()
    sample = toy.make_sample(task)
    full = toy.make_teacher(task, seeds=(3,))(sample["net_input"])
    low = TeacherEnsemble([toy.make_model(task, seed=3)], precision=precision)
    out = low(sample["net_input"])
    assert out.dtype == torch.float32
    assert next(low.models.parameters()).dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    assert torch.allclose(out.exp(), full.exp(), atol=0.05)


def test_task_train_step_passes_the_teacher_only_to_kd_criterions():
    task = toy.make_task()
    task.teacher = toy.make_teacher(task)
    sample = toy.make_sample(task)
    model = toy.make_model(task)

    class RecordingOptimizer:
        def backward(self, loss):
            loss.backward()

    _, _, log = task.train_step(sample, model, word_kd(task), RecordingOptimizer(), update_num=0)
    assert "kd_loss" in log and task.teacher.device == torch.device("cpu")
    plain = LabelSmoothedCrossEntropyCriterion(task, False, 0.1)
    _, _, log = task.train_step(sample, model, plain, RecordingOptimizer(), update_num=1)
    assert "kd_loss" not in log
    # the teacher is neither a parameter of the student nor of the criterion
    teacher_params = {id(p) for p in task.teacher.models.parameters()}
    assert not teacher_params & {id(p) for p in model.parameters()}
    assert list(word_kd(task).parameters()) == []


def test_bad_flags_are_one_line_errors():
    task = toy.make_task()
    with pytest.raises(DistillationError, match="--kd-alpha"):
        word_kd(task, kd_alpha=1.5)
    with pytest.raises(DistillationError, match="--kd-temperature"):
        word_kd(task, kd_temperature=0.0)


def test_dictionary_comparison_names_first_difference():
    a, b = toy.make_dictionary(10), toy.make_dictionary(10)
    compare_dictionaries(a, "task/dict.de.txt", b, "teacher/dict.de.txt")
    b.symbols[6], b.symbols[7] = b.symbols[7], b.symbols[6]
    with pytest.raises(DistillationError) as e:
        compare_dictionaries(a, "task/dict.de.txt", b, "teacher/dict.de.txt")
    message = str(e.value)
    assert "task/dict.de.txt" in message and "teacher/dict.de.txt" in message
    assert "index 6" in message and "'w3'" in message and "'w2'" in message
    short = toy.make_dictionary(8)
    with pytest.raises(DistillationError, match="index 12"):
        compare_dictionaries(a, "task/dict.de.txt", short, "teacher/dict.de.txt")
