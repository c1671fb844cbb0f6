"""`/v1/interventions`: upload (native artifact or pyreft archive), list, get, download, replace, delete.

Uploads are validated fully in memory before the store writes anything; a replaced name is an atomic hot swap
(requests already running keep their version).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, File, Form, UploadFile
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from adapters_store import InterventionRecord
from server.archives import kind_of
from server.dependencies import Services, services
from server.errors import APIError

router = APIRouter(prefix="/v1/interventions", tags=["interventions"])


def _record(record: InterventionRecord) -> dict[str, Any]:
    return {"object": "intervention", **record.to_dict()}


async def _read_upload(file: UploadFile, limit: int) -> bytes:
    payload = await file.read(limit + 1)
    if len(payload) > limit:
        raise APIError(413, f"upload is larger than the {limit} byte limit", code="payload_too_large", param="file")
    if not payload:
        raise APIError(400, "the uploaded file is empty", param="file", code="empty_file")
    return payload


async def _store_upload(
    svc: Services, name: str, file: UploadFile, description: str, positions: str | None, replace: bool
) -> InterventionRecord:
    if len(description) > 2000:
        raise APIError(400, "description is longer than 2000 characters", param="description")
    payload = await _read_upload(file, svc.settings.max_upload_bytes)
    if kind_of(payload) in ("zip", "tar.gz"):
        return await run_in_threadpool(
            svc.registry.put_pyreft_archive, name, payload,
            positions=positions or "l1", description=description, replace=replace,
        )
    if positions:
        raise APIError(400, "positions applies to pyreft archives only; artifacts carry their own", param="positions")
    return await run_in_threadpool(svc.registry.put_artifact, name, payload, description=description, replace=replace)


@router.post("", status_code=201)
async def create_intervention(
    name: str = Form(..., description="name clients put in `model`"),
    file: UploadFile = File(..., description="a .safetensors artifact, or a .zip/.tar.gz of a pyreft save"),
    description: str = Form(""),
    positions: str | None = Form(None, description="pyreft archives only: e.g. l1, f1+l1 (default l1)"),
    svc: Services = Depends(services),
) -> JSONResponse:
    """Upload an intervention; it is servable as soon as this returns."""
    record = await _store_upload(svc, name, file, description, positions, replace=False)
    return JSONResponse(_record(record), status_code=201)


@router.get("")
async def list_interventions(svc: Services = Depends(services)) -> dict[str, Any]:
    """List interventions (current versions)."""
    records = await run_in_threadpool(svc.store.list)
    return {"object": "list", "data": [_record(r) for r in records]}


@router.get("/{name}")
async def get_intervention(name: str, svc: Services = Depends(services)) -> dict[str, Any]:
    """One intervention's record (current version)."""
    return _record(await run_in_threadpool(svc.store.get, name))


@router.get("/{name}/artifact")
async def download_artifact(name: str, svc: Services = Depends(services)) -> Response:
    """Download the current version's artifact file."""
    record = await run_in_threadpool(svc.store.get, name)
    payload = await run_in_threadpool(svc.store.read_artifact, record)
    filename = f"{record.name}-v{record.version}.safetensors"
    return Response(payload, media_type="application/octet-stream",
                    headers={"Content-Disposition": f'attachment; filename="{filename}"'})


@router.put("/{name}")
async def replace_intervention(
    name: str,
    file: UploadFile = File(...),
    description: str = Form(""),
    positions: str | None = Form(None),
    svc: Services = Depends(services),
) -> dict[str, Any]:
    """Replace an intervention with a new version (atomic hot swap)."""
    return _record(await _store_upload(svc, name, file, description, positions, replace=True))


@router.delete("/{name}")
async def delete_intervention(name: str, svc: Services = Depends(services)) -> dict[str, Any]:
    """Delete an intervention; requests already running on it finish normally."""
    await run_in_threadpool(svc.registry.delete, name)
    return {"id": name, "object": "intervention", "deleted": True}
