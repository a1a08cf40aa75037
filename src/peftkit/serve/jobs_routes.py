"""OpenAI's files and fine-tuning routes over a :class:`peftkit.jobs.service.JobService`.

``jobs_router(service, owner)``: ``owner`` is a FastAPI dependency that returns the caller's
owner id ("" on a server without API keys, else one id per key); every file and job belongs to
the owner that created it, and another owner's ids answer 404. Errors are
:class:`peftkit.serve.errors.APIError` (install ``install_error_handlers`` on the app).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Request, UploadFile
from fastapi import File as FileParam
from fastapi.responses import FileResponse

from peftkit.jobs.db import Checkpoint, Event, File, Job
from peftkit.jobs.service import JobService, RequestError
from peftkit.jobs.store import Conflict, NotFound
from peftkit.serve.errors import APIError

__all__ = ["checkpoint_object", "event_object", "file_object", "job_object", "jobs_router"]


def file_object(f: File) -> dict[str, Any]:
    return {"id": f.id, "object": "file", "bytes": f.bytes, "created_at": f.created_at, "filename": f.filename,
            "purpose": f.purpose, "status": "processed", "status_details": None}


def job_object(job: Job) -> dict[str, Any]:
    hp = job.hyperparameters
    extension = {k: v for k, v in (job.peftkit or {}).items()}
    method = dict(job.method)
    method.setdefault(method["type"], {"hyperparameters": dict(hp)})
    return {"object": "fine_tuning.job", "id": job.id, "created_at": job.created_at, "error": job.error,
            "fine_tuned_model": job.fine_tuned_model, "finished_at": job.finished_at, "hyperparameters": dict(hp),
            "model": job.model, "organization_id": job.owner or "org-local", "result_files": [], "seed": job.seed,
            "status": job.status, "trained_tokens": job.trained_tokens, "training_file": job.training_file,
            "validation_file": job.validation_file, "estimated_finish": None, "integrations": [], "metadata": job.meta,
            "method": method, "user_provided_suffix": job.suffix, "peftkit": extension}


def event_object(e: Event) -> dict[str, Any]:
    return {"object": "fine_tuning.job.event", "id": e.id, "created_at": e.created_at, "level": e.level,
            "message": e.message, "type": e.type, "data": e.data or {}}


def checkpoint_object(c: Checkpoint, job: Job) -> dict[str, Any]:
    name = f"ft:{job.model}:{job.suffix or ''}:{job.id}:ckpt-step-{c.step}"
    return {"object": "fine_tuning.job.checkpoint", "id": c.id, "created_at": c.created_at,
            "fine_tuned_model_checkpoint": name, "fine_tuning_job_id": job.id, "metrics": c.metrics, "step_number": c.step}


def _page(items: list[Any], limit: int, render: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
    shown = [render(i) for i in items[:limit]]
    return {"object": "list", "data": shown, "has_more": len(items) > limit,
            "first_id": shown[0]["id"] if shown else None, "last_id": shown[-1]["id"] if shown else None}


def _limit(value: int, top: int = 100) -> int:
    if not 1 <= value <= top:
        raise APIError(400, f"limit must be between 1 and {top}, got {value}", param="limit")
    return value


def jobs_router(service: JobService, owner: Callable[..., str]) -> Any:
    """The ``/v1/files`` and ``/v1/fine_tuning/jobs`` routes (sync handlers: FastAPI runs them
    in its thread pool, the database calls block there)."""
    router = APIRouter()
    store = service.store

    def guard(call: Callable[[], Any]) -> Any:
        try:
            return call()
        except NotFound as exc:
            raise APIError(404, str(exc), code="not_found") from None
        except Conflict as exc:
            raise APIError(409, str(exc), code="invalid_status") from None
        except RequestError as exc:
            raise APIError(exc.status, str(exc), param=exc.param, code=exc.code) from None

    @router.post("/v1/files")
    def upload_file(file: Annotated[UploadFile, FileParam()], purpose: Annotated[str, Form()], who: str = Depends(owner)):
        def chunks():
            while block := file.file.read(1 << 20):
                yield block

        return file_object(guard(lambda: service.upload(who, file.filename or "upload.jsonl", purpose, chunks())))

    @router.get("/v1/files")
    def list_files(purpose: str | None = None, after: str | None = None, limit: int = 10000, who: str = Depends(owner)):
        items = guard(lambda: store.list_files(who, purpose, after, _limit(limit, 10000) + 1))
        return _page(items, limit, file_object)

    @router.get("/v1/files/{file_id}")
    def get_file(file_id: str, who: str = Depends(owner)):
        return file_object(guard(lambda: store.get_file(who, file_id)))

    @router.get("/v1/files/{file_id}/content")
    def file_content(file_id: str, who: str = Depends(owner)):
        record = guard(lambda: store.get_file(who, file_id))
        return FileResponse(store.file_path(record), media_type="application/octet-stream", filename=record.filename)

    @router.delete("/v1/files/{file_id}")
    def delete_file(file_id: str, who: str = Depends(owner)):
        guard(lambda: store.delete_file(who, file_id))
        return {"id": file_id, "object": "file", "deleted": True}

    @router.post("/v1/fine_tuning/jobs")
    async def create_job(request: Request, who: str = Depends(owner)):
        import json

        from starlette.concurrency import run_in_threadpool

        try:
            body = json.loads(await request.body() or b"{}")
        except ValueError as exc:
            raise APIError(400, f"the request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        return job_object(await run_in_threadpool(guard, lambda: service.create_job(who, body)))

    @router.get("/v1/fine_tuning/jobs")
    def list_jobs(request: Request, after: str | None = None, limit: int = 20, who: str = Depends(owner)):
        metadata = {k[len("metadata["):-1]: v for k, v in request.query_params.items() if k.startswith("metadata[") and k.endswith("]")}
        items = guard(lambda: store.list_jobs(who, after, _limit(limit) + 1, metadata or None))
        return _page(items, limit, job_object)

    @router.get("/v1/fine_tuning/jobs/{job_id}")
    def get_job(job_id: str, who: str = Depends(owner)):
        return job_object(guard(lambda: store.get_job(who, job_id)))

    @router.post("/v1/fine_tuning/jobs/{job_id}/cancel")
    def cancel_job(job_id: str, who: str = Depends(owner)):
        return job_object(guard(lambda: store.cancel(who, job_id)))

    @router.post("/v1/fine_tuning/jobs/{job_id}/pause")
    def pause_job(job_id: str, who: str = Depends(owner)):
        return job_object(guard(lambda: store.pause(who, job_id)))

    @router.post("/v1/fine_tuning/jobs/{job_id}/resume")
    def resume_job(job_id: str, who: str = Depends(owner)):
        return job_object(guard(lambda: store.resume(who, job_id)))

    @router.get("/v1/fine_tuning/jobs/{job_id}/events")
    def list_events(job_id: str, after: str | None = None, limit: int = 20, who: str = Depends(owner)):
        items = guard(lambda: store.events(who, job_id, after, _limit(limit, 1000) + 1))
        return _page(items, limit, event_object)

    @router.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
    def list_checkpoints(job_id: str, after: str | None = None, limit: int = 10, who: str = Depends(owner)):
        job = guard(lambda: store.get_job(who, job_id))
        items = guard(lambda: store.checkpoints(who, job_id, after, _limit(limit) + 1))
        return _page(items, limit, lambda c: checkpoint_object(c, job))

    return router
