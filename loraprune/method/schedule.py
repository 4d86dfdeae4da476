"""Cubic sparsity schedule (Zhu & Gupta 2017), as LoRAPrune uses it.

The schedule says what *fraction of the final removal* must be done after
optimiser step ``t``: 0 before ``start``, ``1 − (1 − (t − start)/(end − start))³``
in between, exactly 1 from ``end`` on. Masks change only on update steps
(every ``every`` steps and always at ``end``), so the target is reached exactly
at ``end`` and the remaining steps train LoRA on the final mask (recovery).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CubicSchedule:
    start: int  # last step with nothing pruned
    end: int  # step at which the final mask is reached
    every: int = 10  # steps between mask updates

    def __post_init__(self):
        if self.start < 0 or self.end <= self.start:
            raise ValueError(f"need 0 <= start < end, got start={self.start}, end={self.end}")
        if self.every < 1:
            raise ValueError(f"prune_every must be >= 1, got {self.every}")

    @classmethod
    def for_run(cls, steps: int, start: float | int = 0.0, end: float | int = 0.75, every: int | None = None):
        """Schedule for a run of ``steps`` optimiser steps; ``start``/``end``
        are step numbers (int) or fractions of ``steps`` (float)."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        s = int(round(start * steps)) if isinstance(start, float) else int(start)
        e = int(round(end * steps)) if isinstance(end, float) else int(end)
        e = min(max(e, s + 1), steps)
        if e <= s:
            raise ValueError(f"pruning must end after it starts and within {steps} steps (start={s}, end={e})")
        if every is None:
            every = max(1, (e - s) // 20)
        return cls(s, e, every)

    def fraction(self, step: int) -> float:
        """Fraction of the final removal due after ``step`` completed steps."""
        if step <= self.start:
            return 0.0
        if step >= self.end:
            return 1.0
        progress = (step - self.start) / (self.end - self.start)
        return 1.0 - (1.0 - progress) ** 3

    def is_update(self, step: int) -> bool:
        """Whether masks are recomputed after ``step``."""
        if step <= self.start or step > self.end:
            return False
        return step == self.end or (step - self.start) % self.every == 0

    def update_steps(self) -> list[int]:
        return [t for t in range(self.start + 1, self.end + 1) if self.is_update(t)]
