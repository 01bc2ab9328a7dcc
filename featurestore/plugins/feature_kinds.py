"""The built-in feature kinds, registered through the plugin hook ``register_feature_kinds``.

Random projections, raw pixels, the low-level histograms and CNN embeddings.
Their modules are imported when the hook is called (not when the ``fs``
command starts).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from featurestore.plugins import hookimpl


def _size(value: Any) -> tuple[int, int]:
    """``[W, H]`` from params, or ``"WxH"`` from a ``--feature`` option."""
    if isinstance(value, str):
        from featurestore.errors import InvalidInputError

        w, sep, h = value.lower().partition("x")
        if not (sep and w.isdigit() and h.isdigit()):
            raise InvalidInputError(f"size {value!r} is not WIDTHxHEIGHT, e.g. 640x480")
        return int(w), int(h)
    return int(value[0]), int(value[1])


def _layers(value: Any) -> list[str] | None:
    if isinstance(value, str):
        return [x.strip() for x in value.split(",") if x.strip()] or None
    return list(value) if value else None


@hookimpl
def register_feature_kinds(register: Callable[[Any], None]) -> None:
    from featurestore.features import lowlevel, pixels, projection
    from featurestore.features.cnn import registry as cnn_registry
    from featurestore.features.cnn import views as cnn_views
    from featurestore.features.registry import FeatureKind

    register(FeatureKind(
        "random_projection", projection.RandomProjectionExtractor,
        lambda store, name, p, batch: projection.projection_extractor(
            store, k=int(p["k"]), size=_size(p["size"]), rule=p["resize_rule"], seed=int(p["seed"]), name=name),
        lambda name, p, dim: f"fs extract --rp {p.get('k', dim)}",
        create=lambda store, o: projection.projection_extractor(
            store, int(o["k"]), _size(o.get("size", "640x480")), o.get("rule", "stretch"), int(o.get("seed", 0)),
            replace=bool(o.get("replace", False))),
        description="sparse random projection of the raw pixels (options k, size, rule, seed)",
    ))
    register(FeatureKind(
        "pixels", pixels.PixelsExtractor,
        lambda store, name, p, batch: pixels.PixelsExtractor(_size(p["size"]), rule=p["resize_rule"], name=name),
        lambda name, p, dim: "fs extract --pixels {}x{}".format(*p.get("size", ["W", "H"])),
        create=lambda store, o: pixels.PixelsExtractor(_size(o["size"]), rule=o.get("rule", "stretch")),
        description="raw RGB pixels at a fixed size, scaled to 0..1 (options size, rule)",
    ))
    register(FeatureKind(
        "lowlevel", lowlevel.LowLevelExtractor,
        lambda store, name, p, batch: lowlevel.LowLevelExtractor.from_params(name, p),
        lambda name, p, dim: "fs extract --lowlevel",
        create=lambda store, o: lowlevel.LowLevelExtractor(rule=o.get("rule", "stretch")),
        description="colour, LBP and gradient histograms plus a GIST-like descriptor (option rule)",
    ))
    register(FeatureKind(
        "cnn", cnn_registry.CNNExtractor,
        # issue 16: the model, layer, resize rule, grid and TTA (+center-crop / +grid<N> / +flip sets) all come
        # from the params.
        lambda store, name, p, batch: cnn_registry.cnn_extractor_from_params(store, p, batch_size=batch),
        lambda name, p, dim: cnn_views.extract_command(name, p),
        # one extractor for several taps of the same model, resize rule, grid and TTA (the cluster path)
        lambda store, sets, batch: cnn_registry.cnn_extractor(
            store, sets[0].params["model"], [fs.params["layer"] for fs in sets], batch_size=batch,
            resize=sets[0].params["preprocess"]["resize"], tta=sets[0].params.get("tta", "none"),
            grid=int(sets[0].params.get("grid", 1)), **cnn_registry.stored_precision(sets[0].params)),
        create=lambda store, o: cnn_registry.cnn_extractor(
            store, str(o["model"]), _layers(o.get("layers")),
            **{k: v for k, v in o.items() if k not in ("model", "layers")}),
        description="CNN embeddings of a built-in or registered model (options model, layers, ...)",
    ))
