"""/api/projects/{id}/next (lease the next item) and /api/tasks/{item}/release (give it back)."""

from __future__ import annotations

from fastapi import APIRouter

from rlhfkit.annotate.deps import StoreDep, UserDep

router = APIRouter(prefix="/api", tags=["tasks"])


def public_task(item: dict | None, project) -> dict | None:
    """What an annotator sees of an item: never the gold answer, the label count or other annotators' labels."""
    if item is None:
        return None
    task = {"item_id": item["id"], "kind": item["kind"], "prompt": item["prompt"],
            "completions": item["completions"], "lease_expires_at": item["lease_expires_at"]}
    if item["kind"] == "rating":
        task.update(scale_min=project.scale_min, scale_max=project.scale_max, criteria=project.criteria)
    return task


@router.post("/projects/{project_id}/next")
def next_task(project_id: int, user: UserDep, store: StoreDep) -> dict:
    project = store.project_for(user=user, project_id=project_id)
    item = store.next_task(user=user, project_id=project_id)
    return {"task": public_task(item, project)}


@router.post("/tasks/{item_id}/release")
def release(item_id: int, user: UserDep, store: StoreDep) -> dict:
    store.item_for(user=user, item_id=item_id)
    return {"released": store.release(user=user, item_id=item_id)}
