"""The numeric test vectors of the method specification (section 7).

``S`` and ``Tch`` are drawn with ``numpy.random.default_rng(0)`` in this
order; ``y`` has 7 non-pad tokens (pad = 1, eos = 2).
"""

import numpy as np
import torch

PAD = 1


def spec_batch(dtype=torch.float64):
    rng = np.random.default_rng(0)
    student = rng.normal(0, 2, (2, 4, 10))
    teacher = rng.normal(0, 3, (2, 4, 10))
    target = torch.tensor([[4, 7, 2, 2], [5, 9, 2, PAD]])
    return (
        torch.tensor(student, dtype=dtype),
        torch.tensor(teacher, dtype=dtype),
        target,
    )


# sums over the 7 non-pad tokens (section 7 of the spec)
LS_NLL_EPS_0_1 = 26.546870
NLL = 26.875882
WORD_KD_KL_TAU_1 = 17.668200
WORD_KD_KL_TAU_2 = 6.287060
TIE_KD_KL_EPS = 17.663123
TIE_KD_RANK_K5 = 14.674480
TIE_KD_TOTAL_N1 = 29.442237
SKL_MEAN = 2.316407
SRKL_MEAN = 1.068216
RKL_MEAN = 2.501023
TIE_RANK_PER_POSITION = [[2.423548, 3.723814, 0.257617, 1.832385], [1.686133, 0.870306, 3.880678, None]]
