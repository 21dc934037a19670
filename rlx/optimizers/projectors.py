"""Projectors: the subspace of a weight matrix that gets a state-full optimizer.

A projector maps a gradient G (m×n) to its state-full part R = down(G) and back, up(R), so that
G = up(down(G)) + residual(G). `axis` is the dimension of G that R compresses (its other
dimension is shared with G; Fira's scaling runs along it), or None when R is a flat vector.

* `Subspace` (GaLore-style): an orthonormal basis Q on the smaller side, from the top singular
  vectors of G (`svd`) or drawn at random (`random`). Right side (m ≥ n): R = G Qᵀ, up(R) = R Q;
  left side: R = Qᵀ G, up(R) = Q R. r = round(ρ·min(m, n)).
* `Coordinates`: a subset of rows (`rows`), columns (`columns`), rows or columns on the smaller
  side (`randperm`, a permutation-matrix projection), or single entries (`randk`). Exact: the
  residual is G with the chosen entries zeroed.
* `Full` and `Empty`: the whole tensor or nothing (block-wise, BAdam-style selection).

The projector's tensors (basis or indices) live in the optimizer state, so checkpoints carry them.
"""
from __future__ import annotations

import torch
from torch import Tensor

MATRIX_KINDS = ("svd", "random")
COORD_KINDS = ("randperm", "rows", "columns", "randk")
KINDS = (*MATRIX_KINDS, *COORD_KINDS, "block")


def subspace_size(shape: torch.Size, kind: str, density: float, rank: int | None = None) -> int:
    """How many directions (or rows, columns, entries) of a `shape` matrix are state-full."""
    m, n = shape
    full = {"rows": m, "columns": n, "randk": m * n}.get(kind, min(m, n))
    size = round(full * density) if rank is None else rank
    return max(0, min(size, full))


class Subspace:
    def __init__(self, basis: Tensor, right: bool):
        self.basis, self.right = basis, right  # right: (r, n) rows orthonormal; left: (m, r) columns
        self.axis = 1 if right else 0

    def down(self, g: Tensor) -> Tensor:
        return g @ self.basis.T if self.right else self.basis.T @ g

    def up(self, r: Tensor, like: Tensor | None = None) -> Tensor:
        return r @ self.basis if self.right else self.basis @ r

    def residual(self, g: Tensor) -> Tensor:
        return g - self.up(self.down(g))

    @staticmethod
    def build(g: Tensor, kind: str, r: int, generator: torch.Generator) -> Tensor:
        """The basis for gradient `g`: its top-r singular vectors, or a random orthonormal set."""
        m, n = g.shape
        right = m >= n
        if kind == "svd":
            u, _, vh = torch.linalg.svd(g.float(), full_matrices=False)
            basis = vh[:r] if right else u[:, :r]
        else:
            gauss = torch.randn(n if right else m, r, generator=generator)
            q, _ = torch.linalg.qr(gauss)
            basis = q.T if right else q
        # a compact copy: a slice of U or Vh would keep the whole factor's storage alive
        return basis.to(device=g.device, dtype=g.dtype).clone(memory_format=torch.contiguous_format)


class Coordinates:
    def __init__(self, index: Tensor, axis: int | None):
        self.index, self.axis = index, axis  # axis 0: rows, 1: columns, None: flat entries

    def down(self, g: Tensor) -> Tensor:
        return g.reshape(-1)[self.index] if self.axis is None else g.index_select(self.axis, self.index)

    def up(self, r: Tensor, like: Tensor) -> Tensor:
        out = torch.zeros_like(like)
        if self.axis is None:
            out.view(-1)[self.index] = r
        else:
            out.index_copy_(self.axis, self.index, r)
        return out

    def residual(self, g: Tensor) -> Tensor:
        out = g.clone()
        if self.axis is None:
            out.view(-1)[self.index] = 0
        else:
            out.index_fill_(self.axis, self.index, 0)
        return out

    @staticmethod
    def axis_of(kind: str, shape: torch.Size) -> int | None:
        if kind == "randperm":
            return 1 if shape[0] >= shape[1] else 0  # the smaller side, as the subspace projectors
        return {"rows": 0, "columns": 1, "randk": None}[kind]

    @staticmethod
    def build(shape: torch.Size, kind: str, k: int, generator: torch.Generator, device) -> Tensor:
        axis = Coordinates.axis_of(kind, shape)
        total = shape[0] * shape[1] if axis is None else shape[axis]
        return torch.randperm(total, generator=generator)[:k].sort().values.to(device)


class Full:
    axis = None

    def down(self, g: Tensor) -> Tensor:
        return g

    def up(self, r: Tensor, like: Tensor | None = None) -> Tensor:
        return r

    def residual(self, g: Tensor) -> Tensor:
        return torch.zeros_like(g)


class Empty:
    axis = None

    def residual(self, g: Tensor) -> Tensor:
        return g


def block_selection(num_blocks: int, density: float, refresh: int, order: str, generator: torch.Generator) -> list[int]:
    """The blocks (whole projectable tensors) active in refresh period `refresh`: round(ρ·N) of them,
    drawn at random or walked through in ascending or descending layer order."""
    k = round(num_blocks * density)
    if k == 0:
        return []
    if order == "random":
        return sorted(torch.randperm(num_blocks, generator=generator)[:k].tolist())
    walk = list(range(num_blocks)) if order == "ascending" else list(range(num_blocks))[::-1]
    return sorted(walk[(refresh * k + j) % num_blocks] for j in range(k))
