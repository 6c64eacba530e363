"""/api/projects: create and list projects, import items, members, progress, agreement, export."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Query
from fastapi.responses import Response

from rlhfkit.annotate import agreement, export
from rlhfkit.annotate.deps import AdminDep, StoreDep, UserDep
from rlhfkit.annotate.errors import ApiError, not_found
from rlhfkit.annotate.importer import items_from_source
from rlhfkit.annotate.schemas import ItemsImport, MemberAdd, ProjectCreate
from rlhfkit.errors import UserError

router = APIRouter(prefix="/api/projects", tags=["projects"])


@router.get("")
def list_projects(user: UserDep, store: StoreDep) -> list[dict]:
    return [{**p.public(), "progress": store.progress(project_id=p.id, user=user)}
            for p in store.list_projects(user=user)]


@router.post("", status_code=201)
def create_project(body: ProjectCreate, _admin: AdminDep, store: StoreDep) -> dict:
    return store.create_project(**body.model_dump()).public()


@router.get("/{project_id}")
def get_project(project_id: int, user: UserDep, store: StoreDep) -> dict:
    project = store.project_for(user=user, project_id=project_id)
    return {**project.public(), "progress": store.progress(project_id=project_id, user=user)}


@router.post("/{project_id}/items")
def import_items(project_id: int, body: ItemsImport, _admin: AdminDep, store: StoreDep) -> dict:
    """Add items from candidate records (the same records `rlhfkit annotate import` reads from a file). All or
    nothing: one bad record rejects the request with a 422 naming records[i] and the field."""
    project = store.get_project(project_id=project_id)
    try:
        items, n = items_from_source(body.records, project, name="records", shuffle_pairs=body.shuffle_pairs,
                                     pairs=body.pairs)
    except UserError as err:
        raise ApiError(422, str(err)) from None
    added, present = store.import_items(project_id=project_id, items=items)
    return {"records": n, "added": added, "already_present": present}


@router.post("/{project_id}/members")
def add_member(project_id: int, body: MemberAdd, _admin: AdminDep, store: StoreDep) -> dict:
    store.get_project(project_id=project_id)
    user = store.user_by_name(body.user)
    if user is None:
        raise not_found(f"user {body.user!r}")
    return {"added": store.add_member(project_id=project_id, user_id=user.id)}


@router.get("/{project_id}/stats")
def stats(project_id: int, _admin: AdminDep, store: StoreDep) -> dict:
    return {"progress": store.progress(project_id=project_id),
            "annotators": store.annotator_stats(project_id=project_id)}


@router.get("/{project_id}/agreement")
def project_agreement(project_id: int, _admin: AdminDep, store: StoreDep) -> dict:
    store.get_project(project_id=project_id)
    return agreement.project_agreement(store.labels(project_id=project_id))


@router.get("/{project_id}/export")
def export_jsonl(project_id: int, _admin: AdminDep, store: StoreDep,
                 kind: Literal["preferences", "ratings", "edits", "edit_pairs"] = "preferences",
                 mode: Literal["majority", "all"] = "majority", ties: bool = False,
                 min_votes: int = Query(1, ge=1), criterion: str = "", edits: bool = False) -> Response:
    """The export file as JSONL (application/x-ndjson); the same rows `rlhfkit annotate export` writes."""
    import json

    project = store.get_project(project_id=project_id)
    opts = {"mode": mode, "min_votes": min_votes}
    if kind == "preferences":
        opts.update(ties=ties, edits=edits)
    if kind == "ratings":
        opts["criterion"] = criterion
    if kind in ("edits", "edit_pairs"):
        opts = {}
    rows, skipped = export.build_rows(store.items(project_id=project.id), store.labels(project_id=project.id),
                                      kind=kind, **opts)
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return Response(body, media_type="application/x-ndjson",
                    headers={"X-Rows": str(len(rows)), "X-Skipped": json.dumps(skipped),
                             "Content-Disposition": f'attachment; filename="{project.name}-{kind}.jsonl"'})
