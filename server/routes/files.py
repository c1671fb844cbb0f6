"""`/v1/files`: the caller's training files (OpenAI's Files API, purpose `fine-tune` only).

A file is validated completely when it is uploaded (UTF-8 JSONL, one `{messages}` or `{prompt, completion}` example
per line, at most `max_training_examples`), so a bad line is a 400 naming it before anything is stored. Files are
capped by `max_file_bytes`, count in the tenant's storage quota with its interventions, and belong to the tenant:
another tenant's file is a 404 exactly like one that does not exist.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, File, Form, Query, UploadFile
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from adapters_store import TrainingFileRecord
from server.auth import Principal, principal
from server.dependencies import Services, services
from server.errors import APIError
from server.jsonl import parse_examples
from server.pagination import cursor_page, list_body

router = APIRouter(prefix="/v1/files", tags=["files"])
PURPOSE = "fine-tune"


def file_body(record: TrainingFileRecord) -> dict[str, Any]:
    return {"id": record.id, "object": "file", "bytes": record.size_bytes, "created_at": record.created_at,
            "filename": record.filename, "purpose": record.purpose, "status": "processed", "status_details": None,
            "expires_at": None}


@router.post("")
async def create_file(
    file: UploadFile = File(..., description="JSONL: one {messages} or {prompt, completion} example per line"),
    purpose: str = Form(..., description="must be fine-tune"),
    who: Principal = Depends(principal),
    svc: Services = Depends(services),
) -> dict[str, Any]:
    """Upload a training file; every line is validated now (a bad one is a 400 naming the line)."""
    if purpose != PURPOSE:
        raise APIError(400, f"purpose must be '{PURPOSE}' (this server stores training files only), got "
                       f"'{purpose:.40}'", param="purpose", code="invalid_purpose")
    limit = svc.settings.max_file_bytes
    payload = await file.read(limit + 1)
    if len(payload) > limit:
        raise APIError(413, f"the file is larger than the {limit} byte limit (max_file_bytes)", param="file",
                       code="payload_too_large")
    filename = file.filename or "upload.jsonl"
    parse_examples(payload, svc.settings.max_training_examples, source=f"file '{filename:.80}'")
    record = await run_in_threadpool(svc.store.training_files.put, who.tenant, filename, purpose, payload,
                                     svc.registry.quota(who.tenant))
    return file_body(record)


@router.get("")
async def list_files(
    purpose: str | None = Query(None), after: str | None = Query(None), limit: int = Query(10_000, ge=1, le=10_000),
    order: Literal["asc", "desc"] = Query("desc"), who: Principal = Depends(principal),
    svc: Services = Depends(services),
) -> dict[str, Any]:
    """List your files, newest first (`order=asc`: oldest first); cursor pagination with `after` and `limit`."""
    records = await run_in_threadpool(svc.store.training_files.list, who.tenant, purpose)
    if order == "asc":
        records.reverse()
    page, has_more = cursor_page(records, lambda r: r.id, after, limit)
    return list_body([file_body(r) for r in page], has_more)


@router.get("/{file_id}")
async def retrieve_file(
    file_id: str, who: Principal = Depends(principal), svc: Services = Depends(services)
) -> dict[str, Any]:
    """One file's metadata."""
    return file_body(await run_in_threadpool(svc.store.training_files.get, who.tenant, file_id))


@router.get("/{file_id}/content")
async def file_content(file_id: str, who: Principal = Depends(principal), svc: Services = Depends(services)) -> Response:
    """The file's bytes, as uploaded."""
    record = await run_in_threadpool(svc.store.training_files.get, who.tenant, file_id)
    payload = await run_in_threadpool(svc.store.training_files.read, who.tenant, file_id)
    return Response(payload, media_type="application/octet-stream",
                    headers={"Content-Disposition": f'attachment; filename="{record.id}.jsonl"'})


@router.delete("/{file_id}")
async def delete_file(
    file_id: str, who: Principal = Depends(principal), svc: Services = Depends(services)
) -> dict[str, Any]:
    """Delete a file (jobs already created from it keep their examples)."""
    await run_in_threadpool(svc.store.training_files.delete, who.tenant, file_id)
    return {"id": file_id, "object": "file", "deleted": True}
