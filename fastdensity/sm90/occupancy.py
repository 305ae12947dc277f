"""Theoretical occupancy of a kernel on a Hopper SM (compute capability 9.0), from its compile figures.

Occupancy is the share of the SM's 64 warp slots a kernel's resident blocks fill: resident blocks per
SM are the fewest any one resource allows,

    by warps      floor(64 / W)                           W warps per block (2048 threads per SM)
    by blocks     32
    by registers  floor(65536 / (W * ceil(32 R / 256) * 256))   R registers per thread, allocated per
                                                          warp in units of 256 (R rounded up to 8)
    by shared     floor(233472 / (S + 1024))              S bytes per block; 228 KiB per SM, of which
                                                          the driver reserves 1 KiB for each block

and occupancy = blocks * W / 64. A block needing more than 227 KiB (232448 bytes) of shared memory,
more than 255 registers per thread or more than 32 warps cannot launch at all: occupancy 0. These
are the figures of NVIDIA's occupancy calculator for compute capability 9.0 (H100, H200).
"""
from __future__ import annotations

WARPS_PER_SM = 64
BLOCKS_PER_SM = 32
REGISTERS_PER_SM = 65536
MAX_REGISTERS_PER_THREAD = 255
REGISTER_UNIT = 256  # registers, allocated per warp
SHARED_PER_SM = 228 * 1024
SHARED_PER_BLOCK = 227 * 1024  # the most one block may use (opt-in carve-out)
SHARED_RESERVED_PER_BLOCK = 1024
MAX_WARPS_PER_BLOCK = 32


def resident_blocks(registers: int, shared: int, num_warps: int) -> int:
    """Blocks of ``num_warps`` warps, ``registers`` per thread and ``shared`` bytes that fit on one SM."""
    if not 1 <= num_warps <= MAX_WARPS_PER_BLOCK or registers > MAX_REGISTERS_PER_THREAD or shared > SHARED_PER_BLOCK:
        return 0
    per_warp = -(-max(registers, 1) * 32 // REGISTER_UNIT) * REGISTER_UNIT
    return min(WARPS_PER_SM // num_warps,
               BLOCKS_PER_SM,
               REGISTERS_PER_SM // (per_warp * num_warps),
               SHARED_PER_SM // (shared + SHARED_RESERVED_PER_BLOCK))


def occupancy(registers: int, shared: int, num_warps: int) -> float:
    """Resident warps per SM over the 64 an SM holds (0 when the block cannot launch)."""
    return resident_blocks(registers, shared, num_warps) * num_warps / WARPS_PER_SM
