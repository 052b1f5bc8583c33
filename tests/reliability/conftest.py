"""Fixtures of the reliability suite; the servers come from `tests/conftest.py`."""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from typing import Any

import pytest

from redmap.audit import AuditReport, audit
from tests.reliability._models import reg

SEED_ENV = "REDMAP_SEED"
"""Environment variable fixing the seed of the randomized tests (to replay a failure)."""


@pytest.fixture
def seed() -> int:
    """The seed of a randomized test: `REDMAP_SEED` if set, else a fresh one. Printed at
    set-up, so a failing run shows it (pytest's "Captured stdout setup") to replay."""
    fixed = os.environ.get(SEED_ENV)
    value = int(fixed) if fixed else random.SystemRandom().randrange(2**32)
    print(f"\nseed {value} (replay: {SEED_ENV}={value})")
    return value


@pytest.fixture
def assert_audit_clean(redis_client: Any) -> Callable[[], AuditReport]:
    """A check that recomputes every index and link of the suite's models from the hashes
    (`redmap.audit`) and fails on any mismatch or unexplained key."""

    def check() -> AuditReport:
        report = audit(redis_client, reg)
        assert report.ok, (
            report.summary() + "\n" + "\n".join(report.mismatches + report.unexplained)
        )
        return report

    return check
