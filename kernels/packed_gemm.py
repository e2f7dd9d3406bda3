"""Linear-layer weights in MKL's packed GEMM layout, for fp32 on the CPU.

`F.linear` on the CPU calls MKL's sgemm, which copies (packs) the weight into its kernel's
panel layout on every call. A decode step's GEMMs are short and wide (tens of rows against
a weight of millions of floats), so that copy costs as much as the arithmetic: packing once
at load time and calling `cblas_sgemm_compute` on the packed panels runs the projections of a
64-row decode 1.3x faster and those of 4-16 rows up to 2.5x (`benchmarks/README.md`). This
is torch's own op pair for it (`mkl::_mkl_reorder_linear_weight`, `mkl::_mkl_linear`, what
Inductor's frozen CPU graphs call).

The packed panels take the bytes of the weight they replace (measured as the process's
resident set; the op reports a larger element count than it allocates). MKL's packed layout of
B does not depend on the row count of A: one packing serves every batch size, which
`tests/test_packed_gemm.py` holds against `F.linear` for any row count, exactly where both
take MKL's GEMM path. The op runs the packed GEMM only when the `prepack_batch_size` it is
given equals the input's row count, so every call passes the row count it has.
"""
from __future__ import annotations

import torch

# The row count MKL is told at packing time; its packed layout of B does not depend on it.
_PACKING_ROWS_HINT = 64


def packing_available(weight: torch.Tensor) -> bool:
    """Whether `weight` can be packed: a 2-D fp32 CPU tensor, in a torch built with MKL."""
    return (weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.dim() == 2
            and torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear"))


class PackedWeight:
    """An `[out, in]` fp32 weight packed once for MKL's GEMM; `linear(x, bias)` is
    `F.linear(x, weight, bias)`. Holds no reference to the source weight (the caller may
    free it); immutable after construction."""

    def __init__(self, weight: torch.Tensor):
        if not packing_available(weight):
            raise ValueError(f"cannot pack a {weight.dtype} weight of shape {tuple(weight.shape)} "
                             f"on {weight.device} (fp32 2-D CPU tensors, torch built with MKL)")
        self.out_features, self.in_features = weight.shape
        self.packed = torch.ops.mkl._mkl_reorder_linear_weight(weight.detach().contiguous(), _PACKING_ROWS_HINT)
        # The op reads the source weight's shape only (its packed path never touches the data):
        # a zero-stride view of one float carries the shape without keeping the weight alive.
        self.shape_carrier = torch.zeros(1, dtype=weight.dtype).expand(self.out_features, self.in_features)
        self.nbytes = weight.numel() * weight.element_size()  # what the panels occupy (see the module's note)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """`x @ W^T (+ bias)` for `x: [..., in]`; a new tensor `[..., out]`."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, the weight takes {self.in_features}")
        rows = x.numel() // self.in_features if self.in_features else 0
        return torch.ops.mkl._mkl_linear(x, self.packed, self.shape_carrier, bias, rows)
