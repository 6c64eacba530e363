"""FastAPI dependencies: typed aliases for the store and the authenticated user (template: api/deps.py).

Authentication itself happens in `main.AuthMiddleware`, before routing, so that every /api/ path, known or not,
answers 401 without credentials; these dependencies read what it found and add the role check (403)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from rlhfkit.annotate.errors import ApiError
from rlhfkit.annotate.schemas import User
from rlhfkit.annotate.settings import Settings
from rlhfkit.annotate.store import Store


def get_store(request: Request) -> Store:
    return request.app.state.store


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_user(request: Request) -> User:
    user = getattr(request.state, "user", None)
    if user is None:  # only reachable if a route outside /api/ uses this dependency by mistake
        raise ApiError(401, "not logged in")
    return user


def get_admin(user: Annotated[User, Depends(get_user)]) -> User:
    if not user.is_admin:
        raise ApiError(403, "admin role required")
    return user


StoreDep = Annotated[Store, Depends(get_store)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
UserDep = Annotated[User, Depends(get_user)]
AdminDep = Annotated[User, Depends(get_admin)]
