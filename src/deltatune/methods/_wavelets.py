"""Orthogonal wavelet filters computed from their definitions, and the one-level 2-D inverse transform WaveFT uses.

Daubechies ``dbN`` and symlets ``symN`` (Daubechies, "Ten Lectures on Wavelets", 1992, ch. 6 and 8) share the
squared magnitude of their low-pass filter ``|m₀(ω)|² = cos²ᴺ(ω/2) · P(sin²(ω/2))`` with
``P(y) = Σ_{k<N} C(N-1+k, k) yᵏ``; a filter is one spectral factor of it. Each root ``y`` of ``P`` gives a reciprocal
pair ``{z, 1/z}`` of roots of ``z + 1/z = 2 - 4y``; ``dbN`` keeps the roots inside the unit circle (minimum phase),
``symN`` the choice whose phase is closest to linear (the published choice, recorded per ``N``). The filters are
normalised to ``Σ h = √2`` and laid out as PyWavelets' reconstruction low-pass ``rec_lo`` (the other three filters of
the bank follow from it), which is what peft's WaveFT reads.

Coiflets ``coifK`` (ibid. §8.2) have no spectral factorisation: the length-``6K`` filter solves ``Σ h = √2``,
orthonormality to its even shifts, ``2K`` vanishing moments of the wavelet and ``2K - 1`` of the scaling function
(about tap ``2K``). The system has several real solutions; Newton's method from a recorded Gaussian start reaches the
published one for ``K ≤ 3``. The wavelet's zeroth moment, implied by the others, is kept as an equation: without it
the Jacobian is singular at the solution and Newton's method keeps only half of float64's digits. (peft's tables for
``coif4`` / ``coif5`` are not orthonormal filters, so no definition reproduces them: those are refused.)

Computed in float64 with ``torch`` alone (no PyWavelets), once per family and cached.
"""

from __future__ import annotations

import math
from functools import cache

import torch
import torch.nn.functional as F

DAUBECHIES = tuple(f"db{n}" for n in range(1, 11))
SYMLETS = tuple(f"sym{n}" for n in range(2, 11))
COIFLETS = tuple(f"coif{n}" for n in range(1, 4))
SUPPORTED = DAUBECHIES + SYMLETS + COIFLETS


def _poly_from_roots(roots: list[complex]) -> torch.Tensor:
    """Coefficients (highest power first, complex128) of ``Π (z - r)``."""
    coeffs = torch.ones(1, dtype=torch.complex128)
    for r in roots:
        coeffs = torch.cat([coeffs, coeffs.new_zeros(1)]) - r * torch.cat([coeffs.new_zeros(1), coeffs])
    return coeffs


def _poly_roots(coeffs: list[float]) -> list[complex]:
    """Roots of ``Σ cₖ yᵏ`` (lowest power first) from the companion matrix's eigenvalues."""
    c = torch.tensor(coeffs, dtype=torch.float64)
    degree = c.numel() - 1
    companion = torch.zeros(degree, degree, dtype=torch.float64)
    companion[1:, :-1] = torch.eye(degree - 1, dtype=torch.float64)
    companion[:, -1] = -c[:-1] / c[-1]
    return [complex(r) for r in torch.linalg.eigvals(companion).tolist()]


def _root_pairs(n: int) -> list[list[tuple[complex, complex]]]:
    """Per root (or conjugate pair of roots) of ``P``: its ``(inside, outside)`` reciprocal z-roots, conjugates kept
    together so that any choice gives a real filter."""
    if n == 1:
        return []
    ys = _poly_roots([math.comb(n - 1 + k, k) for k in range(n)])
    groups: list[list[tuple[complex, complex]]] = []
    for y in sorted(ys, key=lambda v: (v.real, v.imag)):
        if y.imag < -1e-9:
            continue  # taken with its conjugate
        b = 2 - 4 * y
        disc = (b * b - 4) ** 0.5
        z = (b - disc) / 2
        inside = z if abs(z) < 1 else 1 / z
        pair = [(inside, 1 / inside)]
        if y.imag > 1e-9:
            pair.append((inside.conjugate(), 1 / inside.conjugate()))
        groups.append(pair)
    return groups


def _filter(n: int, zeros: list[complex]) -> torch.Tensor:
    """The real length-``2n`` filter with ``n`` zeros at ``z = -1`` and ``zeros``, scaled to ``Σ h = √2``."""
    h = _poly_from_roots([-1.0] * n + zeros).real
    return h * (math.sqrt(2) / h.sum())


# symN's choice of zeros, as PyWavelets' symlets have it: per root of P (ordered by real part, a conjugate pair counted
# once), "1" keeps the reciprocal pair's zero outside the unit circle, "0" the one inside. Phase-linearity criteria
# (max or mean deviation over a band) pick these for most N but not all, so the published choice is recorded;
# tests/test_waveft.py checks the resulting filters against peft's tables.
_SYMLET_ZEROS = {2: "0", 3: "0", 4: "01", 5: "10", 6: "101", 7: "100", 8: "0101", 9: "0110", 10: "10101"}


# coifK: (centre offset, width) of the Gaussian Newton starts from, in the basin of the published solution
_COIFLET_STARTS = {1: (0.0, 1.5), 2: (0.0, 1.5), 3: (0.0, 2.0)}


def _coiflet_equations(h: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Residuals ``(7k,)`` of coifK's defining equations at ``h`` ``(6k,)`` and their Jacobian ``(7k, 6k)``."""
    length = h.numel()
    taps = torch.arange(length, dtype=torch.float64)
    # linear conditions, moments scaled by 1/k to keep the rows comparable: Σ h = √2, wavelet and scaling moments
    rows = [torch.ones_like(h)]
    rows += [(-1.0) ** taps * (taps / k) ** p for p in range(2 * k)]
    rows += [((taps - 2 * k) / k) ** p for p in range(1, 2 * k)]
    linear = torch.stack(rows)
    targets = torch.zeros(linear.shape[0], dtype=torch.float64)
    targets[0] = math.sqrt(2)
    residuals, jacobian = [linear @ h - targets], [linear]
    for shift in range(0, length, 2):  # Σ_j h_j h_{j+shift} = δ(shift)
        residuals.append((h[shift:] * h[: length - shift]).sum()[None] - float(shift == 0))
        row = torch.zeros_like(h)
        row[: length - shift] += h[shift:]
        row[shift:] += h[: length - shift]
        jacobian.append(row[None])
    return torch.cat(residuals), torch.cat(jacobian)


def _coiflet(k: int) -> torch.Tensor:
    """coifK by Gauss-Newton on :func:`_coiflet_equations`, to float64 precision."""
    centre, width = _COIFLET_STARTS[k]
    taps = torch.arange(6 * k, dtype=torch.float64)
    h = torch.exp(-((taps - 2 * k - centre) ** 2) / (2 * width**2))
    h = h * (math.sqrt(2) / h.sum())
    for _ in range(100):
        residuals, jacobian = _coiflet_equations(h, k)
        if residuals.abs().max() < 1e-14:
            break
        h = h + torch.linalg.lstsq(jacobian, -residuals[:, None]).solution.squeeze(1)
    return h


@cache
def rec_lo(family: str) -> tuple[float, ...]:
    """PyWavelets' reconstruction low-pass filter of ``family`` (``dbN`` / ``symN`` / ``coifK``), float64 values.

    Raises:
        ValueError: ``family`` is not in :data:`SUPPORTED`.
    """
    if family not in SUPPORTED:
        raise ValueError(f"wavelet family {family!r} is not supported; supported: {', '.join(SUPPORTED)}")
    if family.startswith("coif"):
        return tuple(_coiflet(int(family.removeprefix("coif"))).tolist())
    n = int(family.removeprefix("db").removeprefix("sym"))
    groups = _root_pairs(n)
    sides = [0] * len(groups) if family.startswith("db") else [int(c) for c in _SYMLET_ZEROS[n]]
    zeros = [pair[side] for group, side in zip(groups, sides) for pair in group]
    return tuple(_filter(n, zeros).tolist())  # dbN: every zero inside (minimum phase), largest taps first


def filter_bank(family: str, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rec_lo, rec_hi)`` as tensors: ``rec_hi[k] = (-1)ᵏ rec_lo[L-1-k]`` (the quadrature-mirror filter)."""
    lo = torch.tensor(rec_lo(family), dtype=torch.float64)
    signs = torch.tensor([(-1.0) ** k for k in range(lo.numel())], dtype=torch.float64)
    hi = signs * lo.flip(0)
    return lo.to(device=device, dtype=dtype), hi.to(device=device, dtype=dtype)


def _synthesize_last(low: torch.Tensor, high: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """One-level 1-D synthesis along the last axis: ``y[m] = Σᵢ low[i] lo[m+p-2i] + high[i] hi[m+p-2i]`` with the
    ``p = L-2`` boundary samples cut from each end (PyWavelets' ``waverec`` length ``2n - L + 2``).
    ``low``, ``high``: ``(rows, n)`` → ``(rows, 2n - L + 2)``."""
    length = lo.numel()
    bands = torch.stack([low, high], 1)  # (rows, 2, n)
    weight = torch.stack([lo, hi])[:, None, :]  # (2, 1, L): transposed conv scatters each coefficient's filter
    full = F.conv_transpose1d(bands, weight, stride=2).squeeze(1)  # (rows, 2n + L - 2)
    cut = length - 2
    return full[:, cut: full.shape[1] - cut] if cut else full


def inverse_dwt2(
    approx: torch.Tensor, horizontal: torch.Tensor, vertical: torch.Tensor, diagonal: torch.Tensor, family: str
) -> torch.Tensor:
    """One-level 2-D inverse DWT (PyWavelets' ``waverec2`` of ``(cA, (cH, cV, cD))``), separably: columns, then rows.

    ``cH`` is high-pass along rows and low-pass along columns, ``cV`` the reverse. Each band is ``(h, w)``; the result
    is ``(2h - L + 2, 2w - L + 2)`` for a filter of length ``L``, in the bands' dtype."""
    lo, hi = filter_bank(family, approx.dtype, approx.device)
    top = _synthesize_last(approx, vertical, lo, hi)  # row-low bands, columns synthesised: (h, W)
    bottom = _synthesize_last(horizontal, diagonal, lo, hi)  # row-high bands: (h, W)
    return _synthesize_last(top.T, bottom.T, lo, hi).T  # rows synthesised: (H, W)
