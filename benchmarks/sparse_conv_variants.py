"""Which spconv algorithm and compute dtype for the xCPE convolutions on the GPU? (encoder step, base config)

For each variant: the encoder step time (bf16 autocast, forward + backward + AdamW) on gpu_step.py's two-room
batch, and the eval forward's relative error against the fp32 Native baseline on the same weights.

    PYTHONPATH=.:/tmp/site python benchmarks/sparse_conv_variants.py
"""

from __future__ import annotations

import torch
from spconv.core import ConvAlgo

from gpu_step import build_encoder, concerto_config, encoder_step, scene_batch, time_steps
from concerto_ray.data.pipeline import batch_to_device
from concerto_ray.model import sparse

VARIANTS = [("Native", torch.float32), ("MaskImplicitGemm", torch.float32), ("MaskImplicitGemm", torch.float16),
            ("MaskImplicitGemm", torch.bfloat16)]


def conv_forward(dtype):
    def forward(self, x):
        with torch.autocast(device_type=x.features.device.type, enabled=False):
            out = self._conv_forward(self.training, x.replace_feature(x.features.to(dtype)), self.weight.to(dtype),
                                     None, name=self.name, sparse_unique_name=self._sparse_unique_name)
            return out.replace_feature(out.features.float() + self.bias.float())
    return forward


def main() -> None:
    device = torch.device("cuda")
    config = concerto_config(large=False, tiny=False).backbone
    batch = batch_to_device(scene_batch(150_000, seed=0), device)
    model = build_encoder(config, device)
    model.set_order_shuffling(False)
    baseline = None
    rows = []
    for algo, dtype in VARIANTS:
        for module in model.modules():
            if isinstance(module, sparse.SubMConv3d):
                module.algo = getattr(ConvAlgo, algo)
        sparse.SubMConv3d.forward = conv_forward(dtype)
        try:
            model.eval()
            with torch.no_grad():
                out = model(dict(batch)).feat.float()
            if baseline is None:
                baseline = out
            error = float((out - baseline).norm() / baseline.norm())
            model.train()
            timing = time_steps(encoder_step(model, batch, device), steps=10, warmup=3, device=device)
            rows.append((algo, str(dtype), timing["step_ms_median"], error))
        except Exception as exc:  # a dtype spconv has no kernel for
            rows.append((algo, str(dtype), float("nan"), f"{type(exc).__name__}: {str(exc)[:80]}"))
    print(f"{'algorithm':18s} {'dtype':16s} {'step ms':>8s}  rel. error vs Native fp32")
    for algo, dtype, ms, error in rows:
        print(f"{algo:18s} {dtype:16s} {ms:8.1f}  {error}")


if __name__ == "__main__":
    main()
