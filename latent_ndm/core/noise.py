"""Where the random draws of one NELBO estimate come from.

A batch is a sequence of blocks, each drawing from its own generator. Training keys a block to
(seed, step, data lane) and evaluation keys one to (seed, repeat, example id), so the noise an
example gets does not depend on how many processes share the batch, and resuming a run needs no
saved random state. Times are stratified over the whole global batch (VDM's low-discrepancy
sampler): u_i = (u_0 + pos_i / n) mod 1, with one u_0 that every process draws alike.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import Tensor


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any tuple of ints and strings: independent streams for each (seed, step, lane...)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def keyed_generator(device: torch.device | str, *parts: object) -> torch.Generator:
    return torch.Generator(device).manual_seed(derive_seed(*parts))


class Noise:
    """Standard normals and stratified uniforms for a batch made of blocks.

    generators[j] draws the rows of block j (sizes[j] rows). If `positions` is given, uniforms are
    (u_0 + positions / total) mod 1 with u_0 from `u0_generator`; otherwise each block draws its own.
    """

    def __init__(self, generators: Sequence[torch.Generator], sizes: Sequence[int],
                 u0_generator: torch.Generator | None = None, positions: Tensor | None = None,
                 total: int | None = None):
        if len(generators) != len(sizes):
            raise ValueError("one generator per block")
        if positions is not None and (u0_generator is None or total is None or len(positions) != sum(sizes)):
            raise ValueError("stratified uniforms need u0_generator, total and one position per row")
        self.generators, self.sizes = list(generators), list(sizes)
        self.u0_generator, self.positions, self.total = u0_generator, positions, total

    @property
    def batch_size(self) -> int:
        return sum(self.sizes)

    @classmethod
    def from_generator(cls, generator: torch.Generator | None, batch_size: int,
                       device: torch.device | str = "cpu") -> Noise:
        """All draws from one generator, stratified over this batch (a single process's own batch).
        None: a generator seeded from torch's global RNG (so torch.manual_seed makes it repeatable)."""
        if generator is None:
            generator = torch.Generator(device).manual_seed(int(torch.randint(2**62, (1,))))
        return cls([generator], [batch_size], generator, torch.arange(batch_size, device=device), batch_size)

    @classmethod
    def per_example(cls, ids: Sequence[int], device: torch.device | str, *key: object) -> Noise:
        """One generator per example, keyed by (key, id): reproducible whatever the batching."""
        return cls([keyed_generator(device, *key, int(i)) for i in ids], [1] * len(ids))

    def normal(self, like: Tensor) -> Tensor:
        """Standard normals shaped like `like` [B, ...], row blocks from their own generators."""
        if like.shape[0] != self.batch_size:
            raise ValueError(f"noise for {self.batch_size} rows asked for a batch of {like.shape[0]}")
        rest = like.shape[1:]
        parts = [torch.randn((n, *rest), generator=g, device=like.device, dtype=like.dtype)
                 for g, n in zip(self.generators, self.sizes)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def uniform_like(self, like: Tensor) -> Tensor:
        """U[0, 1) draws shaped like `like` [B, ...], row blocks from their own generators."""
        if like.shape[0] != self.batch_size:
            raise ValueError(f"noise for {self.batch_size} rows asked for a batch of {like.shape[0]}")
        parts = [torch.rand((n, *like.shape[1:]), generator=g, device=like.device, dtype=like.dtype)
                 for g, n in zip(self.generators, self.sizes)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def uniform(self, device: torch.device) -> Tensor:
        """[B] float64 uniforms in [0, 1): stratified over the global batch when positions are set."""
        if self.positions is not None:
            u0 = torch.rand((), generator=self.u0_generator, device=device, dtype=torch.float64)
            return torch.remainder(u0 + self.positions.to(device, torch.float64) / self.total, 1.0)
        return torch.cat([torch.rand(n, generator=g, device=device, dtype=torch.float64)
                          for g, n in zip(self.generators, self.sizes)])
