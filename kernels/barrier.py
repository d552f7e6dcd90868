"""Grid barriers for a group of co-resident programs, bounded so they can never hang, and a kernel that times them.

Two schemes share one layout: a group's barrier is one int32 word on its own 128-byte line (a barrier
buffer holds the error word on line 0 and group g's word on line g + 1, see WORD_STRIDE), so
groups polling different words never share a cache line.

flip (the default; the scheme of CUDA cooperative groups' grid sync). Arrival is one fire-and-forget
release reduction: program 0 of the group adds 0x80000000 − (n − 1), every other program adds 1.
After all n arrivals the word has grown by exactly 0x80000000 (mod 2^32): its top bit has flipped
and the low bits are back where they were. Waiters poll the word with relaxed loads until the top
bit differs from the one they started with, then make one acquire load, which synchronises with
every arrival's release. A program knows the current top bit without reading the word at each
barrier: it reads it once before its first barrier (read_phase) and flips its copy after each.

count (the previous scheme, kept so one GPU run can measure both): the low 16 bits count arrivals and
the high 16 bits hold a generation. Each program adds 1 with an acq_rel atomic (a round trip); the
last to arrive (it reads n − 1) adds 2^16 − n in one release atomic, which resets the count and moves
the generation; the others poll with acquire loads until the generation moves.

Both leave the word ready for the next barrier, launch and CUDA-graph replay with no host reset.

Never hanging: every wait polls at most `patience` times. A program that runs out sets the error word
(ERROR_TIMEOUT) and returns patience 0, so its later barriers do not wait at all and the kernel
finishes quickly with garbage that the launcher then refuses: it reads the error word and raises.
The launcher's bound (persistent.MAX_POLLS) is far beyond any real step; see there.

Triton runs a scalar atomic or load in one thread and broadcasts the result through shared memory;
tl.debug_barrier() on both sides orders the other threads' memory accesses of the step around the
arrival and the exit.
"""
import triton
import triton.language as tl

WORD_STRIDE = tl.constexpr(32)  # int32 words per 128-byte line: one barrier word per line
TOP_BIT = tl.constexpr(-0x80000000)  # 0x80000000 as an int32
GENERATION_SHIFT = tl.constexpr(16)
GENERATION_ONE = tl.constexpr(1 << 16)  # one generation step of the count scheme
FIELD_MASK = tl.constexpr(0xFFFF)  # each field of the count scheme, count and generation, is 16 bits
ERROR_TIMEOUT = tl.constexpr(1)  # the error word's bit for "a barrier wait ran out of patience"


@triton.jit
def read_phase(p_word, FLIP: tl.constexpr):
    """The group's current phase (an acquire read): the top bit (flip) or the generation (count). Once
    per program before its first barrier."""
    word = tl.atomic_add(p_word, 0, sem="acquire")
    if FLIP:
        return word & TOP_BIT
    else:
        return (word >> GENERATION_SHIFT) & FIELD_MASK


@triton.jit
def group_barrier(p_word, p_error, rank, n_programs, phase, patience, FLIP: tl.constexpr):
    """Wait until all n_programs of the group (this one is `rank`) have arrived, polling at most
    `patience` times. Returns (next phase, patience): patience is 0 after a timeout, so a program
    that gave up once never waits again in this launch."""
    tl.debug_barrier()  # every thread's stores of this step are issued before the arrival
    if FLIP:
        increment = tl.where(rank == 0, TOP_BIT - (n_programs - 1), 1)
        tl.atomic_add(p_word, increment, sem="release")
        waiting = (tl.atomic_add(p_word, 0, sem="relaxed") & TOP_BIT) == phase
        polls = 0
        while waiting & (polls < patience):
            polls += 1
            waiting = (tl.atomic_add(p_word, 0, sem="relaxed") & TOP_BIT) == phase
        tl.atomic_add(p_word, 0, sem="acquire")  # one acquire after the loop orders the reads that follow
        next_phase = phase ^ TOP_BIT
    else:
        arrived = tl.atomic_add(p_word, 1, sem="acq_rel") & FIELD_MASK
        waiting = False
        if arrived == n_programs - 1:
            # As a tensor like `arrived`: Triton 3.9's interpreter refuses a bare constexpr value here.
            tl.atomic_add(p_word, tl.zeros_like(arrived) + (GENERATION_ONE - n_programs), sem="release")
        else:
            waiting = read_phase(p_word, False) == phase
            polls = 0
            while waiting & (polls < patience):
                polls += 1
                waiting = read_phase(p_word, False) == phase
        next_phase = (phase + 1) & FIELD_MASK
    if waiting:  # still waiting after `patience` polls: give up, say so, and never wait again
        if patience > 0:
            tl.atomic_or(p_error, ERROR_TIMEOUT, sem="relaxed")
        patience = 0
    tl.debug_barrier()
    return next_phase, patience


@triton.jit(do_not_specialize=["n_iters", "n_programs", "patience"])
def barrier_loop_kernel(p_words, n_iters, n_programs, patience, FLIP: tl.constexpr):
    """n_iters barriers of one group of n_programs (the 1-D grid, or a deliberately wrong count to
    test the timeout) and nothing else: the barrier micro-benchmark. p_words is a barrier buffer:
    the error word, then the group's word one line on."""
    p_word = p_words + WORD_STRIDE
    phase = read_phase(p_word, FLIP)
    for _ in range(0, n_iters):
        phase, patience = group_barrier(p_word, p_words, tl.program_id(0), n_programs, phase, patience, FLIP)
