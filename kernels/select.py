"""Radix select of the k largest |w| (protected entries first, ties to the lower flat index), no host sync.

Magnitudes are compared as integers (the bit pattern of a non-negative float orders like its value); entries
protected by the j-per-neuron rule get the key of +inf, so they are kept first. The k-th largest key is fixed
8 bits at a time, from the top: each pass histograms the next digit of the keys that share the digits fixed so
far, and a one-program scan picks the digit where the count from the top reaches k. The state (prefix, k still
to place, bits fixed) lives on the device, so every launch is unconditional and the host never waits.

Warm start: the threshold moves little between steps. Given the previous threshold, one pass counts the keys
above its top 16 bits and histograms the next digit among those sharing them; if the k-th key still lies in
that group the search finishes with one more pass (2 passes instead of 4); if not, the state resets and the
full passes, which otherwise return at once, do the work.

Ties at the threshold go to the lowest flat index, as in the reference: a last pass keeps keys above the
threshold and counts ties per block, and a second one ranks the tied entries with an exclusive prefix over
the blocks (it skips blocks without ties).

The j rule is fused into the first pass. With j > 0 that pass walks the matrix neuron by neuron, each a row (for
neurons that are columns it reads a transposed copy, and its mask is transposed back): it finds each neuron's j-th largest key by walking its distinct keys
from the top (j + 1 sweeps of the fan, each a max and a count, served from L1/L2 after the first), ranks the
neuron's ties at it by fan index, writes the protection as a bool mask, and adds every key, protected ones as +inf,
to the first histogram. The later passes read that mask.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.runtime import require_launchable

INF_KEY: tl.constexpr = tl.constexpr(0x7F800000)  # bit pattern of +inf: above every finite magnitude
PASSES = (24, 16, 8, 0)  # digit positions, 8 bits each


def _hi_mask(shift: int) -> int:
    """int32 mask of the bits above the digit at `shift` (as a signed value)."""
    hi = shift + 8
    return 0 if hi >= 32 else -(1 << hi)


@triton.jit
def _keys(w_ptr, prot_ptr, offs, inside, HAS_PROT: tl.constexpr):
    w = tl.load(w_ptr + offs, mask=inside, other=0.0)
    key = w.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    if HAS_PROT:
        prot = tl.load(prot_ptr + offs, mask=inside, other=0)
        key = tl.where(prot != 0, INF_KEY, key)
    return key


@triton.jit
def _count_digits(key, inside, prefix, hist, above, SHIFT: tl.constexpr, HI_MASK: tl.constexpr, WARM: tl.constexpr):
    """A radix pass's work on one block of keys: histogram the digit at SHIFT among the keys matching the prefix
    (bin 256 collects the rest); for a warm start, also count the keys above the prefix."""
    high = key & HI_MASK
    hist += tl.histogram(tl.where(inside & (high == prefix), (key >> SHIFT) & 255, 256), 512)
    if WARM:
        above += (inside & (high > prefix)).to(tl.int32)
    return hist, above


@triton.jit
def _radix_pass(w_ptr, prot_ptr, n, state_ptr, hist_ptr, SHIFT: tl.constexpr, HI_MASK: tl.constexpr, LEVEL: tl.constexpr,
                WARM: tl.constexpr, HAS_PROT: tl.constexpr, BLOCK: tl.constexpr):
    """Histogram digit (key >> SHIFT) & 255 of the keys matching the prefix; no-op unless LEVEL bits are fixed."""
    level = tl.load(state_ptr + 2)
    if level == LEVEL:
        prefix = tl.load(state_ptr)
        hist = tl.zeros((512,), dtype=tl.int32)
        above = tl.zeros((BLOCK,), dtype=tl.int32)
        for blk in range(tl.program_id(0), tl.cdiv(n, BLOCK), tl.num_programs(0)):
            offs = blk * BLOCK + tl.arange(0, BLOCK)  # n < 2³¹ (checked by select_topk)
            inside = offs < n
            key = _keys(w_ptr, prot_ptr, offs, inside, HAS_PROT)
            hist, above = _count_digits(key, inside, prefix, hist, above, SHIFT, HI_MASK, WARM)
        tl.atomic_add(hist_ptr + tl.arange(0, 512), hist)
        if WARM:
            tl.atomic_add(state_ptr + 3, tl.sum(above, axis=0))


@triton.jit
def _protect_pass(w_ptr, prot_ptr, n_neurons, fan, j, state_ptr, hist_ptr, SHIFT: tl.constexpr,
                  HI_MASK: tl.constexpr, WARM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr):
    """The j largest |w| of every row (ties: the lower index) -> prot_ptr, fused with the first radix pass.

    w is [n_neurons, fan], contiguous. Each program walks whole rows, BLOCK_N at a time.
    """
    prefix = tl.load(state_ptr)
    hist = tl.zeros((512,), dtype=tl.int32)
    above_prefix = tl.zeros((BLOCK_N * BLOCK_F,), dtype=tl.int32)
    cols = tl.arange(0, BLOCK_F)
    for tile in range(tl.program_id(0), tl.cdiv(n_neurons, BLOCK_N), tl.num_programs(0)):
        nrn = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        live = nrn < n_neurons
        # The neuron's j-th largest key T, walking its distinct keys from the top: pass r finds the largest key below
        # the previous pass's (v_r) and counts the previous one's copies; T is the first v whose running count
        # reaches j, and `need` is how many of T's copies the j rule takes. j + 1 sweeps (5 for the default j = 4)
        # of a max and a count, against 31 counts for a bitwise search; at most fan + 1.
        prev = tl.zeros((BLOCK_N,), dtype=tl.int32)
        thr = tl.full((BLOCK_N,), -1, tl.int32)  # stays -1 when the fan has fewer than j entries: all protected
        need = tl.zeros((BLOCK_N,), dtype=tl.int32)
        above = tl.zeros((BLOCK_N,), dtype=tl.int32)  # keys above prev
        found = tl.zeros((BLOCK_N,), dtype=tl.int1)
        for r in range(tl.minimum(j, fan) + 1):  # a fan has at most `fan` distinct keys
            v = tl.full((BLOCK_N,), -1, tl.int32)
            copies = tl.zeros((BLOCK_N,), dtype=tl.int32)
            for f0 in range(0, fan, BLOCK_F):
                inside = live[:, None] & (f0 + cols[None, :] < fan)
                key = _keys(w_ptr, prot_ptr, nrn.to(tl.int64)[:, None] * fan + f0 + cols[None, :], inside, False)
                below = inside & ((key < prev[:, None]) | (r == 0))
                v = tl.maximum(v, tl.max(tl.where(below, key, -1), axis=1))
                copies += tl.sum((inside & (key == prev[:, None]) & (r > 0)).to(tl.int32), axis=1)
            reached = (~found) & (r > 0) & (above + copies >= j)
            thr = tl.where(reached, prev, thr)
            need = tl.where(reached, j - above, need)
            found = found | reached
            above += copies
            prev = v
        ties_before = tl.zeros((BLOCK_N,), dtype=tl.int32)
        for f0 in range(0, fan, BLOCK_F):
            inside = live[:, None] & (f0 + cols[None, :] < fan)
            offs = nrn.to(tl.int64)[:, None] * fan + f0 + cols[None, :]
            key = _keys(w_ptr, prot_ptr, offs, inside, False)
            tied = inside & (key == thr[:, None])
            rank = ties_before[:, None] + tl.cumsum(tied.to(tl.int32), axis=1)
            ties_before += tl.sum(tied.to(tl.int32), axis=1)
            prot = inside & ((key > thr[:, None]) | (tied & (rank <= need[:, None])))
            tl.store(prot_ptr + offs, prot, mask=inside)
            # The first radix pass on the same keys, protected ones as +inf (as _keys gives the later passes).
            hist, above_prefix = _count_digits(tl.reshape(tl.where(prot, INF_KEY, key), (BLOCK_N * BLOCK_F,)),
                                               tl.reshape(inside, (BLOCK_N * BLOCK_F,)), prefix, hist, above_prefix,
                                               SHIFT, HI_MASK, WARM)
    tl.atomic_add(hist_ptr + tl.arange(0, 512), hist)
    if WARM:
        tl.atomic_add(state_ptr + 3, tl.sum(above_prefix, axis=0))


@triton.jit
def _radix_scan(state_ptr, hist_ptr, k, SHIFT: tl.constexpr, LEVEL: tl.constexpr, WARM: tl.constexpr):
    """Fix the digit at SHIFT: the largest d with count(digit ≥ d) ≥ k_rem among matching keys."""
    level = tl.load(state_ptr + 2)
    if level == LEVEL:
        i = tl.arange(0, 256)
        h = tl.load(hist_ptr + 255 - i)  # h[i] counts digit 255 - i
        prefix = tl.load(state_ptr)
        k_rem = tl.load(state_ptr + 1)
        if WARM:  # is the k-th key inside the group of the previous threshold's top bits?
            above = tl.load(state_ptr + 3)
            valid = (above < k) & (k <= above + tl.sum(h, axis=0))
            k_rem = k - above
        from_top = tl.cumsum(h, axis=0)
        first = tl.min(tl.where(from_top >= k_rem, i, 256), axis=0)
        passed = tl.sum(tl.where(i == first, from_top - h, 0), axis=0)  # keys with a larger digit
        new_prefix = prefix | ((255 - first) << SHIFT)
        new_k = k_rem - passed
        new_level = tl.full((), LEVEL + 8, tl.int32)
        if WARM:  # a failed warm start begins again from level 0
            new_prefix, new_k, new_level = tl.where(valid, new_prefix, 0), tl.where(valid, new_k, k), tl.where(valid, new_level, 0)
        tl.store(state_ptr, new_prefix)
        tl.store(state_ptr + 1, new_k)
        tl.store(state_ptr + 2, new_level)
    tl.store(hist_ptr + tl.arange(0, 512), tl.zeros((512,), dtype=tl.int32))


@triton.jit
def _select_strict(w_ptr, prot_ptr, n, state_ptr, keep_ptr, ties_ptr, HAS_PROT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    key = _keys(w_ptr, prot_ptr, offs, inside, HAS_PROT)
    thr = tl.load(state_ptr)
    tl.store(keep_ptr + offs, key > thr, mask=inside)
    tl.store(ties_ptr + tl.program_id(0), tl.sum((inside & (key == thr)).to(tl.int32), axis=0))


@triton.jit
def _select_ties(w_ptr, prot_ptr, n, state_ptr, keep_ptr, ties_ptr, before_ptr, HAS_PROT: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    if tl.load(ties_ptr + pid) > 0:
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offs < n
        key = _keys(w_ptr, prot_ptr, offs, inside, HAS_PROT)
        tied = inside & (key == tl.load(state_ptr))
        rank = tl.load(before_ptr + pid) + tl.cumsum(tied.to(tl.int32), axis=0)
        tl.store(keep_ptr + offs, tied, mask=tied & (rank <= tl.load(state_ptr + 1)))


def launch_sizes(cuda: bool) -> dict:
    """Launch constants: block of the flat passes, most programs per pass, the protection pass's (BLOCK_N rows,
    BLOCK_F entries, warps). The interpreter pays per program and per operation, not per element: one program over
    big blocks there (tests/test_kernels.py runs the GPU's constants on a CPU as well)."""
    if cuda:  # the protection tile: the fewest instructions per entry of those compared (docs/benchmarks.md)
        return {"block": 1024, "programs": 1024, "protect": (4, 256, 4)}
    return {"block": 16384, "programs": 1, "protect": (256, 64, 4)}


def select_topk(w: torch.Tensor, k: int, j: int = 0, neuron_axis: int | None = None, warm: torch.Tensor | None = None):
    """(mask of the k largest |w| with every neuron's j largest first, threshold key for the next warm start).

    The survivors are kernels.reference.projection_mask(w, k, j, neuron_axis), entry for entry: neurons are the
    rows of a 2-D `w` for neuron_axis 0, its columns for 1; j = 0 or neuron_axis None protects nothing.
    """
    require_launchable(w, "radix select")
    n = w.numel()
    if n >= 2**31:
        raise ValueError(f"radix select handles tensors of fewer than 2³¹ entries, got {n}")
    if k >= n or k <= 0:
        return torch.full(w.shape, k > 0, dtype=torch.bool, device=w.device), warm
    has_prot = j > 0 and neuron_axis is not None
    if has_prot and (w.dim() != 2 or neuron_axis not in (0, 1)):
        raise ValueError(f"the j rule needs a 2-D weight and neuron_axis 0 or 1, got shape {tuple(w.shape)}, axis {neuron_axis}")
    flat = w.detach().float().contiguous().view(-1)
    prot = flat  # no mask to read unless the j rule writes one
    state = torch.zeros(4, dtype=torch.int32, device=w.device)  # prefix, k still to place, bits fixed, warm count
    state[1] = k
    hist = torch.zeros(512, dtype=torch.int32, device=w.device)
    sizes = launch_sizes(w.is_cuda)
    block, max_programs = sizes["block"], sizes["programs"]
    grid = (min(triton.cdiv(n, block), max_programs),)
    passes = [(shift, 24 - shift, False) for shift in PASSES]  # (digit position, bits fixed before it, warm)
    if warm is not None:
        state[0:1] = warm & _hi_mask(8)
        state[2] = 16
        passes.insert(0, (8, 16, True))
    if has_prot:  # the first pass, fused with the j rule; it runs unconditionally, so it must be the one due now
        # Columns as neurons: the pass reads a transposed copy, so every neuron's fan is a contiguous row (one pass
        # reading columns in place either runs one program per 64 columns, too few to fill the GPU, or reads them
        # uncoalesced), and its mask comes back transposed. Two copies, against j + 2 sweeps of the fan.
        rows_first = flat.view(w.shape) if neuron_axis == 0 else flat.view(w.shape).t().contiguous()
        neurons, fan = rows_first.shape
        prot_rows = torch.empty(neurons, fan, dtype=torch.bool, device=w.device)
        block_n, block_f, warps = sizes["protect"]
        shift, _, is_warm = passes[0]
        _protect_pass[(min(triton.cdiv(neurons, block_n), max_programs),)](
            rows_first, prot_rows, neurons, fan, j, state, hist, SHIFT=shift, HI_MASK=_hi_mask(shift),
            WARM=is_warm, BLOCK_N=block_n, BLOCK_F=min(block_f, triton.next_power_of_2(fan)), num_warps=warps)
        prot = (prot_rows if neuron_axis == 0 else prot_rows.t().contiguous()).view(-1)
    for i, (shift, level, is_warm) in enumerate(passes):
        if not (has_prot and i == 0):
            _radix_pass[grid](flat, prot, n, state, hist, SHIFT=shift, HI_MASK=_hi_mask(shift), LEVEL=level, WARM=is_warm,
                              HAS_PROT=has_prot, BLOCK=block)
        _radix_scan[(1,)](state, hist, k, SHIFT=shift, LEVEL=level, WARM=is_warm)
    blocks = triton.cdiv(n, block)
    keep = torch.empty(n, dtype=torch.bool, device=w.device)  # written as bool: no copy to convert it
    ties = torch.empty(blocks, dtype=torch.int32, device=w.device)
    _select_strict[(blocks,)](flat, prot, n, state, keep, ties, HAS_PROT=has_prot, BLOCK=block)
    before = torch.cumsum(ties, 0, dtype=torch.int32) - ties
    _select_ties[(blocks,)](flat, prot, n, state, keep, ties, before, HAS_PROT=has_prot, BLOCK=block)
    return keep.view(w.shape), state[0:1].clone()


class RadixSelect:
    """`select_topk` that remembers the threshold of each named tensor, to warm-start its next selection."""

    def __init__(self):
        self.thresholds: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, w: torch.Tensor, k: int, j: int = 0, neuron_axis: int | None = None) -> torch.Tensor:
        mask, thr = select_topk(w, k, j, neuron_axis, self.thresholds.get(name))
        if thr is not None:
            self.thresholds[name] = thr
        return mask
