"""A model of the Hopper cluster kernel's barrier protocol (`triton_src/cluster_hopper.py`: `_produce`,
`_consume`, `_walk`), run under random interleavings of its three partitions on the CPU.

The kernel itself only runs on an sm_90 GPU; its ring protocol (mbarrier phases, the producer's cp.async groups
and when it publishes them, the consumers' ping-pong turns) is modelled here statement by statement: a change to
the order of waits and arrivals in the kernel must be made here too. Checked for every schedule: no deadlock,
a consumer only reads a slot holding the tile it expects, landed (Q with it), a slot is never refilled while a
product reads it, and each busy consumer folds every tile once, in order. The publish order that came first
(publish tile ``j - STAGES + 1`` only after committing V of tile j) deadlocks here (`test_old_order_deadlocks`).
"""
import random

import pytest

class Bar:
    """An mbarrier: ``count`` arrivals complete a phase; ``passed(parity)`` is ``try_wait.parity``."""

    def __init__(self, count):
        self.count, self.pending, self.completed = count, count, 0

    def arrive(self):
        self.pending -= 1
        assert self.pending >= 0
        if self.pending == 0:
            self.completed += 1
            self.pending = self.count

    def passed(self, parity):
        return self.completed % 2 != parity


class World:
    """Shared memory of one program: the barriers, what each ring slot holds (tile, landed), how many products
    read it now, Q, and the producer's outstanding copy groups (kind, slot, tile), oldest first."""

    def __init__(self, stages):
        self.S = stages
        self.k_ready, self.v_ready = [Bar(1) for _ in range(stages)], [Bar(1) for _ in range(stages)]
        self.k_empty, self.v_empty = [Bar(2) for _ in range(stages)], [Bar(2) for _ in range(stages)]
        self.turn = [Bar(1), Bar(1)]
        self.kslot, self.vslot = [None] * stages, [None] * stages
        self.kuse, self.vuse = [0] * stages, [0] * stages
        self.q = None
        self.groups = []


def wait(bar, parity, pred=True):
    while pred and not bar.passed(parity):
        yield


def copy(w, kind, slot, tile):
    """Commit a copy group (it lands at the next `land` that covers it)."""
    if kind == "q":
        w.q = (None, False)
    else:
        slots, use = (w.kslot, w.kuse) if kind == "k" else (w.vslot, w.vuse)
        assert use[slot] == 0, f"{kind} slot {slot} refilled while a product reads it"
        slots[slot] = (tile, False)
    w.groups.append((kind, slot, tile))


def land(w, newest):
    """``cp.async.wait_group(newest)`` + fence + partition barrier: all but the newest groups have landed."""
    done, w.groups = w.groups[:len(w.groups) - newest], (w.groups[len(w.groups) - newest:] if newest else [])
    for kind, slot, tile in done:
        if kind == "q":
            w.q = (None, True)
        else:
            slots = w.kslot if kind == "k" else w.vslot
            assert slots[slot] == (tile, False)
            slots[slot] = (tile, True)


def producer(w, n_kv):
    """`cluster_hopper._produce`."""
    S, lag = w.S, w.S - 2
    if n_kv > 0:
        copy(w, "q", None, None)
    for j in range(n_kv):
        stage, phase = j % S, (j // S) & 1
        yield from wait(w.k_empty[stage], phase ^ 1)
        copy(w, "k", stage, j)
        yield
        if j >= lag:
            land(w, 2 * lag)
            yield
            w.k_ready[(j - lag) % S].arrive()
            if j > lag:
                w.v_ready[(j - lag - 1) % S].arrive()
        yield from wait(w.v_empty[stage], phase ^ 1)
        copy(w, "v", stage, j)
        yield
    land(w, 0)
    yield
    for j in range(max(n_kv - lag, 0), n_kv):
        w.k_ready[j % S].arrive()
    for j in range(max(n_kv - lag - 1, 0), n_kv):
        w.v_ready[j % S].arrive()


def wait_turn(w, half, j, pingpong):
    yield from wait(w.turn[half], (j & 1) ^ (1 - half), pingpong)


def give_turn(w, half, pingpong):
    if pingpong:
        w.turn[1 - half].arrive()


def read(w, kind, slot, tile):
    slots, use = (w.kslot, w.kuse) if kind == "k" else (w.vslot, w.vuse)
    assert slots[slot] == (tile, True), f"{kind} slot {slot} holds {slots[slot]}, not tile {tile} landed"
    assert w.q == (None, True)
    use[slot] += 1


def release(w, kind, slot, log, tile):
    use, empty = (w.kuse, w.k_empty) if kind == "k" else (w.vuse, w.v_empty)
    use[slot] -= 1
    empty[slot].arrive()
    log.append((kind, tile))


def walk(w, half, j_lo, j_hi, turn0, pingpong, log):
    """`cluster_hopper._walk`: products are issued at a turn and read their slots until their wait."""
    S = w.S
    stage = j_lo % S
    yield from wait(w.k_ready[stage], (j_lo // S) & 1)
    yield from wait_turn(w, half, turn0, pingpong)
    read(w, "k", stage, j_lo)
    give_turn(w, half, pingpong)
    yield
    release(w, "k", stage, log, j_lo)
    for j in range(j_lo + 1, j_hi):
        prev, stage = stage, j % S
        yield from wait(w.k_ready[stage], (j // S) & 1)
        yield from wait(w.v_ready[prev], ((j - 1) // S) & 1)
        yield from wait_turn(w, half, turn0 + j - j_lo, pingpong)
        read(w, "k", stage, j)
        read(w, "v", prev, j - 1)
        give_turn(w, half, pingpong)
        yield
        release(w, "k", stage, log, j)
        yield
        release(w, "v", prev, log, j - 1)
    yield from wait(w.v_ready[stage], ((j_hi - 1) // S) & 1)
    yield from wait_turn(w, half, turn0 + j_hi - j_lo, pingpong)
    read(w, "v", stage, j_hi - 1)
    give_turn(w, half, pingpong)
    yield
    release(w, "v", stage, log, j_hi - 1)


def consumer(w, half, q0, q1, n_full, n_kv, log):
    """`cluster_hopper._consume`."""
    S = w.S
    pingpong = q1 - q0 > 64
    if q0 + half * 64 >= q1:
        for j in range(n_kv):
            stage, phase = j % S, (j // S) & 1
            yield from wait(w.k_ready[stage], phase)
            w.k_empty[stage].arrive()
            yield from wait(w.v_ready[stage], phase)
            w.v_empty[stage].arrive()
    elif n_kv > 0:
        if n_full > 0:
            yield from walk(w, half, 0, n_full, 0, pingpong, log)
        if n_kv > n_full:
            yield from walk(w, half, n_full, n_kv, n_full + 1 if n_full > 0 else 0, pingpong, log)


def run(S, q0, q1, n_full, n_kv, seed, produce=producer, max_steps=20000):
    """One random interleaving of the three partitions (one step = up to the next wait or yield)."""
    rnd = random.Random(seed)
    w = World(S)
    logs = [[], []]
    threads = [produce(w, n_kv)] + [consumer(w, half, q0, q1, n_full, n_kv, logs[half]) for half in (0, 1)]
    alive, steps = [0, 1, 2], 0
    while alive:
        i = rnd.choice(alive)
        try:
            next(threads[i])
        except StopIteration:
            alive.remove(i)
        steps += 1
        assert steps < max_steps, f"deadlock: stages={S} rows={q1 - q0} n_full={n_full} n_kv={n_kv}"
    for half in (0, 1):
        if q0 + half * 64 < q1 and n_kv:
            assert [t for kind, t in logs[half] if kind == "k"] == list(range(n_kv))
            assert [t for kind, t in logs[half] if kind == "v"] == list(range(n_kv))


@pytest.mark.parametrize("stages", [2, 3, 4])
@pytest.mark.parametrize("rows", [0, 1, 64, 65, 128])
def test_ring_protocol_under_random_schedules(stages, rows):
    """Empty slot, one consumer busy (<= 64 rows), ping-pong (> 64); every split of full / partial tiles."""
    for n_kv in range(0, 2 * stages + 3):
        for n_full in range(0, n_kv + 1):
            for seed in range(4):
                run(stages, 0, rows, n_full, n_kv, seed)


def producer_publishing_after_v(w, n_kv):
    """The first producer: published tile ``j - STAGES + 1`` after committing V of tile j."""
    S, lag = w.S, w.S - 1
    if n_kv > 0:
        copy(w, "q", None, None)
    for j in range(n_kv):
        stage, phase = j % S, (j // S) & 1
        yield from wait(w.k_empty[stage], phase ^ 1)
        copy(w, "k", stage, j)
        yield from wait(w.v_empty[stage], phase ^ 1)
        copy(w, "v", stage, j)
        yield
        if j >= lag:
            land(w, 2 * lag)
            w.k_ready[(j - lag) % S].arrive()
            w.v_ready[(j - lag) % S].arrive()
    land(w, 0)
    for j in range(max(n_kv - lag, 0), n_kv):
        w.k_ready[j % S].arrive()
        w.v_ready[j % S].arrive()


def test_old_order_deadlocks():
    with pytest.raises(AssertionError, match="deadlock"):
        run(2, 0, 128, 5, 5, 0, produce=producer_publishing_after_v)
