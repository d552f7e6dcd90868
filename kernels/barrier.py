"""A reusable grid barrier for a group of co-resident programs, and a kernel that times it.

group_barrier is the sense-reversing kind. Each program bumps the group's counter (acq_rel); the
last to arrive resets the counter to 0 and then bumps the generation word (release); the others
spin on an acquire read of the generation until it moves. Because the counter is 0 again after
every barrier and the generation only needs to change, the same two words serve every later
barrier, launch and CUDA-graph replay with no host-side reset.

The generation is read before arriving: it cannot move until this program has arrived, so the
value read is the current one. Scalar atomics run once per program; tl.debug_barrier() on both
sides orders the other threads' memory accesses of the step around them.
"""
import triton
import triton.language as tl


@triton.jit
def group_barrier(p_count, p_generation, n_programs):
    tl.debug_barrier()  # every thread's stores of this step are issued before the arrival
    generation = tl.atomic_add(p_generation, 0, sem="acquire")
    arrived = tl.atomic_add(p_count, 1, sem="acq_rel")
    if arrived == n_programs - 1:
        tl.atomic_xchg(p_count, 0, sem="relaxed")
        tl.atomic_add(p_generation, 1, sem="release")
    else:
        while tl.atomic_add(p_generation, 0, sem="acquire") == generation:
            pass
    tl.debug_barrier()


@triton.jit(do_not_specialize=["n_iters"])
def barrier_loop_kernel(p_barrier, n_iters):
    """n_iters barriers across the whole 1-D grid and nothing else: the barrier micro-benchmark."""
    for _ in range(0, n_iters):
        group_barrier(p_barrier, p_barrier + 1, tl.num_programs(0))
