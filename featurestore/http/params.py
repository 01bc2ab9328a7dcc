"""Request parameters shared by the routes, with their limits (violations answer 422).

Ids are bounded to SQL BIGINT (larger ids cannot exist and would overflow the
driver); names and filters refuse NUL, which PostgreSQL text cannot hold and
no stored name contains.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import Form, Path, Query
from pydantic import AfterValidator

MAX_ID = 2**63 - 1
MAX_K = 1000
MAX_NAME = 200


def _no_nul(value: str | None) -> str | None:
    if value is not None and "\x00" in value:
        raise ValueError("contains a NUL character")
    return value


NoNul = AfterValidator(_no_nul)
Metric = Literal["cosine", "l2"]

ImageId = Annotated[int, Path(ge=1, le=MAX_ID, description="Image id (see GET /v1/images/{id}).")]
RunId = Annotated[int, Path(ge=1, le=MAX_ID, description="Run id (see GET /v1/runs).")]
SetName = Annotated[str, Path(max_length=MAX_NAME, description="Feature set name (see GET /v1/feature-sets)."),
                    NoNul]
QueryImageId = Annotated[int, Query(ge=1, le=MAX_ID, description="Query image (excluded from the results).")]
TopK = Annotated[int, Query(ge=1, le=MAX_K, description="Number of results.")]
Label = Annotated[str | None, Query(max_length=MAX_NAME, description="Only images with this label."), NoNul]
DatasetName = Annotated[str | None, Query(max_length=MAX_NAME, description="Only images of this dataset."), NoNul]
MetricQuery = Annotated[Metric, Query(description="cosine: similarity, higher is better; l2: Euclidean distance. "
                                                  "`distance` is lower-is-better for both.")]

FormTopK = Annotated[int, Form(ge=1, le=MAX_K, description="Number of results.")]
FormLabel = Annotated[str | None, Form(max_length=MAX_NAME, description="Only images with this label."), NoNul]
FormDataset = Annotated[str | None, Form(max_length=MAX_NAME, description="Only images of this dataset."), NoNul]
FormMetric = Annotated[Metric, Form(description="cosine or l2.")]
ExactQuery = Annotated[bool, Query(description="Score every vector even if the feature set has an ANN index.")]
FormExact = Annotated[bool, Form(description="Score every vector even if the feature set has an ANN index.")]
