"""Tests for `alembic_like.revision`."""

from __future__ import annotations

import pytest

from alembic_like.exc import (
    CycleDetected,
    DependencyError,
    MultipleHeads,
    ResolutionError,
    RevisionError,
)
from alembic_like.revision import Direction, MigrationStep, Revision, RevisionMap


def build(*edges: tuple[str, str | tuple[str, ...] | None]) -> RevisionMap:
    """A map from (revision, down_revision) pairs."""
    return RevisionMap(Revision(rev, down, message=f"msg {rev}") for rev, down in edges)


def linear() -> RevisionMap:
    """a <- b <- c <- d."""
    return build(("a", None), ("b", "a"), ("c", "b"), ("d", "c"))


def branched() -> RevisionMap:
    """a <- b1 <- c1 and a <- b2: a is a branch point, c1 and b2 are heads."""
    return build(("a", None), ("b1", "a"), ("c1", "b1"), ("b2", "a"))


def diamond() -> RevisionMap:
    """a <- b1, a <- b2, (b1, b2) <- m <- n: a branch point and a merge."""
    return build(("a", None), ("b1", "a"), ("b2", "a"), ("m", ("b1", "b2")), ("n", "m"))


def ids(steps: list[MigrationStep]) -> list[str]:
    """The revision ids of a plan, in order."""
    return [s.revision.revision for s in steps]


def run(rmap: RevisionMap, heads: tuple[str, ...], steps: list[MigrationStep]) -> list[tuple]:
    """The heads after each step of `steps`, starting from `heads`."""
    seen = []
    for step in steps:
        heads = rmap.apply_step(heads, step)
        seen.append(heads)
    return seen


class TestRevision:
    def test_list_down_revision_becomes_tuple(self) -> None:
        """A list of down revisions is stored as a tuple; a merge has two or more."""
        rev = Revision("m", ["a", "b"])  # type: ignore[arg-type]
        assert rev.down_revision == ("a", "b")
        assert rev.is_merge and not rev.is_base

    def test_base_has_no_down_revisions(self) -> None:
        """A revision with down_revision None is a base with an empty tuple of parents."""
        assert Revision("a").down_revisions == ()
        assert Revision("a").is_base

    @pytest.mark.parametrize("bad", ["head", "heads", "base", "a-b", "a+b", "a@b", ""])
    def test_reserved_or_illegal_ids_are_refused(self, bad: str) -> None:
        """Reserved words and characters used by targets cannot be revision ids."""
        with pytest.raises(RevisionError):
            Revision(bad)

    def test_self_reference_is_a_cycle(self) -> None:
        """A revision that revises itself is a cycle."""
        with pytest.raises(CycleDetected):
            Revision("a", "a")

    def test_step_str_names_both_ends(self) -> None:
        """A step prints as Alembic's 'upgrade a -> b, message' line."""
        rev = Revision("b", "a", message="add x")
        assert str(MigrationStep(rev, Direction.UP)) == "upgrade a -> b, add x"
        assert str(MigrationStep(rev, Direction.DOWN)) == "downgrade b -> a, add x"
        assert str(MigrationStep(Revision("a"), Direction.UP)) == "upgrade <base> -> a"


class TestBuild:
    def test_linear_heads_and_bases(self) -> None:
        """A chain has one base and one head and iterates parents first."""
        rmap = linear()
        assert rmap.heads == ("d",) and rmap.bases == ("a",)
        assert [r.revision for r in rmap] == ["a", "b", "c", "d"]
        assert len(rmap) == 4 and "c" in rmap

    def test_branches_give_several_heads(self) -> None:
        """Two children of one revision leave two heads; a branch is followed to its end."""
        rmap = branched()
        assert set(rmap.heads) == {"c1", "b2"}
        assert rmap.children("a") == ("b1", "b2")
        order = [r.revision for r in rmap]
        assert order.index("c1") == order.index("b1") + 1

    def test_diamond_has_one_head(self) -> None:
        """A merge joins the branches back into a single head."""
        assert diamond().heads == ("n",)

    def test_duplicate_ids_are_refused(self) -> None:
        """Two revisions with one id is an error."""
        with pytest.raises(RevisionError, match="more than once"):
            build(("a", None), ("a", None))

    def test_missing_down_revision(self) -> None:
        """A down_revision that is not in the map raises DependencyError naming both."""
        with pytest.raises(DependencyError) as info:
            build(("a", None), ("b", "zz"))
        assert (info.value.revision, info.value.missing) == ("b", "zz")

    def test_cycle_is_detected(self) -> None:
        """Revisions that revise each other are reported with the revisions involved."""
        with pytest.raises(CycleDetected) as info:
            build(("a", None), ("b", ("a", "c")), ("c", "b"))
        assert set(info.value.revisions) == {"b", "c"}

    def test_cycle_without_base_is_detected(self) -> None:
        """A graph that is only a loop has no base and is still reported."""
        with pytest.raises(CycleDetected):
            build(("x", "y"), ("y", "x"))


class TestGetRevision:
    def test_full_id(self) -> None:
        """A full id finds its revision."""
        assert linear().get_revision("c").revision == "c"

    def test_unique_prefix_resolves(self) -> None:
        """A prefix shared with no other id finds the revision."""
        rmap = build(("ae1027a6acf", None), ("27c6a30d7c24", "ae1027a6acf"))
        assert rmap.get_revision("ae10").revision == "ae1027a6acf"
        assert rmap.get_revision("2").revision == "27c6a30d7c24"

    def test_ambiguous_prefix_lists_candidates(self) -> None:
        """A prefix of several ids raises ResolutionError listing them."""
        rmap = build(("ae1027a6acf", None), ("ae10f3b2c1d0", "ae1027a6acf"))
        with pytest.raises(ResolutionError, match="Multiple revisions start with") as info:
            rmap.get_revision("ae10")
        assert info.value.candidates == ("ae1027a6acf", "ae10f3b2c1d0")

    def test_unknown_id(self) -> None:
        """An id matching nothing raises, hinting at four characters when short."""
        with pytest.raises(ResolutionError, match="four characters"):
            linear().get_revision("zz")
        with pytest.raises(ResolutionError, match="No such revision"):
            linear().get_revision("zzzzzz")


class TestResolve:
    def test_symbols(self) -> None:
        """base is empty, head and heads name the heads, an id names itself."""
        rmap = linear()
        assert rmap.resolve("base") == ()
        assert rmap.resolve("head") == ("d",)
        assert rmap.resolve("heads") == ("d",)
        assert rmap.resolve("b") == ("b",)

    def test_head_of_empty_map_is_base(self) -> None:
        """With no revisions, head is base, so upgrading does nothing."""
        assert RevisionMap([]).resolve("head") == ()
        assert RevisionMap([]).upgrade_plan((), "head") == []

    def test_head_with_several_heads_raises(self) -> None:
        """'head' is ambiguous when there are two heads; 'heads' is not."""
        rmap = branched()
        with pytest.raises(MultipleHeads) as info:
            rmap.resolve("head")
        assert set(info.value.heads) == {"c1", "b2"}
        assert set(rmap.resolve("heads")) == {"c1", "b2"}

    def test_relative_from_current(self) -> None:
        """+N and -N walk from the current head, or from base when nothing is applied."""
        rmap = linear()
        assert rmap.resolve("+2") == ("b",)
        assert rmap.resolve("+1", ["b"]) == ("c",)
        assert rmap.resolve("-1", ["c"]) == ("b",)
        assert rmap.resolve("-1", ["a"]) == ()

    def test_relative_from_symbols(self) -> None:
        """head-1, base+2, REV+2 and REV-1 walk from the named revision."""
        rmap = linear()
        assert rmap.resolve("head-1") == ("c",)
        assert rmap.resolve("base+2") == ("b",)
        assert rmap.resolve("a+2") == ("c",)
        assert rmap.resolve("c-1") == ("b",)

    def test_overwalk_raises(self) -> None:
        """Walking past head or below base raises ResolutionError."""
        rmap = linear()
        with pytest.raises(ResolutionError, match=r"\+5 moves 5 revisions, but head is 4 away"):
            rmap.resolve("+5")
        with pytest.raises(ResolutionError, match=r"already at head: d\+1 has no revision"):
            rmap.resolve("d+1")
        with pytest.raises(ResolutionError):
            rmap.resolve("b-3")

    def test_walk_through_branch_point_is_ambiguous(self) -> None:
        """Walking up from a branch point or down from a merge cannot choose a side."""
        with pytest.raises(ResolutionError, match="Ambiguous walk"):
            branched().resolve("a+1")
        with pytest.raises(ResolutionError, match="Ambiguous walk"):
            diamond().resolve("m-1")

    def test_relative_from_several_current_heads(self) -> None:
        """+1 with two current heads raises MultipleHeads."""
        with pytest.raises(MultipleHeads):
            branched().resolve("+1", ["c1", "b2"])


class TestUpgradePlan:
    def test_linear_from_base(self) -> None:
        """From base to head runs every revision, oldest first."""
        rmap = linear()
        plan = rmap.upgrade_plan((), "head")
        assert ids(plan) == ["a", "b", "c", "d"]
        assert all(s.direction is Direction.UP for s in plan)
        assert run(rmap, (), plan)[-1] == ("d",)

    def test_from_middle_and_relative(self) -> None:
        """Only unapplied revisions run; +1 runs one."""
        rmap = linear()
        assert ids(rmap.upgrade_plan(["b"], "head")) == ["c", "d"]
        assert ids(rmap.upgrade_plan(["b"], "+1")) == ["c"]

    def test_already_applied_target_is_empty(self) -> None:
        """Upgrading to a revision already applied does nothing."""
        assert linear().upgrade_plan(["c"], "b") == []

    def test_negative_relative_is_refused(self) -> None:
        """upgrade -1 is a downgrade and is refused."""
        with pytest.raises(RevisionError, match="downgrade"):
            linear().upgrade_plan(["c"], "-1")

    def test_other_branch_adds_a_head(self) -> None:
        """Upgrading to a revision on another branch keeps the first branch's head."""
        rmap = branched()
        plan = rmap.upgrade_plan(["c1"], "b2")
        assert ids(plan) == ["b2"]
        assert set(run(rmap, ("c1",), plan)[-1]) == {"c1", "b2"}

    def test_heads_upgrades_every_branch(self) -> None:
        """'heads' runs both branches from the branch point."""
        rmap = branched()
        plan = rmap.upgrade_plan((), "heads")
        assert ids(plan)[0] == "a" and set(ids(plan)) == {"a", "b1", "c1", "b2"}
        assert set(run(rmap, (), plan)[-1]) == {"c1", "b2"}

    def test_through_merge_replaces_two_heads_by_one(self) -> None:
        """Both branches run before the merge, which turns two heads into one."""
        rmap = diamond()
        plan = rmap.upgrade_plan((), "head")
        order = ids(plan)
        assert order[0] == "a" and order[-2:] == ["m", "n"]
        seen = run(rmap, (), plan)
        assert set(seen[2]) == {"b1", "b2"}
        assert seen[3] == ("m",) and seen[4] == ("n",)

    def test_merge_from_one_branch_applied(self) -> None:
        """With one branch applied, upgrading to the merge runs the other branch first."""
        rmap = diamond()
        plan = rmap.upgrade_plan(["b1"], "m")
        assert ids(plan) == ["b2", "m"]
        assert run(rmap, ("b1",), plan)[-1] == ("m",)

    def test_unknown_current_head_raises(self) -> None:
        """A stored head that is not in the map is reported."""
        with pytest.raises(ResolutionError, match="Can't locate revision"):
            linear().upgrade_plan(["zzz"], "head")


class TestDowngradePlan:
    def test_linear_to_base(self) -> None:
        """To base undoes everything, newest first, ending with no heads."""
        rmap = linear()
        plan = rmap.downgrade_plan(["d"], "base")
        assert ids(plan) == ["d", "c", "b", "a"]
        assert all(s.direction is Direction.DOWN for s in plan)
        assert run(rmap, ("d",), plan)[-1] == ()

    def test_relative_and_revision(self) -> None:
        """-2 undoes two steps; a revision undoes everything above it."""
        rmap = linear()
        assert ids(rmap.downgrade_plan(["d"], "-2")) == ["d", "c"]
        assert ids(rmap.downgrade_plan(["d"], "b")) == ["d", "c"]

    def test_positive_relative_is_refused(self) -> None:
        """downgrade +1 is an upgrade and is refused."""
        with pytest.raises(RevisionError, match="upgrade"):
            linear().downgrade_plan(["b"], "+1")

    def test_target_not_applied_raises(self) -> None:
        """Downgrading to a revision that is not applied is refused."""
        with pytest.raises(RevisionError, match="not a valid downgrade target"):
            linear().downgrade_plan(["b"], "c")

    def test_through_merge_restores_two_heads(self) -> None:
        """Undoing a merge leaves both of its parents as heads."""
        rmap = diamond()
        plan = rmap.downgrade_plan(["n"], "b1")
        assert ids(plan) == ["n", "m"]
        assert set(run(rmap, ("n",), plan)[-1]) == {"b1", "b2"}

    def test_diamond_to_base(self) -> None:
        """Every revision of a diamond is undone once, children before parents."""
        rmap = diamond()
        plan = rmap.downgrade_plan(["n"], "base")
        order = ids(plan)
        assert order[:2] == ["n", "m"] and order[-1] == "a" and len(order) == 5
        seen = run(rmap, ("n",), plan)
        assert set(seen[1]) == {"b1", "b2"} and seen[-1] == ()

    def test_other_branch_is_kept(self) -> None:
        """Downgrading one branch leaves the other branch's head in place."""
        rmap = branched()
        plan = rmap.downgrade_plan(["c1", "b2"], "b1")
        assert ids(plan) == ["c1"]
        assert set(run(rmap, ("c1", "b2"), plan)[-1]) == {"b1", "b2"}

    def test_branch_point_collapses_heads(self) -> None:
        """Downgrading to the branch point undoes both branches."""
        rmap = branched()
        plan = rmap.downgrade_plan(["c1", "b2"], "a")
        assert set(ids(plan)) == {"c1", "b1", "b2"}
        assert run(rmap, ("c1", "b2"), plan)[-1] == ("a",)

    def test_relative_with_several_heads_raises(self) -> None:
        """-1 from two heads is ambiguous."""
        with pytest.raises(MultipleHeads):
            branched().downgrade_plan(["c1", "b2"], "-1")

    def test_apply_downgrade_of_non_head_raises(self) -> None:
        """Undoing a revision that is not a current head is a bookkeeping error."""
        rmap = linear()
        with pytest.raises(RevisionError):
            rmap.apply_step(("c",), MigrationStep(rmap.get_revision("a"), Direction.DOWN))


class TestIterateAndStamp:
    def test_iterate_newest_first(self) -> None:
        """iterate_revisions goes from upper down to lower, leaving lower out."""
        rmap = linear()
        assert [r.revision for r in rmap.iterate_revisions("head", "a")] == ["d", "c", "b"]
        assert [r.revision for r in rmap.iterate_revisions("c", "a", inclusive=True)] == [
            "c",
            "b",
            "a",
        ]
        assert len(list(diamond().iterate_revisions("heads", "base"))) == 5

    def test_iterate_requires_ancestor(self) -> None:
        """A lower bound that is not below the upper one raises."""
        with pytest.raises(ResolutionError, match="not an ancestor"):
            list(branched().iterate_revisions("c1", "b2"))

    def test_stamp_replaces_own_lineage_only(self) -> None:
        """Stamping moves the heads of the target's lineage and keeps other branches."""
        rmap = branched()
        assert set(rmap.stamp_heads(["b1", "b2"], "c1")) == {"c1", "b2"}
        assert set(rmap.stamp_heads(["c1", "b2"], "b1")) == {"b1", "b2"}
        assert rmap.stamp_heads(["c1", "b2"], "base") == ()
        assert rmap.stamp_heads([], "heads") == rmap.heads

    def test_stamp_purge_ignores_unknown_heads(self) -> None:
        """purge replaces every stored head, even ones the map does not know."""
        assert linear().stamp_heads(["gone"], "b", purge=True) == ("b",)

    def test_normalize_drops_covered_heads(self) -> None:
        """A head that another head descends from is dropped."""
        assert diamond().normalize_heads(["b1", "m", "a"]) == ("m",)
