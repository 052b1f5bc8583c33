"""Budgets of the property-based machines: seeded runs, example counts, branch minimums.

A property run that generated nothing, or never reached the branches it exists for,
passes while proving nothing. Every machine therefore runs with a printed seed
(`REDMAP_SEED` replays it; a failure prints the command), refuses
`REDMAP_PP_EXAMPLES=0`, counts its rules and outcomes, and fails when an interesting
branch ran fewer times than its minimum.
"""

from __future__ import annotations

import os
import random
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import seed as hypothesis_seed
from hypothesis.stateful import run_state_machine_as_test

SHRINK = os.environ.get("REDMAP_PP_SHRINK", "1") != "0"
"""`REDMAP_PP_SHRINK=0` reports a failure as found, without shrinking it (faster)."""


def examples_from_env(default: int) -> int:
    """`REDMAP_PP_EXAMPLES`, else `default`; zero or less is an error, not a vacuous pass."""
    raw = os.environ.get("REDMAP_PP_EXAMPLES")
    n = default if raw is None else int(raw)
    if n <= 0:
        raise pytest.UsageError(
            f"REDMAP_PP_EXAMPLES={raw}: a property-based run needs at least one example"
        )
    return n


def run_seeded(
    name: str, machine: Any, *, max_examples: int, steps: int, test_id: str, min_steps: int = 0
) -> int:
    """Run `machine` seeded (`REDMAP_SEED`, else a fresh seed, printed with the command that
    replays the run; printed again on a failure). Returns the seed."""
    fixed = os.environ.get("REDMAP_SEED")
    seed = int(fixed) if fixed else random.SystemRandom().randrange(2**32)
    replay = (
        f"REDMAP_SEED={seed} REDMAP_PP_EXAMPLES={max_examples} "
        f"pytest '{test_id}' -p no:cacheprovider -s"
    )
    print(f"\n{name}: seed {seed} (replay: {replay})")
    hypothesis_seed(seed)(machine)
    try:
        run_state_machine_as_test(
            machine,
            settings=settings(
                max_examples=max_examples,
                stateful_step_count=steps,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
                phases=[p for p in Phase if p is not Phase.shrink or SHRINK],
            ),
            _min_steps=min_steps,
        )
    except BaseException:
        print(f"\n{name} FAILED with seed {seed}; replay with:\n  {replay}")
        raise
    return seed


def check_minimums(
    stats: dict[str, int],
    minimums: dict[str, int],
    *,
    examples: int,
    per: int,
    given: dict[str, tuple[str, int]] | None = None,
) -> None:
    """Fail when a branch ran fewer times than its minimum, given per `per` examples and
    scaled to the run (runs of fewer than `per` / 2 examples are too small to judge).

    `given` holds the branches only one configuration can reach, as `branch: (count,
    minimum)`: `minimum` per `per` examples counted under `count` (`"config unique"`).
    Hypothesis's stateful generation reuses earlier examples' draws, so one value of a
    configuration can get 7% of a run instead of its 25%; scaled to the whole run, such a
    branch's minimum then fails a machine that did reach it as often as it could."""
    if examples < per // 2:
        return
    scale = examples / per
    need = {k: int(v * scale) for k, v in minimums.items()}
    for k, (count, v) in (given or {}).items():
        need[k] = int(v * stats.get(count, 0) / per)
    short = {k: (stats.get(k, 0), n) for k, n in need.items() if stats.get(k, 0) < n}
    assert not short, f"branches that ran too rarely (ran, needed): {short}"


class Stats(dict[str, int]):
    """Counts of a run: rules run, outcomes seen, branches taken."""

    def bump(self, key: str, n: int = 1) -> None:
        self[key] = self.get(key, 0) + n

    def rule(self, fn: Any) -> Any:
        """Decorate a rule (under `@rule`) to count its runs as `rule <name>`."""
        stats = self

        def counted(machine: Any, *args: Any, **kwargs: Any) -> Any:
            stats.bump(f"rule {fn.__name__}")
            return fn(machine, *args, **kwargs)

        counted.__name__ = fn.__name__
        counted.__doc__ = fn.__doc__
        return counted
