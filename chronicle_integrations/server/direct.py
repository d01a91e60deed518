"""The routes of direct uploads (see :mod:`..store.direct`): the worker asks for the part size,
announces its digests, and receives presigned part URLs a few at a time; it then completes the
upload with ``POST /v1/uploads/{id}/complete`` as usual. A server whose assets are not in S3
(or that runs ``--uploads proxied``) answers 400 ``invalid_request`` with
``reason: direct_unavailable``, and the worker sends the bytes with ``PUT`` instead."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Path
from fastapi.responses import JSONResponse
from pydantic import Field

from ..store import Store
from .routes import _errors
from .wire import _Request

__all__ = ["DirectUploadRequest", "build_direct_router"]


class DirectUploadRequest(_Request):
    sha256: str = Field(description="SHA-256 of the whole content, 64 lowercase hex characters.")
    parts: list[str] = Field(
        description="SHA-256 of each part (hex, part 1 first), cut at the announced part size."
    )


UploadIdPath = Annotated[str, Path(description="The id returned by POST .../uploads.")]


def _answer(data: dict[str, Any]) -> JSONResponse:
    asset = data.get("asset")
    if asset is not None:
        data = {**data, "asset": asset.to_dict()}
    return JSONResponse(data)


def build_direct_router(store: Store) -> APIRouter:
    """``GET``/``POST /v1/uploads/{upload_id}/direct`` over ``store``."""
    router = APIRouter()

    @router.get("/uploads/{upload_id}/direct", tags=["uploads"], responses=_errors(404, 413))
    def direct_plan(upload_id: UploadIdPath) -> JSONResponse:
        """How to cut the file: ``part_size`` and the number of ``parts`` to hash."""
        return JSONResponse(store.direct_plan(upload_id))

    @router.post(
        "/uploads/{upload_id}/direct", tags=["uploads"], responses=_errors(404, 413, body=True)
    )
    def direct_upload(
        upload_id: UploadIdPath, body: Annotated[DirectUploadRequest, Body()]
    ) -> JSONResponse:
        """Announce the digests; get presigned URLs for the next missing parts (``urls``:
        ``part``, ``size``, ``url``, ``headers`` to send with the ``PUT``), or
        ``completed: true`` with the ``asset`` when equal content is already stored."""
        return _answer(store.direct_upload(upload_id, body.sha256, body.parts))

    return router
