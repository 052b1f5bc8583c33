"""Tests for the reference checks of `redmap.audit`: foreign keys and many-to-many links.

Valid data is written through redmap, then corrupted with raw redis-py commands the way
earlier defects or another program did: a parent hash deleted under its children, a
bogus member added to a link zset, one side of a link removed. Each test asserts the
exact findings, then applies the repair the finding names and audits clean again.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Optional

import pytest

import redmap
from redmap import ForeignKey, Indexed, PrimaryKey, Session, registry
from redmap import relationship as rel
from redmap.audit import AuditReport, BrokenReference, audit
from redmap.orm.mapper import mapper_of
from redmap.testing.servers import ClusterProcesses

SHARDS = 4
reg = registry(prefix="ar", shards=SHARDS)
OWNER = uuid.UUID("00000000-0000-4000-8000-000000000001")
NOTE = uuid.UUID("00000000-0000-4000-8000-0000000000aa")


@reg.mapped
@dataclass
class Home:
    name: str
    kids: list[Kid] = rel(back_populates="home")
    id: Annotated[Optional[int], PrimaryKey()] = None


@reg.mapped
@dataclass
class Kid:
    name: str
    home_id: Annotated[Optional[int], ForeignKey("Home")] = None
    home: Optional[Home] = rel(back_populates="kids")
    id: Annotated[Optional[int], PrimaryKey()] = None


@reg.mapped
@dataclass
class Owner:
    name: str
    id: Annotated[uuid.UUID, PrimaryKey()]


@reg.mapped
@dataclass
class Pet:
    name: str
    owner_id: Annotated[uuid.UUID, ForeignKey("Owner")]  # required: no None to fall back on
    id: Annotated[Optional[int], PrimaryKey()] = None


@reg.mapped
@dataclass
class Post:
    title: str
    tags: list[Tag] = rel(secondary="post_tags", back_populates="posts")
    notes: list[Note] = rel(secondary="post_notes")  # far side: Note's hidden ~post.notes
    id: Annotated[Optional[int], PrimaryKey()] = None


@reg.mapped
@dataclass
class Tag:
    code: Annotated[str, PrimaryKey()]
    posts: list[Post] = rel(secondary="post_tags", back_populates="tags")


@reg.mapped
@dataclass
class Note:
    text: str
    id: Annotated[uuid.UUID, PrimaryKey()]


@reg.mapped
@dataclass
class Hall:
    __shard_key__ = "id"
    name: Annotated[str, Indexed()]
    desks: list[Desk] = rel(back_populates="hall")
    id: Annotated[Optional[int], PrimaryKey()] = None


@reg.mapped
@dataclass
class Desk:
    __shard_key__ = "hall_id"
    label: str
    hall_id: Annotated[Optional[int], ForeignKey("Hall")] = None
    hall: Optional[Hall] = rel(back_populates="desks")
    id: Annotated[Optional[int], PrimaryKey()] = None


def _seed(engine: redmap.Engine) -> None:
    """Home 1 with kids 1 and 2, home 2 with kid 3; pet 1 of OWNER; post 1 tagged red and
    blue with NOTE, post 2 tagged red; then hall 1 (shard 1) with desks, in its own flush."""
    with Session(engine) as s:
        h1, h2 = Home(name="h1"), Home(name="h2")
        h1.kids.extend([Kid(name="a"), Kid(name="b")])
        h2.kids.append(Kid(name="c"))
        red, blue = Tag(code="red"), Tag(code="blue")
        p1, p2 = Post(title="p1"), Post(title="p2")
        p1.tags.extend([red, blue])
        p2.tags.append(red)
        p1.notes.append(Note(text="n", id=NOTE))
        s.add_all([h1, h2, p1, p2, Owner(name="o", id=OWNER), Pet(name="rex", owner_id=OWNER)])
        s.commit()
    with Session(engine) as s:
        hall = Hall(name="big", id=1)
        hall.desks.extend([Desk(label="d1"), Desk(label="d2")])
        s.add(hall)
        s.commit()


def _hall_tag() -> str:
    return mapper_of(Hall).keys_for_pk(1).tag


def _audit_clean(client: Any) -> None:
    report = audit(client, reg)
    assert report.ok, report.mismatches + report.unexplained
    assert report.broken_references == []


def _fk_hint(child: str, field: str, model: str, fk_key: str, seg: str) -> str:
    return (
        f"re-parent it in the application (set {field} to an existing {model}), or "
        f"detach it: HDEL {child} {field} and ZREM {fk_key} {seg}"
    )


@pytest.fixture(params=["standalone", "cluster"])
def client(request: pytest.FixtureRequest) -> Iterator[Any]:
    """Seeded data on an emptied standalone server, then on an emptied 3-node cluster;
    yields a raw redis-py client of it."""
    if request.param == "standalone":
        url = request.getfixturevalue("redis_url")
        raw = request.getfixturevalue("redis_client")
    else:
        cluster: ClusterProcesses = request.getfixturevalue("cluster")
        raw = request.getfixturevalue("cluster_client")
        url = cluster.url
    engine = redmap.create_engine(url)
    try:
        _seed(engine)
    finally:
        engine.dispose()
    yield raw


def test_clean_data_has_no_broken_references(client: Any) -> None:
    """Every foreign key and link written by redmap names an existing object, listed
    on both sides: the audit reports nothing, and reports it as nothing."""
    report = audit(client, reg)
    assert report.ok, report.mismatches + report.unexplained
    assert report.broken_references == [] and report.objects == 15
    assert "broken references" not in report.summary()


def test_deleted_parent_hash_is_reported_per_child(client: Any) -> None:
    """A parent hash deleted under its children: each child's foreign key is a finding
    naming the child, the missing parent and the HDEL/ZREM that detaches it; applying
    that repair (and dropping the parent from #all) audits clean."""
    client.delete("{ar}:home:1")
    report = audit(client, reg)
    assert report.broken_references == [
        BrokenReference(
            f"{{ar}}:kid:{kid}",
            "Kid.home_id is 1, but that Home does not exist ({ar}:home:1 is missing)",
            _fk_hint(f"{{ar}}:kid:{kid}", "home_id", "Home", "{ar}:kid:#fk:home_id:1", str(kid)),
        )
        for kid in (1, 2)
    ]
    assert report.mismatches == [
        *map(str, report.broken_references),
        "{ar}:home:#all: expected {('2', 2.0)}, found {('1', 1.0), ('2', 2.0)}",
    ]
    assert report.unexplained == []
    assert "2 broken references" in report.summary()
    for kid in (1, 2):
        client.hdel(f"{{ar}}:kid:{kid}", "home_id")
        client.zrem("{ar}:kid:#fk:home_id:1", str(kid))
    client.zrem("{ar}:home:#all", "1")
    _audit_clean(client)


def test_required_foreign_key_to_a_missing_uuid_parent(client: Any) -> None:
    """A required UUID foreign key whose parent is gone cannot be detached: the hint says
    to re-parent the child or restore the parent, not to HDEL the field."""
    owner_key = f"{{ar}}:owner:{OWNER}"
    client.delete(owner_key)
    client.zrem("{ar}:owner:#all", str(OWNER))
    report = audit(client, reg)
    assert report.mismatches == [
        f"{{ar}}:pet:1: Pet.owner_id is {OWNER!r}, but that Owner does not exist "
        f"({owner_key} is missing); repair: re-parent it in the application (set owner_id "
        f"to an existing Owner; the field is required), or restore {owner_key}"
    ]
    assert report.unexplained == []


def test_deleted_sharded_parent(client: Any) -> None:
    """Children in a shard whose parent (in the same shard) is gone are found under the
    shard's keys, with a repair naming those keys."""
    tag = _hall_tag()
    assert tag == "{ar|1}"
    client.delete(f"{tag}:hall:1")
    client.zrem(f"{tag}:hall:#all", "1")
    client.srem(f"{tag}:hall:#ix:name:big", "1")
    report = audit(client, reg)
    desks = sorted(client.zrange(f"{tag}:desk:#fk:hall_id:1", 0, -1))
    assert len(desks) == 2
    assert report.broken_references == [
        BrokenReference(
            f"{tag}:desk:{d.decode()}",
            f"Desk.hall_id is 1, but that Hall does not exist ({tag}:hall:1 is missing)",
            _fk_hint(
                f"{tag}:desk:{d.decode()}",
                "hall_id",
                "Hall",
                f"{tag}:desk:#fk:hall_id:1",
                d.decode(),
            ),
        )
        for d in desks
    ]
    assert report.mismatches == [str(b) for b in report.broken_references]
    assert report.unexplained == []


def test_bogus_members_of_link_zsets(client: Any) -> None:
    """A member ZADDed into a #rel zset that names no object (a missing id, or text that
    is no id of the model at all) is one finding each, with the ZREM that removes it."""
    client.zadd("{ar}:post:#rel:tags:1", {"green": 0})
    client.zadd("{ar}:tag:#rel:posts:red", {"999": 999, "x y": 0})
    report = audit(client, reg)
    assert report.mismatches == [
        "{ar}:post:#rel:tags:1: member 'green' names a Tag that does not exist "
        "({ar}:tag:green is missing); repair: ZREM {ar}:post:#rel:tags:1 green",
        "{ar}:tag:#rel:posts:red: member '999' names a Post that does not exist "
        "({ar}:post:999 is missing); repair: ZREM {ar}:tag:#rel:posts:red 999",
        "{ar}:tag:#rel:posts:red: member 'x y' names a Post that does not exist "
        '(not an id of Post); repair: ZREM {ar}:tag:#rel:posts:red "x y"',
    ]
    assert len(report.broken_references) == 3 and report.unexplained == []
    client.zrem("{ar}:post:#rel:tags:1", "green")
    client.zrem("{ar}:tag:#rel:posts:red", "999", "x y")
    _audit_clean(client)


def test_link_missing_on_one_side(client: Any) -> None:
    """A link only one side lists is reported on the side that lacks it, with both
    repairs (ZADD to keep it, ZREM to drop it); the same for a hidden far side, also
    when removing the member deleted that zset altogether."""
    note = f"{{ar}}:note:#rel:~post.notes:{NOTE}"
    client.zrem("{ar}:tag:#rel:posts:red", "1")
    client.zrem(note, "1")
    assert not client.exists(note)
    report = audit(client, reg)
    assert report.mismatches == [
        "{ar}:tag:#rel:posts:red: does not list Post 1 back, though {ar}:post:#rel:tags:1 "
        "links it to Tag red; repair: ZADD {ar}:tag:#rel:posts:red 1 1 to keep the link, "
        "or ZREM {ar}:post:#rel:tags:1 red to drop it",
        f"{note}: does not list Post 1 back, though {{ar}}:post:#rel:notes:1 links it to "
        f"Note {NOTE}; repair: ZADD {note} 1 1 to keep the link, or "
        f"ZREM {{ar}}:post:#rel:notes:1 {NOTE} to drop it",
    ]
    assert report.unexplained == []
    client.zadd("{ar}:tag:#rel:posts:red", {"1": 1})
    client.zrem("{ar}:post:#rel:notes:1", str(NOTE))
    _audit_clean(client)


def test_far_side_lists_a_link_the_owner_lacks(client: Any) -> None:
    """The other direction: the tag lists the post, the post's own zset lost the tag (a
    str id, so the score to restore is 0)."""
    client.zrem("{ar}:post:#rel:tags:2", "red")
    report = audit(client, reg)
    assert report.mismatches == [
        "{ar}:post:#rel:tags:2: does not list Tag red back, though {ar}:tag:#rel:posts:red "
        "links it to Post 2; repair: ZADD {ar}:post:#rel:tags:2 0 red to keep the link, "
        "or ZREM {ar}:tag:#rel:posts:red 2 to drop it"
    ]
    client.zadd("{ar}:post:#rel:tags:2", {"red": 0})
    _audit_clean(client)


def test_links_of_a_deleted_object(client: Any) -> None:
    """An object hash deleted with its links left behind: its own link zset is reported
    (DEL it) and so is every far-side member naming it (ZREM it), once each."""
    client.delete("{ar}:tag:red")
    client.zrem("{ar}:tag:#all", "red")
    report = audit(client, reg)
    assert report.mismatches == [
        "{ar}:post:#rel:tags:1: member 'red' names a Tag that does not exist "
        "({ar}:tag:red is missing); repair: ZREM {ar}:post:#rel:tags:1 red",
        "{ar}:post:#rel:tags:2: member 'red' names a Tag that does not exist "
        "({ar}:tag:red is missing); repair: ZREM {ar}:post:#rel:tags:2 red",
        "{ar}:tag:#rel:posts:red: holds the posts links of Tag red, which does not exist "
        "({ar}:tag:red is missing); repair: DEL {ar}:tag:#rel:posts:red",
    ]
    assert report.unexplained == []
    client.zrem("{ar}:post:#rel:tags:1", "red")
    client.zrem("{ar}:post:#rel:tags:2", "red")
    client.delete("{ar}:tag:#rel:posts:red")
    _audit_clean(client)


def test_link_with_the_wrong_score(client: Any) -> None:
    """A link member scored otherwise than by its id is reported with the ZADD XX that
    restores the score, and nothing else."""
    client.zadd("{ar}:tag:#rel:posts:red", {"2": 7})
    report = audit(client, reg)
    assert report.mismatches == [
        "{ar}:tag:#rel:posts:red: member 2 has score 7, expected 2 (its id, or 0 for a str "
        "or UUID id); repair: ZADD {ar}:tag:#rel:posts:red XX 2 2"
    ]
    client.zadd("{ar}:tag:#rel:posts:red", {"2": 2}, xx=True)
    _audit_clean(client)


def test_every_reference_corruption_at_once(client: Any) -> None:
    """All corruptions in one keyspace: one run reports each exactly once."""
    client.delete("{ar}:home:2", f"{_hall_tag()}:hall:1")
    client.zadd("{ar}:post:#rel:tags:1", {"green": 0})
    client.zrem("{ar}:tag:#rel:posts:blue", "1")
    report = audit(client, reg)
    keys = sorted(b.key for b in report.broken_references)
    desks = [
        f"{_hall_tag()}:desk:{d.decode()}"
        for d in client.zrange(f"{_hall_tag()}:desk:#fk:hall_id:1", 0, -1)
    ]
    # The blue tag lost its last link, so its zset is gone: reported under its name.
    assert not client.exists("{ar}:tag:#rel:posts:blue")
    assert keys == sorted(
        ["{ar}:kid:3", "{ar}:post:#rel:tags:1", "{ar}:tag:#rel:posts:blue", *desks]
    )
    assert len(desks) == 2


class _HidingScan:
    """A raw client whose SCAN does not return one key, as a SCAN running while that key
    was created may not; every other call goes to the real client."""

    def __init__(self, client: Any, hidden: str):
        self._client, self._hidden = client, hidden.encode()

    def scan_iter(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
        for key in self._client.scan_iter(*args, **kwargs):
            if key != self._hidden:
                yield key

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


def test_parent_missed_by_the_scan_is_asked_for(client: Any) -> None:
    """A parent the SCAN did not return is asked for with EXISTS before its children are
    reported: while it exists there is no finding; once it is deleted, there is."""
    hiding = _HidingScan(client, "{ar}:home:2")
    report = audit(hiding, reg)
    assert report.broken_references == []
    client.delete("{ar}:home:2")
    report = audit(hiding, reg)
    assert [b.key for b in report.broken_references] == ["{ar}:kid:3"]


# -- cost ----------------------------------------------------------------------------


class _Counting:
    """A raw client recording the command names of every pipelined round trip."""

    def __init__(self, client: Any):
        self._client = client
        self.batches: list[list[str]] = []

    def pipeline(self, transaction: bool = True) -> Any:
        pipe = self._client.pipeline(transaction=transaction)
        execute = pipe.execute

        def counted(raise_on_error: bool = True) -> Any:
            self.batches.append([str(args[0]).upper() for args, _ in pipe.command_stack])
            return execute(raise_on_error=raise_on_error)

        pipe.execute = counted
        return pipe

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def exists_batches(self) -> list[int]:
        return [b.count("EXISTS") for b in self.batches if "EXISTS" in b]


def _kids(engine: redmap.Engine, homes: int, per: int) -> None:
    for start in range(0, homes, 500):
        with Session(engine) as s:
            for h in range(start, min(start + 500, homes)):
                home = Home(name=f"h{h}")
                home.kids.extend(Kid(name=f"k{h}-{i}") for i in range(per))
                s.add(home)
            s.commit()


def test_cost_of_checking_ten_thousand_foreign_keys(
    engine: redmap.Engine, redis_client: Any
) -> None:
    """10,000 children of 5,000 parents: on sound data the reference check sends no
    command (the scan already saw every parent); with every parent hash deleted it asks
    EXISTS once per distinct parent, 500 per pipelined round trip (10 round trips)."""
    _kids(engine, homes=5000, per=2)
    counting = _Counting(redis_client)
    report = audit(counting, reg)
    assert report.ok and report.objects == 15000
    assert counting.exists_batches() == []
    clean_trips = len(counting.batches)
    # TYPE of 20,004 keys (41 round trips), HGETALL of 15,000 objects (30), the 5,002
    # expected index keys (11), 2 counters (2): 84, each step in batches of 500.
    assert clean_trips <= math.ceil(report.keys / 500) + 2 * math.ceil(15000 / 500) + 3

    pipe = redis_client.pipeline(transaction=False)
    for h in range(1, 5001):
        pipe.delete(f"{{ar}}:home:{h}")
    pipe.execute()
    counting = _Counting(redis_client)
    report = audit(counting, reg)
    assert len(report.broken_references) == 10000
    assert counting.exists_batches() == [500] * 10
    assert sum(name == "EXISTS" for b in counting.batches for name in b) == 5000
    # The other steps did not grow: the EXISTS batches are the whole extra cost.
    assert len(counting.batches) - 10 <= clean_trips


def test_audit_report_type() -> None:
    """The structured record prints as the line the CLI shows among the mismatches."""
    finding = BrokenReference("{ar}:kid:1", "Kid.home_id is 1, but ...", "HDEL {ar}:kid:1 home_id")
    assert str(finding) == "{ar}:kid:1: Kid.home_id is 1, but ...; repair: HDEL {ar}:kid:1 home_id"
    assert AuditReport().broken_references == []
