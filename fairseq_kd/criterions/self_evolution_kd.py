"""Self-Evolution KD (Song, Ding, Zan, Huang, COLING 2025, arXiv 2412.15303).

Hard tokens -- those whose student distribution is far from a blend of the
gold one-hot and the teacher -- are distilled towards a proxy in which that
blend is mixed into the student distribution; easy tokens get plain Word-KD::

    loss = (1 - alpha) * LS-NLL(gold) + alpha * s * L_SEKD + beta * NLL(gold)

with ``s = tau^2`` (``--kd-temperature-scale``) or 1, exactly as ``word_kd``
(whose KD term ``L_SEKD`` equals when every ratio is zero).  The paper has no
public code and its equations were not readable: ``L_SEKD`` is the
reconstruction of methods.md section 3.1, documented with every alternative
reading in :func:`fairseq_kd.losses.self_evolution_kd`.  The flags' defaults
are placeholders, not values from the paper.
"""

from dataclasses import dataclass, field

from fairseq.criterions import register_criterion
from fairseq.dataclass import ChoiceEnum

from fairseq_kd import losses
from fairseq_kd.criterions.base import KDCriterion, KDCriterionConfig
from fairseq_kd.errors import DistillationError


@dataclass
class SelfEvolutionKDConfig(KDCriterionConfig):
    sekd_gt_weight: float = field(
        default=0.5,
        metadata={
            "help": "gamma: weight of the gold one-hot in the prior r = gamma*e_y + (1-gamma)*p_teacher"
        },
    )
    sekd_hard_criterion: ChoiceEnum(losses.SEKD_HARD_CRITERIA) = field(
        default="ratio",
        metadata={
            "help": "which tokens are hard: difficulty above --sekd-threshold, the most difficult "
            "--sekd-hard-ratio of the batch's tokens, or all tokens"
        },
    )
    sekd_threshold: float = field(
        default=1.0,
        metadata={
            "help": "delta, in nats: a token is hard when KL(r || p_student) > delta (threshold criterion)"
        },
    )
    sekd_hard_ratio: float = field(
        default=0.5,
        metadata={
            "help": "rho: fraction of the batch's target tokens treated as hard (ratio criterion)"
        },
    )
    sekd_lambda: float = field(
        default=0.5,
        metadata={
            "help": "lambda: share of the prior in a hard token's proxy (const), or its slope "
            "per nat of difficulty (linear)"
        },
    )
    sekd_lambda_mode: ChoiceEnum(losses.SEKD_LAMBDA_MODES) = field(
        default="const",
        metadata={"help": "const: every hard token gets lambda; linear: min(lambda * difficulty, lambda_max)"},
    )
    sekd_lambda_max: float = field(
        default=0.9,
        metadata={"help": "upper clip of the per-token mixing ratio, in [0, 1)"},
    )
    sekd_divergence: ChoiceEnum(losses.SEKD_DIVERGENCES) = field(
        default="fkl",
        metadata={"help": "fkl: KL(teacher-side || student-side); rkl: the arguments swapped"},
    )
    sekd_prior_side: ChoiceEnum(losses.SEKD_PRIOR_SIDES) = field(
        default="student",
        metadata={
            "help": "student: mix the prior into the student distribution (proxy); target: "
            "smooth the teacher target towards the gold one-hot instead"
        },
    )
    sekd_nll_weight: float = field(
        default=0.0,
        metadata={"help": "beta: weight of an extra unsmoothed gold NLL term, added to the loss"},
    )


@register_criterion("self_evolution_kd", dataclass=SelfEvolutionKDConfig)
class SelfEvolutionKDCriterion(KDCriterion):
    ratio_keys = KDCriterion.ratio_keys + (
        ("sekd_hard", "kd_tokens", "sekd_hard_frac"),
        ("sekd_difficulty", "kd_tokens", "sekd_difficulty"),
        ("sekd_ratio", "kd_tokens", "sekd_ratio"),
    )

    def __init__(self, task, cfg: SelfEvolutionKDConfig):
        super().__init__(task, cfg)
        checks = (
            ("--sekd-gt-weight", cfg.sekd_gt_weight, 0.0 <= cfg.sekd_gt_weight <= 1.0, "in [0, 1]"),
            ("--sekd-threshold", cfg.sekd_threshold, cfg.sekd_threshold >= 0.0, ">= 0"),
            ("--sekd-hard-ratio", cfg.sekd_hard_ratio, 0.0 <= cfg.sekd_hard_ratio <= 1.0, "in [0, 1]"),
            ("--sekd-lambda", cfg.sekd_lambda, cfg.sekd_lambda >= 0.0, ">= 0"),
            ("--sekd-lambda-max", cfg.sekd_lambda_max, 0.0 <= cfg.sekd_lambda_max < 1.0, "in [0, 1)"),
            ("--sekd-nll-weight", cfg.sekd_nll_weight, cfg.sekd_nll_weight >= 0.0, ">= 0"),
        )
        for flag, value, ok, expected in checks:
            if not ok:
                raise DistillationError(f"{flag} must be {expected}, got {value}")
        if str(cfg.sekd_lambda_mode) == "const" and cfg.sekd_lambda > cfg.sekd_lambda_max:
            raise DistillationError(
                f"--sekd-lambda {cfg.sekd_lambda} exceeds --sekd-lambda-max {cfg.sekd_lambda_max} "
                f"in const mode; lower it or raise --sekd-lambda-max"
            )
        self.sekd_options = dict(
            gt_weight=cfg.sekd_gt_weight,
            hard_criterion=str(cfg.sekd_hard_criterion),
            threshold=cfg.sekd_threshold,
            hard_ratio=cfg.sekd_hard_ratio,
            lam=cfg.sekd_lambda,
            lambda_mode=str(cfg.sekd_lambda_mode),
            lambda_max=cfg.sekd_lambda_max,
            divergence=str(cfg.sekd_divergence),
            prior_side=str(cfg.sekd_prior_side),
        )

    def teacher_cache_error(self, manifest):
        return None  # gold, prior and proxy are formed on the teacher's top-k + tail buckets

    def forward(self, model, sample, reduce=True, teacher=None, reference=True):
        """``reference=False`` (source-only rows): the Self-Evolution term alone, no NLL term."""
        (loss, nll_loss, terms), tensors = self.teacher_forced_kd(
            model, sample, teacher, losses.self_evolution_kd_loss, reference,
            nll_weight=self.cfg.sekd_nll_weight if reference else 0.0, release_teacher=True, **self.sekd_options,
        )
        kd_loss = terms.kd_loss if terms is not None else None
        logging_output = self.kd_logging_output(sample, loss, nll_loss, kd_loss, *tensors)
        if terms is not None:
            # tensors, summed by reduce_metrics: no device sync per step
            logging_output["sekd_hard"] = terms.n_hard.detach()
            logging_output["sekd_difficulty"] = terms.difficulty_sum.detach()
            logging_output["sekd_ratio"] = terms.ratio_sum.detach()
        return loss, self.sample_size(sample), logging_output
