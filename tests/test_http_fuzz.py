"""Property-based fuzz of the HTTP service's OpenAPI spec (schemathesis, in-process ASGI).

Every operation in /openapi.json gets generated requests, valid and invalid
(path and query values, multipart uploads of random bytes, missing fields);
the property is that no client input produces a 5xx.
"""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from featurestore.config import Settings  # noqa: E402
from featurestore.features.projection import projection_extractor  # noqa: E402
from featurestore.http.app import create_app  # noqa: E402
from featurestore.pipelines.extract import extract  # noqa: E402
from featurestore.pipelines.ingest import ingest  # noqa: E402
from featurestore.pipelines.train import TrainConfig, train  # noqa: E402
from featurestore.store import Store  # noqa: E402
from helpers import make_image  # noqa: E402


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    base = tmp_path_factory.mktemp("fuzz")
    seed = 0
    for cls in ("a", "b", "c"):
        for k in range(6):
            make_image(base / "imgs" / cls / f"{cls}{k}.png", size=(24, 16), seed=seed)
            seed += 1
    settings_ = Settings(store=base / ".fs", workers=2, max_upload_mb=1, allowed_hosts="testserver")
    with Store.open(settings_, create=True) as store, store.writing():
        ingest(store, base / "imgs", dataset="imgs")
        extract(store, [projection_extractor(store, 8, (16, 12))])
        train(store, TrainConfig(["rp8"], n_splits=2, trees=5))
    app = create_app(settings_)
    return schemathesis.openapi.from_asgi("/openapi.json", app)


# Path values of resources that exist, so the fuzzer also gets past the 404s.
KNOWN = {"name": "rp8", "run_id": 1, "image_id": 2}


def _fuzz(operation, mode, known: bool = False) -> None:  # type: ignore[no-untyped-def]
    names = {p.name for p in operation.path_parameters}
    fixed = {k: v for k, v in KNOWN.items() if k in names} if known else None
    @given(case=operation.as_strategy(generation_mode=mode, path_parameters=fixed or None))
    @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None,
              phases=[Phase.explicit, Phase.generate, Phase.shrink])
    def run(case) -> None:  # type: ignore[no-untyped-def]
        case.call_and_validate(checks=[not_a_server_error])

    run()


# schemathesis' own pytest integration (from_fixture) does not work with pytest 9, so each
# operation's strategy is driven by hypothesis here; the property is the same check.
@pytest.mark.parametrize(("mode", "known"), [("positive", False), ("negative", False), ("positive", True),
                                             ("negative", True)])
def test_no_server_errors(api_schema, mode: str, known: bool) -> None:  # type: ignore[no-untyped-def]
    generation_mode = GenerationMode(mode)
    operations = [r.ok() for r in api_schema.get_all_operations()]
    assert operations
    fuzzed = 0
    for op in operations:
        try:
            _fuzz(op, generation_mode, known)
            fuzzed += 1
        except Unsatisfiable:
            # No parameters and no body: there is nothing to make invalid.
            assert generation_mode is GenerationMode.NEGATIVE, op.path
        except Exception as exc:
            raise AssertionError(f"{op.method.upper()} {op.path} ({mode}): {exc}") from exc
    assert fuzzed >= 6


def test_spec_covers_the_api(api_schema) -> None:  # type: ignore[no-untyped-def]
    ops = {(op.method.upper(), op.path) for op in (r.ok() for r in api_schema.get_all_operations())}
    assert ("POST", "/v1/runs/{run_id}/predict") in ops
    assert ("GET", "/v1/feature-sets/{name}/search") in ops
    assert len(ops) >= 10

