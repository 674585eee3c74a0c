"""nn.Modules of the distillation criterions (their pure math is in :mod:`fairseq_kd.losses`)."""
