"""Argmax and top-k ids through block maxima (fairseq_kd/losses/block_max.py) equal torch's own
kernels: ids, ties, NaN, the fallbacks, and the gradient of the gathered values; and the KL that
leaves its gradient factor in the teacher's storage does so only when a backward can follow."""

import pytest
import torch
import torch.nn.functional as F

from fairseq_kd.losses import block_max, chunked


def rows(vocab, seed=0, lead=(3, 7), dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*lead, vocab, generator=g, dtype=dtype) * 4.0


@pytest.mark.parametrize("vocab, width", [(64, 8), (1000, 8), (8000, 64), (8008, 8), (32000, 128), (40008, 8),
                                          (1003, None), (40, None)])
def test_block_width(vocab, width):
    assert block_max.block_width(vocab) == width


@pytest.mark.parametrize("vocab", [64, 1000, 8000, 8008, 32000, 1003, 40])
def test_argmax_ids_equals_torch_argmax(vocab):
    for seed in range(3):
        x = rows(vocab, seed)
        assert torch.equal(block_max.argmax_ids(x), x.argmax(dim=-1))
        lp = F.log_softmax(x, -1)
        assert torch.equal(block_max.argmax_ids(lp), lp.argmax(dim=-1))


def test_argmax_ids_ties_nan_and_infinities_as_torch():
    vocab = 8000
    x = torch.zeros(6, vocab)  # row 0: every entry tied -> index 0
    x[1, [300, 5000, 7999]] = 2.0  # row 1: the first of three maxima, in different blocks
    x[2, [130, 131]] = 1.0  # row 2: two maxima in one block
    x[3, 4000] = float("nan")  # row 3: NaN wins, as in torch.argmax
    x[3, 7000] = float("nan")
    x[4] = float("-inf")  # row 4: a zero-probability row
    x[4, 6543] = 0.0
    x[5, 17] = float("inf")
    expected = x.argmax(dim=-1)
    assert expected.tolist() == [0, 300, 130, 4000, 6543, 17]
    assert torch.equal(block_max.argmax_ids(x), expected)


@pytest.mark.parametrize("vocab", [64, 1000, 8000, 8008, 32000, 1003])
@pytest.mark.parametrize("k", [1, 2, 5, 8])
def test_topk_ids_equal_torch_topk(vocab, k):
    x = rows(vocab, seed=k)
    values, ids = x.topk(k, dim=-1)
    fast = block_max.topk_ids(x, k)
    assert torch.equal(fast, ids)  # random floats: no ties
    assert torch.equal(x.gather(-1, fast), values)


def test_topk_ids_large_k_falls_back_and_refuses_bad_k():
    x = rows(64)
    assert block_max.block_width(64, k=5) is None  # 5 of 8 blocks: no saving, torch's kernel
    assert torch.equal(block_max.topk_ids(x, 20), x.topk(20, dim=-1)[1])
    with pytest.raises(ValueError, match="k must be in"):
        block_max.topk_ids(x, 65)


def test_topk_ids_with_ties_return_the_tied_values():
    x = torch.zeros(2, 8000)
    x[0, [10, 2000, 7000]] = 1.0
    values = x.gather(-1, block_max.topk_ids(x, 5))
    assert torch.equal(values, x.topk(5, dim=-1)[0])
    assert set(block_max.topk_ids(x, 3)[0].tolist()) == {10, 2000, 7000}


def test_gathered_top_values_backpropagate_as_torch_topk():
    x = rows(1000, lead=(2, 3), dtype=torch.float64).requires_grad_(True)
    weights = torch.arange(1.0, 6.0, dtype=torch.float64)
    (x.gather(-1, block_max.topk_ids(x, 5)) * weights).sum().backward()
    y = x.detach().clone().requires_grad_(True)
    (y.topk(5, dim=-1)[0] * weights).sum().backward()
    assert torch.equal(x.grad, y.grad)


@pytest.mark.parametrize("kind, eps", [("kl", 0.0), ("floored", 1e-6)])
def test_teacher_storage_is_reused_only_when_a_backward_can_follow(kind, eps):
    g = torch.Generator().manual_seed(5)
    teacher = F.log_softmax(torch.randn(2, 4, 64, generator=g), -1)
    student = F.log_softmax(torch.randn(2, 4, 64, generator=g), -1)
    mask = torch.ones(2, 4, dtype=torch.bool)
    t = teacher.clone()
    with torch.no_grad():
        chunked.pair_divergence(t, student.clone().requires_grad_(True), mask, kind, eps, overwrite_p=True)
    assert torch.equal(t, teacher)  # no backward: left as it was
    chunked.pair_divergence(t, student, mask, kind, eps, overwrite_p=True)
    assert torch.equal(t, teacher)  # the student needs no gradient: left as it was
    s = student.clone().requires_grad_(True)
    value = chunked.pair_divergence(t, s, mask, kind, eps, overwrite_p=True)
    p = teacher.exp()
    expected = p if kind == "kl" else p * student.exp() / (student.exp() + eps)
    torch.testing.assert_close(t, expected)  # the factor of the student's gradient, from forward on
    value.sum().backward()
    torch.testing.assert_close(s.grad, -expected)
