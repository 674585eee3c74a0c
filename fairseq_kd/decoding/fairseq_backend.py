"""The fairseq translation backend: the teacher (``--path a.pt`` or
``a.pt:b.pt``, read by the safe checkpoint loader with the dictionary check)
beam-searched by fairseq's ``SequenceGenerator`` (``task.build_generator``),
plus the fairseq task giving the dictionaries and the torch device."""

import os
from typing import Dict, Optional

from fairseq_kd.decoding.backend import TranslationBackend, register_backend
from fairseq_kd.errors import DistillationError


def build_task(data: str, src: Optional[str], tgt: Optional[str]):
    from fairseq.data import data_utils
    from fairseq.tasks.translation import TranslationConfig, TranslationTask

    if not os.path.isdir(data):
        raise DistillationError(f"data directory {data} not found (--data)")
    if src is None or tgt is None:
        src, tgt = data_utils.infer_language_pair(data)
        if src is None:
            raise DistillationError(f"cannot infer the language pair of {data}: pass --source-lang and --target-lang")
    for lang in (src, tgt):
        path = os.path.join(data, f"dict.{lang}.txt")
        if not os.path.isfile(path):
            raise DistillationError(f"{path} not found; --data must be the binarized data directory (fairseq-preprocess output)")
    return TranslationTask.setup_task(TranslationConfig(data=data, source_lang=src, target_lang=tgt))


def resolve_device(device: Optional[str], cpu: bool):
    import torch

    if cpu:
        return torch.device("cpu")
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def generation_settings(args) -> Dict:
    return {
        "beam": args.beam,
        "nbest": args.nbest,
        "max_len_a": args.max_len_a,
        "max_len_b": args.max_len_b,
        "min_len": args.min_len,
        "lenpen": args.lenpen,
        "unkpen": args.unkpen,
        "teacher": [os.path.abspath(p) for p in args.path.split(":") if p],
    }


@register_backend("fairseq")
class FairseqBackend(TranslationBackend):
    """Load the teacher (safe loader, dictionary check) and beam-search it with
    fairseq's ``SequenceGenerator``."""

    def __init__(self, task, teacher_paths: str, settings: Dict, device, precision="fp32", teacher_data_dir=None):
        from fairseq import utils
        from fairseq.dataclass.configs import GenerationConfig

        from fairseq_kd.teacher import load_teacher, split_paths

        if settings["nbest"] > settings["beam"]:
            raise DistillationError(f"--nbest {settings['nbest']} cannot exceed --beam {settings['beam']}")
        teacher = load_teacher(split_paths(teacher_paths), task, precision=precision, teacher_data_dir=teacher_data_dir)
        teacher.to(device)
        self.task, self.device, self.nbest = task, device, settings["nbest"]
        self.models = list(teacher.models)
        gen_cfg = GenerationConfig(**{k: v for k, v in settings.items() if k != "teacher"})
        self.generator = task.build_generator(self.models, gen_cfg)
        max_positions = utils.resolve_max_positions(task.max_positions(), *[m.max_positions() for m in self.models])
        self.max_source_len = max_positions[0]

    def translate(self, sample):
        import torch
        from fairseq import utils

        tgt_dict = self.task.target_dictionary
        sample = utils.apply_to_sample(lambda t: t.to(self.device), sample)
        with torch.no_grad():
            hypos = self.task.inference_step(self.generator, self.models, sample)
        return [
            [(tgt_dict.string(h["tokens"].int().cpu()), float(h["score"])) for h in sent[: self.nbest]]
            for sent in hypos
        ]


def teacher_translator(task, teacher_paths: str, settings: Dict, device, precision="fp32", teacher_data_dir=None):
    """Load the teacher (safe loader, dictionary check) and return
    ``(translate, max_source_len)`` running fairseq's ``SequenceGenerator``."""
    backend = FairseqBackend(task, teacher_paths, settings, device, precision, teacher_data_dir)
    return backend.translate, backend.max_source_len
