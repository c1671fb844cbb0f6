"""`/v1/interventions/{name}/versions`: list an intervention's retained versions, promote one, delete one.

A promote moves the name's current pointer back to a retained version in one store transaction: new requests get it
at once, requests already running keep the digest they resolved, and no bytes are copied (so no quota is charged).
Deleting a version refuses the current one (409): a name always has exactly one current version. Reads follow the
name's visibility (`?owner=T` for another tenant's public one); writes act on the caller's own names only, so
another tenant's name or version is a 404 exactly like one that does not exist.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path
from starlette.concurrency import run_in_threadpool

from adapters_store import MAX_VERSION, InterventionRecord
from adapters_store.jobs import JobRecord
from server.auth import Principal, principal
from server.dependencies import Services, services
from server.routes.interventions import OWNER, record_body
from server.routes.models import model_name

router = APIRouter(prefix="/v1/interventions", tags=["interventions"])
VersionNumber = Annotated[int, Path(ge=1, le=MAX_VERSION, description="a version number, as listed")]


def version_body(record: InterventionRecord, current: int, tenant: str, job: JobRecord | None = None) -> dict[str, Any]:
    """One version as clients see it; `id` is what they put in `model` to pin it; `job` the training job behind it
    (its evaluation is shown with the version)."""
    training = record.training  # what training stored with the artifact (an upload's is the uploader's claim)
    return {
        "object": "intervention.version", "id": f"{model_name(record, tenant)}@{record.version}",
        "name": record.name, "owner": record.tenant, "version": record.version, "digest": record.digest,
        "created": int(datetime.fromisoformat(record.created_at).timestamp()), "created_at": record.created_at,
        "size_bytes": record.size_bytes, "source": record.source, "description": record.description,
        "training_job": job.id if job else None, "validation_loss": training.get("validation_loss"),
        "evaluation": job.evaluation if job else None,
        "current": record.version == current,
    }


@router.get("/{name}/versions")
async def list_versions(
    name: str, owner: str | None = OWNER, who: Principal = Depends(principal), svc: Services = Depends(services)
) -> dict[str, Any]:
    """List an intervention's retained versions, newest first, marking the current one."""
    history, current = await run_in_threadpool(svc.registry.versions, who.tenant, name, owner)
    jobs = await run_in_threadpool(svc.training.jobs_by_version, history)
    return {"object": "list", "current_version": current,
            "data": [version_body(record, current, who.tenant, jobs.get(record.version)) for record in history]}


@router.post("/{name}/versions/{version}/promote")
async def promote_version(
    name: str, version: VersionNumber, who: Principal = Depends(principal), svc: Services = Depends(services)
) -> dict[str, Any]:
    """Make a retained version current again (atomic; running requests keep the version they started with)."""
    return record_body(await run_in_threadpool(svc.registry.promote, who.tenant, name, version), who.tenant)


@router.delete("/{name}/versions/{version}")
async def delete_version(
    name: str, version: VersionNumber, who: Principal = Depends(principal), svc: Services = Depends(services)
) -> dict[str, Any]:
    """Delete one non-current version and its artifact file (409 for the current version)."""
    await run_in_threadpool(svc.registry.delete_version, who.tenant, name, version)
    return {"id": f"{name}@{version}", "object": "intervention.version", "deleted": True}
