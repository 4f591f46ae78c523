"""The Triton kernel bodies of utils/triton_gemv.py (undecorated: that module compiles them for a GPU or
interprets them on a CPU).  Imported only when a triton kernel is asked for: triton is an optional dependency."""
import triton.language as tl



def rows_kernel(w_ptr, x_ptr, keep_ptr, out_ptr, R, IN, GROUP,
                BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    in_range = r < R
    kept = tl.load(keep_ptr + r // GROUP, mask=in_range, other=0) != 0
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for k0 in range(0, IN, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_in = k < IN
        x = tl.load(x_ptr + k, mask=k_in, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + r[:, None] * IN + k[None, :], mask=kept[:, None] & k_in[None, :], other=0.0)
        acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
    tl.store(out_ptr + r, acc, mask=in_range)

def columns_kernel(wt_ptr, x_ptr, keep_ptr, out_ptr, IN, OUT, GROUP,
                   BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    kept = tl.load(keep_ptr + k // GROUP, mask=k < IN, other=0) != 0
    if tl.sum(kept.to(tl.int32), axis=0) > 0:             # a block of pruned channels: no reads, no atomics
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_in = n < OUT
        x = tl.load(x_ptr + k, mask=kept, other=0.0).to(tl.float32)
        w = tl.load(wt_ptr + k[:, None] * OUT + n[None, :], mask=kept[:, None] & n_in[None, :], other=0.0)
        tl.atomic_add(out_ptr + n, tl.sum(w.to(tl.float32) * x[:, None], axis=0), mask=n_in)


def threshold_columns_kernel(wt_ptr, x_ptr, norm_ptr, out_ptr, IN, OUT, THRESHOLD,
                             HAS_NORM: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    # columns_kernel with the keep mask computed here: channel i kept when |x[i]| (* norm[i]) >= THRESHOLD
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_in = k < IN
    x = tl.load(x_ptr + k, mask=k_in, other=0.0).to(tl.float32)
    score = tl.abs(x)
    if HAS_NORM:
        score = score * tl.load(norm_ptr + k, mask=k_in, other=0.0)
    kept = k_in & (score >= THRESHOLD)
    if tl.sum(kept.to(tl.int32), axis=0) > 0:
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_in = n < OUT
        w = tl.load(wt_ptr + k[:, None] * OUT + n[None, :], mask=kept[:, None] & n_in[None, :], other=0.0)
        x = tl.where(kept, x, 0.0)
        tl.atomic_add(out_ptr + n, tl.sum(w.to(tl.float32) * x[:, None], axis=0), mask=n_in)
