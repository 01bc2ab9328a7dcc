"""Hand-crafted low-level descriptors: colour, texture, gradients, GIST.

One feature set, ``lowlevel`` (kind ``"lowlevel"``), the concatenation of four
blocks computed with numpy and scipy only, on the image resized to a working
size (default 256x256, ``"stretch"``):

1. ``hsv``: joint HSV colour histogram, ``8 x 4 x 4 = 128`` bins (hue x
   saturation x value, each channel of Pillow's 8-bit HSV split into equal
   ranges), L1-normalised (sums to 1).
2. ``lbp``: local binary patterns on the grayscale image (Pillow ``L``,
   ITU-R 601-2 luma): 8 neighbours at radius 1 (the 3x3 ring, no
   interpolation), bit set when neighbour >= centre, mapped to the 58
   "uniform" patterns (at most two 0/1 transitions around the ring, in
   ascending code order) plus one bin for all others: 59 bins over the
   interior pixels, L1-normalised.
3. ``hog``: gradient-orientation histograms. Central-difference gradients
   (``numpy.gradient``), unsigned orientation in ``[0, 180)`` degrees split into 9
   bins, each pixel's magnitude shared linearly between its two nearest bins,
   accumulated over a 4x4 grid of cells (cell-major: cell (row, col), then bin)
   = 144 values, L1-normalised over the whole block (so cells keep their
   relative strength). A featureless image (no gradient) gives zeros.
4. ``gist``: GIST-like spectral envelope. The grayscale image is resized
   (Pillow bilinear) to a GIST size (default 128x128), its mean removed, it
   is mirror-padded (by 1/8 of each side) and filtered in the frequency domain
   (``scipy.fft``) by a bank of one-sided log-Gabor filters, 4 scales (centre
   frequencies 0.25, 0.125, 0.0625, 0.03125 cycles/pixel of the GIST
   image, ``sigma_on_f``
   0.55) x 8 orientations (0, 22.5, ..., 157.5 degrees, angular sigma
   ``pi / 8 / 1.5``). One-sided filters give a quadrature (complex)
   response whose modulus is the local energy; it is averaged over a 4x4 grid
   of cells: ``4 * 8 * 16 = 512`` values ordered (scale, orientation, cell row,
   cell col), L2-normalised. The filters are built once, in ``__init__``.

Total dim with the defaults: 128 + 59 + 144 + 512 = 843. The block offsets
and every parameter are recorded in the feature set's params.

The whole descriptor is computed in :meth:`LowLevelExtractor.prepare`, i.e. in
the pipeline's worker threads (Pillow, numpy and scipy.fft release the GIL
for the heavy parts), and :meth:`~LowLevelExtractor.compute` only stacks.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import scipy.fft
from PIL import Image

from featurestore.errors import InvalidInputError
from featurestore.features.base import Extractor, FeatureSpec
from featurestore.features.resize import check_rule, check_size, resize_params, resize_rgb

LOWLEVEL_VERSION = 1

# LBP neighbour offsets (dy, dx), bit k for offset k: east, then counter-clockwise.
_LBP_OFFSETS = ((0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1), (1, 0), (1, 1))


def _uniform_lbp_table() -> np.ndarray:
    """Map 8-bit LBP codes to 59 bins: 58 uniform codes in ascending order, then the rest."""
    codes = np.arange(256)
    rotated = ((codes >> 1) | ((codes & 1) << 7)) & 0xFF
    transitions = np.array([bin(c).count("1") for c in (codes ^ rotated)])
    uniform = codes[transitions <= 2]
    table = np.full(256, len(uniform), dtype=np.intp)
    table[uniform] = np.arange(len(uniform))
    return table


def _grid_edges(n: int, parts: int) -> np.ndarray:
    return (np.arange(parts) * n) // parts


def _cell_index(h: int, w: int, grid: tuple[int, int]) -> np.ndarray:
    """``(h, w)`` array of cell numbers ``row * grid_cols + col`` for a ``grid = (rows, cols)``."""
    rows = (np.arange(h) * grid[0]) // h
    cols = (np.arange(w) * grid[1]) // w
    return rows[:, None] * grid[1] + cols[None, :]


def _l1(v: np.ndarray) -> np.ndarray:
    s = v.sum()
    return v / s if s > 0 else v


def _check_grid(grid: Any, what: str) -> tuple[int, int]:
    try:
        r, c = (int(x) for x in grid)
    except (TypeError, ValueError):
        raise InvalidInputError(f"{what} must be two positive integers (rows, cols), got {grid!r}") from None
    if r < 1 or c < 1:
        raise InvalidInputError(f"{what} must be positive, got {grid!r}")
    return r, c


class LowLevelExtractor(Extractor):
    """Colour histogram + LBP + HOG-like + GIST-like descriptor (see module docstring).

    Parameters
    ----------
    working_size : tuple of int
        ``(width, height)`` every image is resized to first.
    rule : {"stretch", "letterbox"}
        Resize rule.
    hsv_bins : tuple of int
        Bins for hue, saturation, value (each <= 256).
    hog_orientations : int
        Orientation bins over ``[0, 180)`` degrees.
    hog_grid, gist_grid : tuple of int
        ``(rows, cols)`` of the pooling cells.
    gist_size : tuple of int
        ``(width, height)`` of the grayscale image the GIST block is computed
        on (smaller is faster: 128x128 takes about a quarter of 256x256).
    gist_frequencies : sequence of float
        Log-Gabor centre frequencies in cycles/pixel of the GIST image
        (one per scale, each in ``(0, 0.5]``).
    gist_orientations : int
        Orientations per scale, evenly spaced over ``[0, 180)`` degrees.
    name : str
        Feature set name.
    """

    kind = "lowlevel"

    @classmethod
    def from_params(cls, name: str, p: dict[str, Any]) -> LowLevelExtractor:
        """Rebuild from recorded params (defaults for settings absent from older records)."""
        kwargs: dict[str, Any] = {"rule": p["resize_rule"], "name": name}
        if "working_size" in p:
            kwargs["working_size"] = tuple(p["working_size"])
        hsv, hog, gist = p.get("hsv", {}), p.get("hog", {}), p.get("gist", {})
        for key, block, field_name, as_tuple in [
            ("hsv_bins", hsv, "bins", True), ("hog_orientations", hog, "orientations", False),
            ("hog_grid", hog, "grid", True), ("gist_size", gist, "size", True),
            ("gist_frequencies", gist, "frequencies", True), ("gist_orientations", gist, "orientations", False),
            ("gist_grid", gist, "grid", True),
        ]:
            if field_name in block:
                kwargs[key] = tuple(block[field_name]) if as_tuple else block[field_name]
        return cls(**kwargs)

    def __init__(
        self,
        working_size: tuple[int, int] = (256, 256),
        rule: str = "stretch",
        hsv_bins: tuple[int, int, int] = (8, 4, 4),
        hog_orientations: int = 9,
        hog_grid: tuple[int, int] = (4, 4),
        gist_size: tuple[int, int] = (128, 128),
        gist_frequencies: tuple[float, ...] = (0.25, 0.125, 0.0625, 0.03125),
        gist_orientations: int = 8,
        gist_grid: tuple[int, int] = (4, 4),
        name: str = "lowlevel",
    ):
        self.working_size = check_size(working_size)
        self.rule = check_rule(rule)
        w, h = self.working_size
        if w < 8 or h < 8:
            raise InvalidInputError(f"low-level working size must be at least 8x8, got {w}x{h}")
        self.hsv_bins = tuple(int(b) for b in hsv_bins)
        if len(self.hsv_bins) != 3 or not all(1 <= b <= 256 for b in self.hsv_bins):
            raise InvalidInputError(f"hsv_bins must be three integers in 1..256, got {hsv_bins!r}")
        self.hog_orientations = int(hog_orientations)
        if self.hog_orientations < 1:
            raise InvalidInputError(f"hog_orientations must be >= 1, got {hog_orientations}")
        self.hog_grid = _check_grid(hog_grid, "hog_grid")
        self.gist_frequencies = tuple(float(f) for f in gist_frequencies)
        if not self.gist_frequencies or not all(0 < f <= 0.5 for f in self.gist_frequencies):
            raise InvalidInputError(f"gist_frequencies must be in (0, 0.5], got {gist_frequencies!r}")
        self.gist_orientations = int(gist_orientations)
        if self.gist_orientations < 1:
            raise InvalidInputError(f"gist_orientations must be >= 1, got {gist_orientations}")
        self.gist_grid = _check_grid(gist_grid, "gist_grid")
        self.gist_size = check_size(gist_size)
        gw, gh = self.gist_size
        if self.hog_grid[0] > h or self.hog_grid[1] > w or self.gist_grid[0] > gh or self.gist_grid[1] > gw:
            raise InvalidInputError(
                f"pooling grids must fit in the {w}x{h} working size and {gw}x{gh} GIST size"
            )
        self.name = name
        self._precompute()

    def _precompute(self) -> None:
        """Lookup tables, pooling cells, the GIST filter bank and the block layout."""
        w, h = self.working_size
        gw, gh = self.gist_size
        self._lbp_table = _uniform_lbp_table()
        self._lbp_bins = int(self._lbp_table.max()) + 1
        self._hog_cells = _cell_index(h, w, self.hog_grid)
        self._gist_sigma_on_f = 0.55
        self._gist_theta_sigma = np.pi / self.gist_orientations / 1.5
        self._gist_pad = (gh // 8, gw // 8)
        self._gist_filters = self._make_gist_filters()
        # Per-thread FFT work buffer: reusing it avoids page-faulting a fresh ~6 MB array per image.
        self._local = threading.local()
        hb, sb, vb = self.hsv_bins
        levels = np.arange(256)
        self._hsv_luts = (
            ((levels * hb) >> 8) * (sb * vb),
            ((levels * sb) >> 8) * vb,
            (levels * vb) >> 8,
        )
        sizes = {
            "hsv": int(np.prod(self.hsv_bins)),
            "lbp": self._lbp_bins,
            "hog": self.hog_grid[0] * self.hog_grid[1] * self.hog_orientations,
            "gist": len(self.gist_frequencies) * self.gist_orientations * self.gist_grid[0] * self.gist_grid[1],
        }
        self.blocks: dict[str, tuple[int, int]] = {}
        start = 0
        for block, n in sizes.items():
            self.blocks[block] = (start, start + n)
            start += n
        self.dim = start

    # ------------------------------------------------------------ filter bank
    def _make_gist_filters(self) -> np.ndarray:
        """``(scales * orientations, Hp, Wp)`` float32 one-sided log-Gabor transfer functions."""
        w, h = self.gist_size
        hp, wp = h + 2 * self._gist_pad[0], w + 2 * self._gist_pad[1]
        fy = scipy.fft.fftfreq(hp)[:, None]
        fx = scipy.fft.fftfreq(wp)[None, :]
        radius = np.hypot(fx, fy)
        radius[0, 0] = 1.0  # avoid log(0); the DC term is zeroed below
        theta = np.arctan2(fy, fx)
        log_sigma = 2 * np.log(self._gist_sigma_on_f) ** 2
        filters = []
        for f0 in self.gist_frequencies:
            radial = np.exp(-(np.log(radius / f0) ** 2) / log_sigma)
            radial[0, 0] = 0.0
            for o in range(self.gist_orientations):
                theta0 = o * np.pi / self.gist_orientations
                dtheta = np.angle(np.exp(1j * (theta - theta0)))  # wrapped to (-pi, pi]
                angular = np.exp(-(dtheta**2) / (2 * self._gist_theta_sigma**2))
                filters.append(radial * angular)
        return np.stack(filters).astype(np.float32)

    # ----------------------------------------------------------- descriptors
    def describe(self, rgb: np.ndarray) -> np.ndarray:
        """The ``(dim,)`` float32 descriptor of an RGB uint8 image already at the working size."""
        rgb = np.asarray(rgb, dtype=np.uint8)
        w, h = self.working_size
        if rgb.shape != (h, w, 3):
            raise InvalidInputError(f"describe() expects a {h}x{w}x3 uint8 array, got shape {rgb.shape}")
        pil = Image.fromarray(rgb, "RGB")
        hsv = np.asarray(pil.convert("HSV"))
        gray = np.asarray(pil.convert("L"))
        out = np.empty(self.dim, dtype=np.float32)
        parts = {
            "hsv": self._hsv_hist(hsv),
            "lbp": self._lbp_hist(gray),
            "hog": self._hog(gray),
            "gist": self._gist(gray),
        }
        for block, (a, b) in self.blocks.items():
            out[a:b] = parts[block]
        return out

    def _hsv_hist(self, hsv: np.ndarray) -> np.ndarray:
        lut_h, lut_s, lut_v = self._hsv_luts
        idx = lut_h[hsv[..., 0]] + lut_s[hsv[..., 1]] + lut_v[hsv[..., 2]]
        return _l1(np.bincount(idx.ravel(), minlength=int(np.prod(self.hsv_bins))).astype(np.float64))

    def _lbp_hist(self, gray: np.ndarray) -> np.ndarray:
        g = gray.astype(np.int16)
        centre = g[1:-1, 1:-1]
        code = np.zeros(centre.shape, dtype=np.uint8)
        hh, ww = g.shape
        for bit, (dy, dx) in enumerate(_LBP_OFFSETS):
            neighbour = g[1 + dy : hh - 1 + dy, 1 + dx : ww - 1 + dx]
            code |= (neighbour >= centre).astype(np.uint8) << np.uint8(bit)
        hist = np.bincount(self._lbp_table[code.ravel()], minlength=self._lbp_bins)
        return _l1(hist.astype(np.float64))

    def _hog(self, gray: np.ndarray) -> np.ndarray:
        n_bins = self.hog_orientations
        gy, gx = np.gradient(gray.astype(np.float32))
        mag = np.sqrt(gx * gx + gy * gy).ravel()
        angle = np.arctan2(gy, gx).ravel()
        angle[angle < 0] += np.float32(np.pi)  # unsigned: [0, pi]; pi lands in the last/first bin pair
        pos = angle * np.float32(n_bins / np.pi) - np.float32(0.5)
        lo_f = np.floor(pos)
        frac = pos - lo_f
        lo = lo_f.astype(np.intp)  # in [-1, n_bins - 1]
        hi = lo + 1
        lo[lo < 0] = n_bins - 1
        hi[hi == n_bins] = 0
        base = self._hog_cells.ravel() * n_bins
        size = self.hog_grid[0] * self.hog_grid[1] * n_bins
        hist = np.bincount(base + lo, weights=mag * (1 - frac), minlength=size)
        hist += np.bincount(base + hi, weights=mag * frac, minlength=size)
        return _l1(hist)

    def _gist(self, gray: np.ndarray) -> np.ndarray:
        py, px = self._gist_pad
        if gray.shape[::-1] != self.gist_size:
            gray = np.asarray(Image.fromarray(gray, "L").resize(self.gist_size, Image.Resampling.BILINEAR))
        img = gray.astype(np.float32)
        img -= img.mean()
        img = np.pad(img, ((py, py), (px, px)), mode="symmetric")
        spectrum = scipy.fft.fft2(img)
        buf = getattr(self._local, "gist_buffer", None)
        if buf is None:
            buf = self._local.gist_buffer = np.empty(self._gist_filters.shape, dtype=np.complex64)
        np.multiply(spectrum[None], self._gist_filters, out=buf)
        response = scipy.fft.ifft2(buf, axes=(-2, -1), overwrite_x=True)
        h, w = gray.shape
        energy = np.abs(response[:, py : py + h, px : px + w])
        ey = _grid_edges(h, self.gist_grid[0])
        ex = _grid_edges(w, self.gist_grid[1])
        pooled = np.add.reduceat(np.add.reduceat(energy, ey, axis=1), ex, axis=2)
        counts = np.diff(np.append(ey, h))[:, None] * np.diff(np.append(ex, w))[None, :]
        v = (pooled / counts).ravel().astype(np.float64)
        norm = np.linalg.norm(v)
        return v / norm if norm > 0 else v

    # ------------------------------------------------------------- Extractor
    def outputs(self) -> list[FeatureSpec]:
        params: dict[str, Any] = {"version": LOWLEVEL_VERSION, "working_size": list(self.working_size)}
        rp = resize_params(self.working_size, self.rule)
        params.update({"resize_rule": rp["resize_rule"], "resize_filter": rp["resize_filter"]})
        params.update(
            {
                "gray": "Pillow L (ITU-R 601-2 luma)",
                "blocks": {k: list(v) for k, v in self.blocks.items()},
                "hsv": {"bins": list(self.hsv_bins), "space": "Pillow HSV 8-bit", "norm": "l1"},
                "lbp": {
                    "neighbours": 8,
                    "radius": 1,
                    "interpolation": "none",
                    "mapping": "uniform",
                    "bins": self._lbp_bins,
                    "norm": "l1",
                },
                "hog": {
                    "orientations": self.hog_orientations,
                    "signed": False,
                    "grid": list(self.hog_grid),
                    "gradient": "central differences",
                    "binning": "linear between orientation bins",
                    "norm": "l1 over all cells",
                },
                "gist": {
                    "size": list(self.gist_size),
                    "filter": "one-sided log-gabor",
                    "frequencies": list(self.gist_frequencies),
                    "orientations": self.gist_orientations,
                    "sigma_on_f": self._gist_sigma_on_f,
                    "theta_sigma": float(self._gist_theta_sigma),
                    "padding": "symmetric, 1/8 of each side",
                    "grid": list(self.gist_grid),
                    "pooling": "mean modulus",
                    "norm": "l2",
                },
            }
        )
        return [FeatureSpec(name=self.name, kind=self.kind, dim=self.dim, params=params)]

    def prepare(self, image: Image.Image) -> np.ndarray:
        """Resize and compute the whole descriptor (runs in a worker thread)."""
        return self.describe(resize_rgb(image, self.working_size, self.rule))

    def compute(self, prepared: list[np.ndarray]) -> dict[str, np.ndarray]:
        if not prepared:
            return {self.name: np.zeros((0, self.dim), dtype=np.float32)}
        return {self.name: np.stack(prepared).astype(np.float32, copy=False)}
