"""spconv wrappers: a submanifold convolution that picks its algorithm and compute dtype from where it runs."""

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

    How it runs depends on the input's device, decided per call (a model is often built on the CPU and moved):
    - CPU: the Native algorithm (gather-GEMM-scatter), the only one spconv has CPU kernels for, in fp32. Native
      cannot fuse a bias there, so the bias is added after the conv.
    - CUDA: the MaskImplicitGemm tensor-core kernels (several times faster than Native's), in fp16 under an
      enabled autocast, as Pointcept's models run (spconv declares `custom_fwd(cast_inputs=torch.float16)` and has
      no bf16 kernels), else in fp32.
    All convolutions that share an `indice_key` run on one device, so they agree on the algorithm, as spconv
    requires for its shared neighbour maps. The output is fp32; the next Linear is autocast again.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, bias: bool = True, indice_key: str | None = None
    ):
        super().__init__(in_channels, out_channels, kernel_size, bias=bias, indice_key=indice_key, algo=ConvAlgo.Native)

    def forward(self, x: SparseConvTensor) -> SparseConvTensor:
        device = x.features.device
        on_gpu = device.type == "cuda"
        self.algo = ConvAlgo.MaskImplicitGemm if on_gpu else ConvAlgo.Native
        dtype = torch.float16 if on_gpu and torch.is_autocast_enabled(device.type) else torch.float32
        with torch.autocast(device_type=device.type, enabled=False):
            out = self._conv_forward(
                self.training,
                x.replace_feature(x.features.to(dtype)),
                self.weight.to(dtype),
                None,
                name=self.name,
                sparse_unique_name=self._sparse_unique_name,
            )
            features = out.features.float()
            if self.bias is not None:
                features = features + self.bias.float()
        return out.replace_feature(features)
