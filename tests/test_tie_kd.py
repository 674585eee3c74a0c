"""TIE-KD: the hierarchical ranking loss, its KL, and the ``tie_kd`` criterion."""

import types
from unittest import mock

import pytest
import torch
from fairseq.logging import metrics

from fairseq_kd import losses
from fairseq_kd.criterions.tie_kd import TieKDConfig, TieKDCriterion
from fairseq_kd.losses.ranking import next_prefix
from fairseq_kd.criterions.word_kd import WordKDConfig, WordKDCriterion
from fairseq_kd.errors import DistillationError
from tests import spec_vectors as sv
from tests import toy

# -- the loss functions ---------------------------------------------------------

# spec 2.1 hand example: one position, V = 6, k = 3 (probabilities given as log-probs)
HAND_TEACHER = torch.tensor([[[0.5, 0.2, 0.15, 0.1, 0.04, 0.01]]], dtype=torch.float64).log()
HAND_STUDENT = torch.tensor([[[0.12, 0.3, 0.05, 0.4, 0.08, 0.05]]], dtype=torch.float64).log()
HAND_TARGET = torch.tensor([[0]])


def test_hand_example():
    rank = losses.hierarchical_ranking(HAND_STUDENT, HAND_TEACHER, HAND_TARGET, padding_idx=99, topk=3)
    # top-1 level .18 + top-k level .91
    assert rank.item() == pytest.approx(1.09, abs=1e-12)
    kl = losses.tie_kd_kl(HAND_STUDENT, HAND_TEACHER, HAND_TARGET, padding_idx=99)
    assert kl.item() == pytest.approx(0.6148045, abs=1e-7)
    exact = losses.tie_kd_kl(HAND_STUDENT, HAND_TEACHER, HAND_TARGET, padding_idx=99, log_epsilon=0.0)
    assert exact.item() == pytest.approx(0.6148073, abs=1e-7)


def test_spec_vectors():
    student, teacher, target = sv.spec_batch()
    assert losses.hierarchical_ranking(student, teacher, target, sv.PAD, topk=5).item() == pytest.approx(
        sv.TIE_KD_RANK_K5, rel=1e-6
    )
    per_position = losses.hierarchical_ranking_from_probs(losses.probs(student), losses.probs(teacher), 5)
    expected = [v for row in sv.TIE_RANK_PER_POSITION for v in row if v is not None]
    assert per_position[target.ne(sv.PAD)].tolist() == pytest.approx(expected, abs=1e-6)
    assert per_position[1, 3].item() == pytest.approx(3.301297, abs=1e-6)  # the pad position, masked
    kl_eps = losses.tie_kd_kl(student, teacher, target, sv.PAD)
    assert kl_eps.item() == pytest.approx(sv.TIE_KD_KL_EPS, rel=1e-6)
    assert losses.tie_kd_kl(student, teacher, target, sv.PAD, log_epsilon=0.0).item() == pytest.approx(
        sv.WORD_KD_KL_TAU_1, rel=1e-6
    )
    kl, rank = losses.tie_kd_terms(student, losses.DenseTeacher.from_logits(teacher), target, sv.PAD, topk=5)
    ls, _ = losses.label_smoothed_nll(student, target, sv.PAD, 0.1)
    assert (0.5 * ls + 0.5 * (kl + rank)).item() == pytest.approx(sv.TIE_KD_TOTAL_N1, rel=1e-6)
    assert kl.item() == pytest.approx(sv.TIE_KD_KL_EPS, rel=1e-6)
    assert rank.item() == pytest.approx(sv.TIE_KD_RANK_K5, rel=1e-6)
    kl_only, no_rank = losses.tie_kd_terms(student, losses.DenseTeacher.from_logits(teacher), target, sv.PAD, ranking=False)
    assert no_rank is None and kl_only.item() == kl.item()


def test_float32_and_half_inputs():
    student, teacher, target = sv.spec_batch(torch.float32)
    kl, rank = losses.tie_kd_terms(student, losses.DenseTeacher.from_logits(teacher), target, sv.PAD)
    assert kl.dtype == rank.dtype == torch.float32
    assert kl.item() == pytest.approx(sv.TIE_KD_KL_EPS, rel=1e-5)
    assert rank.item() == pytest.approx(sv.TIE_KD_RANK_K5, rel=1e-5)
    rank16 = losses.hierarchical_ranking(student.half(), teacher.half(), target, sv.PAD)
    assert rank16.dtype == torch.float32
    assert rank16.item() == pytest.approx(sv.TIE_KD_RANK_K5, rel=5e-3)
    s64, t64, _ = sv.spec_batch()
    assert losses.hierarchical_ranking(s64, t64, target, sv.PAD).dtype == torch.float64


def brute_force_ranking(student_logits, teacher_logits, target, padding_idx, topk):
    """Spec 2.1 written out position by position and pair by pair."""
    ps, pt = student_logits.softmax(-1), teacher_logits.softmax(-1)
    total = 0.0
    for b in range(target.size(0)):
        for t in range(target.size(1)):
            if target[b, t] == padding_idx:
                continue
            p_s, p_t = ps[b, t].tolist(), pt[b, t].tolist()
            teacher_top = sorted(range(len(p_t)), key=lambda v: -p_t[v])[:topk]
            student_top = sorted(range(len(p_s)), key=lambda v: -p_s[v])[:topk]
            for ti in teacher_top:
                total += max(0.0, p_s[ti] - p_s[teacher_top[0]])
            for ti in teacher_top:
                for sj in student_top:
                    if p_t[ti] > p_t[sj]:
                        total += max(0.0, p_s[sj] - p_s[ti])
    return total


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("topk", [1, 2, 5, 11])
def test_matches_brute_force(seed, topk):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(3, 5, 11, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(3, 5, 11, generator=g, dtype=torch.float64) * 3
    if seed % 2:  # make the student agree with the teacher at some positions
        student[:, ::2] = teacher[:, ::2] + 0.3 * torch.randn(3, 3, 11, generator=g, dtype=torch.float64)
    target = torch.randint(2, 11, (3, 5), generator=g)
    target[0, 3:] = 1
    target[2, 4] = 1
    value = losses.hierarchical_ranking(student, teacher, target, padding_idx=1, topk=topk).item()
    expected = brute_force_ranking(student, teacher, target, 1, topk)
    assert value == pytest.approx(expected, rel=1e-12, abs=1e-14)


def test_gradcheck():
    g = torch.Generator().manual_seed(7)
    student = torch.randn(2, 3, 8, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 3, 8, generator=g, dtype=torch.float64) * 2
    target = torch.tensor([[3, 4, 2], [5, 2, 1]])
    assert torch.autograd.gradcheck(
        lambda s: losses.hierarchical_ranking(s, teacher, target, 1, topk=4), (student,)
    )
    assert torch.autograd.gradcheck(lambda s: losses.tie_kd_kl(s, teacher, target, 1), (student,))
    assert torch.autograd.gradcheck(
        lambda s: sum(losses.tie_kd_terms(s, losses.DenseTeacher.from_logits(teacher), target, 1, topk=3, log_epsilon=0.0)), (student,)
    )
    # pad positions get no gradient
    losses.hierarchical_ranking(student, teacher, target, 1, topk=4).backward()
    assert student.grad[1, 2].abs().max().item() == 0.0
    assert student.grad[0].abs().max().item() > 0.0


def test_bad_arguments():
    student, teacher, target = sv.spec_batch()
    with pytest.raises(ValueError):
        losses.hierarchical_ranking(student, teacher, target, sv.PAD, topk=0)
    with pytest.raises(ValueError):
        losses.hierarchical_ranking(student, teacher, target, sv.PAD, topk=11)
    with pytest.raises(ValueError):
        losses.tie_kd_kl(student, teacher, target, sv.PAD, log_epsilon=-1.0)


# -- the criterion ------------------------------------------------------------------


def make_criterion(task, **overrides):
    return TieKDCriterion(task, TieKDConfig(sentence_avg=False, **overrides))


@pytest.fixture
def setting():
    task = toy.make_task()
    model = toy.make_model(task, seed=0)
    model.train()
    teacher = toy.make_teacher(task, seeds=(1,))
    sample = toy.make_sample(task, batch_size=4, seed=3)
    return task, model, teacher, sample


def gradients(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_one_pass_without_ranking_equals_word_kd(setting):
    task, model, teacher, sample = setting
    model.double()  # float64 student: the two sums differ only by rounding
    tie = make_criterion(task, tie_iterations=1, tie_no_rank=True, tie_exact_kl=True)
    word = WordKDCriterion(task, WordKDConfig(sentence_avg=False))

    model.zero_grad()
    tie_loss, tie_size, tie_log = tie(model, sample, teacher=teacher)
    tie_loss.backward()
    tie_grads = gradients(model)
    model.zero_grad()
    word_loss, word_size, word_log = word(model, sample, teacher=teacher)
    word_loss.backward()
    word_grads = gradients(model)

    assert tie_loss.item() == pytest.approx(word_loss.item(), rel=1e-12)
    assert tie_size == word_size
    assert tie_log["kd_loss"].item() == pytest.approx(word_log["kd_loss"].item(), rel=1e-12)
    assert tie_log["kd_agree"] == word_log["kd_agree"]
    assert "rank_loss" not in tie_log
    assert tie_grads.keys() == word_grads.keys() and tie_grads
    for name in tie_grads:
        torch.testing.assert_close(tie_grads[name], word_grads[name], rtol=1e-9, atol=1e-12)


def test_three_passes_decode_student_predictions(setting):
    task, model, teacher, sample = setting
    criterion = make_criterion(task)  # defaults: N = 3, k = 5, ranking on, +1e-6 KL
    pad, unk = task.target_dictionary.pad(), task.target_dictionary.unk()
    gold_prev = sample["net_input"]["prev_output_tokens"]
    before = {k: v.clone() for k, v in sample["net_input"].items()}

    passes = list(criterion.decoding_passes(model, sample["net_input"], teacher))
    assert len(passes) == 3
    prefixes = [p for p, _, _ in passes]
    assert torch.equal(prefixes[0], gold_prev)
    for n in (1, 2):
        assert torch.equal(prefixes[n], next_prefix(prefixes[n - 1], passes[n - 1][1], pad, unk))
        assert torch.equal(prefixes[n][:, 0], gold_prev[:, 0])  # BOS (= EOS) kept
        assert not torch.equal(prefixes[n], gold_prev)
        # the student's own predictions, not the gold tokens, inside the sentences
        inside = sample["target"].ne(pad)
        assert prefixes[n][inside].ne(gold_prev[inside]).any()

    # the value is the spec's formula over these passes
    loss, sample_size, log = criterion(model, sample, teacher=teacher)
    target = sample["target"]
    ls, _ = losses.label_smoothed_nll(passes[0][1], target, pad, 0.1)
    terms = [losses.tie_kd_terms(s, t, target, pad, topk=5) for _, s, t in passes]
    kl = sum(k for k, _ in terms) / 3
    rank = sum(r for _, r in terms) / 3
    assert loss.item() == pytest.approx((0.5 * ls + 0.5 * (kl + rank)).item(), rel=1e-6)
    assert log["kd_loss"].item() == pytest.approx(kl.item(), rel=1e-6)
    assert log["rank_loss"].item() == pytest.approx(rank.item(), rel=1e-6)
    assert sample_size == sample["ntokens"]
    for n, (_, s, t) in enumerate(passes, start=1):
        assert log[f"kd_agree_iter{n}"] == losses.top1_agreement(s, t.lprobs, target, pad).item()
    assert log["kd_agree"] == log["kd_agree_iter1"]

    # the sample is not modified
    for key, value in before.items():
        assert torch.equal(sample["net_input"][key], value)


def test_encoders_run_once_decoders_n_times(setting):
    task, model, teacher, sample = setting
    calls = {"encoder": 0, "decoder": 0, "teacher_encoder": 0, "teacher_decoder": 0}

    def count(name):
        def hook(*args):
            calls[name] += 1
        return hook

    model.encoder.register_forward_hook(count("encoder"))
    model.decoder.register_forward_hook(count("decoder"))
    teacher.models[0].encoder.register_forward_hook(count("teacher_encoder"))
    teacher.models[0].decoder.register_forward_hook(count("teacher_decoder"))
    make_criterion(task, tie_iterations=4)(model, sample, teacher=teacher)
    assert calls == {"encoder": 1, "decoder": 4, "teacher_encoder": 1, "teacher_decoder": 4}


def test_every_pass_gets_gradient(setting):
    # the loss of pass 3 alone depends on the student (its logits are computed with grad)
    task, model, teacher, sample = setting
    criterion = make_criterion(task)
    *_, (_, student_logits, teacher_distribution) = criterion.decoding_passes(model, sample["net_input"], teacher)
    assert student_logits.requires_grad and not teacher_distribution.lprobs.requires_grad


def test_predicted_pad_is_replaced():
    pad, unk, eos = 1, 3, 2
    prev = torch.tensor([[eos, 5, 6, 7], [eos, 8, pad, pad]])
    logits = torch.zeros(2, 4, 10)
    logits[..., pad] = 5.0  # argmax is pad everywhere ...
    logits[0, 1, 9] = 6.0  # ... except here
    assert next_prefix(prev, logits, pad, unk).tolist() == [[eos, unk, 9, unk], [eos, unk, unk, unk]]
    assert next_prefix(prev, logits, pad, None).tolist() == [[eos, pad, 9, pad], [eos, pad, pad, pad]]
    assert prev.tolist() == [[eos, 5, 6, 7], [eos, 8, pad, pad]]


def _student_that_predicts_pad(model, pad):
    old = model.decoder.output_projection
    new = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        new.weight.copy_(old.weight)
        new.bias.zero_()
        new.bias[pad] = 1e4
    model.decoder.output_projection = new
    return model


@pytest.mark.parametrize("keep", [False, True])
def test_criterion_replaces_predicted_pad(setting, keep):
    task, model, teacher, sample = setting
    d = task.target_dictionary
    model = _student_that_predicts_pad(model, d.pad())
    criterion = make_criterion(task, tie_iterations=2, tie_keep_pad_predictions=keep)
    passes = list(criterion.decoding_passes(model, sample["net_input"], teacher))
    second = passes[1][0]
    expected = d.pad() if keep else d.unk()
    assert second[:, 1:].eq(expected).all()
    assert second[:, 0].eq(d.eos()).all()
    loss, _, _ = criterion(model, sample, teacher=teacher)
    assert torch.isfinite(loss)


def test_ranking_ablation(setting):
    task, model, teacher, sample = setting
    pad = task.target_dictionary.pad()
    with_rank = make_criterion(task, tie_iterations=1)
    without = make_criterion(task, tie_iterations=1, tie_no_rank=True)
    loss_r, _, log_r = with_rank(model, sample, teacher=teacher)
    loss_n, _, log_n = without(model, sample, teacher=teacher)
    assert "rank_loss" not in log_n and log_r["rank_loss"].item() > 0
    assert (loss_r - loss_n).item() == pytest.approx(0.5 * log_r["rank_loss"].item(), rel=1e-5)
    # with N = 1 the per-pass agreement is not logged (it is kd_top1_agree)
    assert not any(k.startswith("kd_agree_iter") for k in log_r)
    # the +1e-6 KL is the default, the exact KL a flag
    exact = make_criterion(task, tie_iterations=1, tie_no_rank=True, tie_exact_kl=True)
    _, _, log_e = exact(model, sample, teacher=teacher)
    student_logits = model(**sample["net_input"])[0]
    teacher_lprobs = teacher(sample["net_input"])
    assert log_n["kd_loss"].item() == pytest.approx(
        losses.tie_kd_kl(student_logits, teacher_lprobs, sample["target"], pad).item(), rel=1e-6
    )
    assert log_e["kd_loss"].item() == pytest.approx(
        losses.kl_divergence(student_logits, teacher_lprobs, sample["target"], pad).item(), rel=1e-6
    )


def test_validation_is_label_smoothed_nll(setting):
    task, model, _, sample = setting
    model.eval()
    loss, sample_size, log = make_criterion(task)(model, sample)
    expected, nll = losses.label_smoothed_nll(model(**sample["net_input"])[0], sample["target"], 1, 0.1)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert log["nll_loss"].item() == pytest.approx(nll.item(), rel=1e-6)
    assert sample_size == sample["ntokens"]
    assert "kd_loss" not in log and "rank_loss" not in log


def test_metrics(setting):
    task, model, teacher, sample = setting
    criterion = make_criterion(task)
    logs = [criterion(model, sample, teacher=teacher)[2], criterion(model, sample, teacher=teacher)[2]]
    with metrics.aggregate() as agg:
        TieKDCriterion.reduce_metrics(logs)
    values = agg.get_smoothed_values()
    ntokens = 2 * sample["ntokens"]
    assert float(values["rank_loss"]) == pytest.approx(2 * logs[0]["rank_loss"].item() / ntokens, abs=1e-4)
    assert float(values["kd_loss"]) == pytest.approx(2 * logs[0]["kd_loss"].item() / ntokens, abs=1e-4)
    for n in (1, 2, 3):
        expected = float(logs[0][f"kd_agree_iter{n}"]) / sample["ntokens"]
        assert float(values[f"kd_top1_agree_iter{n}"]) == pytest.approx(expected, abs=1e-4)
    assert values["kd_top1_agree"] == values["kd_top1_agree_iter1"]


@pytest.mark.parametrize(
    "overrides",
    [
        {"tie_topk": 0},
        {"tie_topk": 10_000},
        {"tie_iterations": 0},
        {"kd_temperature": 2.0},
        {"kd_alpha": 1.5},
    ],
)
def test_bad_flags(overrides):
    with pytest.raises(DistillationError):
        make_criterion(toy.make_task(), **overrides)


def test_refuses_torch_ddp(setting):
    task, model, teacher, sample = setting
    task.teacher = teacher
    wrapped = types.SimpleNamespace(module=mock.Mock(spec=torch.nn.parallel.DistributedDataParallel),
                                    train=model.train, set_num_updates=model.set_num_updates)
    with pytest.raises(DistillationError, match="TieKDCriterion calls the student's encoder.*legacy_ddp"):
        task.train_step(sample, wrapped, make_criterion(task), types.SimpleNamespace(backward=None), 0)


def test_refuses_left_padded_prefixes(setting):
    task, model, teacher, sample = setting
    net_input = dict(sample["net_input"])
    net_input["prev_output_tokens"] = net_input["prev_output_tokens"].clone()
    net_input["prev_output_tokens"][0, 0] = task.target_dictionary.pad()
    with pytest.raises(DistillationError, match="right-padded"):
        list(make_criterion(task).decoding_passes(model, net_input, teacher))
