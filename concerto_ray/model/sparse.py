"""spconv wrappers: a submanifold convolution that runs on CPU and GPU and always computes in fp32."""

from __future__ import annotations

import warnings

import torch

with warnings.catch_warnings():
    # spconv 2.3 decorates its autograd functions with the deprecated torch.cuda.amp helpers at import.
    warnings.simplefilter("ignore", FutureWarning)
    import spconv.pytorch as spconv
    from spconv.core import ConvAlgo

SparseConvTensor = spconv.SparseConvTensor


class SubMConv3d(spconv.SubMConv3d):
    """spconv's SubMConv3d with the same `weight` (out, k, k, k, in) and `bias` parameters.

    Two deliberate differences in how it runs:
    - It always uses the Native algorithm (gather-GEMM-scatter): spconv's CPU kernels exist only for
      it, and one algorithm everywhere keeps the neighbour maps shared through `indice_key` valid on
      any device. Native cannot fuse a bias on CPU, so the bias is added after the conv.
    - The conv runs in fp32 with autocast off. spconv's autograd functions are declared with
      `custom_fwd(cast_inputs=torch.float16)`, so under a bf16 autocast they would silently compute
      in fp16, whose range the un-normalised residual stream entering the positional encoding can
      exceed. The output stays fp32; the next Linear is autocast again.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool = True,
                 indice_key: str | None = None):
        super().__init__(in_channels, out_channels, kernel_size, bias=bias, indice_key=indice_key,
                         algo=ConvAlgo.Native)

    def forward(self, x: SparseConvTensor) -> SparseConvTensor:
        with torch.autocast(device_type=x.features.device.type, enabled=False):
            out = self._conv_forward(self.training, x.replace_feature(x.features.float()),
                                     self.weight.float(), None, name=self.name,
                                     sparse_unique_name=self._sparse_unique_name)
            if self.bias is not None:
                out = out.replace_feature(out.features + self.bias.float())
        return out
