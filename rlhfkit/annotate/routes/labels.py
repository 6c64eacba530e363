"""/api/labels: submit a label (idempotent by client_key) and list your own labels."""

from __future__ import annotations

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse

from rlhfkit.annotate.deps import StoreDep, UserDep
from rlhfkit.annotate.schemas import LabelCreate, User, check_label
from rlhfkit.annotate.store import Store

router = APIRouter(prefix="/api/labels", tags=["labels"])


def submit(store: Store, user: User, body: LabelCreate) -> tuple[dict, bool]:
    """Validate and store one label for `user` (shared by the JSON API and the HTML form)."""
    item = store.item_for(user=user, item_id=body.item_id)
    project = store.get_project(project_id=item["project_id"])
    payload = check_label(project, item["kind"], body)
    return store.submit_label(user=user, item=item, payload=payload)


@router.post("", status_code=201)
def create_label(body: LabelCreate, user: UserDep, store: StoreDep):
    """201 with the new label; 200 with the stored one when this client_key was already used for the same label
    (a retry or a double click); 409 when the key was used for a different label or the item is labelled."""
    label, created = submit(store, user, body)
    return JSONResponse({"label": label, "created": created}, status_code=201 if created else 200)


@router.get("")
def my_labels(user: UserDep, store: StoreDep, project_id: int = Query(ge=1)) -> list[dict]:
    """Your own labels in a project (annotators never see anyone else's)."""
    store.project_for(user=user, project_id=project_id)
    return store.labels(project_id=project_id, user_id=user.id)
