"""What the warp-specialised Hopper kernels share (`block_sparse_hopper`, `cluster_hopper`): the rows of one
consumer warpgroup, the ring's barriers, the turns two consumer warpgroups take issuing their matrix products
(FlashAttention-3's ping-pong), and how a consumer without rows keeps the ring moving."""
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier

HALF_M = gl.constexpr(64)  # query rows per consumer warpgroup (the wgmma M of one warpgroup)
LN2 = gl.constexpr(0.6931471805599453)


@gluon.jit
def ring_barriers(STAGES: gl.constexpr, CONSUMERS: gl.constexpr = 2):
    """The K/V ring's barriers ``(k_ready, k_empty, v_ready, v_empty)``, ``STAGES`` each, and the two ``turn``
    barriers: a slot is ready after one arrival (the loader's), empty after ``CONSUMERS`` (one per consumer)."""
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(turn.index(i), count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=CONSUMERS)
        mbarrier.init(v_empty.index(i), count=CONSUMERS)
    return k_ready, k_empty, v_ready, v_empty, turn


@gluon.jit
def wait_turn(turn, HALF: gl.constexpr, j, pingpong):
    """Wait until it is this consumer's turn to issue its ``j``-th block of matrix products.

    Consumer 0 goes first (its first wait is on the barrier's pre-completed phase); each consumer hands
    the turn over with `give_turn` once its products are issued. Tiles of at most 64 rows (one busy
    consumer) take no turns (``pingpong`` false), nor does the LVSA kernel's fp8 mode; a third consumer
    (``HALF = 2``, fp8 only) has no turn barrier."""
    if HALF < 2:
        mbarrier.wait(turn.index(HALF), (j & 1) ^ (1 - HALF), pred=pingpong)


@gluon.jit
def give_turn(turn, HALF: gl.constexpr, pingpong):
    """Hand the turn to the other consumer (see `wait_turn`)."""
    if HALF < 2:
        mbarrier.arrive(turn.index(1 - HALF), count=1, pred=pingpong)


@gluon.jit
def pass_ring(k_ready, k_empty, v_ready, v_empty, n_kv):
    """Wait for and release every ring slot of ``n_kv`` key tiles, as a consumer with no rows in the tile does
    (the loader refills a slot only after every consumer released it)."""
    STAGES: gl.constexpr = k_ready.type.shape[0]
    for j in range(n_kv):
        stage = j % STAGES
        phase = (j // STAGES) & 1
        mbarrier.wait(k_ready.index(stage), phase)
        mbarrier.arrive(k_empty.index(stage), count=1)
        mbarrier.wait(v_ready.index(stage), phase)
        mbarrier.arrive(v_empty.index(stage), count=1)
