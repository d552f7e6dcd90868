"""A reusable grid barrier for a group of co-resident programs, and a kernel that times it.

The barrier is one int32 word per group: the arrival count in the low 16 bits, a generation in the
high 16. Each program bumps the word by 1 (acq_rel). The last to arrive (it reads count n - 1)
adds 2^16 - n in one release atomic, which puts the count back to 0 and moves the generation on;
the others poll the word with acquire loads until its generation differs from theirs. So the word
is back at count 0 after every barrier and serves every later barrier, launch and CUDA-graph
replay with no host-side reset (the generation wraps harmlessly: it only needs to change).

A program knows the current generation without reading it: it cannot move until this program
arrives, so it is the value read once at the start (read_generation) plus the number of barriers
passed since. That keeps one atomic round trip on the arrival path, not two. Triton runs scalar
atomics and loads in one thread and broadcasts the result; tl.debug_barrier() on both sides
orders the other threads' memory accesses of the step around the arrival and the exit.
"""
import triton
import triton.language as tl

GENERATION_SHIFT = tl.constexpr(16)
GENERATION_ONE = tl.constexpr(1 << 16)  # one generation step in the word
FIELD_MASK = tl.constexpr(0xFFFF)  # each field, count and generation, is 16 bits


@triton.jit
def read_generation(p_word):
    """The group's current generation (an acquire read); once per program before its first barrier,
    and while waiting."""
    return (tl.atomic_add(p_word, 0, sem="acquire") >> GENERATION_SHIFT) & FIELD_MASK


@triton.jit
def group_barrier(p_word, n_programs, generation):
    """Wait until all n_programs of the group have arrived; returns the next generation."""
    tl.debug_barrier()  # every thread's stores of this step are issued before the arrival
    arrived = tl.atomic_add(p_word, 1, sem="acq_rel") & FIELD_MASK
    if arrived == n_programs - 1:
        tl.atomic_add(p_word, GENERATION_ONE - n_programs, sem="release")
    else:
        while read_generation(p_word) == generation:
            pass
    tl.debug_barrier()
    return (generation + 1) & FIELD_MASK


@triton.jit(do_not_specialize=["n_iters"])
def barrier_loop_kernel(p_barrier, n_iters):
    """n_iters barriers across the whole 1-D grid and nothing else: the barrier micro-benchmark."""
    generation = read_generation(p_barrier)
    for _ in range(0, n_iters):
        generation = group_barrier(p_barrier, tl.num_programs(0), generation)
