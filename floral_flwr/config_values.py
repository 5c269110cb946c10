"""Typed readers of run-config values: each turns a raw value (TOML or ``--run-config`` text)
into the typed value or raises :class:`ConfigError` naming the key, the value, what is allowed
and the nearest valid spelling. No torch, no flwr: ``floral_flwr.config`` builds its ``READERS``
table from these.
"""

from __future__ import annotations

import difflib
import math
from typing import Any, Callable


class ConfigError(ValueError):
    """A run-config value is missing, of the wrong type or out of range."""


def nearest(word: Any, choices: Any) -> str | None:
    """The closest spelling of ``word`` among ``choices`` (difflib), or None."""
    if not isinstance(word, str):
        return None
    found = difflib.get_close_matches(word.strip(), [str(c) for c in choices], n=1, cutoff=0.6)
    return found[0] if found else None


def _hint(word: Any, choices: Any) -> str:
    near = nearest(word, choices)
    return f"; did you mean {near!r}?" if near is not None else ""


def _err(key: str, value: Any, allowed: str, hint: str = "") -> ConfigError:
    return ConfigError(f"run config '{key}' = {value!r} is invalid: allowed {allowed}{hint}")


def _as_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise _err(key, value, "true or false", _hint(value, ("true", "false")))


def _as_int(key: str, value: Any, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(value, bool):
        raise _err(key, value, "an integer")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise _err(key, value, "an integer") from None
    if not isinstance(value, int):
        raise _err(key, value, "an integer")
    rng = _range_text(lo, hi)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise _err(key, value, f"an integer {rng}")
    return value


def _as_float(
    key: str,
    value: Any,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
) -> float:
    if isinstance(value, bool):
        raise _err(key, value, "a number")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise _err(key, value, "a number") from None
    if not isinstance(value, (int, float)):
        raise _err(key, value, "a number")
    value = float(value)
    rng = _range_text(lo, hi, lo_open)
    if not math.isfinite(value):
        raise _err(key, value, f"a finite number {rng}".strip())
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise _err(key, value, f"a number {rng}")
    if hi is not None and value > hi:
        raise _err(key, value, f"a number {rng}")
    return value


def _range_text(lo: Any, hi: Any, lo_open: bool = False) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo}, {hi}]"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f"<= {hi}"
    return ""


def is_valid_run_name(name: Any) -> bool:
    """A run name is one directory name inside ``output-dir``: no separators, no ``.``/``..``,
    no hidden name, no control characters; ``""`` (automatic) is valid."""
    if not isinstance(name, str):
        return False
    if name == "":
        return True
    return (len(name) <= 200 and not name.startswith(".") and name.strip() == name
            and not any(c in name for c in "/\\:") and all(c.isprintable() for c in name))


def _as_trim_fraction(key: str, value: Any) -> float:
    """trim-fraction: the weight removed from each end, in [0, 0.5)."""
    beta = _as_float(key, value, 0.0, 0.5)
    if beta >= 0.5:
        raise _err(key, value, "a number in [0, 0.5) (0.5 would trim everything: use robust 'median')")
    return beta


def _as_choice(key: str, value: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise _err(key, value, "one of " + ", ".join(repr(c) for c in choices), _hint(value, choices))
    return value


RANK_WORDS = ("sqrt", "log", "full")
_RANK_ALLOWED = "an int >= 1, a float in (0, 1], 'sqrt', 'log' or 'full'"


def _as_rank(key: str, value: Any) -> float | int | str:
    """rank: int >= 1 (absolute), float in (0, 1] (relative budget rho), or sqrt/log/full."""
    if isinstance(value, str):
        s = value.strip()
        if s in RANK_WORDS:
            return s
        try:
            value = float(s)
        except ValueError:
            raise _err(key, value, _RANK_ALLOWED, _hint(s, RANK_WORDS)) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _err(key, value, _RANK_ALLOWED)
    if isinstance(value, float) and 0.0 < value <= 1.0:
        return value
    if float(value).is_integer() and value >= 1:
        return int(value)
    raise _err(key, value, _RANK_ALLOWED)


def _as_text(allowed: str, ok: Callable[[str], bool]) -> Callable[[str, Any], str]:
    def read(key: str, value: Any) -> str:
        if not isinstance(value, str) or not ok(value):
            raise _err(key, value, allowed)
        return value

    return read


def as_reply_poll(key: str, value: Any) -> float:
    """0 (Flower's own 3 s loop) or 0.01..10 s."""
    poll = _as_float(key, value, 0.0, 10.0)
    if 0.0 < poll < 0.01:
        raise _err(key, value, "0 (Flower's send_and_receive) or a number in [0.01, 10] seconds")
    return poll


def _as_num_shares(key: str, value: Any) -> int:
    """secagg-num-shares: 0 (automatic) or an odd integer >= 3 (SecAgg+ neighbourhoods are
    symmetric around a client, so their size is odd)."""
    allowed = "0 (automatic: min(N, 5)) or an odd integer >= 3"
    try:
        n = _as_int(key, value, 0)
    except ConfigError:
        raise _err(key, value, allowed) from None
    if n != 0 and (n < 3 or n % 2 == 0):
        raise _err(key, value, allowed)
    return n
