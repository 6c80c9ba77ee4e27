"""What every scenario shares: the result record, the CI/long switch and seeded fault schedules."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

LONG_ENV = "ZCLIP_RELIABILITY_LONG"


@dataclass(frozen=True)
class Row:
    """One line of docs/reliability.md: what was tried on which front end and what happened.

    ``status``: ``"ok"`` (the guarantee held), ``"FAIL"``, or ``"limit"`` (a documented limitation
    behaved exactly as documented; a limit that changes behaviour is a FAIL too).
    """

    area: str
    front_end: str
    tried: str
    happened: str
    status: str

    @property
    def ok(self) -> bool:
        return self.status in ("ok", "limit")


def row(area: str, front_end: str, tried: str, checks: dict[str, bool], happened: str, *,
        limit: bool = False) -> Row:
    """A row whose status is the conjunction of named checks; failed checks are named in ``happened``."""
    failed = [name for name, good in checks.items() if not good]
    if failed:
        return Row(area, front_end, tried, happened + " -- FAILED: " + ", ".join(failed), "FAIL")
    return Row(area, front_end, tried, happened, "limit" if limit else "ok")


def is_long() -> bool:
    return os.environ.get(LONG_ENV, "") not in ("", "0")


def steps(short: int, long: int = 500) -> int:
    return long if is_long() else short


def fault_plan(seed: int, n_steps: int, world: int, count: int, first: int) -> dict[int, int]:
    """``count`` distinct steps in [first, n_steps) -> the single rank hit there, reproducibly from ``seed``."""
    rng = random.Random(seed)
    chosen = sorted(rng.sample(range(first, n_steps), count))
    return {s: rng.randrange(world) for s in chosen}


def assert_rows(rows: list[Row]) -> None:
    """pytest helper: every row held; the message lists the ones that did not."""
    bad = [r for r in rows if not r.ok]
    assert not bad, "\n".join(f"[{r.area} / {r.front_end}] {r.tried}: {r.happened}" for r in bad)
