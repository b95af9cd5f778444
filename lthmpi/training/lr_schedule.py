"""The learning-rate schedule, once: step decay by lr_gamma at each milestone, as float32 per iteration.

Every backend trains from these numbers (the compiled XLA steps take them as an argument, the C kernels
as an array), so no two backends can disagree about the learning rate of an iteration.
"""
from __future__ import annotations

import numpy as np

from ..steps import Step


class StepDecay:
    """lr * gamma ** (milestones passed): iteration t is past milestone m when t >= m."""

    def __init__(self, lr: float, gamma: float, milestones, per_epoch: int):
        self.lr, self.gamma = np.float32(lr), np.float32(gamma)
        self.milestones = np.asarray(sorted(Step.parse(m).iterations(per_epoch) for m in milestones), np.int64)

    def rates(self, t: int, n: int) -> np.ndarray:
        """The learning rates of iterations t .. t + n - 1, float32."""
        drops = np.searchsorted(self.milestones, np.arange(t, t + n), side="right").astype(np.float32)
        return (self.lr * np.power(self.gamma, drops)).astype(np.float32)

    @classmethod
    def of(cls, train_cfg, per_epoch: int) -> StepDecay:
        return cls(train_cfg.lr, train_cfg.lr_gamma, train_cfg.lr_milestones, per_epoch)
