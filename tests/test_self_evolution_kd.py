"""Self-Evolution KD: the pure loss in fairseq_kd.losses and the ``self_evolution_kd`` criterion."""

import itertools
import math

import pytest
import torch
from fairseq.logging import metrics

from fairseq_kd import losses
from fairseq_kd.criterions.self_evolution_kd import SelfEvolutionKDConfig, SelfEvolutionKDCriterion
from fairseq_kd.criterions.word_kd import WordKDConfig, WordKDCriterion
from fairseq_kd.errors import DistillationError
from tests import spec_vectors as sv
from tests import toy

ln = math.log

# ---------------------------------------------------------------------------
# Hand-made batch: V = 3, one sentence of 3 target tokens plus one pad.
# Token 1 is the pad index (as in fairseq); the gold tokens are 0, 0, 2.
#
#   pos  gold  p_t              p_s
#   1    0     [1/2, 1/4, 1/4]  [1/2, 3/8, 1/8]
#   2    0     [1/2, 1/4, 1/4]  [1/4, 1/2, 1/4]
#   3    2     [1/2, 1/4, 1/4]  [1/2, 1/4, 1/4]
#   pad  1     garbage
#
# With gamma = 0.5, r = 0.5 e_y + 0.5 p_t:
#   r1 = r2 = [3/4, 1/8, 1/8],  r3 = [1/4, 1/8, 5/8]
# Difficulties d = KL(r || p_s):
#   d1 = .75 ln(.75/.5) + .125 ln(.125/.375) + .125 ln(.125/.125) = .75 ln 1.5 - .125 ln 3     = 0.166772
#   d2 = .75 ln(.75/.25) + .125 ln(.125/.5) + .125 ln(.125/.25)   = .75 ln 3 - .125 ln 4 - .125 ln 2 = 0.564029
#   d3 = .25 ln(.25/.5) + .125 ln(.125/.25) + .625 ln(.625/.25)   = -.375 ln 2 + .625 ln 2.5     = 0.312752
# ---------------------------------------------------------------------------
PAD = 1
P_T = [[0.5, 0.25, 0.25]] * 3 + [[0.2, 0.3, 0.5]]
P_S = [[0.5, 0.375, 0.125], [0.25, 0.5, 0.25], [0.5, 0.25, 0.25], [0.9, 0.05, 0.05]]
HAND_TARGET = torch.tensor([[0, 0, 2, PAD]])
D1 = 0.75 * ln(1.5) - 0.125 * ln(3)
D2 = 0.75 * ln(3) - 0.125 * ln(4) - 0.125 * ln(2)
D3 = -0.375 * ln(2) + 0.625 * ln(2.5)
# vanilla KL on the easy position 1
FKL1 = 0.25 * ln(0.25 / 0.375) + 0.25 * ln(0.25 / 0.125)  # KL(p_t || p_s) = .25 ln(4/3)
RKL1 = 0.375 * ln(0.375 / 0.25) + 0.125 * ln(0.125 / 0.25)  # KL(p_s || p_t)


def hand_batch(dtype=torch.float64):
    lp = lambda p: torch.tensor([p], dtype=dtype).log()  # noqa: E731
    return lp(P_S), lp(P_T), HAND_TARGET


def sekd(student, teacher, target=HAND_TARGET, pad=PAD, **kw):
    kw.setdefault("gt_weight", 0.5)
    return losses.self_evolution_kd(student, losses.DenseTeacher.from_logits(teacher), target, pad, **kw)


def test_hand_difficulties():
    student, teacher, target = hand_batch()
    assert [D1, D2, D3] == pytest.approx([0.166772, 0.564029, 0.312752], abs=1e-6)
    mask = losses.non_pad_mask(target, PAD)
    prior = losses.gold_teacher_log_mixture(teacher, target, 0.5)
    expected_r = [[0.75, 0.125, 0.125], [0.75, 0.125, 0.125], [0.25, 0.125, 0.625]]
    assert torch.allclose(prior[0, :3].exp(), torch.tensor(expected_r, dtype=torch.float64), atol=1e-12)
    d = losses.kl_from_log_probs(student, prior, mask)
    assert d[0].tolist() == pytest.approx([D1, D2, D3, 0.0], abs=1e-12)
    terms = sekd(student, teacher, hard_criterion="all")
    assert terms.difficulty_sum.item() == pytest.approx(D1 + D2 + D3, abs=1e-12)


@pytest.mark.parametrize(
    "criterion, threshold, ratio, expected",
    [
        ("threshold", 0.3, 0.5, [False, True, True, False]),  # d2, d3 > .3
        ("threshold", 0.5, 0.5, [False, True, False, False]),  # only d2 > .5
        ("threshold", 0.6, 0.5, [False, False, False, False]),
        ("ratio", 1.0, 0.5, [False, True, True, False]),  # k = ceil(.5 * 3) = 2 -> d2, d3
        ("ratio", 1.0, 1 / 3, [False, True, False, False]),  # k = ceil(1) = 1 -> d2
        ("ratio", 1.0, 0.34, [False, True, True, False]),  # k = ceil(1.02) = 2
        ("ratio", 1.0, 0.0, [False, False, False, False]),  # k = 0
        ("ratio", 1.0, 1.0, [True, True, True, False]),  # k = 3, the pad never
        ("all", 1.0, 0.0, [True, True, True, False]),
    ],
)
def test_hand_hard_split(criterion, threshold, ratio, expected):
    student, teacher, target = hand_batch()
    d = torch.tensor([[D1, D2, D3, 7.0]], dtype=torch.float64)  # huge garbage on the pad
    mask = losses.non_pad_mask(target, PAD)
    hard = losses.sekd_hard_mask(d, mask, criterion, threshold, ratio)
    assert hard[0].tolist() == expected
    terms = sekd(student, teacher, hard_criterion=criterion, threshold=threshold, hard_ratio=ratio)
    assert terms.n_hard.item() == sum(expected)
    # const lambda = .5 on each hard token
    assert terms.ratio_sum.item() == pytest.approx(0.5 * sum(expected), abs=1e-12)


def test_ratio_ties_are_included():
    d = torch.tensor([[1.0, 2.0, 2.0, 0.5]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    # k = ceil(.25 * 4) = 1, gate = 2.0, both 2.0 are hard (Selective-KD's convention)
    assert losses.sekd_hard_mask(d, mask, "ratio", hard_ratio=0.25)[0].tolist() == [False, True, True, False]


def test_hand_ratios():
    d = torch.tensor([[D1, D2, D3, 5.0]], dtype=torch.float64)
    hard = torch.tensor([[False, True, True, False]])
    const = losses.sekd_ratios(d, hard, lam=0.5, mode="const", lambda_max=0.9)
    assert const[0].tolist() == [0.0, 0.5, 0.5, 0.0]
    # const is clipped too: min(.5, .3) = .3
    assert losses.sekd_ratios(d, hard, 0.5, "const", 0.3)[0].tolist() == pytest.approx([0, 0.3, 0.3, 0])
    # linear, slope 1/nat, clip .5: [0, min(.5, .564), min(.5, .3128), 0]
    linear = losses.sekd_ratios(d, hard, lam=1.0, mode="linear", lambda_max=0.5)
    assert linear[0].tolist() == pytest.approx([0.0, 0.5, D3, 0.0], abs=1e-12)
    # linear, slope 2: [0, min(.9, 1.128), min(.9, .6255), 0]
    linear2 = losses.sekd_ratios(d, hard, lam=2.0, mode="linear", lambda_max=0.9)
    assert linear2[0].tolist() == pytest.approx([0.0, 0.9, 2 * D3, 0.0], abs=1e-12)


def test_hand_student_side_forward_kl():
    # threshold .3 -> hard {2, 3}, lambda = .5 there
    # pos 2: q = .5 [.25,.5,.25] + .5 [.75,.125,.125] = [.5, .3125, .1875]
    #        KL(p_t||q) = .5 ln 1 + .25 ln(.25/.3125) + .25 ln(.25/.1875) = .25 ln .8 + .25 ln(4/3)
    # pos 3: q = .5 [.5,.25,.25] + .5 [.25,.125,.625] = [.375, .1875, .4375]
    #        KL(p_t||q) = .5 ln(4/3) + .25 ln(4/3) + .25 ln(4/7)
    student, teacher, target = hand_batch()
    kl2 = 0.25 * ln(0.8) + 0.25 * ln(4 / 3)
    kl3 = 0.75 * ln(4 / 3) + 0.25 * ln(4 / 7)
    terms = sekd(student, teacher, hard_criterion="threshold", threshold=0.3, lam=0.5)
    assert terms.kd_loss.item() == pytest.approx(FKL1 + kl2 + kl3, abs=1e-12)
    assert terms.kd_loss.item() == pytest.approx(0.163913, abs=1e-6)
    assert (terms.n_hard.item(), terms.ratio_sum.item()) == (2, 1.0)
    # the mixing matters: plain Word-KD is FKL1 + (.5 ln(.5/.25) + .25 ln(.25/.5)) + 0 = 0.245206
    word = losses.kl_divergence(student, teacher, target, PAD).item()
    assert word == pytest.approx(FKL1 + 0.25 * ln(2), abs=1e-12)
    assert word - terms.kd_loss.item() > 0.08


def test_hand_student_side_reverse_kl():
    # KL(q || p_t) with the same proxies as above; easy position 1: KL(p_s || p_t)
    # pos 2: .5 ln(.5/.5) + .3125 ln(.3125/.25) + .1875 ln(.1875/.25) = .3125 ln 1.25 + .1875 ln .75
    # pos 3: .375 ln(.375/.5) + .1875 ln(.1875/.25) + .4375 ln(.4375/.25) = .5625 ln .75 + .4375 ln 1.75
    student, teacher, _ = hand_batch()
    kl2 = 0.3125 * ln(1.25) + 0.1875 * ln(0.75)
    kl3 = 0.5625 * ln(0.75) + 0.4375 * ln(1.75)
    terms = sekd(student, teacher, hard_criterion="threshold", threshold=0.3, lam=0.5, divergence="rkl")
    assert terms.kd_loss.item() == pytest.approx(RKL1 + kl2 + kl3, abs=1e-12)
    assert terms.kd_loss.item() == pytest.approx(0.164209, abs=1e-6)


def test_hand_target_side():
    # qbar = .75 p_t + .25 e_y on hard tokens {2, 3} (lambda = .25)
    # pos 2 (gold 0): qbar = [.625, .1875, .1875], p_s = [.25, .5, .25]
    # pos 3 (gold 2): qbar = [.375, .1875, .4375], p_s = [.5, .25, .25]
    student, teacher, _ = hand_batch()
    fkl2 = 0.625 * ln(0.625 / 0.25) + 0.1875 * ln(0.1875 / 0.5) + 0.1875 * ln(0.1875 / 0.25)
    fkl3 = 0.375 * ln(0.375 / 0.5) + 0.1875 * ln(0.1875 / 0.25) + 0.4375 * ln(0.4375 / 0.25)
    rkl2 = 0.25 * ln(0.25 / 0.625) + 0.5 * ln(0.5 / 0.1875) + 0.25 * ln(0.25 / 0.1875)
    rkl3 = 0.5 * ln(0.5 / 0.375) + 0.25 * ln(0.25 / 0.1875) + 0.25 * ln(0.25 / 0.4375)
    opts = dict(hard_criterion="threshold", threshold=0.3, lam=0.25, prior_side="target")
    fkl = sekd(student, teacher, divergence="fkl", **opts)
    rkl = sekd(student, teacher, divergence="rkl", **opts)
    assert fkl.kd_loss.item() == pytest.approx(FKL1 + fkl2 + fkl3, abs=1e-12)
    assert rkl.kd_loss.item() == pytest.approx(RKL1 + rkl2 + rkl3, abs=1e-12)
    # the difficulty (stage 1) does not depend on the stage-2 reading
    assert fkl.difficulty_sum.item() == pytest.approx(D1 + D2 + D3, abs=1e-12)


def test_hand_linear_mode():
    # slope 1, clip .5: lambda = [0, .5, d3]; pos 3: q = (1-d3) p_s + d3 r3
    student, teacher, _ = hand_batch()
    q = [0.5 - 0.25 * D3, 0.25 - 0.125 * D3, 0.25 + 0.375 * D3]
    kl3 = 0.5 * ln(0.5 / q[0]) + 0.25 * ln(0.25 / q[1]) + 0.25 * ln(0.25 / q[2])
    kl2 = 0.25 * ln(0.8) + 0.25 * ln(4 / 3)  # lambda = .5, as in the const test
    terms = sekd(student, teacher, hard_criterion="threshold", threshold=0.3, lam=1.0,
                 lambda_mode="linear", lambda_max=0.5)
    assert terms.kd_loss.item() == pytest.approx(FKL1 + kl2 + kl3, abs=1e-12)
    assert terms.ratio_sum.item() == pytest.approx(0.5 + D3, abs=1e-12)


def test_gt_weight_extremes():
    student, teacher, target = hand_batch()
    # gamma = 0: r = p_t
    assert torch.equal(losses.gold_teacher_log_mixture(teacher, target, 0.0), teacher)
    # gamma = 1: r = e_y exactly (log 0 = -inf off the gold)
    r = losses.gold_teacher_log_mixture(teacher, target, 1.0).exp()
    assert torch.equal(r, torch.nn.functional.one_hot(target, 3).to(r.dtype))
    # difficulty with gamma = 1 is the gold NLL: -ln p_s(y) = ln 2, ln 4, ln 4
    terms = sekd(student, teacher, gt_weight=1.0, hard_criterion="all")
    assert terms.difficulty_sum.item() == pytest.approx(ln(2) + 2 * ln(4), abs=1e-12)
    assert torch.isfinite(terms.kd_loss)


@pytest.mark.parametrize("divergence", ["fkl", "rkl"])
@pytest.mark.parametrize("prior_side", ["student", "target"])
@pytest.mark.parametrize(
    "zeroing", [dict(lam=0.0), dict(hard_ratio=0.0), dict(hard_criterion="threshold", threshold=1e9)]
)
def test_zero_ratio_is_vanilla_kl(divergence, prior_side, zeroing):
    student, teacher, target = sv.spec_batch()
    for tau in (1.0, 2.0):
        terms = losses.self_evolution_kd(
            student, losses.DenseTeacher.from_logits(teacher), target, sv.PAD, divergence=divergence, prior_side=prior_side,
            temperature=tau, **zeroing,
        )
        assert terms.ratio_sum.item() == 0.0
        lps, lpt = losses.log_probs(student, tau), losses.log_probs(teacher, tau)
        mask = losses.non_pad_mask(target, sv.PAD)
        if divergence == "fkl":
            expected = losses.kl_divergence(student, teacher, target, sv.PAD, tau)
            assert terms.kd_loss.item() == expected.item()  # bit for bit
        else:
            expected = (lps.exp() * (lps - lpt)).sum(-1).masked_fill(~mask, 0).sum()
            assert terms.kd_loss.item() == pytest.approx(expected.item(), rel=1e-12)
    assert losses.kl_divergence(student, teacher, target, sv.PAD).item() == pytest.approx(sv.WORD_KD_KL_TAU_1)


def test_full_loss_combination():
    student, teacher, target = sv.spec_batch()
    opts = dict(hard_criterion="all", lam=0.3)
    for tau, scale, beta in ((1.0, True, 0.0), (2.0, True, 0.4), (2.0, False, 1.0)):
        loss, nll, terms = losses.self_evolution_kd_loss(
            student, losses.DenseTeacher.from_logits(teacher), target, sv.PAD, 0.1, 0.3, tau, scale, nll_weight=beta, **opts
        )
        ls, nll_ref = losses.label_smoothed_nll(student, target, sv.PAD, 0.1)
        kd = losses.self_evolution_kd(student, losses.DenseTeacher.from_logits(teacher), target, sv.PAD, temperature=tau, **opts).kd_loss
        factor = tau**2 if scale else 1.0
        assert nll.item() == pytest.approx(sv.NLL, rel=1e-6)
        expected = 0.7 * ls.item() + 0.3 * factor * kd.item() + beta * nll_ref.item()
        assert loss.item() == pytest.approx(expected, rel=1e-12)
    loss, nll, terms = losses.self_evolution_kd_loss(student, None, target, sv.PAD, 0.1, 0.3, nll_weight=1.0)
    assert terms is None and loss.item() == pytest.approx(sv.LS_NLL_EPS_0_1, rel=1e-6)


ALL_READINGS = list(itertools.product(["student", "target"], ["fkl", "rkl"]))


def _random_batch(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(2, 3, 6, generator=g, dtype=dtype) * 2
    teacher = torch.randn(2, 3, 6, generator=g, dtype=dtype) * 2
    target = torch.tensor([[2, 3, 5], [4, 2, 0]])  # pad = 0 at [1, 2]
    return student, teacher, target


@pytest.mark.parametrize("prior_side, divergence", ALL_READINGS)
@pytest.mark.parametrize("gt_weight", [0.0, 0.5, 1.0])
def test_gradcheck_stage_two(prior_side, divergence, gt_weight):
    student, teacher, target = _random_batch()
    student.requires_grad_(True)
    mask = target.ne(0)
    lpt = torch.log_softmax(teacher, -1)
    ratio = torch.tensor([[0.0, 0.3, 0.7], [0.5, 0.0, 0.9]], dtype=torch.float64)

    def f(s):
        return losses.sekd_divergence(
            torch.log_softmax(s, -1), lpt, target, ratio, mask, gt_weight, divergence, prior_side
        ).sum()

    assert torch.autograd.gradcheck(f, (student,))


@pytest.mark.parametrize("prior_side, divergence", ALL_READINGS)
@pytest.mark.parametrize("hard_criterion", ["threshold", "ratio", "all"])
def test_gradcheck_full_loss_const_mode(prior_side, divergence, hard_criterion):
    # with a constant lambda the hard set does not move under gradcheck's tiny perturbations
    student, teacher, target = _random_batch(1)
    student.requires_grad_(True)
    opts = dict(hard_criterion=hard_criterion, threshold=1.0, hard_ratio=0.5, lam=0.4,
                divergence=divergence, prior_side=prior_side)
    terms = losses.self_evolution_kd(student, losses.DenseTeacher.from_logits(teacher), target, 0, **opts)
    assert 0 < terms.n_hard.item() <= 5
    def f(s):
        return losses.self_evolution_kd_loss(s, losses.DenseTeacher.from_logits(teacher), target, 0, 0.1, 0.5, 1.5, nll_weight=0.2, **opts)[0]

    assert torch.autograd.gradcheck(f, (student,))


def test_difficulty_and_ratio_are_stop_gradient():
    # linear mode: lambda_t depends on p_s, but only through sg(p_s), so the
    # gradient is that of stage 2 with the ratios held constant
    student, teacher, target = _random_batch(2)
    student.requires_grad_(True)
    opts = dict(hard_criterion="all", lam=0.5, lambda_mode="linear", lambda_max=0.8)
    losses.self_evolution_kd(student, losses.DenseTeacher.from_logits(teacher), target, 0, **opts).kd_loss.backward()
    mask = target.ne(0)
    lps, lpt = torch.log_softmax(student.detach(), -1), torch.log_softmax(teacher, -1)
    prior = losses.gold_teacher_log_mixture(lpt, target, 0.5)
    d = losses.kl_from_log_probs(lps, prior, mask)
    ratio = (0.5 * d).clamp(max=0.8).masked_fill(~mask, 0)
    assert ratio[mask].min() > 0
    s2 = student.detach().clone().requires_grad_(True)
    losses.sekd_divergence(torch.log_softmax(s2, -1), lpt, target, ratio, mask).sum().backward()
    assert torch.allclose(student.grad, s2.grad, atol=1e-12)


def _extreme_batch(big, dtype):
    # student: gold token at -big (probability ~0), others +-1e4 (or +-6e4 in half);
    # teacher: extreme too, one token at -big
    student = torch.tensor(
        [[[-big, 1e4, -1e4, 0.0], [3.0, -big, 1e4, 1e4], [0.0, 0.0, 0.0, 0.0]]], dtype=torch.float32
    )
    teacher = torch.tensor(
        [[[1e4, -big, 0.0, -1e4], [-1e4, 1e4, -big, 2.0], [1e4, 1e4, -big, 5.0]]], dtype=torch.float32
    )
    if dtype == torch.float16:
        student, teacher = (x.clamp(-6e4, 6e4) for x in (student, teacher))
    target = torch.tensor([[0, 1, 3]])
    return student.to(dtype), teacher.to(dtype), target


@pytest.mark.parametrize("dtype, big", [(torch.float32, 1e9), (torch.float16, 6e4), (torch.float64, 1e9)])
def test_extreme_logits_are_finite_for_every_flag_combination(dtype, big):
    combos = itertools.product(
        ["student", "target"], ["fkl", "rkl"], ["threshold", "ratio", "all"], ["const", "linear"],
        [0.0, 0.5, 1.0],
    )
    n = 0
    for prior_side, divergence, hard_criterion, mode, gamma in combos:
        student, teacher, target = _extreme_batch(big, dtype)
        student.requires_grad_(True)
        loss, _, terms = losses.self_evolution_kd_loss(
            student, losses.DenseTeacher.from_logits(teacher), target, padding_idx=2, epsilon=0.1, alpha=0.5, nll_weight=0.5,
            gt_weight=gamma, hard_criterion=hard_criterion, threshold=1.0, hard_ratio=0.5, lam=0.5,
            lambda_mode=mode, lambda_max=0.9, divergence=divergence, prior_side=prior_side,
        )
        loss.backward()
        assert torch.isfinite(loss), (prior_side, divergence, hard_criterion, mode, gamma)
        assert torch.isfinite(student.grad).all(), (prior_side, divergence, hard_criterion, mode, gamma)
        assert torch.isfinite(terms.difficulty_sum) and torch.isfinite(terms.ratio_sum)
        assert terms.n_hard.item() >= 1
        n += 1
    assert n == 72


def test_half_inputs_are_computed_in_float32():
    student, teacher, target = sv.spec_batch(torch.float32)
    ref = losses.self_evolution_kd(student, losses.DenseTeacher.from_logits(teacher), target, sv.PAD, hard_criterion="all")
    half = losses.self_evolution_kd(student.half(), losses.DenseTeacher.from_logits(teacher.half()), target, sv.PAD, hard_criterion="all")
    assert half.kd_loss.dtype == torch.float32
    assert half.kd_loss.item() == pytest.approx(ref.kd_loss.item(), rel=5e-3)


def test_pad_positions_are_ignored():
    student, teacher, target = sv.spec_batch()
    garbage = student.clone()
    garbage[1, 3] = 1e3  # the pad position
    a = losses.self_evolution_kd(student, losses.DenseTeacher.from_logits(teacher), target, sv.PAD, hard_ratio=0.5)
    b = losses.self_evolution_kd(garbage, losses.DenseTeacher.from_logits(teacher), target, sv.PAD, hard_ratio=0.5)
    assert a == b  # every field, bit for bit


# ---------------------------------------------------------------------------
# The criterion on a real (tiny) fairseq Transformer and batch
# ---------------------------------------------------------------------------


def _criterion(task, **overrides):
    return SelfEvolutionKDCriterion(task, SelfEvolutionKDConfig(sentence_avg=False, **overrides))


@pytest.fixture(scope="module")
def toy_setup():
    task = toy.make_task()
    return task, toy.make_model(task), toy.make_teacher(task), toy.make_sample(task, batch_size=4)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(sekd_lambda=0.0),
        dict(sekd_hard_ratio=0.0),
        dict(sekd_hard_criterion="threshold", sekd_threshold=1e6),
        dict(sekd_lambda=0.0, sekd_prior_side="target", kd_temperature=2.0),
    ],
)
def test_criterion_without_mixing_equals_word_kd(toy_setup, overrides):
    task, model, teacher, sample = toy_setup
    common = {k: v for k, v in overrides.items() if k.startswith("kd_")}
    word = WordKDCriterion(task, WordKDConfig(sentence_avg=False, kd_alpha=0.3, **common))
    sekd_crit = _criterion(task, kd_alpha=0.3, **overrides)
    w_loss, w_size, w_log = word(model, sample, teacher=teacher)
    s_loss, s_size, s_log = sekd_crit(model, sample, teacher=teacher)
    assert s_size == w_size == sample["ntokens"]
    assert s_log["kd_loss"].item() == w_log["kd_loss"].item()
    assert s_loss.item() == pytest.approx(w_loss.item(), rel=1e-6)
    tau = common.get("kd_temperature", 1.0)
    logits = model(**sample["net_input"])[0]
    pad = task.target_dictionary.pad()
    kl = losses.kl_divergence(logits, teacher(sample["net_input"]), sample["target"], pad, tau)
    assert s_log["kd_loss"].item() == pytest.approx(kl.item(), rel=1e-6)
    assert s_log["sekd_ratio"] == 0.0


def test_criterion_logs_the_three_statistics(toy_setup):
    task, model, teacher, sample = toy_setup
    crit = _criterion(
        task, sekd_hard_ratio=0.25, sekd_lambda=0.2, sekd_lambda_mode="linear", sekd_nll_weight=0.5
    )
    loss, size, log = crit(model, sample, teacher=teacher)
    logits = model(**sample["net_input"])[0]
    terms = losses.self_evolution_kd(
        logits, losses.DenseTeacher.from_logits(teacher(sample["net_input"])), sample["target"], task.target_dictionary.pad(),
        hard_ratio=0.25, lam=0.2, lambda_mode="linear",
    )
    n = sample["ntokens"]
    assert log["sekd_hard"] == terms.n_hard.item() >= math.ceil(0.25 * n)
    assert log["kd_tokens"] == n
    with metrics.aggregate() as agg:
        SelfEvolutionKDCriterion.reduce_metrics([log, log])
        values = agg.get_smoothed_values()
    assert values["sekd_hard_frac"] == pytest.approx(terms.n_hard.item() / n, abs=1e-4)
    assert values["sekd_difficulty"] == pytest.approx(terms.difficulty_sum.item() / n, abs=1e-3)
    assert values["sekd_ratio"] == pytest.approx(terms.ratio_sum.item() / n, abs=1e-4)
    assert values["sekd_ratio"] > 0 and values["sekd_difficulty"] > 0
    assert "kd_loss" in values and "kd_top1_agree" in values
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.zero_grad()


def test_criterion_validation_is_plain_ls_nll(toy_setup):
    task, model, _, sample = toy_setup
    loss, _, log = _criterion(task, sekd_nll_weight=1.0)(model, sample)
    logits = model(**sample["net_input"])[0]
    ls, _ = losses.label_smoothed_nll(logits, sample["target"], task.target_dictionary.pad(), 0.1)
    assert loss.item() == pytest.approx(ls.item(), rel=1e-6)
    assert "sekd_hard" not in log and "kd_loss" not in log


@pytest.mark.parametrize(
    "overrides, flag",
    [
        (dict(sekd_gt_weight=1.5), "--sekd-gt-weight"),
        (dict(sekd_hard_ratio=-0.1), "--sekd-hard-ratio"),
        (dict(sekd_threshold=-1.0), "--sekd-threshold"),
        (dict(sekd_lambda=-0.5), "--sekd-lambda"),
        (dict(sekd_lambda_max=1.0), "--sekd-lambda-max"),
        (dict(sekd_lambda=0.95), "--sekd-lambda"),  # const mode, above lambda_max = .9
        (dict(sekd_nll_weight=-1.0), "--sekd-nll-weight"),
    ],
)
def test_bad_flags_raise_distillation_error(overrides, flag):
    task = toy.make_task()
    with pytest.raises(DistillationError, match=flag) as err:
        _criterion(task, **overrides)
    assert "\n" not in str(err.value)


def test_linear_mode_allows_lambda_above_lambda_max():
    _criterion(toy.make_task(), sekd_lambda=3.0, sekd_lambda_mode="linear")
