"""Grid barriers for a group of co-resident programs, bounded so they can never hang, and a kernel that times them.

Two schemes share one layout: a group's barrier is one int32 word on its own 128-byte line (a barrier
buffer holds the error word on line 0 and group g's word on line g + 1, see WORD_STRIDE), so
groups polling different words never share a cache line.

flip (the default; the scheme of CUDA cooperative groups' grid sync). Arrival is one fire-and-forget
release reduction: program 0 of the group adds 0x80000000 − (n − 1), every other program adds 1.
After all n arrivals the word has grown by exactly 0x80000000 (mod 2^32): its top bit has flipped
and the low bits are back where they were. The top bit flips at the n-th arrival, never earlier,
only while the low 31 bits are 0 at the start of the barrier: with low bits L > 0 it flips up to L
arrivals early (program 0 first: L − (n − 1) + k reaches 0 at k = n − 1 − L), and near 2^31 the 1s
alone carry into it. What the kernels guarantee instead of "any word": every word starts at 0 (the
launcher zeroes new buffers) and every completed barrier leaves the low bits as it found them, so
they are 0 at every barrier. A launch that timed out leaves its words half-arrived; the launcher
drops that buffer and never reuses it.
Waiters poll the word with acquire loads, as cooperative groups does, until the top bit differs from
the one they started with: the poll that sees it synchronises with every arrival's release. On sm_90
an acquire poll is `LDG.E.STRONG.GPU` + `CCTL.IVALL` (an L1 invalidate), no more round trips than a
relaxed one. (A single acquire after relaxed polls, written as atomic_add(p, 0) with its result
unused, is erased by Triton 3.6/3.9: tests/compile_sm90.py checks the acquire is in the poll loop.)
A program knows the current top bit without reading the word at each barrier: it reads it once
before its first barrier (read_phase) and flips its copy after each.

count (the previous scheme, kept so one GPU run can measure both): the low 16 bits count arrivals and
the high 16 bits hold a generation. Each program adds 1 with an acq_rel atomic (a round trip); the
last to arrive (it reads n − 1) adds 2^16 − n in one release atomic, which resets the count and moves
the generation; the others poll with acquire loads until the generation moves.

Both leave the word ready for the next barrier, launch and CUDA-graph replay with no host reset.

Never hanging: every wait polls at most `patience` times. A program that runs out sets the error word
(ERROR_TIMEOUT) and returns patience 0, so its later barriers do not wait at all and the kernel
finishes quickly with garbage that the launcher then refuses: it reads the error word and raises.
The launcher's bound (persistent.MAX_POLLS) is far beyond any real step; see there.

Triton runs a scalar atomic or load in one thread and broadcasts the result through shared memory
between two bar.syncs (each poll pays them; Triton offers no way for the other threads to skip them).
tl.debug_barrier() before the arrival orders every thread's accesses of the step before it. No
second one is needed at the exit: the other threads read the acquire's result (the last poll, or the
count scheme's acq_rel arrival) after the bar.sync that follows it, so their reads of the next step
come after the acquire.
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
        # Acquire polls: the poll that sees the flip is the acquire (a separate acquire whose result
        # went unused would be erased by Triton; tests/compile_sm90.py checks the PTX keeps it).
        waiting = (tl.atomic_add(p_word, 0, sem="acquire") & TOP_BIT) == phase
        polls = 0
        while waiting & (polls < patience):
            polls += 1
            waiting = (tl.atomic_add(p_word, 0, sem="acquire") & TOP_BIT) == phase
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
