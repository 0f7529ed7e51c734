"""Where to cut a backbone: the authors' published tables, the network's stages, ``uniform``, ``balanced``
or a list.

A split is a list of unit groups plus ``stem_module`` (is the stem its own gradient-isolated piece,
as in MAN++'s code?). ``K`` always means the real number of pieces: ``len(groups) + stem_module``.
The default (``auto``, see :func:`resolve_split`) follows the published recipes and the stages.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Collection, Sequence

from .errors import ConfigError

# Published tables: boundary "after unit (stage, index)", as in the authors' configs; the last entry is
# the end of the network. "every" = a boundary after every unit.
PUBLISHED_SPLITS: dict[str, dict[str, dict[int, list[tuple[int, int]] | str]]] = {
    "resnet32": {
        "paper": {
            8: [(1, 0), (1, 2), (1, 4), (2, 1), (2, 3), (3, 0), (3, 2), (3, 4)],
            16: "every",
        },
    },
    "resnet110": {
        "paper": {
            16: [(1, 1), (1, 4), (1, 7), (1, 10), (1, 13), (1, 16), (2, 1), (2, 4), (2, 7), (2, 11),
                 (2, 15), (3, 1), (3, 5), (3, 9), (3, 13), (3, 17)],
            32: [(1, 1), (1, 2), (1, 4), (1, 5), (1, 7), (1, 9), (1, 11), (1, 13), (1, 14), (1, 16),
                 (1, 17), (2, 1), (2, 2), (2, 4), (2, 5), (2, 7), (2, 9), (2, 11), (2, 13), (2, 14),
                 (2, 16), (2, 17), (3, 1), (3, 3), (3, 4), (3, 6), (3, 7), (3, 9), (3, 11), (3, 13),
                 (3, 15), (3, 17)],
            55: "every",
        },
        # InfoPro* memory-balanced splits (CIFAR-10).
        "memory": {
            2: [(1, 14), (3, 17)],
            3: [(1, 9), (2, 2), (3, 17)],
            4: [(1, 6), (1, 14), (2, 8), (3, 17)],
        },
    },
    # ImageNet (InfoPro / MAN ImageNet code; stages 1..4, the stem is part of the first block, so these
    # are K=2 / K=4 with stem_module=False). The InfoPro ImageNet code cuts ResNeXt-101 K=2 after (2, 2)
    # (its k2_infopro table); SPEC.md section 4 lists (2, 0) for both 101-layer nets, kept here.
    "resnet101": {
        "paper": {
            2: [(2, 0), (4, 2)],
            4: [(2, 2), (3, 8), (3, 16), (4, 2)],
        },
    },
    "resnext101_32x8d": {
        "paper": {
            2: [(2, 0), (4, 2)],
            4: [(2, 2), (3, 8), (3, 16), (4, 2)],
        },
    },
    "resnet152": {
        "paper": {
            2: [(2, 5), (4, 2)],
            4: [(2, 6), (3, 13), (3, 25), (4, 2)],
        },
    },
    # MAN++ ViT: K=4 groups of 3 transformer blocks (stem = patch embedding, part of the first group).
    **{vit: {"paper": {4: [(1, 2), (1, 5), (1, 8), (1, 11)]}} for vit in ("vit_tiny", "vit_small", "vit_base")},
}

SPLIT_KINDS = ("auto", "paper", "memory", "uniform", "balanced", "stages")

#: Stages after which a ``stages`` split cuts a 4-stage backbone; K=4 is SPEC 3.4's detection table
#: (stem+layer1 | layer2 | layer3 | layer4). Other stage counts are cut evenly.
DEFAULT_STAGE_CUTS = {1: (), 2: (2,), 3: (1, 2), 4: (1, 2, 3)}


@dataclass(frozen=True)
class Split:
    """Resolved split: ``ends[g]`` is one past the last unit of group g; ``ends[-1] == n_units``."""

    ends: tuple[int, ...]
    stem_module: bool
    source: str = "explicit"

    @property
    def K(self) -> int:
        return len(self.ends) + int(self.stem_module)

    def pieces(self) -> list[tuple[bool, range]]:
        """For each gradient-isolated piece: (contains the stem, range of unit indices)."""
        out: list[tuple[bool, range]] = []
        if self.stem_module:
            out.append((True, range(0, 0)))
        start = 0
        for g, end in enumerate(self.ends):
            out.append((g == 0 and not self.stem_module, range(start, end)))
            start = end
        return out


def _table_ends(table: list[tuple[int, int]] | str, unit_ids: list[tuple[int, int]]) -> tuple[int, ...]:
    if table == "every":
        return tuple(range(1, len(unit_ids) + 1))
    index = {uid: i for i, uid in enumerate(unit_ids)}
    return tuple(index[tuple(b)] + 1 for b in table)  # type: ignore[arg-type]


def published_tables(model_name: str | None, unit_ids: list[tuple[int, int]] | None,
                     kind: str) -> dict[int, tuple[int, ...]]:
    """Published tables of ``kind`` for this model as {number of unit groups: ends}."""
    if model_name is None or unit_ids is None:
        return {}
    tables = PUBLISHED_SPLITS.get(model_name, {}).get(kind, {})
    out = {}
    known = {tuple(u) for u in unit_ids}
    for table in tables.values():
        if table != "every" and any(tuple(b) not in known for b in table):
            continue  # a table of the full-depth network does not apply to a shallower variant
        ends = _table_ends(table, unit_ids)
        out[len(ends)] = ends
    return out


def uniform_ends(n_units: int, groups: int) -> tuple[int, ...]:
    """Contiguous groups of (nearly) equal unit count; earlier groups take the remainder."""
    q, r = divmod(n_units, groups)
    ends, pos = [], 0
    for g in range(groups):
        pos += q + (1 if g < r else 0)
        ends.append(pos)
    return tuple(ends)


def balanced_ends(costs: Sequence[float], groups: int, first_extra: float = 0.0,
                  end_costs: Sequence[float] | None = None, *, cut_only_at: Collection[int] | None = None,
                  always_cut_at: Collection[int] = ()) -> tuple[int, ...]:
    """Contiguous partition of ``costs`` into ``groups`` minimising the largest group cost.

    A group's cost is the sum of its units' costs, plus ``first_extra`` for the first group (the stem's
    cost when it is not its own piece), plus ``end_costs[j]`` for a group ending after unit ``j - 1``
    (what is kept at that cut, e.g. the auxiliary network placed there; ``end_costs[n]`` is the end of the
    network). ``cut_only_at`` restricts the cuts to those unit counts; no group spans a position of
    ``always_cut_at`` (stage boundaries). Ties are broken towards later boundaries being earlier
    (deterministic).
    """
    n = len(costs)
    allowed = None if cut_only_at is None else set(cut_only_at)
    walls = sorted(always_cut_at)
    if end_costs is not None and len(end_costs) != n + 1:
        raise ValueError(f"end_costs needs {n + 1} entries (one per cut position 0..n), got {len(end_costs)}")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))

    def seg(i: int, j: int) -> float:  # cost of units i..j-1
        return (prefix[j] - prefix[i] + (first_extra if i == 0 else 0.0)
                + (float(end_costs[j]) if end_costs is not None else 0.0))

    inf = float("inf")
    # best[g][j]: minimal max-cost of splitting units[0:j] into g groups
    best = [[inf] * (n + 1) for _ in range(groups + 1)]
    arg = [[0] * (n + 1) for _ in range(groups + 1)]
    best[0][0] = 0.0
    for g in range(1, groups + 1):
        for j in range(g, n - (groups - g) + 1):
            if g < groups and allowed is not None and j not in allowed:
                continue
            for i in range(g - 1, j):
                if any(i < w < j for w in walls):
                    continue
                v = max(best[g - 1][i], seg(i, j))
                if v < best[g][j]:
                    best[g][j], arg[g][j] = v, i
    if best[groups][n] == inf:
        raise ValueError(f"no cut of {n} units into {groups} groups meets the constraints")
    ends, j = [], n
    for g in range(groups, 0, -1):
        ends.append(j)
        j = arg[g][j]
    return tuple(reversed(ends))


def stage_ends(unit_ids: Sequence[tuple[int, int]] | None) -> list[int]:
    """Unit count at the end of each stage (``[3, 7, 13, 16]`` for ResNet-50)."""
    if not unit_ids:
        raise ConfigError("a cut at stage boundaries needs a backbone whose units carry (stage, index) ids")
    ends = [j + 1 for j in range(len(unit_ids)) if j + 1 == len(unit_ids) or unit_ids[j + 1][0] != unit_ids[j][0]]
    return ends


def ends_from_stage_cuts(cuts: Sequence[int], unit_ids: Sequence[tuple[int, int]] | None) -> tuple[int, ...]:
    """Split ends for cuts after the given stages (1-based stage numbers, increasing)."""
    ends = stage_ends(unit_ids)
    n = len(ends)
    cuts = [int(c) for c in cuts]
    if cuts != sorted(set(cuts)) or any(not 1 <= c < n for c in cuts):
        raise ConfigError(f"stage_cuts {tuple(cuts)} is not a valid cut of {n} stages: give increasing stage "
                          f"numbers in 1..{n - 1}")
    return tuple(ends[c - 1] for c in cuts) + (ends[-1],)


def _stage_split(K: int, stem_module: bool, unit_ids) -> tuple[int, ...]:
    n = len(stage_ends(unit_ids))
    groups = K - int(stem_module)
    if not 1 <= groups <= n:
        raise ConfigError(f"K={K} is impossible for a cut at stage boundaries of {n} stages: K must be 1..{n}"
                          + (" (plus the stem module)" if stem_module else ""))
    cuts = DEFAULT_STAGE_CUTS[groups] if n == 4 else tuple(round(n * (i + 1) / groups) for i in range(groups - 1))
    return ends_from_stage_cuts(cuts, unit_ids)


def is_vit_like(shapes: Sequence[tuple[int, ...]], unit_ids: Sequence[tuple[int, int]] | None) -> bool:
    """A patch embedding followed by one stage of same-shaped token units (``N x D`` in and out): a ViT.

    ``shapes`` holds the output shape (batch left out) of the stem, then of every unit.
    """
    one_stage = not unit_ids or len({stage for stage, _ in unit_ids}) == 1
    return one_stage and len(shapes[0]) == 2 and all(tuple(s) == tuple(shapes[0]) for s in shapes)


def stage_aware_ends(costs: Sequence[float], groups: int, stage_end_counts: Sequence[int], first_extra: float = 0.0,
                     end_costs: Sequence[float] | None = None) -> tuple[int, ...]:
    """Balanced cuts (as :func:`balanced_ends`) that respect the stages.

    With no more groups than stages every cut is a stage boundary (the balance picks which ones); with more,
    every stage boundary is a cut and the extra cuts fall inside stages where they balance the costs best.
    """
    boundaries = list(stage_end_counts[:-1])
    if groups <= len(stage_end_counts):
        return balanced_ends(costs, groups, first_extra, end_costs, cut_only_at=boundaries)
    return balanced_ends(costs, groups, first_extra, end_costs, always_cut_at=boundaries)


def _describe_tables(model_name: str | None, unit_ids, n_units: int) -> str:
    parts = []
    for kind in ("paper", "memory"):
        for groups in sorted(published_tables(model_name, unit_ids, kind)):
            parts.append(f"split={kind!r}: K={groups + 1} with stem_module=True or K={groups} with "
                         f"stem_module=False")
    tables = "; ".join(parts) if parts else f"No published table for {model_name or 'this backbone'}"
    return (f"{tables}. 'uniform' and 'balanced' accept any K from 1 to {n_units + 1} "
            f"(stem_module=True) or {n_units} (stem_module=False)")


def resolve_split(n_units: int, K: int, split: str | Sequence = "auto", stem_module: bool = True,
                  model_name: str | None = None, unit_ids: list[tuple[int, int]] | None = None,
                  unit_costs: Callable[[], tuple[float, list[float]]] | None = None,
                  end_costs: Callable[[], list[float]] | None = None, vit_like: bool = False) -> Split:
    """Turn a split request into a :class:`Split` with exactly K pieces, or refuse clearly.

    ``split`` is one of ``auto``, ``paper`` (published tables only), ``memory`` (the published memory
    table, else the cuts that make the largest block's peak smallest: needs ``unit_costs``, returning
    (stem cost, per-unit costs), and ``end_costs``, the bytes kept at each cut position 0..n — the
    auxiliary network placed there), ``uniform``, ``balanced`` (unit costs only), ``stages`` (cuts at stage
    boundaries only), ``stages:1,2,3`` (cuts after those stages), or an explicit list of boundaries: unit
    counts (``[3, 8, 15]``) or ``(stage, index)`` pairs, the last one being the end of the network.

    ``auto`` follows the published recipes and the network's stages, first rule that applies:

    1. a published table (``paper``, then ``memory``) that gives K pieces;
    2. ``vit_like`` (see :func:`is_vit_like`): equal groups of transformer blocks, earlier groups taking
       the remainder, as in the MAN++ ViT recipe (12 blocks at K=4: 3+3+3+3);
    3. units in several stages (``unit_ids``): cuts on stage boundaries only while the groups are no more
       than the stages, else at every stage boundary plus cuts inside stages (see :func:`stage_aware_ends`);
       which cuts is decided by the memory as in ``memory``, or by unit counts when no costs are given;
    4. otherwise ``memory``, or ``uniform`` when no costs are given.
    """
    if isinstance(K, bool) or not isinstance(K, int) or K < 1:
        raise ConfigError(f"K must be a positive integer (number of gradient-isolated pieces), got {K!r}")
    if K == 1:
        return Split((n_units,), False, "single")
    max_k = n_units + int(stem_module)
    if isinstance(split, str) and split.startswith("stages:"):
        try:
            cuts = [int(c) for c in split[len("stages:"):].split(",")]
        except ValueError:
            raise ConfigError(f"split {split!r}: give the stages to cut after as stages:1,2,3") from None
        split = list(ends_from_stage_cuts(cuts, unit_ids))
    if not isinstance(split, str):
        ends = _explicit_ends(split, n_units, unit_ids)
        got = Split(ends, stem_module, "explicit")
        if got.K != K:
            raise ConfigError(f"the explicit split has {len(ends)} unit groups, i.e. K={got.K} pieces with "
                              f"stem_module={stem_module}, but K={K} was requested")
        return got
    if split not in SPLIT_KINDS:
        raise ConfigError(f"unknown split {split!r}; choose one of {', '.join(SPLIT_KINDS)} or give a list "
                          "of boundaries")
    if K > max_k:
        raise ConfigError(f"K={K} is impossible: the backbone has {n_units} unit{'s' * (n_units != 1)}"
                          f"{' plus the stem module' if stem_module else ''}, so at most K={max_k} pieces. "
                          + _describe_tables(model_name, unit_ids, n_units))
    groups = K - int(stem_module)
    if split == "stages":
        return Split(_stage_split(K, stem_module, unit_ids), stem_module, "stages")
    if split in ("auto", "paper", "memory"):
        kinds = ("paper", "memory") if split == "auto" else (split,)
        for kind in kinds:
            tables = published_tables(model_name, unit_ids, kind)
            if groups in tables:
                return Split(tables[groups], stem_module, f"{kind} table")
        if split == "paper":
            raise ConfigError(f"no published {split!r} split for {model_name or 'this backbone'} with K={K} "
                              f"and stem_module={stem_module}. " + _describe_tables(model_name, unit_ids, n_units))
        if split == "auto" and vit_like:
            return Split(uniform_ends(n_units, groups), stem_module, "equal groups")
        if split == "auto" and unit_ids and len(stage_ends(unit_ids)) > 1:
            return _stage_aware_split(n_units, groups, stem_module, unit_ids, unit_costs, end_costs)
        if split == "auto" and (unit_costs is None or end_costs is None):
            split = "uniform"
    if split == "uniform":
        return Split(uniform_ends(n_units, groups), stem_module, "uniform")
    if unit_costs is None:
        raise ConfigError(f"split={split!r} needs per-unit memory measurements")
    stem_cost, costs = unit_costs()
    extra = 0.0 if stem_module else stem_cost
    if split == "balanced":
        return Split(balanced_ends(costs, groups, extra), stem_module, "balanced")
    if end_costs is None:
        raise ConfigError("split='memory' needs the memory kept at each cut (its auxiliary networks)")
    return Split(balanced_ends(costs, groups, extra, end_costs()), stem_module, "memory")


def _stage_aware_split(n_units: int, groups: int, stem_module: bool, unit_ids: Sequence[tuple[int, int]],
                       unit_costs: Callable[[], tuple[float, list[float]]] | None,
                       end_costs: Callable[[], list[float]] | None) -> Split:
    """``auto`` on a backbone with stages; ``source`` says whether cuts inside stages were needed and how
    they were placed (by measured memory, or by unit counts when nothing was measured)."""
    measured = unit_costs is not None and end_costs is not None
    if measured:
        stem_cost, costs = unit_costs()
        extra, kept = (0.0 if stem_module else stem_cost), end_costs()
    else:
        costs, extra, kept = [1.0] * n_units, 0.0, None
    stage_end_counts = stage_ends(unit_ids)
    ends = stage_aware_ends(costs, groups, stage_end_counts, extra, kept)
    if groups <= len(stage_end_counts):
        return Split(ends, stem_module, "stage boundaries")
    return Split(ends, stem_module, f"stage boundaries + {'memory' if measured else 'uniform'}")


def _explicit_ends(split: Sequence, n_units: int, unit_ids) -> tuple[int, ...]:
    items = list(split)
    if not items:
        raise ConfigError("an explicit split needs at least one boundary (the end of the network)")
    ends: list[int] = []
    for b in items:
        if isinstance(b, (tuple, list)) and len(b) == 2:
            if unit_ids is None:
                raise ConfigError("(stage, index) boundaries need a backbone with unit_ids; give unit counts")
            index = {tuple(u): i for i, u in enumerate(unit_ids)}
            if tuple(b) not in index:
                raise ConfigError(f"boundary {tuple(b)} names no unit; units run from {unit_ids[0]} to "
                                  f"{unit_ids[-1]}")
            ends.append(index[tuple(b)] + 1)
        elif isinstance(b, int) and not isinstance(b, bool):
            ends.append(b)
        else:
            raise ConfigError(f"a split boundary must be a unit count or a (stage, index) pair, got {b!r}")
    if any(b <= a for a, b in zip(ends, ends[1:])) or ends[0] < 1:
        raise ConfigError(f"split boundaries must be strictly increasing unit counts >= 1, got {ends}")
    if ends[-1] != n_units:
        raise ConfigError(f"the last boundary must be the end of the network (unit count {n_units}), "
                          f"got {ends[-1]}")
    return tuple(ends)
