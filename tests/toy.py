"""In-memory toy setting for criterion tests: dictionary, task, tiny models, batches.

No files and no CLI: a criterion can be called on a real fairseq
``TransformerModel`` and a real ``LanguagePairDataset`` batch in milliseconds.
End-to-end tests through the command-line tools live in ``test_end_to_end*.py``.
"""

import argparse

import torch
from fairseq.data import Dictionary, LanguagePairDataset
from fairseq.models.transformer import TransformerModel, base_architecture

from fairseq_kd.tasks.distillation_translation import (
    DistillationTranslationConfig,
    DistillationTranslationTask,
)
from fairseq_kd.teacher import TeacherEnsemble


def make_dictionary(n_words: int = 24) -> Dictionary:
    d = Dictionary()
    for i in range(n_words):
        d.add_symbol(f"w{i}")
    d.finalize(padding_factor=1)
    return d


def make_task(n_words: int = 24, **cfg_overrides) -> DistillationTranslationTask:
    d = make_dictionary(n_words)
    cfg = DistillationTranslationConfig(data="toy", source_lang="src", target_lang="tgt", **cfg_overrides)
    return DistillationTranslationTask(cfg, d, d)


def make_model(task, seed: int = 0, dim: int = 16, layers: int = 1, dropout: float = 0.0):
    torch.manual_seed(seed)
    args = argparse.Namespace(
        arch="transformer",
        encoder_embed_dim=dim,
        decoder_embed_dim=dim,
        encoder_ffn_embed_dim=2 * dim,
        decoder_ffn_embed_dim=2 * dim,
        encoder_layers=layers,
        decoder_layers=layers,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        dropout=dropout,
        attention_dropout=0.0,
        activation_dropout=0.0,
        max_source_positions=64,
        max_target_positions=64,
    )
    base_architecture(args)
    return TransformerModel.build_model(args, task)


def make_sample(task, batch_size: int = 3, seed: int = 0, min_len: int = 2, max_len: int = 6):
    """A real collated batch: right-padded targets ending in EOS, and
    ``prev_output_tokens`` starting with EOS, as fairseq's translation task builds them."""
    g = torch.Generator().manual_seed(seed)
    d = task.target_dictionary
    first, last = d.nspecial, len(d) - 1

    def sentence():
        n = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        body = torch.randint(first, last + 1, (n,), generator=g)
        return torch.cat([body, torch.tensor([d.eos()])])

    src = [sentence() for _ in range(batch_size)]
    tgt = [sentence() for _ in range(batch_size)]
    dataset = LanguagePairDataset(src, [len(s) for s in src], d, tgt, [len(t) for t in tgt], d)
    return dataset.collater([dataset[i] for i in range(batch_size)])


def make_teacher(task, seeds=(1,), **model_kwargs) -> TeacherEnsemble:
    return TeacherEnsemble([make_model(task, seed=s, **model_kwargs) for s in seeds])
