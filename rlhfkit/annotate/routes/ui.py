"""HTML pages (Jinja2, autoescaped): login, project list, the labelling page, my labels, admin overview.

Forms carry a CSRF token: the session's for logged-in forms, a double-submit cookie for the login form. The
labelling page posts a fresh client_key with each form, so a double click or a browser retry stores one label.
"""

from __future__ import annotations

import math
import time
from typing import Annotated

from fastapi import APIRouter, Depends, Form, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse
from pydantic import ValidationError

from rlhfkit.annotate import agreement, security
from rlhfkit.annotate.deps import SettingsDep, StoreDep
from rlhfkit.annotate.errors import ApiError
from rlhfkit.annotate.main import SESSION_COOKIE, LoginRequired, read_cookie
from rlhfkit.annotate.routes.labels import submit
from rlhfkit.annotate.schemas import LabelCreate, User, pydantic_message
from rlhfkit.annotate.store import Store

router = APIRouter(include_in_schema=False)
LOGIN_CSRF_COOKIE = "rlhfkit_login_csrf"


def _session(request: Request) -> tuple[User, str]:
    sid = read_cookie(dict(request.scope["headers"]), SESSION_COOKIE)
    found = request.app.state.store.user_by_session(sid) if sid else None
    if found is None:
        raise LoginRequired()
    request.state.user = found[0]
    return found


Session = Annotated[tuple, Depends(_session)]


def _render(request: Request, name: str, status: int = 200, **ctx):
    settings = request.app.state.settings
    return request.app.state.templates.TemplateResponse(request, name, {"title": settings.title, **ctx},
                                                        status_code=status)


def _check_csrf(sent: str | None, expected: str | None) -> None:
    if not sent or not expected or not security.same(sent, expected):
        raise ApiError(403, "the form's CSRF token is missing or stale: reload the page and try again")


def _safe_next(target: str | None) -> str:
    # only a path on this site: "//host" and "/\\host" would send the user elsewhere after login
    ok = target and target.startswith("/") and not target.startswith(("//", "/\\")) and "\n" not in target
    return target if ok else "/"


@router.get("/login")
def login_page(request: Request, settings: SettingsDep, next: str = "/"):
    token = security.new_secret()
    resp = _render(request, "login.html", csrf=token, next=_safe_next(next), error=None)
    resp.set_cookie(LOGIN_CSRF_COOKIE, token, httponly=True, samesite="strict", secure=settings.cookie_secure)
    return resp


@router.post("/login")
def login(request: Request, store: StoreDep, settings: SettingsDep, name: Annotated[str, Form(max_length=100)],
          password: Annotated[str, Form(max_length=200)], csrf: Annotated[str, Form(max_length=100)],
          next: Annotated[str, Form(max_length=500)] = "/"):
    _check_csrf(csrf, read_cookie(dict(request.scope["headers"]), LOGIN_CSRF_COOKIE))
    limiter, address = request.app.state.login_limiter, request.client.host if request.client else "-"
    wait = limiter.retry_after(name, address)
    if wait > 0:  # refused before the password is even checked
        resp = _render(request, "login.html", status=429, csrf=csrf, next=_safe_next(next),
                       error=f"Too many failed logins. Try again in {math.ceil(wait)} seconds.")
        resp.headers["Retry-After"] = str(math.ceil(wait))
        return resp
    user = store.check_password(name=name, password=password)
    if user is None:
        limiter.failed(name, address)
        return _render(request, "login.html", status=401, csrf=csrf, next=_safe_next(next),
                       error="Wrong name or password.")
    limiter.succeeded(name)
    sid, _ = store.create_session(user_id=user.id, hours=settings.session_hours)
    resp = RedirectResponse(_safe_next(next), status_code=303)
    resp.set_cookie(SESSION_COOKIE, sid, httponly=True, samesite="lax", secure=settings.cookie_secure,
                    max_age=int(settings.session_hours * 3600))
    resp.delete_cookie(LOGIN_CSRF_COOKIE)
    return resp


@router.post("/logout")
def logout(request: Request, session: Session, store: StoreDep, csrf: Annotated[str, Form(max_length=100)]):
    _check_csrf(csrf, session[1])
    store.delete_session(read_cookie(dict(request.scope["headers"]), SESSION_COOKIE))
    resp = RedirectResponse("/login", status_code=303)
    resp.delete_cookie(SESSION_COOKIE)
    return resp


@router.get("/")
def index(request: Request, session: Session, store: StoreDep):
    user, csrf = session
    projects = [(p, store.progress(project_id=p.id, user=user)) for p in store.list_projects(user=user)]
    return _render(request, "projects.html", user=user, csrf=csrf, projects=projects)


def _label_page(request: Request, store: Store, user: User, csrf: str, project_id: int, item: dict | None,
                error: str | None = None, client_key: str | None = None, status: int = 200, saved: bool = False):
    project = store.project_for(user=user, project_id=project_id)
    progress = store.progress(project_id=project_id, user=user)
    edit_text = ""
    if item and item["kind"] == "edit":
        c = item["completions"][0]
        edit_text = c if isinstance(c, str) else "\n\n".join(m["content"] for m in c)
    return _render(request, "label.html", status=status, user=user, csrf=csrf, project=project, item=item,
                   progress=progress, error=error, saved=saved, edit_text=edit_text,
                   client_key=client_key or security.new_secret(), shown_at=f"{time.time():.3f}")


@router.get("/projects/{project_id}")
def label_page(request: Request, project_id: int, session: Session, store: StoreDep, saved: int = 0):
    user, csrf = session
    store.project_for(user=user, project_id=project_id)
    item = store.next_task(user=user, project_id=project_id)
    return _label_page(request, store, user, csrf, project_id, item, saved=bool(saved))


def _form_label(form) -> dict:
    data: dict = {"item_id": form.get("item_id"), "client_key": form.get("client_key"),
                  "tags": [t for t in str(form.get("tags", "")).split(",") if t.strip()],
                  "comment": str(form.get("comment", "")).strip()}
    if form.get("choice"):
        data["choice"] = form.get("choice")
    if form.get("strength"):
        data["strength"] = form.get("strength")
    ratings = {k.split(":", 1)[1]: v for k, v in form.multi_items() if k.startswith("rating:")}
    if ratings or form.get("kind") == "rating":
        data["ratings"] = ratings
    if "edited" in form:
        data["edited"] = str(form.get("edited")).replace("\r\n", "\n")
    try:
        data["duration_ms"] = max(0, int((time.time() - float(form.get("shown_at", ""))) * 1000))
    except ValueError:
        pass
    return data


@router.post("/projects/{project_id}/label")
async def label_submit(request: Request, project_id: int, session: Session, store: StoreDep):
    user, csrf = session
    form = await request.form()
    _check_csrf(form.get("csrf"), csrf)
    data = _form_label(form)
    try:
        body = LabelCreate.model_validate(data)
        await run_in_threadpool(submit, store, user, body)
    except (ValidationError, ApiError) as err:
        message = pydantic_message(err.errors()) if isinstance(err, ValidationError) else err.detail
        status = 422 if isinstance(err, ValidationError) else err.status
        try:
            item = await run_in_threadpool(store.item_for, user=user, item_id=int(form.get("item_id", "0")))
        except (ApiError, ValueError):
            item = None
        return await run_in_threadpool(_label_page, request, store, user, csrf, project_id, item, message,
                                       str(form.get("client_key") or "") or None, status)
    return RedirectResponse(f"/projects/{project_id}?saved=1", status_code=303)


@router.post("/projects/{project_id}/skip")
def skip(project_id: int, session: Session, store: StoreDep, csrf: Annotated[str, Form(max_length=100)],
         item_id: Annotated[int, Form()]):
    user, expected = session
    _check_csrf(csrf, expected)
    store.item_for(user=user, item_id=item_id)
    store.release(user=user, item_id=item_id)
    return RedirectResponse(f"/projects/{project_id}", status_code=303)


@router.get("/projects/{project_id}/mine")
def my_labels(request: Request, project_id: int, session: Session, store: StoreDep):
    user, csrf = session
    project = store.project_for(user=user, project_id=project_id)
    labels = store.labels(project_id=project_id, user_id=user.id)
    items = {it["id"]: it for it in store.items(project_id=project_id)} if labels else {}
    return _render(request, "mine.html", user=user, csrf=csrf, project=project,
                   rows=[(lab, items.get(lab["item_id"])) for lab in reversed(labels)])


@router.get("/admin")
def admin(request: Request, session: Session, store: StoreDep):
    user, csrf = session
    if not user.is_admin:
        raise ApiError(403, "admin role required")
    projects = []
    for p in store.list_projects(user=user):
        labels = store.labels(project_id=p.id)
        projects.append({"project": p, "progress": store.progress(project_id=p.id),
                         "annotators": store.annotator_stats(project_id=p.id),
                         "agreement": agreement.project_agreement(labels)})
    return _render(request, "admin.html", user=user, csrf=csrf, projects=projects, users=store.list_users())
