"""Pydantic models that document the wire formats in OpenAPI (/docs).

Hot paths do not build these per request: routes parse with orjson and numpy and declare
these models only as the documented request and response shapes.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ErrorResponse(BaseModel):
    error: str = Field(description="What went wrong, in words a client can act on")


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in ((400, "Bad input"), (404, "Unknown model or version"), (413, "Too large"),
                       (415, "Unsupported media type"), (503, "Model not ready or overloaded"))
}
"""The error statuses every model route documents (in OpenAPI)."""


class ClassScore(BaseModel):
    class_id: int
    label: str
    score: float


class ImagePrediction(ClassScore):
    top_k: list[ClassScore]


class PredictResponse(BaseModel):
    model: str
    version: int
    predictions: list[ImagePrediction] = Field(description="One entry per image, in input order")


class Base64Images(BaseModel):
    images: list[str] = Field(description="Base64-encoded image files (PNG, JPEG, ...)")
    top_k: int | None = Field(None, ge=1, description="Classes per image (default: the server's default_top_k)")


class VersionStatus(BaseModel):
    version: int
    state: str = Field(description="READY, LOADING, UNAVAILABLE or FAILED")
    error: str | None = None


class TensorDescription(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelSummary(BaseModel):
    name: str
    default_version: int | None = Field(description="The newest ready version, served by unversioned routes")
    versions: list[VersionStatus]
    error: str | None = Field(None, description="Why the model's config.pbtxt cannot be used, if it cannot")
    platform: str | None = None
    input: TensorDescription | None = None
    output: TensorDescription | None = None
    labels: list[str] = []
    digit: bool = False


class ModelsResponse(BaseModel):
    models: list[ModelSummary]


# --- Open Inference Protocol (KServe v2) ---

class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class V2ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorDescription]
    outputs: list[TensorDescription]


class V2RequestInput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = Field(None, description='{"binary_data_size": n} for binary data')
    data: list[Any] | None = Field(None, description="Row-major values, flat or nested")


class V2RequestOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = Field(
        None, description='{"binary_data": true} and/or {"classification": k}')


class V2InferRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] | None = Field(None, description='{"binary_data_output": true}')
    inputs: list[V2RequestInput]
    outputs: list[V2RequestOutput] | None = None


class V2ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class V2InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[V2ResponseOutput]


# --- TensorFlow Serving REST ---

class TFPredictRequest(BaseModel):
    signature_name: str | None = None
    instances: list[Any] | None = Field(None, description="Row format: one entry per example")
    inputs: Any | None = Field(None, description="Columnar format: a tensor or {input name: tensor}")


class TFPredictResponse(BaseModel):
    predictions: list[Any] | None = None
    outputs: Any | None = None


class TFVersionStatus(BaseModel):
    version: str
    state: str
    status: dict[str, str]


class TFModelStatus(BaseModel):
    model_version_status: list[TFVersionStatus]
