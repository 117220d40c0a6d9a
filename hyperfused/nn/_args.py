"""Constructor argument checks shared by every module, so that a wrong argument is named the same way
everywhere: ``name: expected ..., got ...``. bool is refused where a number is expected (True is an int to
Python, but ``hidden_size=True`` is a mistake), and strings are refused where a bool is (``"no"`` is truthy)."""
from __future__ import annotations

import numbers


def positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return int(value)


def non_negative_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name}: expected a non-negative int, got {value!r}")
    return int(value)


def flag(name: str, value) -> bool:
    if not isinstance(value, (bool, numbers.Integral)) or value not in (0, 1):
        raise TypeError(f"{name}: expected a bool, got {value!r}")
    return bool(value)


def real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or value != value:
        raise TypeError(f"{name}: expected a real number, got {value!r}")
    return float(value)


def finite_real(name: str, value) -> float:
    x = real(name, value)
    if x in (float("inf"), float("-inf")):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    return x


def probability(name: str, value, include_one: bool = False) -> float:
    p = real(name, value)
    if not (0.0 <= p <= 1.0 if include_one else 0.0 <= p < 1.0):
        raise ValueError(f"{name}: expected a probability in [0, 1{']' if include_one else ')'}, got {value!r}")
    return p


def int_pair(name: str, value, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints, each at least `minimum`, as a pair (nn.Conv2d's stride, padding, dilation)."""
    items = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(items) != 2 or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < minimum
                              for v in items):
        what = "positive" if minimum == 1 else "non-negative"
        raise ValueError(f"{name}: expected a {what} int or a pair of them, got {value!r}")
    return int(items[0]), int(items[1])
