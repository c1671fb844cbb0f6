"""`/v1/interventions`: upload (native artifact or pyreft archive), list, get, download, replace, delete.

Uploads are validated fully in memory before the store writes anything; a replaced name is an atomic hot swap
(requests already running keep their version). Writing into an existing name takes `replace=true` or PUT, so a
typo'd upload never silently supersedes a working persona; PUT keeps the description when it is not given. Every
route acts on the caller's tenant; reads also reach another tenant's public intervention with `?owner=<tenant>`,
and `?version=N` reads a retained version. Anything else of another tenant is a 404, as if absent.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, File, Form, Query, UploadFile
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from adapters_store import MAX_VERSION, InterventionRecord
from server.archives import kind_of
from server.auth import Principal, principal
from server.dependencies import Services, services
from server.errors import APIError
from server.pagination import MAX_PAGE, list_body, page_size
from server.routes.models import model_name

router = APIRouter(prefix="/v1/interventions", tags=["interventions"])


def record_body(record: InterventionRecord, tenant: str) -> dict[str, Any]:
    return {"object": "intervention", **record.to_dict(), "id": model_name(record, tenant), "owner": record.tenant}


OWNER = Query(None, description="another tenant whose public intervention to read (default: your own)")
VERSION = Query(None, ge=1, le=MAX_VERSION, description="a retained version to read (default: the current one)")


async def _read_upload(file: UploadFile, limit: int) -> bytes:
    payload = await file.read(limit + 1)
    if len(payload) > limit:
        raise APIError(413, f"upload is larger than the {limit} byte limit", code="payload_too_large", param="file")
    if not payload:
        raise APIError(400, "the uploaded file is empty", param="file", code="empty_file")
    return payload


async def _store_upload(
    svc: Services, tenant: str, name: str, file: UploadFile, description: str | None, positions: str | None, *,
    replace: bool = False, upsert: bool = False,
) -> InterventionRecord:
    """`replace`: the name must exist (PUT); `upsert`: either; `description` None keeps the current one."""
    if description is not None and len(description) > 2000:
        raise APIError(400, "description is longer than 2000 characters", param="description")
    payload = await _read_upload(file, svc.settings.max_upload_bytes)
    if kind_of(payload) in ("zip", "tar.gz"):
        return await run_in_threadpool(
            svc.registry.put_pyreft_archive, tenant, name, payload,
            positions=positions, description=description, replace=replace, upsert=upsert,
        )
    if positions:
        raise APIError(400, "positions applies to pyreft archives only; artifacts carry their own", param="positions")
    return await run_in_threadpool(
        svc.registry.put_artifact, tenant, name, payload, description=description, replace=replace, upsert=upsert
    )


@router.post("", status_code=201)
async def create_intervention(
    name: str = Form(..., description="name clients put in `model`"),
    file: UploadFile = File(..., description="a .safetensors artifact, or a .zip/.tar.gz of a pyreft save"),
    description: str | None = Form(None, description="default: empty, or the current one when replacing"),
    positions: str | None = Form(None, description="pyreft archives only: e.g. l1, f1+l1 (default l1, or the "
                                                   "current version's when replacing)"),
    replace: bool = Form(False, description="store a new version if the name exists (otherwise 409)"),
    who: Principal = Depends(principal),
    svc: Services = Depends(services),
) -> JSONResponse:
    """Upload an intervention (a new version with replace=true); it is servable as soon as this returns."""
    record = await _store_upload(svc, who.tenant, name, file, description, positions, upsert=replace)
    return JSONResponse(record_body(record, who.tenant), status_code=201)


LIMIT = Query(None, ge=1, le=MAX_PAGE, description=f"at most this many items (default and maximum {MAX_PAGE}; "
                                                    "page on with `after` while `has_more`)")
AFTER = Query(None, max_length=200, description="the `id` of the previous page's last item")


@router.get("")
async def list_interventions(
    limit: int | None = LIMIT, after: str | None = AFTER, who: Principal = Depends(principal),
    svc: Services = Depends(services),
) -> JSONResponse:
    """List your interventions (current versions), then other tenants' public ones (as `tenant/name`); cursor
    pagination with `after` and `limit`."""
    page, has_more = await run_in_threadpool(svc.registry.visible, who.tenant, after, page_size(limit))
    # rendered here: FastAPI's generic encoding of a returned dict took 10x json.dumps' time (6.4 s for 100k)
    return JSONResponse(list_body([record_body(r, who.tenant) for r in page], has_more))


@router.get("/{name}")
async def get_intervention(
    name: str, owner: str | None = OWNER, version: int | None = VERSION, who: Principal = Depends(principal),
    svc: Services = Depends(services),
) -> dict[str, Any]:
    """One intervention's record (the current version, or `?version=N`)."""
    record = await run_in_threadpool(svc.registry.get_visible, who.tenant, name, owner, version)
    # what the training job behind this version measured at its end (samples of persona and base), if any
    job = (await run_in_threadpool(svc.training.jobs_by_version, [record])).get(record.version)
    return record_body(record, who.tenant) | {"evaluation": job.evaluation if job else None}


@router.get("/{name}/artifact")
async def download_artifact(
    name: str, owner: str | None = OWNER, version: int | None = VERSION, who: Principal = Depends(principal),
    svc: Services = Depends(services),
) -> Response:
    """Download the artifact file of the current version, or of `?version=N`."""
    record = await run_in_threadpool(svc.registry.get_visible, who.tenant, name, owner, version)
    payload = await run_in_threadpool(svc.store.read_artifact, record)
    filename = f"{record.name}-v{record.version}.safetensors"
    return Response(payload, media_type="application/octet-stream",
                    headers={"Content-Disposition": f'attachment; filename="{filename}"'})


@router.put("/{name}")
async def replace_intervention(
    name: str,
    file: UploadFile = File(...),
    description: str | None = Form(None, description="default: the current version's"),
    positions: str | None = Form(None, description="pyreft archives only (default: the current version's)"),
    who: Principal = Depends(principal),
    svc: Services = Depends(services),
) -> dict[str, Any]:
    """Replace an intervention with a new version (atomic hot swap); fields not given keep their values."""
    record = await _store_upload(svc, who.tenant, name, file, description, positions, replace=True)
    return record_body(record, who.tenant)


@router.delete("/{name}")
async def delete_intervention(
    name: str, who: Principal = Depends(principal), svc: Services = Depends(services)
) -> dict[str, Any]:
    """Delete an intervention; requests already running on it finish normally."""
    await run_in_threadpool(svc.registry.delete, who.tenant, name)
    return {"id": name, "object": "intervention", "deleted": True}
