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
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.runtime import require_launchable

INF_KEY = 0x7F800000  # bit pattern of +inf: above every finite magnitude
PASSES = (24, 16, 8, 0)  # digit positions, 8 bits each
BLOCK = 1024
MAX_PROGRAMS = 1024


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
        key = tl.where(prot != 0, 0x7F800000, key)
    return key


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
            high = key & HI_MASK
            match = inside & (high == prefix)
            hist += tl.histogram(tl.where(match, (key >> SHIFT) & 255, 256), 512)  # bin 256 collects the rest
            if WARM:
                above += (inside & (high > prefix)).to(tl.int32)
        tl.atomic_add(hist_ptr + tl.arange(0, 512), hist)
        if WARM:
            tl.atomic_add(state_ptr + 3, tl.sum(above, axis=0))


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


def select_topk(w: torch.Tensor, k: int, protected: torch.Tensor | None = None, warm: torch.Tensor | None = None):
    """(mask of the k largest |w| with protected entries first, threshold key for the next warm start)."""
    require_launchable(w, "radix select")
    n = w.numel()
    if n >= 2**31:
        raise ValueError(f"radix select handles tensors of fewer than 2³¹ entries, got {n}")
    if k >= n or k <= 0:
        return torch.full(w.shape, k > 0, dtype=torch.bool, device=w.device), warm
    flat = w.detach().float().contiguous().view(-1)
    prot = protected.contiguous().view(-1).view(torch.int8) if protected is not None else flat
    has_prot = protected is not None
    state = torch.zeros(4, dtype=torch.int32, device=w.device)  # prefix, k still to place, bits fixed, warm count
    state[1] = k
    hist = torch.zeros(512, dtype=torch.int32, device=w.device)
    grid = (min(triton.cdiv(n, BLOCK), MAX_PROGRAMS),)
    if warm is not None:
        state[0:1] = warm & _hi_mask(8)
        state[2] = 16
        _radix_pass[grid](flat, prot, n, state, hist, SHIFT=8, HI_MASK=_hi_mask(8), LEVEL=16, WARM=True, HAS_PROT=has_prot, BLOCK=BLOCK)
        _radix_scan[(1,)](state, hist, k, SHIFT=8, LEVEL=16, WARM=True)
    for shift in PASSES:
        level = 24 - shift
        _radix_pass[grid](flat, prot, n, state, hist, SHIFT=shift, HI_MASK=_hi_mask(shift), LEVEL=level, WARM=False, HAS_PROT=has_prot, BLOCK=BLOCK)
        _radix_scan[(1,)](state, hist, k, SHIFT=shift, LEVEL=level, WARM=False)
    blocks = triton.cdiv(n, BLOCK)
    keep = torch.empty(n, dtype=torch.bool, device=w.device)  # written as bool: no copy to convert it
    ties = torch.empty(blocks, dtype=torch.int32, device=w.device)
    _select_strict[(blocks,)](flat, prot, n, state, keep, ties, HAS_PROT=has_prot, BLOCK=BLOCK)
    before = torch.cumsum(ties, 0, dtype=torch.int32) - ties
    _select_ties[(blocks,)](flat, prot, n, state, keep, ties, before, HAS_PROT=has_prot, BLOCK=BLOCK)
    return keep.view(w.shape), state[0:1].clone()


class RadixSelect:
    """`select_topk` that remembers the threshold of each named tensor, to warm-start its next selection."""

    def __init__(self):
        self.thresholds: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, w: torch.Tensor, k: int, protected: torch.Tensor | None = None) -> torch.Tensor:
        mask, thr = select_topk(w, k, protected, self.thresholds.get(name))
        if thr is not None:
            self.thresholds[name] = thr
        return mask
