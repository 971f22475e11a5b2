"""Resource quantities as Kubernetes writes them: CPU cores ("500m", 2) and bytes ("4Gi", "512M").

One parser for both spawners, so a profile means the same on one machine and on a cluster.
"""

from __future__ import annotations

import math
import re

_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50}
_DECIMAL = {"k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15}
_BYTES_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGTP]i|[kKMGTP])?\s*$")
_CPU_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(m)?\s*$")


def parse_bytes(value: object) -> int:
    """Parse "4Gi", "512M", "1.5Gi" or a plain number of bytes; raise ValueError with the value."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a memory size")
    if isinstance(value, int):
        number, unit = float(value), None
    elif isinstance(value, float):
        number, unit = value, None
    elif isinstance(value, str) and (m := _BYTES_RE.match(value)):
        number, unit = float(m.group(1)), m.group(2)
    else:
        if isinstance(value, str) and value.strip().startswith("-"):
            raise ValueError(f"{value!r} is negative")
        raise ValueError(f"{value!r} is not a memory size (use e.g. 512Mi, 4Gi, 4G)")
    if not math.isfinite(number):
        raise ValueError(f"{value!r} is not a memory size (not a finite number)")
    if number < 0:
        raise ValueError(f"{value!r} is negative")
    factor = 1 if unit is None else _BINARY.get(unit) or _DECIMAL[unit]
    return int(number * factor)


def parse_cpu(value: object) -> float:
    """Parse cores: 2, 0.5, "500m"; raise ValueError with the value."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a CPU amount")
    if isinstance(value, (int, float)):
        cores = float(value)
    elif isinstance(value, str) and (m := _CPU_RE.match(value)):
        cores = float(m.group(1)) / (1000 if m.group(2) else 1)
    else:
        if isinstance(value, str) and value.strip().startswith("-"):
            raise ValueError(f"{value!r} is negative")
        raise ValueError(f"{value!r} is not a CPU amount (use e.g. 2, 0.5 or 500m)")
    if not math.isfinite(cores):
        raise ValueError(f"{value!r} is not a CPU amount (not a finite number)")
    if cores < 0:
        raise ValueError(f"{value!r} is negative")
    return cores


def format_bytes(n: int) -> str:
    """Short human form, binary units: 4294967296 -> '4 GiB'."""
    for unit, factor in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= factor:
            value = n / factor
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{n} B"


def to_quantity(n: int) -> str:
    """Bytes in the notation of the profile files, exact: 2147483648 -> '2Gi' (parse_bytes' inverse)."""
    for unit, factor in (("Ti", 2**40), ("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)):
        if n and n % factor == 0:
            return f"{n // factor}{unit}"
    return str(n)


def format_cpu(cores: float) -> str:
    return f"{cores:g} CPU" if cores == 1 else f"{cores:g} CPUs"
