"""HTTP behaviour: authentication and roles, bad requests (4xx with a message, never 500, never a partial write),
CSRF, escaping of untrusted model output."""

from __future__ import annotations

import re

import pytest

ADMIN_PATHS = [("GET", "/api/users"), ("POST", "/api/users"), ("POST", "/api/projects"),
               ("POST", "/api/projects/1/items"), ("POST", "/api/projects/1/members"),
               ("GET", "/api/projects/1/stats"), ("GET", "/api/projects/1/agreement"),
               ("GET", "/api/projects/1/export"), ("POST", "/api/users/ann2/deactivate"),
               ("POST", "/api/users/ann2/activate"), ("POST", "/api/users/ann1/token")]  # (rotates ann1's: last)


OTHER_PATHS = [("GET", "/api/me"), ("GET", "/api/projects"), ("POST", "/api/labels"), ("POST", "/api/projects/1/next"),
               ("GET", "/api/labels?project_id=1"), ("POST", "/api/tasks/1/release"), ("GET", "/api/does-not-exist"),
               ("DELETE", "/api/x/y"), ("GET", "/api")]


def test_every_api_path_needs_credentials(app):
    app.cookies.set("rlhfkit_session", "forged")
    for method, path in ADMIN_PATHS + OTHER_PATHS:
        for headers in ({}, {"Authorization": "Bearer wrong-token"}, {"Authorization": "Basic abc"}):
            r = app.request(method, path, headers=headers, json={})
            assert r.status_code == 401, (method, path, headers, r.text)
            assert r.json()["detail"] and r.headers["www-authenticate"] == "Bearer"
    assert app.get("/api/does-not-exist", headers=app.hdr("ann1")).status_code == 404  # with credentials


def test_annotator_gets_403_on_admin_paths(app):
    for method, path in ADMIN_PATHS:
        r = app.request(method, path, headers=app.hdr("ann1"), json={})
        assert r.status_code == 403 and "admin" in r.json()["detail"], (method, path)
        assert app.request(method, path, headers=app.hdr("admin"), json={}).status_code != 403


def test_annotators_see_only_their_projects_and_labels(app):
    a1, a2, a3 = app.hdr("ann1"), app.hdr("ann2"), app.hdr("ann3")
    pid = app.project.id
    assert [p["name"] for p in app.get("/api/projects", headers=a1).json()] == ["p"]
    assert app.get("/api/projects", headers=a3).json() == []
    assert app.post(f"/api/projects/{pid}/next", headers=a3).status_code == 404  # not a member
    other = app.store.get_project(name="other").id
    assert app.post(f"/api/projects/{other}/next", headers=a1).status_code == 404
    task = app.post(f"/api/projects/{pid}/next", headers=a1).json()["task"]
    assert "gold" not in task and "n_labels" not in task
    r = app.post("/api/labels", headers=a1, json={"item_id": task["item_id"], "client_key": "c1", "choice": "A"})
    assert r.status_code == 201 and r.json()["created"] is True
    assert len(app.get(f"/api/labels?project_id={pid}", headers=a1).json()) == 1
    assert app.get(f"/api/labels?project_id={pid}", headers=a2).json() == []  # never another's labels
    # an item in a project you are not in is "not found", even by id
    foreign_item = app.store.items(project_id=other)[0]["id"]
    r = app.post("/api/labels", headers=a1, json={"item_id": foreign_item, "client_key": "c2", "choice": "A"})
    assert r.status_code == 404


def test_submission_is_idempotent_over_http(app):
    a1, pid = app.hdr("ann1"), app.project.id
    task = app.post(f"/api/projects/{pid}/next", headers=a1).json()["task"]
    body = {"item_id": task["item_id"], "client_key": "double-click", "choice": "B", "strength": 3}
    first, second = (app.post("/api/labels", headers=a1, json=body) for _ in range(2))
    assert (first.status_code, second.status_code) == (201, 200)
    assert first.json()["label"]["id"] == second.json()["label"]["id"]
    assert app.store.count_labels(project_id=pid) == 1


def _labels(app):
    return app.store.count_labels()


@pytest.mark.parametrize("body,status,message", [
    ({}, 422, "field 'item_id': required"),
    ({"item_id": "seven", "client_key": "k", "choice": "A"}, 422, "field 'item_id'"),
    ({"item_id": 1, "client_key": "k", "choice": "C"}, 422, "field 'choice'"),
    ({"item_id": 1, "client_key": "k", "choice": "A", "surprise": 1}, 422, "field 'surprise'"),
    ({"item_id": 1, "client_key": "", "choice": "A"}, 422, "field 'client_key'"),
    ({"item_id": 1, "client_key": "k", "choice": "A", "strength": 9}, 422, "field 'strength'"),
    ({"item_id": 1, "client_key": "k", "choice": "A", "tags": ["x" * 60]}, 422, "tag"),
    ({"item_id": 99999, "client_key": "k", "choice": "A"}, 404, "item 99999 not found"),
    ({"item_id": 1, "client_key": "k", "ratings": {"helpful": 3, "fluent": 3}}, 422, "pairwise"),
    ([1, 2], 422, "valid dictionary"),
])
def test_bad_label_requests_are_4xx_and_write_nothing(app, body, status, message):
    a1 = app.hdr("ann1")
    task = app.post(f"/api/projects/{app.project.id}/next", headers=a1).json()["task"]  # a pairwise item
    assert task["kind"] == "pairwise"
    if isinstance(body, dict) and body.get("item_id") == 1:
        body = {**body, "item_id": task["item_id"]}
    before = _labels(app)
    r = app.post("/api/labels", headers=a1, json=body)
    assert r.status_code == status, r.text
    assert message in r.json()["detail"]
    assert _labels(app) == before


def test_malformed_and_oversize_bodies(app):
    a1, admin = app.hdr("ann1"), app.hdr("admin")
    r = app.post("/api/labels", headers={**a1, "Content-Type": "application/json"}, content=b'{"item_id": 1,')
    assert r.status_code == 422 and "not valid JSON" in r.json()["detail"]
    big = {"records": [{"prompt": "p", "completions": ["a" * 300_000, "b"]}]}
    r = app.post(f"/api/projects/{app.project.id}/items", headers=admin, json=big)
    assert r.status_code == 413 and "too large" in r.json()["detail"]

    def chunks():  # no Content-Length: the limit is enforced while reading
        for _ in range(40):
            yield b"x" * 10_000

    r = app.post("/api/labels", headers={**a1, "Content-Type": "application/json"}, content=chunks())
    assert r.status_code == 413
    assert app.store.count_labels() == 0


def test_api_import_is_all_or_nothing(app):
    admin, pid = app.hdr("admin"), app.project.id
    n = len(app.store.items(project_id=pid))
    records = [{"prompt": "fresh", "completions": ["x", "y"]}, {"prompt": "bad", "completions": "not a list"}]
    r = app.post(f"/api/projects/{pid}/items", headers=admin, json={"records": records})
    assert r.status_code == 422 and "records[1]: field 'completions'" in r.json()["detail"]
    assert len(app.store.items(project_id=pid)) == n
    r = app.post(f"/api/projects/{pid}/items", headers=admin, json={"records": records[:1]})
    assert r.json()["added"] == 5  # 1 pair + 2 ratings + 2 edits
    r = app.post(f"/api/projects/{pid}/items", headers=admin, json={"records": records[:1]})
    assert r.json() == {"records": 1, "added": 0, "already_present": 5}


def test_admin_creates_user_and_token_works(app):
    r = app.post("/api/users", headers=app.hdr("admin"), json={"name": "newbie", "projects": ["p"]})
    assert r.status_code == 201
    token = r.json()["token"]
    me = app.get("/api/me", headers={"Authorization": f"Bearer {token}"}).json()
    assert me["name"] == "newbie" and me["role"] == "annotator"
    assert app.post("/api/users", headers=app.hdr("admin"), json={"name": "newbie"}).status_code == 409
    r = app.post("/api/users", headers=app.hdr("admin"), json={"name": "x", "projects": ["nope"]})
    assert r.status_code == 404 and app.store.user_by_name("x") is None


def login(client, name, password):
    page = client.get("/login")
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
    return client.post("/login", data={"name": name, "password": password, "csrf": csrf}, follow_redirects=False)


def test_login_session_and_csrf(app):
    assert app.get("/", follow_redirects=False).headers["location"].startswith("/login")
    assert login(app, "ann1", "wrong").status_code == 401
    # login form without the matching CSRF cookie is refused
    app.get("/login")
    r = app.post("/login", data={"name": "ann1", "password": "pw1", "csrf": "forged"}, follow_redirects=False)
    assert r.status_code == 403
    r = login(app, "ann1", "pw1")
    assert r.status_code == 303 and "rlhfkit_session" in r.cookies
    page = app.get(f"/projects/{app.project.id}")
    assert page.status_code == 200 and 'id="label-form"' in page.text
    item_id = re.search(r'name="item_id" value="(\d+)"', page.text).group(1)
    key = re.search(r'name="client_key" value="([^"]+)"', page.text).group(1)
    # cookie login: a write to the JSON API needs the X-CSRF-Token header, a form needs the csrf field
    r = app.post("/api/labels", json={"item_id": int(item_id), "client_key": key, "choice": "A"})
    assert r.status_code == 403 and "X-CSRF-Token" in r.json()["detail"]
    r = app.post(f"/projects/{app.project.id}/label",
                 data={"item_id": item_id, "client_key": key, "kind": "pairwise", "choice": "A", "csrf": "bad"})
    assert r.status_code == 403
    assert app.store.count_labels() == 0
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
    form = {"item_id": item_id, "client_key": key, "kind": "pairwise", "choice": "A", "strength": "2",
            "csrf": csrf, "tags": "too long, formal", "comment": "fine"}
    r = app.post(f"/projects/{app.project.id}/label", data=form, follow_redirects=False)
    assert r.status_code == 303
    r = app.post(f"/projects/{app.project.id}/label", data=form, follow_redirects=False)  # browser retry
    assert r.status_code == 303
    labels = app.store.labels(project_id=app.project.id)
    assert len(labels) == 1 and labels[0]["tags"] == ["too long", "formal"] and labels[0]["strength"] == 2
    assert app.get("/admin").status_code == 403
    assert app.get("/api/me").json()["name"] == "ann1"  # GETs work with the cookie alone


XSS = ['<script>window.__pwned = 1</script>', '<img src=x onerror="window.__pwned = 2">']


def test_model_output_is_escaped(app):
    admin = app.hdr("admin")
    r = app.post("/api/projects", headers=admin, json={"name": "xss", "kinds": ["pairwise", "edit"], "k": 1})
    pid = r.json()["id"]
    app.post(f"/api/projects/{pid}/items", headers=admin,
             json={"records": [{"prompt": [{"role": "user", "content": XSS[0]}], "completions": XSS}]})
    app.post(f"/api/projects/{pid}/members", headers=admin, json={"user": "ann1"})
    login(app, "ann1", "pw1")
    for _ in range(3):  # the pairwise item and both edit items
        page = app.get(f"/projects/{pid}")
        assert page.status_code == 200
        html = page.text
        for payload in XSS:
            assert payload not in html
        assert "&lt;script&gt;window.__pwned = 1&lt;/script&gt;" in html or "&lt;img src=x" in html
        assert "<script>" not in html.replace('<script src="/static/app.js" defer></script>', "")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        item = re.search(r'name="item_id" value="(\d+)"', html).group(1)
        csrf = re.search(r'name="csrf" value="([^"]+)"', html).group(1)
        key = re.search(r'name="client_key" value="([^"]+)"', html).group(1)
        data = {"item_id": item, "client_key": key, "csrf": csrf, "kind": "x", "comment": XSS[1]}
        data.update({"choice": "A"} if 'data-kind="pairwise"' in html else {"edited": XSS[0] + " fixed"})
        assert app.post(f"/projects/{pid}/label", data=data, follow_redirects=False).status_code == 303
    mine = app.get(f"/projects/{pid}/mine").text
    assert XSS[1] not in mine and "&lt;img src=x onerror=" in mine and XSS[0] not in mine


JUNK = [None, [], "x", 0, -1, 10**30, {"a": {"b": [None]}}, {"name": "x" * 5000}, {"records": [{}]},
        {"records": "x"}, {"item_id": -5, "client_key": "k", "choice": "A"}, {"user": "../../etc"},
        {"name": "ok-name", "kinds": ["nope"]}, {"name": "ok2", "scale_min": 5, "scale_max": 1}]


def test_junk_never_gives_500(app):
    posts = ["/api/users", "/api/projects", "/api/projects/1/items", "/api/projects/999/items",
             "/api/projects/1/members", "/api/labels", "/api/projects/1/next", "/api/projects/abc/next",
             "/api/tasks/999/release", "/api/users/nobody/token"]
    gets = ["/api/projects/999", "/api/projects/1/export?kind=bad", "/api/projects/1/export?min_votes=0",
            "/api/labels?project_id=-1", "/api/labels", "/api/projects/999/stats", "/api/projects/999/agreement"]
    before = (app.store.count_labels(), len(app.store.list_users()))
    for who in ("admin", "ann1"):
        for path in posts:
            for body in JUNK:
                r = app.post(path, headers=app.hdr(who), json=body)
                assert 400 <= r.status_code < 500 or r.status_code in (200, 201), (who, path, body, r.text)
                assert r.status_code < 500
        for path in gets:
            r = app.get(path, headers=app.hdr(who))
            assert 400 <= r.status_code < 500, (who, path, r.text)
            assert isinstance(r.json()["detail"], str)
    # the junk bodies that were valid created nothing unexpected: no labels, no users
    assert (app.store.count_labels(), len(app.store.list_users())) == before


def test_admin_page_shows_progress_and_agreement(app):
    pid = app.project.id
    for who in ("ann1", "ann2"):
        task = app.post(f"/api/projects/{pid}/next", headers=app.hdr(who)).json()["task"]
        app.post("/api/labels", headers=app.hdr(who), json={"item_id": task["item_id"], "client_key": "k",
                                                            "choice": "A"})
    login(app, "admin", "pw-admin")
    page = app.get("/admin")
    assert page.status_code == 200
    assert "ann1 / ann2" in page.text and "Krippendorff" in page.text and "percent agreement 1.0" in page.text
    assert f"/api/projects/{pid}/export?kind=preferences" in page.text
    export = app.get(f"/api/projects/{pid}/export?kind=preferences")  # the link works with the cookie login
    assert export.status_code == 200 and export.headers["x-rows"] == "1"


def test_login_redirect_stays_on_site(app):
    for target, expected in [("/projects/1", "/projects/1"), ("//evil.example", "/"), ("/\\evil.example", "/"),
                             ("https://evil.example", "/")]:
        app.cookies.clear()
        page = app.get("/login")
        csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
        r = app.post("/login", data={"name": "ann1", "password": "pw1", "csrf": csrf, "next": target},
                     follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == expected


def test_login_failures_are_rate_limited_per_name_and_address(app):
    """login_max_failures wrong passwords for a name within the window: the next try, even with the right password,
    is refused (429, Retry-After) without checking it; other names still work until the address itself has 5x as
    many failures; after the window everything works again; a success clears the name's count."""
    now = [1000.0]
    limiter = app.app.state.login_limiter
    limiter.max_failures, limiter.window_s, limiter.clock = 2, 60.0, lambda: now[0]
    assert login(app, "ann1", "pw1").status_code == 303  # a success leaves no count behind
    assert [login(app, "ann1", "bad").status_code for _ in range(2)] == [401, 401]
    r = login(app, "ann1", "pw1")
    assert r.status_code == 429 and "Too many failed logins" in r.text and 0 < int(r.headers["retry-after"]) <= 60
    assert "rlhfkit_session" not in r.cookies
    assert login(app, "ann2", "pw2").status_code == 303  # another account from the same address
    now[0] += 61  # the failures left the window
    assert login(app, "ann1", "pw1").status_code == 303
    assert login(app, "ANN1", "bad").status_code == 401  # names count case-insensitively
    assert login(app, "ann1", "pw1").status_code == 303  # one failure < 2, and the success clears it
    for i in range(8):  # 8 more failures from this address, under other names: 9 in the window, limit 10
        assert login(app, f"nobody{i}", "x").status_code == 401
    assert login(app, "ann2", "bad").status_code == 401  # the 10th failure from this address
    assert login(app, "ann3", "pw3").status_code == 429  # the address is now blocked for every name


def test_login_limiter_by_hand():
    from rlhfkit.annotate.security import LoginLimiter

    t = [0.0]
    lim = LoginLimiter(3, 10.0, clock=lambda: t[0], max_keys=4)
    for k in range(3):
        assert lim.retry_after("a", "ip") == 0.0
        lim.failed("a", "ip")
        t[0] += 1.0
    assert lim.retry_after("a", "ip") == 7.0  # first failure at 0, window 10, now 3
    t[0] = 10.0
    assert lim.retry_after("a", "ip") == 0.0  # the failure at 0 left the window: 2 remain
    lim.succeeded("a")
    assert lim.retry_after("a", "ip") == 0.0
    for name in "bcdef":  # more keys than max_keys: the stalest are dropped, memory stays bounded
        lim.failed(name, "ip2")
    assert len(lim._failures) <= 4
    assert LoginLimiter(0, 10.0).retry_after("a", "ip") == 0.0  # 0 = off


def test_deactivated_user_is_locked_out_at_once_and_labels_stay(app):
    """POST /api/users/{name}/deactivate: the token, the password and an open browser session stop working, the
    user's leased item goes back to the queue (another annotator gets it), its labels stay; activate undoes it."""
    a1, pid = app.hdr("ann1"), app.project.id
    first = app.post(f"/api/projects/{pid}/next", headers=a1).json()["task"]
    assert app.post("/api/labels", headers=a1, json={"item_id": first["item_id"], "client_key": "k1",
                                                     "choice": "A"}).status_code == 201
    leased = app.post(f"/api/projects/{pid}/next", headers=a1).json()["task"]["item_id"]
    assert lease_expiry(app, "ann1", leased) > 0
    browser = login(app, "ann1", "pw1")
    assert browser.status_code == 303 and app.get("/").status_code == 200
    r = app.post("/api/users/ann1/deactivate", headers=app.hdr("admin"))
    assert r.status_code == 200 and r.json() == {"name": "ann1", "active": False, "changed": True}
    assert app.post("/api/users/ann1/deactivate", headers=app.hdr("admin")).json()["changed"] is False
    assert app.get("/api/me", headers=a1).status_code == 401  # token
    assert app.get("/", follow_redirects=False).status_code in (302, 303, 307)  # the session is gone
    assert login(app, "ann1", "pw1").status_code == 401  # password
    assert app.store.count_labels() == 1  # the label stays
    assert lease_expiry(app, "ann1", leased) == 0.0  # the lease was given back (it would run for lease_seconds)
    users = {u["name"]: u["active"] for u in app.get("/api/users", headers=app.hdr("admin")).json()}
    assert users["ann1"] is False and users["ann2"] is True
    assert app.post("/api/users/admin/deactivate", headers=app.hdr("admin")).status_code == 409  # not yourself
    assert app.post("/api/users/nobody/deactivate", headers=app.hdr("admin")).status_code == 404
    assert app.post("/api/users/ann1/deactivate", headers=app.hdr("ann2")).status_code == 403
    assert app.post("/api/users/ann1/activate", headers=app.hdr("admin")).json()["changed"] is True
    assert app.get("/api/me", headers=a1).status_code == 200 and login(app, "ann1", "pw1").status_code == 303


def lease_expiry(app, name: str, item_id: int) -> float:
    from sqlalchemy import select

    from rlhfkit.annotate import tables as T

    A, uid = T.assignments, app.store.user_by_name(name).id
    with app.store._tx() as c:
        return c.execute(select(A.c.expires_at).where(A.c.user_id == uid, A.c.item_id == item_id)).scalar_one()
