"""The annotation web app: `create_app(settings)` builds the FastAPI application (a factory, so tests pass settings).

    rlhfkit annotate serve db=feedback.db port=8000         # uvicorn, see rlhfkit/annotate/cli.py
    app = create_app(Settings(db="sqlite:///tmp/fb.db"))   # in tests: fastapi.testclient.TestClient(app)

Before routing, `GuardMiddleware` (plain ASGI) refuses oversized bodies (413, without reading past the limit),
authenticates every /api/ request (401 without a valid `Authorization: Bearer TOKEN` or session cookie; a cookie
login must also send the X-CSRF-Token header on writes, 403) and adds security headers to every response (a
Content-Security-Policy that forbids inline scripts, so an escaped-or-not model output can never run script).
"""

from __future__ import annotations

import json
from contextlib import asynccontextmanager
from http.cookies import CookieError, SimpleCookie
from pathlib import Path

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from rlhfkit.annotate import security
from rlhfkit.annotate.errors import ApiError
from rlhfkit.annotate.schemas import pydantic_message
from rlhfkit.annotate.settings import Settings
from rlhfkit.annotate.store import Store
from rlhfkit.errors import UserError

HERE = Path(__file__).parent
SESSION_COOKIE = "rlhfkit_session"
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                 b"object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"x-frame-options", b"DENY"),
]


class LoginRequired(Exception):
    """Raised by HTML routes without a session: redirects to the login page."""


def read_cookie(headers: dict, name: str) -> str | None:
    raw = headers.get(b"cookie")
    if not raw:
        return None
    try:
        jar = SimpleCookie(raw.decode("latin-1"))
    except CookieError:
        return None
    return jar[name].value if name in jar else None


async def _send_json(send, status: int, detail: str, extra_headers: list | None = None) -> None:
    body = json.dumps({"detail": detail}).encode("utf-8")
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status,
                "headers": headers + SECURITY_HEADERS + (extra_headers or [])})
    await send({"type": "http.response.body", "body": body})


class GuardMiddleware:
    def __init__(self, app, store: Store, settings: Settings):
        self.app, self.store, self.settings = app, store, settings

    def _authenticate(self, headers: dict) -> tuple:
        auth = headers.get(b"authorization", b"").decode("latin-1")
        if auth:
            scheme, _, token = auth.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return self.store.user_by_token(token.strip()), "token", None
            return None, "token", None
        sid = read_cookie(headers, SESSION_COOKIE)
        if sid:
            found = self.store.user_by_session(sid)
            if found:
                return found[0], "session", found[1]
        return None, None, None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        limit = self.settings.max_body_bytes
        length = headers.get(b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                return await _send_json(send, 400, "bad Content-Length header")
            if n > limit:
                return await _send_json(send, 413, f"request body too large ({n} bytes; the limit is {limit})")
        if scope["method"] not in SAFE_METHODS:
            chunks, size = [], 0
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    return await _send_json(send, 413, f"request body too large (over the limit of {limit} bytes)")
                chunks.append(chunk)
                if not message.get("more_body"):
                    break
            body, delivered = b"".join(chunks), False

            async def replay():
                nonlocal delivered
                if not delivered:
                    delivered = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            receive = replay
        path = scope["path"]
        if path == "/api" or path.startswith("/api/"):
            try:
                user, via, csrf = await anyio.to_thread.run_sync(self._authenticate, headers)
            except OperationalError:
                return await _send_json(send, 503, "database unavailable, retry shortly", [(b"retry-after", b"1")])
            if user is None:
                detail = ("invalid API token" if via == "token" else
                          "authentication required: send 'Authorization: Bearer TOKEN' or log in")
                return await _send_json(send, 401, detail, [(b"www-authenticate", b"Bearer")])
            if via == "session" and scope["method"] not in SAFE_METHODS:
                sent = headers.get(b"x-csrf-token", b"").decode("latin-1")
                if not sent or not security.same(sent, csrf):
                    return await _send_json(send, 403, "missing or wrong X-CSRF-Token header (required for "
                                                       "writes with a cookie login)")
            scope.setdefault("state", {})["user"] = user

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": list(message.get("headers", [])) + SECURITY_HEADERS}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _is_api(request: Request) -> bool:
    return request.url.path == "/api" or request.url.path.startswith("/api/")


def _error(request: Request, status: int, detail: str, headers: dict | None = None):
    if _is_api(request):
        return JSONResponse({"detail": detail}, status_code=status, headers=headers)
    templates = request.app.state.templates
    return templates.TemplateResponse(request, "error.html", {"status": status, "detail": detail,
                                                              "user": getattr(request.state, "user", None)},
                                      status_code=status, headers=headers)


def create_app(settings: Settings | None = None, store: Store | None = None) -> FastAPI:
    settings = settings or Settings.from_env()
    own_store = store is None
    store = store or Store(settings.db, pool_size=settings.pool_size, sqlite_synchronous=settings.sqlite_synchronous)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        if own_store:
            store.close()

    app = FastAPI(title=settings.title, lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.store = store
    app.state.settings = settings
    app.state.login_limiter = security.LoginLimiter(settings.login_max_failures, settings.login_window_s)
    app.state.templates = Jinja2Templates(directory=str(HERE / "templates"))
    app.add_middleware(GuardMiddleware, store=store, settings=settings)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError):
        return _error(request, err.status, err.detail)

    @app.exception_handler(UserError)
    async def _user_error(request: Request, err: UserError):
        return _error(request, 422, str(err))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, err: RequestValidationError):
        return _error(request, 422, pydantic_message(err.errors()))

    @app.exception_handler(OperationalError)
    async def _db_down(request: Request, err: OperationalError):
        return _error(request, 503, "database busy or unavailable, retry shortly", {"Retry-After": "1"})

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException):
        return _error(request, err.status_code, str(err.detail), getattr(err, "headers", None))

    @app.exception_handler(LoginRequired)
    async def _login(request: Request, err: LoginRequired):
        return RedirectResponse(f"/login?next={request.url.path}", status_code=303)

    from rlhfkit.annotate.routes import labels, projects, tasks, ui, users

    for module in (users, projects, tasks, labels):
        app.include_router(module.router)
    app.include_router(ui.router)
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict:
        return {"ok": True, "schema_version": store.schema_version()}

    return app
