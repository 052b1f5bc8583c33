"""The Redis side of `redmap migrate`; owns `RedisEnvironment` (alembic_like's `Environment`).

Built once per command by `cli` (its host factory) from the `[tool.redmap]` table:

- `url`: the Redis URL (`--url` and `REDMAP_URL` win over it; default: the embedded
  server of the project, `redis+embedded://<project>/.redmap`);
- `models`: `"package.module:registry"`, imported with the project folder on sys.path;
- `migrations`: the migrations folder (default `migrations`);
- `prefix`: the key prefix when no `models` are configured (default `redmap`);
- `batch_size` (default 500; env `REDMAP_MIGRATE_BATCH_SIZE`) and `lock_ttl` in
  seconds (default 30; env `REDMAP_MIGRATE_LOCK_TTL`).

Building it connects to nothing: the engine, the models and the version store are
made on first use.
"""

from __future__ import annotations

import importlib
import os
import sys
from functools import cached_property
from typing import Any

from alembic_like.config import Config
from alembic_like.revision import MigrationStep

from ..engine import Engine, create_engine
from ..exc import MigrationError
from ..orm.registry import DEFAULT_PREFIX
from ..orm.registry import registry as Registry  # noqa: N812 - a class named like SQLAlchemy's
from . import autogenerate, layout
from .batch import DEFAULT_BATCH_SIZE, MigrationRun
from .ops import RedisOperations
from .versioning import DEFAULT_LOCK_TTL, RedisVersionStore

__all__ = ["BATCH_SIZE_ENV", "LOCK_TTL_ENV", "RedisEnvironment", "load_registry"]

BATCH_SIZE_ENV = "REDMAP_MIGRATE_BATCH_SIZE"
LOCK_TTL_ENV = "REDMAP_MIGRATE_LOCK_TTL"


def load_registry(spec: str, root: str | os.PathLike[str] | None = None) -> Registry:
    """The registry named `"package.module:attribute"`, imported with `root` on sys.path."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise MigrationError(
            f"models must look like 'package.module:registry', not {spec!r} ([tool.redmap])"
        )
    if root is not None and str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise MigrationError(f"cannot load the models {spec!r}: {exc}") from exc
    if not isinstance(obj, Registry):
        raise MigrationError(f"{spec!r} is a {type(obj).__name__}, not a redmap registry")
    obj.configure()
    return obj


def _setting(config: Config, key: str, env: str, default: float) -> float:
    raw = os.environ.get(env)
    value: Any = raw if raw is not None else config.table.get(key, default)
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not number > 0:
        where = env if raw is not None else f"[tool.{config.name}] {key}"
        raise MigrationError(f"{where} must be a positive number, not {value!r}")
    return number


class RedisEnvironment:
    """Heads, lock, operations, autogenerate and layout snapshots on one Redis database."""

    def __init__(self, config: Config, *, dry_run: bool = False) -> None:
        self.config = config
        self.dry_run = dry_run
        self.batch_size = int(_setting(config, "batch_size", BATCH_SIZE_ENV, DEFAULT_BATCH_SIZE))
        self.lock_ttl = _setting(config, "lock_ttl", LOCK_TTL_ENV, DEFAULT_LOCK_TTL)

    @property
    def url(self) -> str:
        """The configured URL, else the project's embedded server."""
        if self.config.url:
            return self.config.url
        return "redis+embedded://" + str((self.config.root / ".redmap").resolve())

    @cached_property
    def registry(self) -> Registry | None:
        """The configured models' registry (imported on first use), or None."""
        if not self.config.models:
            return None
        return load_registry(self.config.models, self.config.root.resolve())

    def _require_registry(self, what: str) -> Registry:
        if self.registry is None:
            raise MigrationError(
                f'{what} needs the models: set models = "package.module:registry" in '
                f"[tool.{self.config.name}] of {self.config.path}"
            )
        return self.registry

    @property
    def prefix(self) -> str:
        """The registry's key prefix (`[tool.redmap] prefix` when no models are configured)."""
        if self.registry is not None:
            return self.registry.prefix
        return str(self.config.table.get("prefix", DEFAULT_PREFIX))

    @cached_property
    def engine(self) -> Engine:
        """The engine for `url`, made on first use (an embedded server starts here), once
        its server has loaded its data set: the migration's raw client does not re-send."""
        engine = create_engine(self.url)
        engine.dialect.wait_until_loaded()
        return engine

    @property
    def client(self) -> Any:
        """The raw redis-py client."""
        return self.engine.dialect.client

    @cached_property
    def store(self) -> RedisVersionStore:
        """Where heads, lock and checkpoints live."""
        return RedisVersionStore(self.client, self.prefix, url=self.url, lock_ttl=self.lock_ttl)

    # -- alembic_like's Environment ------------------------------------------------------

    def version_store(self) -> RedisVersionStore:
        """The store of this database (alembic_like's `VersionStore`)."""
        return self.store

    def operations(self, step: MigrationStep) -> RedisOperations:
        """A fresh `op` for one step, carrying the run's client, registry and settings."""
        run = MigrationRun(
            self.client,
            url=self.url,
            prefix=self.prefix,
            messaging=self.config.messaging,
            registry=self.registry,
            store=self.store,
            batch_size=self.batch_size,
            dry_run=self.dry_run,
        )
        run.clustered = self.engine.dialect.supports_cluster
        return RedisOperations(run)

    def compare(self) -> list[str]:
        """The upgrade body taking the layout recorded at head to the models' layout."""
        current = layout.snapshot(self._require_registry("autogenerate/check"))
        recorded = layout.load(self.client, self.prefix, url=self.url)
        return autogenerate.compare(recorded, current)

    def render_imports(self) -> list[str]:
        """Imports the compared body needs: none, as it holds literals only."""
        return []

    def record_snapshot(self, heads: tuple[str, ...]) -> None:
        """Record the models' layout as the one at `heads` (nothing without models)."""
        if self.registry is not None:
            layout.record(self.client, layout.snapshot(self.registry, heads), url=self.url)

    def close(self) -> None:
        """Release the engine's connections, if one was made."""
        if "engine" in self.__dict__:
            self.engine.dispose()
