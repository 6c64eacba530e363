"""/api/me and user administration (admin only)."""

from __future__ import annotations

from fastapi import APIRouter

from rlhfkit.annotate.deps import AdminDep, StoreDep, UserDep
from rlhfkit.annotate.errors import ApiError, not_found
from rlhfkit.annotate.schemas import UserCreate

router = APIRouter(prefix="/api", tags=["users"])


@router.get("/me")
def me(user: UserDep) -> dict:
    return {"id": user.id, "name": user.name, "role": user.role}


@router.get("/users")
def list_users(_admin: AdminDep, store: StoreDep) -> list[dict]:
    return store.list_users()


@router.post("/users", status_code=201)
def create_user(body: UserCreate, _admin: AdminDep, store: StoreDep) -> dict:
    """Create a user (and add them to the named projects); the answer holds the API token, shown only once."""
    projects = [store.get_project(name=p) for p in body.projects]  # 404 before anything is written
    user, token = store.create_user(name=body.name, role=body.role, password=body.password)
    for p in projects:
        store.add_member(project_id=p.id, user_id=user.id)
    return {"id": user.id, "name": user.name, "role": user.role, "token": token,
            "projects": [p.name for p in projects]}


@router.post("/users/{name}/token")
def rotate_token(name: str, _admin: AdminDep, store: StoreDep) -> dict:
    if store.user_by_name(name) is None:
        raise not_found(f"user {name!r}")
    return {"name": name, "token": store.new_token(name=name)}


@router.post("/users/{name}/deactivate")
def deactivate(name: str, admin: AdminDep, store: StoreDep) -> dict:
    """Lock a user out at once (token, password, sessions); leased items go back to the queue, labels stay."""
    if name == admin.name:
        raise ApiError(409, "you cannot deactivate yourself (ask another admin, or use the command line)")
    return {"name": name, "active": False, "changed": store.set_active(name=name, active=False)}


@router.post("/users/{name}/activate")
def activate(name: str, _admin: AdminDep, store: StoreDep) -> dict:
    return {"name": name, "active": True, "changed": store.set_active(name=name, active=True)}
