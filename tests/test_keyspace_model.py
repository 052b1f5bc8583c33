"""The whole keyspace, compared exactly with an independent model of docs/key-layout.md.

`audit()` rebuilds keys and scores with the writer's own helpers, so a bug shared by
both would pass it. This test does not import `redmap.orm.keys` or any helper of the
writer: key names, escaping, stored forms, scores, versions and incarnations are rebuilt
here by hand from the documentation (docs/key-layout.md, docs/mapping.md "Supported types and
how they are stored", docs/relationships.md "Keys used" and "Cascades"), from a plain
Python record of what the objects and links should be. After every commit of a seeded,
varied series (inserts, updates, deletes; Indexed, Unique, Sorted, ForeignKey with and
without `order_by`, many-to-many with and without `back_populates`, cascades; int, str
and UUID keys, generated and explicit; sharded models under their shard tags), every
key (`KEYS *`), its type and its full content must equal the model's: no extra key, no
missing member, no other score. Flush tokens and id guards (`#flush:`, expiring
bookkeeping) are left out, as key-layout.md tells tools walking the keyspace to do.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import json
import math
import random
import uuid
from decimal import Decimal
from typing import Annotated, Any, Optional

import pytest

import redmap
from redmap import ForeignKey, Indexed, PrimaryKey, Session, Sorted, Unique, registry
from redmap import relationship as rel

kreg = registry(prefix="km")
P = "km"


class Mood(enum.Enum):
    CALM = 1
    WILD = 2


@kreg.mapped
@dataclasses.dataclass
class Author:
    name: Annotated[str, Indexed()]
    email: Annotated[Optional[str], Unique()] = None
    age: Annotated[int, Sorted()] = 0
    rating: Annotated[Optional[float], Sorted()] = None
    active: Annotated[bool, Indexed()] = True
    mood: Annotated[Mood, Indexed()] = Mood.CALM
    bio: Optional[str] = None
    notes: list[str] = dataclasses.field(default_factory=list)
    books: list[Book] = rel(back_populates="author", order_by="Book.published")
    badges: list[Badge] = rel(back_populates="holder", cascade="all, delete-orphan")
    id: Annotated[Optional[int], PrimaryKey()] = None


@kreg.mapped
@dataclasses.dataclass
class Book:
    title: Annotated[str, Indexed()]
    published: Annotated[Optional[dt.date], Sorted()] = None
    created: Annotated[dt.datetime, Sorted()] = dt.datetime(2020, 1, 1)
    price: Annotated[Decimal, Sorted()] = Decimal("0")
    author_id: Annotated[Optional[int], ForeignKey("Author")] = None
    author: Optional[Author] = rel(back_populates="books")
    genres: list[Genre] = rel(secondary="book_genres", back_populates="books")
    tags: list[Tag] = rel(secondary="book_tags")  # far side: the hidden ~book.tags
    id: Annotated[Optional[int], PrimaryKey()] = None


@kreg.mapped
@dataclasses.dataclass
class Genre:
    code: Annotated[str, PrimaryKey()]
    label: Annotated[str, Unique()]
    books: list[Book] = rel(secondary="book_genres", back_populates="genres")


@kreg.mapped
@dataclasses.dataclass
class Badge:
    kind: Annotated[str, Indexed()]
    holder_id: Annotated[Optional[int], ForeignKey("Author")] = None
    holder: Optional[Author] = rel(back_populates="badges")
    id: Annotated[Optional[uuid.UUID], PrimaryKey()] = None


@kreg.mapped
@dataclasses.dataclass
class Tag:
    id: Annotated[int, PrimaryKey()]
    label: str = ""


# -- the model of the documented layout (nothing here comes from redmap) ----------------

_SAFE = set(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")


def esc(text: str) -> str:
    """key-layout.md "Escaping": safe bytes stay, every other byte (% too) is %XX."""
    return "".join(chr(b) if b in _SAFE else f"%{b:02X}" for b in text.encode())


def stored(value: Any) -> str:
    """mapping.md: the stored form of a field value (and, escaped, of an index segment)."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, (dt.date, dt.datetime)):
        return value.isoformat()
    if isinstance(value, list):
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return str(value)  # str, int, Decimal, UUID


def score(value: Any) -> float:
    """key-layout.md "Index values and scores"."""
    if value is None:
        return -math.inf
    if isinstance(value, dt.datetime):
        return (value - dt.datetime(1970, 1, 1)).total_seconds()
    if isinstance(value, dt.date):
        return float((value - dt.date(1970, 1, 1)).days)
    return float(value)  # int, float, Decimal, bool


def id_score(pk: Any) -> float:
    """Scores of #all, unordered #fk and #rel members: the id if an int, else 0."""
    return float(pk) if isinstance(pk, int) else 0.0


@dataclasses.dataclass
class Spec:
    """What the model knows of one mapped class (written from the class above by hand)."""

    keyspace: str
    fields: tuple[str, ...]
    indexed: tuple[str, ...] = ()  # Indexed() and Unique(): an #ix set per value
    unique: tuple[str, ...] = ()
    sorted: tuple[str, ...] = ()
    counter: bool = False  # generated int ids (Optional[int]): a #seq counter


SPECS = {
    "Author": Spec(
        "author",
        ("name", "email", "age", "rating", "active", "mood", "bio", "notes"),
        indexed=("name", "email", "active", "mood"),
        unique=("email",),
        sorted=("age", "rating"),
        counter=True,
    ),
    "Book": Spec(
        "book",
        ("title", "published", "created", "price", "author_id"),
        indexed=("title",),
        sorted=("published", "created", "price"),
        counter=True,
    ),
    "Genre": Spec("genre", ("label",), indexed=("label",), unique=("label",)),
    "Badge": Spec("badge", ("kind", "holder_id"), indexed=("kind",)),
    "Tag": Spec("tag", ("label",)),  # explicit int ids only: no counter
}


def object_key(model: str, pk: Any) -> str:
    """key-layout.md: `{P}:K:<id>`, the object hash."""
    return f"{{{P}}}:{SPECS[model].keyspace}:{esc(stored(pk))}"


# What a hash's `#i` is expected to be before the model has seen the token.
UNSEEN = "(a new incarnation token)"


class Incarnations:
    """key-layout.md "The object hash, its version and its incarnation": `#i` is an
    opaque token written by the insert, kept by every update, and never the same for a
    key inserted again.

    The model cannot know a token in advance: it learns each one the first time it reads
    the hash after the insert (if it is new for that key) and from then on requires it
    unchanged until the object is deleted.
    """

    def __init__(self) -> None:
        self.known: dict[str, str] = {}
        self.retired: dict[str, set[str]] = {}
        self.reinserted = 0  # keys inserted again after a delete whose token was seen

    def inserted(self, key: str) -> None:
        self.deleted(key)
        if key in self.retired:
            self.reinserted += 1

    def deleted(self, key: str) -> None:
        old = self.known.pop(key, None)
        if old is not None:
            self.retired.setdefault(key, set()).add(old)

    def fill(self, want: dict[str, tuple[str, Any]], have: dict[str, tuple[str, Any]]) -> None:
        """Put each object hash's expected `#i` into `want` (its content dict)."""
        for key, (kind, content) in want.items():
            if kind != "hash":
                continue
            if key not in self.known:
                found_kind, found = have.get(key, ("none", {}))
                token = found.get("#i") if found_kind == "hash" else None
                if token and token not in self.retired.get(key, ()):
                    self.known[key] = token
            content["#i"] = self.known.get(key, UNSEEN)


@dataclasses.dataclass
class Model:
    """What Redis should hold, as plain records: objects, versions, links, counters."""

    rows: dict[str, dict[Any, dict[str, Any]]] = dataclasses.field(
        default_factory=lambda: {name: {} for name in SPECS}
    )
    versions: dict[tuple[str, Any], int] = dataclasses.field(default_factory=dict)
    seq: dict[str, int] = dataclasses.field(default_factory=dict)
    book_genres: set[tuple[int, str]] = dataclasses.field(default_factory=set)
    book_tags: set[tuple[int, int]] = dataclasses.field(default_factory=set)
    incarnations: Incarnations = dataclasses.field(default_factory=Incarnations)

    def insert(self, model: str, pk: Any, values: dict[str, Any]) -> None:
        self.rows[model][pk] = dict(values)
        self.versions[(model, pk)] = 1
        self.incarnations.inserted(object_key(model, pk))
        if SPECS[model].counter:  # handed out, or an explicit id above it (SET)
            self.seq[model] = max(self.seq.get(model, 0), pk)

    def update(self, model: str, pk: Any, **changes: Any) -> None:
        row = self.rows[model][pk]
        assert any(row[k] != v for k, v in changes.items()), "a no-op update proves nothing"
        row.update(changes)
        self.versions[(model, pk)] += 1

    def delete(self, model: str, pk: Any) -> None:
        del self.rows[model][pk]
        del self.versions[(model, pk)]
        self.incarnations.deleted(object_key(model, pk))
        if model == "Book":
            self.book_genres = {x for x in self.book_genres if x[0] != pk}
            self.book_tags = {x for x in self.book_tags if x[0] != pk}
        if model == "Genre":
            self.book_genres = {x for x in self.book_genres if x[1] != pk}
        if model == "Tag":
            self.book_tags = {x for x in self.book_tags if x[1] != pk}
        if model == "Author":
            for bid, book in self.rows["Book"].items():
                if book["author_id"] == pk:  # no delete cascade: the key is set to None
                    self.update("Book", bid, author_id=None)
            for badge in [b for b, row in self.rows["Badge"].items() if row["holder_id"] == pk]:
                self.delete("Badge", badge)  # cascade="all, delete-orphan"

    # -- the keyspace --------------------------------------------------------------

    def keyspace(self) -> dict[str, tuple[str, Any]]:
        """Every key the layout documents for this state: key -> (type, content)."""
        out: dict[str, tuple[str, Any]] = {}

        def zadd(key: str, member: str, s: float) -> None:
            out.setdefault(key, ("zset", {}))[1][member] = s

        def sadd(key: str, member: str) -> None:
            out.setdefault(key, ("set", set()))[1].add(member)

        for model, spec in SPECS.items():
            base = f"{{{P}}}:{spec.keyspace}:"
            if model in self.seq:
                out[base + "#seq"] = ("string", str(self.seq[model]))
            for pk, row in self.rows[model].items():
                seg = esc(stored(pk))
                fields = {f: stored(row[f]) for f in spec.fields if row[f] is not None}
                fields["#v"] = str(self.versions[(model, pk)])
                out[base + seg] = ("hash", fields)
                zadd(base + "#all", seg, id_score(pk))
                for f in spec.indexed:
                    value = row[f]
                    sadd(f"{base}#ix:{f}:{'#null' if value is None else esc(stored(value))}", seg)
                for f in spec.unique:
                    if row[f] is not None:
                        out[f"{base}#uq:{f}:{esc(stored(row[f]))}"] = ("string", seg)
                for f in spec.sorted:
                    zadd(f"{base}#zs:{f}", seg, score(row[f]))
        for bid, book in self.rows["Book"].items():
            if book["author_id"] is not None:  # ordered by Book.published
                parent = esc(stored(book["author_id"]))
                zadd(
                    f"{{{P}}}:book:#fk:author_id:{parent}",
                    esc(stored(bid)),
                    score(book["published"]),
                )
        for uid, badge in self.rows["Badge"].items():
            if badge["holder_id"] is not None:  # unordered: the child's id score (0 for UUID)
                parent = esc(stored(badge["holder_id"]))
                zadd(f"{{{P}}}:badge:#fk:holder_id:{parent}", esc(stored(uid)), id_score(uid))
        for bid, code in self.book_genres:
            zadd(f"{{{P}}}:book:#rel:genres:{esc(stored(bid))}", esc(code), id_score(code))
            zadd(f"{{{P}}}:genre:#rel:books:{esc(code)}", esc(stored(bid)), id_score(bid))
        for bid, tid in self.book_tags:
            zadd(f"{{{P}}}:book:#rel:tags:{esc(stored(bid))}", esc(stored(tid)), id_score(tid))
            zadd(f"{{{P}}}:tag:#rel:~book.tags:{esc(stored(tid))}", esc(stored(bid)), id_score(bid))
        return out


def read_keyspace(client: Any) -> dict[str, tuple[str, Any]]:
    """Every key of the server but flush tokens (they expire by design), with its content."""
    out: dict[str, tuple[str, Any]] = {}
    for raw in client.keys("*"):
        key = raw.decode()
        if key.startswith(f"{{{P}}}:#flush:"):
            continue
        kind = client.type(raw).decode()
        content: Any
        if kind == "hash":
            content = {k.decode(): v.decode() for k, v in client.hgetall(raw).items()}
        elif kind == "set":
            content = {m.decode() for m in client.smembers(raw)}
        elif kind == "zset":
            content = {m.decode(): s for m, s in client.zrange(raw, 0, -1, withscores=True)}
        elif kind == "string":
            content = client.get(raw).decode()
        else:
            content = kind
        out[key] = (kind, content)
    return out


def assert_same(client: Any, model: Model, step: str) -> dict[str, tuple[str, Any]]:
    want = model.keyspace()
    have = read_keyspace(client)
    model.incarnations.fill(want, have)
    extra = sorted(set(have) - set(want))
    missing = sorted(set(want) - set(have))
    assert not extra and not missing, f"after {step}: extra keys {extra}, missing keys {missing}"
    differ = {k: (want[k], have[k]) for k in want if want[k] != have[k]}
    assert not differ, f"after {step}: expected vs found {differ}"
    return have


# -- the driver: the same steps through redmap and through the model --------------------

GENRE_CODES = ["sci:fi", "a b", "é", "%41", "", "#seq", "x*?[]", "plain-1.0_z"]
NAMES = ["ann", "bob", "x:y", "50%", "zoë", "", "{tag}"]


class Driver:
    def __init__(self, engine: redmap.Engine, rng: random.Random):
        self.engine = engine
        self.rng = rng
        self.m = Model()
        self.fresh = 0

    def session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    def unique_text(self, stem: str) -> str:
        self.fresh += 1
        return f"{stem}{self.fresh}@ex.org" if stem == "mail" else f"{stem} {self.fresh}"

    def pick(self, model: str) -> Any:
        keys = sorted(self.m.rows[model], key=str)
        return self.rng.choice(keys) if keys else None

    def author_values(self) -> dict[str, Any]:
        r = self.rng
        return {
            "name": r.choice(NAMES),
            "email": r.choice([None, self.unique_text("mail")]),
            "age": r.randrange(-5, 90),
            "rating": r.choice([None, 0.1 * r.randrange(50), -0.0, 1e300]),
            "active": r.random() < 0.5,
            "mood": r.choice(list(Mood)),
            "bio": r.choice([None, "", "line\nbreak"]),
            "notes": r.choice([[], ["é", 'a"b'], ["x"]]),
        }

    def book_values(self) -> dict[str, Any]:
        r = self.rng
        return {
            "title": r.choice(["Dune", "Emma", "a:b", "Ürwald"]),
            "published": r.choice([None, dt.date(1999, 12, 31), dt.date(1965, 8, 1)])
            if r.random() < 0.7
            else dt.date(1960 + r.randrange(60), 1 + r.randrange(12), 1 + r.randrange(28)),
            "created": dt.datetime(2001, 2, 3, 4, 5, r.randrange(60)),
            "price": r.choice([Decimal("0"), Decimal("1.10"), Decimal("12.5"), Decimal("-3")]),
        }

    # Each step commits once and records its effect on the model.

    def add_author(self) -> None:
        values = self.author_values()
        explicit = None
        if self.rng.random() < 0.15:  # an explicit id above the counter raises it
            explicit = self.m.seq.get("Author", 0) + self.rng.randrange(1, 4)
        with self.session() as s:
            a = Author(**values, id=explicit)
            books = [Book(**self.book_values()) for _ in range(self.rng.randrange(3))]
            a.books.extend(books)
            badges = [
                Badge(kind=self.rng.choice(["gold", "tin"])) for _ in range(self.rng.randrange(2))
            ]
            a.badges.extend(badges)
            s.add(a)
            s.commit()
            assert a.id is not None
            self.m.insert("Author", a.id, values)
            for b in books:
                assert b.id is not None and b.author_id == a.id
                self.m.insert("Book", b.id, {**self._book_row(b)})
            for g in badges:
                assert isinstance(g.id, uuid.UUID) and g.holder_id == a.id
                self.m.insert("Badge", g.id, {"kind": g.kind, "holder_id": a.id})

    def _book_row(self, b: Book) -> dict[str, Any]:
        return {f: getattr(b, f) for f in SPECS["Book"].fields}

    def update_author(self) -> None:
        pk = self.pick("Author")
        if pk is None:
            return
        row = self.m.rows["Author"][pk]
        fresh = self.author_values()
        changes = {f: v for f, v in fresh.items() if self.rng.random() < 0.5 and v != row[f]}
        if not changes:
            return
        with self.session() as s:
            a = s.get(Author, pk)
            assert a is not None
            for f, v in changes.items():
                setattr(a, f, v)
            s.commit()
        self.m.update("Author", pk, **changes)

    def delete_author(self) -> None:
        pk = self.pick("Author")
        if pk is None:
            return
        with self.session() as s:
            s.delete(s.get(Author, pk))
            s.commit()
        self.m.delete("Author", pk)

    def add_book(self) -> None:
        values = self.book_values()
        parent = self.pick("Author") if self.rng.random() < 0.7 else None
        codes = self.rng.sample(sorted(self.m.rows["Genre"]), k=min(2, len(self.m.rows["Genre"])))
        tags = self.rng.sample(sorted(self.m.rows["Tag"]), k=min(2, len(self.m.rows["Tag"])))
        with self.session() as s:
            b = Book(**values)
            if parent is not None:
                a = s.get(Author, parent)
                assert a is not None
                b.author = a
            b.genres.extend(g for g in s.get_many(Genre, codes) if g is not None)
            b.tags.extend(t for t in s.get_many(Tag, tags) if t is not None)
            s.add(b)
            s.commit()
            assert b.id is not None
        self.m.insert("Book", b.id, {**values, "author_id": parent})
        self.m.book_genres |= {(b.id, c) for c in codes}
        self.m.book_tags |= {(b.id, t) for t in tags}

    def update_book(self) -> None:
        pk = self.pick("Book")
        if pk is None:
            return
        row = self.m.rows["Book"][pk]
        fresh = self.book_values()
        changes = {f: v for f, v in fresh.items() if self.rng.random() < 0.5 and v != row[f]}
        if not changes:
            return
        with self.session() as s:
            b = s.get(Book, pk)
            assert b is not None
            for f, v in changes.items():
                setattr(b, f, v)
            s.commit()
        self.m.update("Book", pk, **changes)

    def reparent_book(self) -> None:
        pk = self.pick("Book")
        if pk is None:
            return
        old = self.m.rows["Book"][pk]["author_id"]
        new = self.pick("Author") if self.rng.random() < 0.8 else None
        if new == old:
            return
        with self.session() as s:
            b = s.get(Book, pk)
            assert b is not None
            if new is None:
                b.author = None
            elif self.rng.random() < 0.5:
                b.author = s.get(Author, new)
            else:
                a = s.get(Author, new)
                assert a is not None
                a.books.append(b)
            s.commit()
        self.m.update("Book", pk, author_id=new)

    def delete_book(self) -> None:
        pk = self.pick("Book")
        if pk is None:
            return
        with self.session() as s:
            s.delete(s.get(Book, pk))
            s.commit()
        self.m.delete("Book", pk)

    def relink(self) -> None:
        pk = self.pick("Book")
        if pk is None:
            return
        code, tag = self.pick("Genre"), self.pick("Tag")
        with self.session() as s:
            b = s.get(Book, pk)
            assert b is not None
            if code is not None:
                g = s.get(Genre, code)
                if (pk, code) in self.m.book_genres:
                    b.genres.remove(g)
                    self.m.book_genres.discard((pk, code))
                else:
                    b.genres.append(g)
                    self.m.book_genres.add((pk, code))
            if tag is not None:
                t = s.get(Tag, tag)
                if (pk, tag) in self.m.book_tags:
                    b.tags.remove(t)
                    self.m.book_tags.discard((pk, tag))
                else:
                    b.tags.append(t)
                    self.m.book_tags.add((pk, tag))
            s.commit()

    def genre(self) -> None:
        free = [c for c in GENRE_CODES if c not in self.m.rows["Genre"]]
        action = self.rng.choice(["add", "add", "relabel", "delete"])
        with self.session() as s:
            if action == "add" and free:
                code = self.rng.choice(free)
                label = self.unique_text("genre")
                s.add(Genre(code=code, label=label))
                s.commit()
                self.m.insert("Genre", code, {"label": label})
                return
            code = self.pick("Genre")
            if code is None:
                return
            g = s.get(Genre, code)
            assert g is not None
            if action == "delete":
                s.delete(g)
                s.commit()
                self.m.delete("Genre", code)
            else:
                g.label = self.unique_text("relabel")
                s.commit()
                self.m.update("Genre", code, label=g.label)

    def badge(self) -> None:
        holder = self.pick("Author")
        if holder is None:
            return
        with self.session() as s:
            a = s.get(Author, holder)
            assert a is not None
            mine = sorted(a.badges, key=lambda g: str(g.id))
            if mine and self.rng.random() < 0.4:
                gone = self.rng.choice(mine)
                a.badges.remove(gone)  # delete-orphan: the badge is deleted
                s.commit()
                self.m.delete("Badge", gone.id)
                return
            explicit = self.rng.random() < 0.5
            g = Badge(kind=self.rng.choice(["gold", "tin", "x y"]))
            if explicit:
                g.id = uuid.UUID(int=self.rng.getrandbits(128))
            a.badges.append(g)
            s.commit()
            assert isinstance(g.id, uuid.UUID)
            self.m.insert("Badge", g.id, {"kind": g.kind, "holder_id": holder})

    def tag(self) -> None:
        with self.session() as s:
            pk = self.pick("Tag")
            if pk is not None and self.rng.random() < 0.3:
                s.delete(s.get(Tag, pk))
                s.commit()
                self.m.delete("Tag", pk)
                return
            free = [i for i in (1, 2, 7, 40, 1000) if i not in self.m.rows["Tag"]]
            if not free:
                return
            new = self.rng.choice(free)
            s.add(Tag(id=new, label=self.rng.choice(["", "t"])))
            s.commit()
            self.m.insert("Tag", new, {"label": s.get(Tag, new).label})  # type: ignore[union-attr]


STEPS = [
    "add_author",
    "add_author",
    "update_author",
    "delete_author",
    "add_book",
    "add_book",
    "update_book",
    "reparent_book",
    "delete_book",
    "relink",
    "relink",
    "genre",
    "genre",
    "badge",
    "tag",
]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_keyspace_equals_the_documented_layout(
    engine: redmap.Engine, redis_client: Any, seed: int
) -> None:
    """After every commit of a varied series, every key and member is what the
    documented layout says, rebuilt without any of redmap's key or encoding code."""
    rng = random.Random(seed)
    d = Driver(engine, rng)
    for name in ["genre", "genre", "tag", "tag", "add_author", "add_book"]:
        getattr(d, name)()
        assert_same(redis_client, d.m, f"seed {seed} setup {name}")
    seen: set[str] = set()
    effective: dict[str, int] = {}
    before = read_keyspace(redis_client)
    for i in range(70):
        name = rng.choice(STEPS)
        getattr(d, name)()
        have = assert_same(redis_client, d.m, f"seed {seed} step {i} {name}")
        if have != before:
            effective[name] = effective.get(name, 0) + 1
        before = have
        seen |= {k.split(":", 2)[2].split(":")[0] for k in have if ":#" in k}
        seen |= {"#null"} if any(k.endswith(":#null") for k in have) else set()
        seen |= {"~"} if any("#rel:~" in k for k in have) else set()
    # The comparison covered every kind of key at least once.
    assert {"#seq", "#all", "#ix", "#uq", "#zs", "#fk", "#rel", "#null", "~"} <= seen, seen
    # ... and every kind of step changed the keyspace at least once.
    assert set(effective) == set(STEPS), effective
    assert sum(effective.values()) >= 50, effective
    # ... and some key was deleted and inserted again (its `#i` must be a new one).
    assert d.m.incarnations.reinserted >= 1


def test_layout_example_from_the_docs(engine: redmap.Engine, redis_client: Any) -> None:
    """The worked example of key-layout.md, key for key, with hostile ids and values."""
    with Session(engine, expire_on_commit=False) as s:
        a = Author(name="Ann", email="ann@example.com", age=41)
        g = Genre(code="a:b", label="x:y")
        s.add_all([a, g])
        s.commit()
    have = read_keyspace(redis_client)
    want: dict[str, tuple[str, Any]] = {
        "{km}:author:1": (
            "hash",
            {
                "name": "Ann",
                "email": "ann@example.com",
                "age": "41",
                "active": "1",
                "mood": "CALM",
                "notes": "[]",
                "#v": "1",
            },
        ),
        "{km}:author:#seq": ("string", "1"),
        "{km}:author:#all": ("zset", {"1": 1.0}),
        "{km}:author:#ix:name:Ann": ("set", {"1"}),
        "{km}:author:#ix:email:ann%40example.com": ("set", {"1"}),
        "{km}:author:#uq:email:ann%40example.com": ("string", "1"),
        "{km}:author:#ix:active:1": ("set", {"1"}),
        "{km}:author:#ix:mood:CALM": ("set", {"1"}),
        "{km}:author:#zs:age": ("zset", {"1": 41.0}),
        "{km}:author:#zs:rating": ("zset", {"1": -math.inf}),
        "{km}:genre:a%3Ab": ("hash", {"label": "x:y", "#v": "1"}),
        "{km}:genre:#all": ("zset", {"a%3Ab": 0.0}),
        "{km}:genre:#ix:label:x%3Ay": ("set", {"a%3Ab"}),
        "{km}:genre:#uq:label:x%3Ay": ("string", "a%3Ab"),
    }
    Incarnations().fill(want, have)
    assert have == want


# -- sharded models: shard tags, ids that carry their shard, the counter under {P} -------

SHARDS = 4
sreg = registry(prefix="kms", shards=SHARDS)


@sreg.mapped
@dataclasses.dataclass
class Hall:
    __shard_key__ = "id"
    name: Annotated[str, Indexed()]
    seats: list[Seat] = rel(back_populates="hall", cascade="all, delete-orphan")
    id: Annotated[Optional[int], PrimaryKey()] = None


@sreg.mapped
@dataclasses.dataclass
class Seat:
    __shard_key__ = "hall_id"
    label: Annotated[str, Indexed()]
    row: Annotated[int, Sorted()] = 0
    hall_id: Annotated[Optional[int], ForeignKey("Hall")] = None
    hall: Optional[Hall] = rel(back_populates="seats")
    id: Annotated[Optional[int], PrimaryKey()] = None


def sharded_keyspace(
    halls: dict[int, str], seats: dict[int, dict[str, Any]], versions: dict[Any, int]
) -> dict[str, tuple[str, Any]]:
    """cluster.md "How a shard is picked" and key-layout.md "The hash tag": an int shard
    key v lives under {P|v % shards}; a seat's id is counter * shards + its hall's shard;
    the counters stay under {P}."""
    out: dict[str, tuple[str, Any]] = {}

    def zadd(key: str, member: str, s: float) -> None:
        out.setdefault(key, ("zset", {}))[1][member] = s

    def sadd(key: str, member: str) -> None:
        out.setdefault(key, ("set", set()))[1].add(member)

    for hid, name in halls.items():
        tag = f"{{kms|{hid % SHARDS}}}"
        out[f"{tag}:hall:{hid}"] = ("hash", {"name": name, "#v": str(versions[("Hall", hid)])})
        zadd(f"{tag}:hall:#all", str(hid), float(hid))
        sadd(f"{tag}:hall:#ix:name:{esc(name)}", str(hid))
    for sid, seat in seats.items():
        assert sid % SHARDS == seat["hall_id"] % SHARDS, "a seat's id carries its hall's shard"
        tag = f"{{kms|{sid % SHARDS}}}"
        fields = {"label": seat["label"], "row": str(seat["row"]), "hall_id": str(seat["hall_id"])}
        out[f"{tag}:seat:{sid}"] = ("hash", {**fields, "#v": str(versions[("Seat", sid)])})
        zadd(f"{tag}:seat:#all", str(sid), float(sid))
        sadd(f"{tag}:seat:#ix:label:{esc(seat['label'])}", str(sid))
        zadd(f"{tag}:seat:#zs:row", str(sid), float(seat["row"]))
        zadd(f"{tag}:seat:#fk:hall_id:{seat['hall_id']}", str(sid), float(sid))
    return out


def test_sharded_keyspace_equals_the_documented_layout(
    engine: redmap.Engine, redis_client: Any
) -> None:
    """Sharded models after every commit of a series: every key under its shard's tag,
    ids carrying their shard, counters under {P} at the last value handed out."""
    rng = random.Random(5)
    halls: dict[int, str] = {}
    seats: dict[int, dict[str, Any]] = {}
    versions: dict[Any, int] = {}
    # Generated ids are never handed out twice, so no key is inserted again: a token
    # learned once stays expected for good.
    incarnations = Incarnations()
    counters = {"hall": 0, "seat": 0}
    for step in range(60):
        action = rng.choice(["hall", "seat", "seat", "update", "delete_seat", "delete_hall"])
        with Session(engine, expire_on_commit=False) as s:
            if action == "hall" or not halls:
                hall = Hall(name=rng.choice(["a", "b:c", "é"]))
                new_seats = [
                    Seat(label=rng.choice("xyz"), row=rng.randrange(9))
                    for _ in range(rng.randrange(3))
                ]
                hall.seats.extend(new_seats)
                s.add(hall)
                s.commit()
                assert hall.id is not None
                counters["hall"] += 1
                halls[hall.id] = hall.name
                versions[("Hall", hall.id)] = 1
                if new_seats:
                    counters["seat"] += len(new_seats)
                for seat in new_seats:
                    assert seat.id is not None
                    seats[seat.id] = {"label": seat.label, "row": seat.row, "hall_id": hall.id}
                    versions[("Seat", seat.id)] = 1
            elif action == "seat":
                hid = rng.choice(sorted(halls))
                seat = Seat(label=rng.choice("xyz"), row=rng.randrange(9), hall_id=hid)
                s.add(seat)
                s.commit()
                assert seat.id is not None
                counters["seat"] += 1
                seats[seat.id] = {"label": seat.label, "row": seat.row, "hall_id": hid}
                versions[("Seat", seat.id)] = 1
            elif action == "update" and seats:
                sid = rng.choice(sorted(seats))
                got = s.get(Seat, sid)
                assert got is not None
                got.row += 1 + rng.randrange(3)
                s.commit()
                seats[sid]["row"] = got.row
                versions[("Seat", sid)] += 1
            elif action == "delete_seat" and seats:
                sid = rng.choice(sorted(seats))
                s.delete(s.get(Seat, sid))
                s.commit()
                del seats[sid], versions[("Seat", sid)]
            elif action == "delete_hall":
                hid = rng.choice(sorted(halls))
                s.delete(s.get(Hall, hid))
                s.commit()  # cascade: its seats go with it
                del halls[hid], versions[("Hall", hid)]
                for sid in [i for i, seat in seats.items() if seat["hall_id"] == hid]:
                    del seats[sid], versions[("Seat", sid)]
        want = sharded_keyspace(halls, seats, versions)
        for model, value in counters.items():
            if value:  # one id per new object, whatever its shard
                want[f"{{kms}}:{model}:#seq"] = ("string", str(value))
        have = {
            k: v
            for k, v in read_keyspace(redis_client).items()
            if k.startswith("{kms") and ":#flush:" not in k
        }
        incarnations.fill(want, have)
        extra, missing = sorted(set(have) - set(want)), sorted(set(want) - set(have))
        differ = {k: (want[k], have[k]) for k in want if k in have and have[k] != want[k]}
        assert have == want, f"step {step} {action}: extra {extra}, missing {missing}, {differ}"
    assert len(halls) >= 2 and len(seats) >= 3, (halls, seats)
    assert len({sid % SHARDS for sid in seats} | {hid % SHARDS for hid in halls}) >= 2
