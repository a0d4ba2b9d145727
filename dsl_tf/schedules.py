"""Update-ratio schedules ρ_t: the fraction of active weights swapped at an exploration."""

from __future__ import annotations

import math

from dsl_tf._validation import is_real, to_float


class UpdateSchedule:
    """Base class: ``schedule(step, end_step) -> ρ_t`` in [0, 1].

    Subclass it and implement :meth:`ratio` for a custom decay; pass the instance as
    ``DynamicSparsity(decay=...)``. The returned ratio is floored at ``min_ratio`` (the
    paper's code uses 0.005) for every step before ``end_step`` and is 0 from
    ``end_step`` on (no exploration after the end of the schedule).
    """

    def __init__(self, initial_ratio: float = 0.5, min_ratio: float = 0.005):
        if not (is_real(initial_ratio) and 0.0 < initial_ratio <= 1.0):
            raise ValueError(f"initial_update_ratio must be in (0, 1], got {initial_ratio!r}")
        initial_ratio = to_float(initial_ratio)
        if not (is_real(min_ratio) and 0.0 <= min_ratio <= initial_ratio):
            raise ValueError(
                f"min_update_ratio must be in [0, initial_update_ratio={initial_ratio}], "
                f"got {min_ratio!r}"
            )
        self.initial_ratio = initial_ratio
        self.min_ratio = to_float(min_ratio)

    def ratio(self, progress: float) -> float:
        """The un-floored ratio at ``progress = step / end_step`` in [0, 1)."""
        raise NotImplementedError

    def __call__(self, step: int, end_step: int) -> float:
        if not (is_real(end_step) and end_step > 0):
            raise ValueError(f"end_step must be positive, got {end_step!r}")
        if step >= end_step:
            return 0.0
        return max(self.min_ratio, float(self.ratio(max(float(step), 0.0) / float(end_step))))

    def get_config(self) -> dict:
        return {"initial_ratio": self.initial_ratio, "min_ratio": self.min_ratio}

    @classmethod
    def from_config(cls, config: dict) -> "UpdateSchedule":
        return cls(**config)


class CosineSchedule(UpdateSchedule):
    """Eq. (2) of the paper: ρ_t = ρ0/2 · (1 + cos(π t / T_end)).

    >>> s = CosineSchedule(0.5, min_ratio=0.0)
    >>> s(0, 100), s(50, 100), round(s(99, 100), 6)
    (0.5, 0.25, 0.000123)
    """

    def ratio(self, progress: float) -> float:
        return self.initial_ratio / 2.0 * (1.0 + math.cos(math.pi * progress))


class LinearSchedule(UpdateSchedule):
    """ρ_t = ρ0 · (1 − t / T_end).

    >>> LinearSchedule(0.5, min_ratio=0.0)(25, 100)
    0.375
    """

    def ratio(self, progress: float) -> float:
        return self.initial_ratio * (1.0 - progress)


class ConstantSchedule(UpdateSchedule):
    """ρ_t = ρ0 (the paper's "no decay" ablation).

    >>> ConstantSchedule(0.3)(99, 100)
    0.3
    """

    def ratio(self, progress: float) -> float:
        return self.initial_ratio


SCHEDULES = {"cosine": CosineSchedule, "linear": LinearSchedule, "constant": ConstantSchedule}
