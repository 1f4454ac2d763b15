"""Expert placement from measured load (the greedy of DeepSeek's EPLB), per layer. Pure Python, no torch.

The input is, per layer, the rows routed to each expert over a recent window; the pool has W workers with
``capacity`` expert slots each per layer, and up to E + R slots are filled (R redundant ones). Per layer:
  1. replicate: every expert gets one slot; each extra slot goes to the expert whose load per replica is the
     highest at that moment (a replica takes an even share of its expert's rows, plan_dispatch); the number of
     extra slots used (0..R) is the one whose packing ends best;
  2. pack: replicas, heaviest first, each onto the least loaded worker that has a free slot and does not host that
     expert yet; then improve by moving or swapping replicas between the most loaded worker and another while that
     lowers the most loaded one;
  3. align: the workers' new sets of experts are matched to the workers that hold most of each already (workers
     are interchangeable for balance), so that a rebalance moves as few weights as it can.
Imbalance is what a layer waits for: its most loaded worker's rows over the mean, summed over the layers.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Sequence

Placement = tuple[tuple[int, ...], ...]  # one layer: [worker] -> global expert ids in local-id order
EPS = 1e-9


def slots_per_worker(num_experts: int, num_workers: int, experts_per_worker: int, redundant: int) -> int:
    """Expert slots per worker and layer: room for the contiguous map and an even share of the R extra slots."""
    if isinstance(redundant, bool) or not isinstance(redundant, int) or redundant < 0:
        raise ValueError(f"redundant_experts must be an integer >= 0, got {redundant!r}")
    if redundant > num_experts * (num_workers - 1):
        raise ValueError(f"redundant_experts={redundant} is more than {num_workers} workers can hold: an expert "
                         f"has at most one copy per worker, so at most {num_experts * (num_workers - 1)} extra slots "
                         f"for {num_experts} experts")
    return max(experts_per_worker, -(-(num_experts + redundant) // num_workers))


def replicate(loads: Sequence[float], slots: int, max_replicas: int) -> list[int]:
    """Replica count of each expert: one each, then each extra slot to the highest load per replica (ties: the
    lower expert id); never more than ``max_replicas`` (the workers) copies of one expert."""
    if not len(loads) <= slots <= len(loads) * max_replicas:
        raise ValueError(f"cannot fill {slots} slots with {len(loads)} experts of at most {max_replicas} copies")
    counts = [1] * len(loads)
    heap = [(-load, e) for e, load in enumerate(loads)]
    heapq.heapify(heap)
    for _ in range(slots - len(loads)):
        _, e = heapq.heappop(heap)
        counts[e] += 1
        if counts[e] < max_replicas:
            heapq.heappush(heap, (-loads[e] / counts[e], e))
    return counts


def pack(loads: Sequence[float], replicas: Sequence[int], num_workers: int, capacity: int) -> Placement:
    """Replicas (each ``loads[e] / replicas[e]`` rows) onto workers: at most ``capacity`` each, never two copies of
    one expert on a worker, expected rows as even as the greedy and its improvement get them."""
    if sum(replicas) > num_workers * capacity:
        raise ValueError(f"{sum(replicas)} replicas do not fit {num_workers} workers x {capacity} slots")
    items = sorted(((loads[e] / r, e) for e, r in enumerate(replicas) for _ in range(r)), key=lambda i: (-i[0], i[1]))
    hosted: list[list[int]] = [[] for _ in range(num_workers)]
    load = [0.0] * num_workers
    share = [loads[e] / r for e, r in enumerate(replicas)]
    for row_load, e in items:
        free = [w for w in range(num_workers) if len(hosted[w]) < capacity and e not in hosted[w]]
        if not free:  # the only free slots are on workers that host e: make room on another one
            free = [_make_room(hosted, load, share, e, capacity)]
        w = min(free, key=lambda w: (load[w], len(hosted[w]), w))
        hosted[w].append(e)
        load[w] += row_load
    _improve(hosted, load, share, capacity)
    return tuple(tuple(sorted(experts)) for experts in hosted)


def _make_room(hosted: list[list[int]], load: list[float], share: list[float], expert: int, capacity: int) -> int:
    """A full worker without ``expert`` moves one of its experts to a worker with a free slot (which hosts
    ``expert``, or it would have been chosen); returns the worker now free for ``expert``. One always exists: the
    free worker holds fewer than ``capacity`` experts, so the full one has one the free one lacks."""
    target = next(w for w in range(len(hosted)) if len(hosted[w]) < capacity)
    donor = min((w for w in range(len(hosted)) if expert not in hosted[w]), key=lambda w: (load[w], w))
    moved = min((e for e in hosted[donor] if e not in hosted[target]), key=lambda e: (share[e], e))
    hosted[donor].remove(moved)
    hosted[target].append(moved)
    load[donor] -= share[moved]
    load[target] += share[moved]
    return donor


def _improve(hosted: list[list[int]], load: list[float], share: list[float], capacity: int,
             max_rounds: int = 1000) -> None:
    """Move or swap single replicas between the most loaded worker and another while that lowers the larger of the
    two below the most loaded one's load; the best such change each round."""
    for _ in range(max_rounds):
        top = max(range(len(hosted)), key=lambda w: (load[w], -w))
        best: tuple[float, int, int, int | None] | None = None  # (new max of the pair, other worker, out, in)
        for other in range(len(hosted)):
            if other == top:
                continue
            for out in hosted[top]:
                if out in hosted[other]:
                    continue
                if len(hosted[other]) < capacity:  # a move
                    pair = max(load[top] - share[out], load[other] + share[out])
                    if pair < load[top] - EPS and (best is None or pair < best[0] - EPS):
                        best = (pair, other, out, None)
                for back in hosted[other]:  # a swap
                    if back in hosted[top] or share[back] >= share[out]:
                        continue
                    pair = max(load[top] - share[out] + share[back], load[other] + share[out] - share[back])
                    if pair < load[top] - EPS and (best is None or pair < best[0] - EPS):
                        best = (pair, other, out, back)
        if best is None:
            return
        _, other, out, swapped = best
        hosted[top].remove(out)
        hosted[other].append(out)
        load[top] -= share[out]
        load[other] += share[out]
        if swapped is not None:
            hosted[other].remove(swapped)
            hosted[top].append(swapped)
            load[other] -= share[swapped]
            load[top] += share[swapped]


def align(new: Placement, current: Placement) -> Placement:
    """``new``'s expert sets given to the workers that already hold most of each (greedy matching), keeping the
    order of experts a worker keeps."""
    pairs = sorted(((len(set(a) & set(b)), i, w) for i, a in enumerate(new) for w, b in enumerate(current)),
                   key=lambda p: (-p[0], p[1], p[2]))
    owner: dict[int, int] = {}
    taken: set[int] = set()
    for _, i, w in pairs:
        if i not in owner and w not in taken:
            owner[i] = w
            taken.add(w)
    out: list[tuple[int, ...]] = [()] * len(current)
    for i, w in owner.items():
        kept = [e for e in current[w] if e in new[i]]
        out[w] = tuple(kept + sorted(set(new[i]) - set(kept)))
    return tuple(out)


def place_layer(loads: Sequence[float], num_workers: int, capacity: int, redundant: int,
                current: Placement | None = None) -> Placement:
    """One layer's placement: replicate, pack, and (given the current one) align.

    A replica only helps if the packing can use it (two hot experts on two workers balance without any, and
    replicating one of them would force both its copies next to the other), so the packings of 0..R extra replicas
    are compared and the one whose most loaded worker has the fewest rows wins (ties: fewer replicas). Unused
    redundant slots stay empty.
    """
    tried = range(redundant + 1) if redundant <= 16 else sorted({redundant * i // 16 for i in range(17)})
    best: tuple[float, Placement] | None = None
    for extra in tried:
        placement = pack(loads, replicate(loads, len(loads) + extra, num_workers), num_workers, capacity)
        peak = max(worker_rows(placement, loads))
        if best is None or peak < best[0] - EPS * max(1.0, peak):
            best = (peak, placement)
    assert best is not None
    return align(best[1], current) if current is not None else best[1]


def plan(layer_loads: Sequence[Sequence[float]], num_workers: int, capacity: int, redundant: int,
         current: Sequence[Placement] | None = None) -> tuple[Placement, ...]:
    """Every layer's placement from its loads ([layer][expert] rows)."""
    return tuple(place_layer(loads, num_workers, capacity, redundant, current[layer] if current else None)
                 for layer, loads in enumerate(layer_loads))


def max_workers(num_experts: int, redundant: int) -> int:
    """The most workers a pool can use: one per expert slot (every expert once, plus the redundant slots)."""
    return num_experts + redundant


def plan_for_workers(layer_loads: Sequence[Sequence[float]], num_workers: int, redundant: int,
                     current: Sequence[Placement]) -> tuple[tuple[Placement, ...], int]:
    """The placement on ``num_workers`` workers (a resized pool) from the same policy, and its slots per worker.

    Workers keep their index: growing adds workers after the current ones (they start empty for the matching),
    shrinking retires the last ones; each new expert set goes to the kept worker that holds most of it, so that
    kept workers read as little as they can. Redundant slots a pool this small cannot use (an expert has at most
    one copy per worker) are left out.
    """
    num_experts = len(layer_loads[0])
    if not 1 <= num_workers <= max_workers(num_experts, redundant):
        raise ValueError(f"an expert pool of {num_experts} experts and {redundant} redundant slots takes 1 to "
                         f"{max_workers(num_experts, redundant)} workers, not {num_workers}")
    usable = min(redundant, num_experts * (num_workers - 1))
    capacity = -(-(num_experts + usable) // num_workers)
    padded = [tuple(layer[:num_workers]) + ((),) * (num_workers - len(layer)) for layer in current]
    layers = tuple(place_layer(loads, num_workers, capacity, usable, was) if any(loads) else
                   even_moving_least(was, current_layer, num_experts)
                   for loads, was, current_layer in zip(layer_loads, padded, current, strict=True))
    return layers, capacity


def even_moving_least(padded: Placement, current: Placement, num_experts: int) -> Placement:
    """Without any measured load, balance is only the count of experts per worker: every expert once, counts
    differing by at most one, and each kept worker keeping as many of its experts as that allows (``padded``: the
    current placement cut or padded to the new size; ``current``: the whole one, for the retired workers'
    experts)."""
    num_workers = len(padded)
    seen: set[int] = set()
    hosted: list[list[int]] = []
    for experts in padded:  # a replica is dropped: with no load it balances nothing
        hosted.append([e for e in experts if e not in seen])
        seen.update(experts)
    orphans = list(dict.fromkeys([e for experts in current for e in experts if e not in seen]
                                 + [e for e in range(num_experts) if e not in seen]))
    base, extra = divmod(num_experts, num_workers)
    ranked = sorted(range(num_workers), key=lambda w: (-len(hosted[w]), w))
    target = {w: base + (rank < extra) for rank, w in enumerate(ranked)}
    for w in range(num_workers):
        while len(hosted[w]) > target[w]:
            orphans.append(hosted[w].pop())
    for e in orphans:
        w = min((w for w in range(num_workers) if len(hosted[w]) < target[w]), key=lambda w: (len(hosted[w]), w))
        hosted[w].append(e)
    return tuple(tuple(experts) for experts in hosted)


def worker_rows(placement: Placement, loads: Sequence[float]) -> list[float]:
    """Expected rows of each worker in one layer: each expert's rows split evenly among its replicas."""
    copies = [0] * len(loads)
    for experts in placement:
        for e in experts:
            copies[e] += 1
    return [sum(loads[e] / copies[e] for e in experts) for experts in placement]


def imbalance(rows: Sequence[Sequence[float]]) -> float:
    """[layer][worker] rows -> sum over layers of the most loaded worker's rows over the sum of the mean worker's
    (each layer waits for its most loaded worker); 1.0 is perfect balance, and also what no rows at all give."""
    worst = sum(max(layer) for layer in rows if layer)
    mean = sum(sum(layer) / len(layer) for layer in rows if layer)
    return worst / mean if mean > 0 else 1.0


def expected_imbalance(placements: Sequence[Placement], layer_loads: Sequence[Sequence[float]]) -> float:
    """The imbalance ``placements`` would have on ``layer_loads``."""
    return imbalance([worker_rows(p, loads) for p, loads in zip(placements, layer_loads, strict=True)])


def moves(before: Sequence[Placement], after: Sequence[Placement]) -> list[str]:
    """What changed, one entry per (layer, expert) whose workers changed: 'L3 e5 w[0]->w[0, 2]'."""
    out = []
    for layer, (old, new) in enumerate(zip(before, after, strict=True)):
        for e in sorted({e for experts in (*old, *new) for e in experts}):
            was = [w for w, experts in enumerate(old) if e in experts]
            now = [w for w, experts in enumerate(new) if e in experts]
            if was != now:
                out.append(f"L{layer} e{e} w{was}->w{now}")
    return out


class LoadWindow:
    """The last ``intervals`` samples of [layer][expert] rows, summed: the sliding window placements use."""

    def __init__(self, intervals: int) -> None:
        self.intervals = intervals
        self._samples: deque[list[list[int]]] = deque(maxlen=intervals)

    def add(self, rows: list[list[int]]) -> None:
        self._samples.append(rows)

    def total(self) -> list[list[int]]:
        if not self._samples:
            return []
        return [[sum(s[layer][e] for s in self._samples) for e in range(len(self._samples[0][layer]))]
                for layer in range(len(self._samples[0]))]

    def rows(self) -> int:
        return sum(sum(map(sum, s)) for s in self._samples)
