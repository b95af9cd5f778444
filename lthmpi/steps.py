"""A training step count written as epochs or iterations ("2ep", "500it").

The late-reset points of the literature are often fractions of an epoch, so a Step keeps the unit the
user wrote and converts to iterations only once the number of batches per epoch is known.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

_STEP = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ep|it)\s*$")


class StepError(ValueError):
    """A step string that cannot be read."""


@dataclass(frozen=True)
class Step:
    value: float
    unit: str  # "ep" or "it"
    text: str

    @classmethod
    def parse(cls, text: str) -> "Step":
        if not isinstance(text, str):
            raise StepError(f"step {text!r} must be a string such as \"2ep\" or \"500it\"")
        m = _STEP.match(text)
        if not m:
            raise StepError(f"step {text!r} is not of the form \"<number>ep\" or \"<integer>it\" (e.g. \"2ep\", \"500it\")")
        value, unit = float(m.group(1)), m.group(2)
        if unit == "it" and value != int(value):
            raise StepError(f"step {text!r}: iterations must be a whole number")
        return cls(value, unit, text.strip())

    def iterations(self, iterations_per_epoch: int) -> int:
        if self.unit == "it":
            return int(self.value)
        return int(math.floor(self.value * iterations_per_epoch + 1e-9))

    def __str__(self) -> str:
        return self.text
