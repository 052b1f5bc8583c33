"""The migration state in Redis; owns `RedisVersionStore` (alembic_like's `VersionStore`).

Built by `env.RedisEnvironment`; used by alembic_like's runner and by `impl` (lock
checks between batches, the step's checkpoint key). Keys, all under `{P}:#meta:`:

- `migrate:heads`: JSON `{"heads": [...], "generation": n}`; `generation` grows by one
  at every completed step, so checkpoints of an interrupted step are found again by
  the rerun and never by a later run of the same revision.
- `migrate:lock`: JSON naming the holder, set with `SET NX PX`, renewed by a thread
  while the run lasts and deleted only by its holder (compare-and-delete).
- `migrate:done:<generation>`: the checkpoint set of the step in progress.
- `migrate:log`: the last 1000 completed steps, newest first.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

from alembic_like.exc import LockError
from alembic_like.revision import Direction

from ..dialects.base import translate_errors
from ..exc import MigrationError
from ..orm import keys

__all__ = ["DEFAULT_LOCK_TTL", "LOG_LENGTH", "RedisVersionStore"]

#: Seconds a lock outlives a holder that stopped renewing it (a killed migrator).
DEFAULT_LOCK_TTL = 30.0
LOG_LENGTH = 1000

# Both scripts act only while the lock still holds the caller's value, so a migrator
# whose lock expired (paused past the TTL) can neither extend nor delete a new holder's.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
# KEYS: heads, lock, checkpoint set of the finished generation; ARGV: lock value
# ('' when called without the lock), new heads JSON.
_SET_HEADS = """
if ARGV[1] ~= '' and redis.call('GET', KEYS[2]) ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('DEL', KEYS[3])
return 1
"""


def _meta(prefix: str, name: str, shard: int | None = None) -> str:
    """A migration bookkeeping key: under the registry's tag, or under a shard's."""
    tag = None if shard is None else keys.shard_tag(prefix, shard)
    return keys.meta_key(prefix, "migrate:" + name, tag=tag)


class RedisVersionStore:
    """Heads, lock, checkpoints and step log of one registry prefix, in Redis.

    Every method is one or two round trips; redis errors become `redmap.exc` errors
    naming the URL without its password.
    """

    def __init__(
        self, client: Any, prefix: str, *, url: str, lock_ttl: float = DEFAULT_LOCK_TTL
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.url = url
        self.lock_ttl = lock_ttl
        self.heads_key = _meta(prefix, "heads")
        self.lock_key = _meta(prefix, "lock")
        self.log_key = _meta(prefix, "log")
        # Shards whose checkpoint sets this store handed out during the current step.
        self._shard_checkpoints: set[int] = set()
        self._held: str | None = None  # the lock value while this store holds the lock
        self._lost = threading.Event()

    # -- heads -----------------------------------------------------------------------

    def _state(self) -> tuple[tuple[str, ...], int]:
        with translate_errors(self.url):
            raw = self.client.get(self.heads_key)
        if raw is None:
            return (), 0
        try:
            data = json.loads(raw)
            heads = tuple(str(h) for h in data["heads"])
            return heads, int(data["generation"])
        except (ValueError, KeyError, TypeError) as exc:
            raise MigrationError(
                f"{self.heads_key} does not hold migration heads ({exc}); it was written by "
                f"something else"
            ) from None

    def get_heads(self) -> tuple[str, ...]:
        """The applied heads; `()` is base."""
        return self._state()[0]

    def generation(self) -> int:
        """How many steps have completed on this database; names the current checkpoint."""
        return self._state()[1]

    def checkpoint_key(self, generation: int, shard: int | None = None) -> str:
        """The set recording which objects the step run at `generation` has done.

        A sharded model's objects are marked in a set of their own shard (its hash tag):
        on a cluster the mark is written in the same script as the object, so both must
        share a slot.
        """
        if shard is not None:
            self._shard_checkpoints.add(shard)
        return _meta(self.prefix, f"done:{generation}", shard)

    def set_heads(self, heads: tuple[str, ...]) -> None:
        """Store `heads` and start a new generation, dropping the finished step's checkpoints.

        Refused with `MigrationError` when this store held the lock and lost it.
        """
        generation = self.generation()
        value = json.dumps({"heads": list(heads), "generation": generation + 1})
        with translate_errors(self.url):
            done = self.client.eval(
                _SET_HEADS,
                3,
                self.heads_key,
                self.lock_key,
                self.checkpoint_key(generation),
                self._held or "",
                value,
            )
        if not done:
            self._lost.set()
            self.check_lock()
        # Per-shard sets live in other slots than the heads, so they go after the step is
        # recorded; a set left by a crash here names an old generation and is never read.
        shards = sorted(self._shard_checkpoints)
        self._shard_checkpoints.clear()
        if shards:
            with translate_errors(self.url):
                pipe = self.client.pipeline(transaction=False)
                for shard in shards:
                    pipe.delete(_meta(self.prefix, f"done:{generation}", shard))
                pipe.execute()

    def record_step(self, revision: str, direction: Direction) -> None:
        """Log the completed step (revision, direction, time, lock owner)."""
        entry = json.dumps(
            {
                "revision": revision,
                "direction": direction.value,
                "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "owner": self._owner_of(self._held) if self._held else None,
            }
        )
        with translate_errors(self.url):
            pipe = self.client.pipeline(transaction=False)
            pipe.lpush(self.log_key, entry)
            pipe.ltrim(self.log_key, 0, LOG_LENGTH - 1)
            pipe.execute()

    # -- lock ------------------------------------------------------------------------

    @contextmanager
    def lock(self, owner: str) -> Iterator[None]:
        """Hold the migration lock for the block; `LockError` naming the holder when taken.

        The lock expires `lock_ttl` seconds after its holder stops renewing it (a
        thread renews it every third of that), so a killed migrator blocks others
        for at most `lock_ttl`.
        """
        ttl_ms = max(1, int(self.lock_ttl * 1000))
        value = json.dumps(
            {
                "owner": owner,
                "token": uuid.uuid4().hex,
                "since": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
        )
        with translate_errors(self.url):
            while not self.client.set(self.lock_key, value, nx=True, px=ttl_ms):
                holder = self.client.get(self.lock_key)
                if holder is not None:  # else it expired since: try again
                    raise self._lock_error(holder)
        self._held = value
        self._lost.clear()
        stop = threading.Event()
        renewer = threading.Thread(
            target=self._renew, args=(value, ttl_ms, stop), name="redmap-migrate-lock", daemon=True
        )
        renewer.start()
        try:
            yield
        finally:
            stop.set()
            renewer.join()
            self._held = None
            with translate_errors(self.url):
                self.client.eval(_RELEASE, 1, self.lock_key, value)

    def check_lock(self) -> None:
        """Raise `MigrationError` if the lock this store held has been lost (called per batch)."""
        if self._lost.is_set():
            raise MigrationError(
                f"lost the migration lock {self.lock_key} (not renewed within "
                f"{self.lock_ttl:g} s, then taken or deleted); stopped. Run the command again"
            )

    def _renew(self, value: str, ttl_ms: int, stop: threading.Event) -> None:
        last_ok = time.monotonic()
        while not stop.wait(self.lock_ttl / 3):
            try:
                renewed = self.client.eval(_RENEW, 1, self.lock_key, value, ttl_ms)
            except Exception:  # a broken connection: retried until the TTL runs out
                renewed = None
            if renewed:
                last_ok = time.monotonic()
            elif renewed == 0 or time.monotonic() - last_ok > self.lock_ttl:
                self._lost.set()
                return

    def _lock_error(self, holder: bytes | str) -> LockError:
        ttl = self.client.pttl(self.lock_key)
        text = holder.decode("utf-8", "replace") if isinstance(holder, bytes) else holder
        owner = self._owner_of(text)
        since = ""
        try:
            since = f" since {json.loads(text)['since']}"
        except (ValueError, KeyError, TypeError):
            pass
        expiry = f"; if it died, the lock expires in {ttl / 1000:.0f} s" if ttl and ttl > 0 else ""
        return LockError(
            f"Migrations are locked by {owner}{since} (key {self.lock_key}): another "
            f"`redmap migrate` is running. Wait for it to finish{expiry}",
            owner=owner,
        )

    @staticmethod
    def _owner_of(value: str) -> str:
        try:
            return str(json.loads(value)["owner"])
        except (ValueError, KeyError, TypeError):
            return value
