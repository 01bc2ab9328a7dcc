"""The int8 options' names and defaults (``fs extract --precision``), in a module that imports nothing.

The CLI builds its option defaults from these at start-up, so they live apart
from :mod:`featurestore.features.cnn.quantize` (numpy, onnx, onnxruntime).
"""

PRECISIONS: tuple[str, ...] = ("fp32", "int8")
CALIBRATION_IMAGES = 100
"""Default sample size (calibration plus held-back images)."""
CALIBRATION_MIN = 20
"""Fewest images a sample may have: 16 to calibrate, 4 held back for the guard."""
MIN_COSINE = 0.98
"""Default lowest mean cosine (int8 vs fp32, per tap, on the held-back images) accepted."""
