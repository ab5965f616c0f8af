"""The labeling web app (`tidal label serve DIR`): a Starlette app over a FeedbackStore.

Pages: /login (token -> session cookie), /label (labelers), /admin (researchers, admin token).
API (JSON, same origin): GET /api/me, GET /api/next, POST /api/submit (a label, a skip, or an
edit of an own label), GET /api/labels/{id} (an own label, to edit it); for admins GET /api/stats,
GET /api/tasks?offset=&limit=, GET /api/tasks/{id} (a task with every label version) and
GET /export/{rankings|comparisons|ratings}. Every POST needs the session's CSRF token
(X-CSRF-Token header, or the form field `csrf`); the login form uses a double-submit cookie.
Model text only ever reaches the page as JSON that the page's script puts in with textContent,
and the Content-Security-Policy allows no inline script, so a completion cannot run code.
Every error is JSON {"error"}: 400 a malformed request, 401/403 auth, 404/405, 409 the store's
state (already labeled, task not leased to you, edit window over), 413 a body over the limit,
507 a full disk and 503 a store that cannot be used, 500 anything else (no traceback).
"""

from __future__ import annotations

import hmac
import html
import secrets
from pathlib import Path
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from tidal.common.web import BadJSON, BodyTooLarge, drain, error_handlers, parse_json, read_body
from tidal.feedback import export, lineage, stats
from tidal.feedback.page import label_view, task_view, to_stored
from tidal.feedback.store import FeedbackError, FeedbackStore

STATIC = Path(__file__).parent / "static"
SESSION_COOKIE, LOGIN_COOKIE = "tidal_session", "tidal_login_csrf"
MAX_BODY_BYTES = 256 * 1024  # a label is a few hundred bytes; nothing here needs more
PAGE_SIZE = 50  # tasks per page of the researcher's task list (the most a request may ask: 500)
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-store",
}


def _json(payload, status: int = 200) -> JSONResponse:
    return JSONResponse(payload, status_code=status, headers=SECURITY_HEADERS)


def _error(status: int, message: str) -> JSONResponse:
    return _json({"error": message}, status)


def _page(name: str, status: int = 200, **values: str) -> HTMLResponse:
    text = (STATIC / name).read_text(encoding="utf-8")
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", html.escape(value))
    return HTMLResponse(text, status_code=status, headers=SECURITY_HEADERS)


async def _store_error(request: Request, exc: FeedbackError) -> Response:
    return _error(exc.status, str(exc))


class LabelApp:
    """The app's request handlers over one store; `routes()` wires them."""

    def __init__(self, store: FeedbackStore, max_body_bytes: int = MAX_BODY_BYTES):
        self.store, self.max_body_bytes = store, max_body_bytes

    async def session(self, request: Request) -> dict | None:
        sid = request.cookies.get(SESSION_COOKIE)
        return None if not sid else await run_in_threadpool(self.store.session, sid)

    async def user(self, request: Request, admin: bool = False) -> dict | Response:
        """The request's session, or the 401/403 answer to give instead."""
        sess = await self.session(request)
        if sess is None:
            return _error(401, "log in first")
        if admin and not sess["is_admin"]:
            return _error(403, "the researcher API and exports need an admin session")
        return sess

    async def body_or_error(self, request: Request) -> bytes | Response:
        try:
            return await read_body(request, self.max_body_bytes)
        except BodyTooLarge as e:
            await drain(request)
            return _error(413, f"body of {e.args[0]} bytes is over the limit of {self.max_body_bytes}")

    def csrf_ok(self, sess: dict, request: Request, form: dict | None = None) -> bool:
        sent = request.headers.get("x-csrf-token") or (form or {}).get("csrf", "")
        return bool(sent) and hmac.compare_digest(sent.encode(), sess["csrf"].encode())

    async def login_page(self, request: Request, status: int = 200, error: str = "") -> Response:
        pre = secrets.token_urlsafe(16)
        resp = _page("login.html", status, csrf=pre, error=error)
        resp.set_cookie(LOGIN_COOKIE, pre, httponly=True, samesite="strict", max_age=3600)
        return resp

    async def login(self, request: Request) -> Response:
        body = await self.body_or_error(request)
        if isinstance(body, Response):
            return body
        form = {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}
        pre = request.cookies.get(LOGIN_COOKIE, "")
        if not pre or not hmac.compare_digest(form.get("csrf", "").encode(), pre.encode()):
            return await self.login_page(request, 403, "The form expired; please try again.")
        got = await run_in_threadpool(self.store.login, form.get("token", "").strip())
        if got is None:
            return await self.login_page(request, 401, "That token is not valid.")
        sid, _ = got
        sess = await run_in_threadpool(self.store.session, sid)
        resp = RedirectResponse("/admin" if sess["is_admin"] else "/label", status_code=303, headers=SECURITY_HEADERS)
        resp.set_cookie(SESSION_COOKIE, sid, httponly=True, samesite="strict", max_age=int(self.store.settings.session_s))
        resp.delete_cookie(LOGIN_COOKIE)
        return resp

    async def logout(self, request: Request) -> Response:
        sess = await self.session(request)
        body = await self.body_or_error(request)
        if isinstance(body, Response):
            return body
        form = {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}
        if sess is None or not self.csrf_ok(sess, request, form):
            return _error(403, "not logged in, or the CSRF token is missing")
        await run_in_threadpool(self.store.logout, request.cookies[SESSION_COOKIE])
        resp = RedirectResponse("/login", status_code=303, headers=SECURITY_HEADERS)
        resp.delete_cookie(SESSION_COOKIE)
        return resp

    async def page(self, request: Request) -> Response:
        sess = await self.session(request)
        if sess is None:
            return RedirectResponse("/login", status_code=303)
        if request.url.path == "/admin":
            if not sess["is_admin"]:
                return _page("login.html", 403, csrf="", error="The researcher page needs an admin token.")
            return _page("admin.html")
        if request.url.path == "/":
            return RedirectResponse("/admin" if sess["is_admin"] else "/label", status_code=303)
        return _page("label.html")

    async def progress(self, sess: dict) -> dict:
        return await run_in_threadpool(self.store.progress, sess["labeler_id"], sess["session"])

    async def me(self, request: Request) -> Response:
        sess = await self.user(request)
        if isinstance(sess, Response):
            return sess
        s = self.store.settings
        return _json({"name": sess["name"], "admin": sess["is_admin"], "csrf": sess["csrf"], "flags": list(s.flags),
                      "likert": s.likert, "edit_s": s.edit_s, "guidelines": s.guidelines,
                      "progress": await self.progress(sess)})

    async def next_task(self, request: Request) -> Response:
        sess = await self.user(request)
        if isinstance(sess, Response):
            return sess
        task = await run_in_threadpool(self.store.next_task, sess["labeler_id"])
        return _json({"task": None if task is None else task_view(task, sess["labeler_id"]),
                      "progress": await self.progress(sess)})

    async def submit(self, request: Request) -> Response:
        sess = await self.user(request)
        if isinstance(sess, Response):
            await drain(request)
            return sess
        if not self.csrf_ok(sess, request):
            await drain(request)
            return _error(403, "missing or wrong X-CSRF-Token header")
        body = await self.body_or_error(request)
        if isinstance(body, Response):
            return body
        try:
            req = parse_json(body)
        except BadJSON as e:
            return _error(400, f"malformed submission: {e}")

        def store_label() -> tuple[int, bool]:  # in a worker thread: SQLite blocks
            task_id = req.get("task_id") if isinstance(req, dict) else None
            task = self.store.tasks_by_id([task_id]).get(task_id) if type(task_id) is int else None
            stored = to_stored(req, sess["labeler_id"], task, self.store.settings)
            return self.store.submit(sess["labeler_id"], session=sess["session"], **stored)

        label_id, new = await run_in_threadpool(store_label)  # a FeedbackError answers with its status
        label = await run_in_threadpool(self.store.label, label_id)
        return _json({"label_id": label_id, "duplicate": not new, "editable_until": self.editable_until(label),
                      "progress": await self.progress(sess)})

    def editable_until(self, label) -> float | None:
        edit_s = self.store.settings.edit_s
        return None if label is None or edit_s <= 0 or label.superseded_at is not None else label.first_at + edit_s

    async def own_label(self, request: Request) -> Response:
        """GET /api/labels/{id}: the labeler's own label with its task, as the page shows them."""
        sess = await self.user(request)
        if isinstance(sess, Response):
            return sess
        label = await run_in_threadpool(self.store.label, _path_int(request, "label_id"))
        if label is None or label.labeler != sess["name"]:
            return _error(404, "no such label of yours")
        task = (await run_in_threadpool(self.store.tasks_by_id, [label.task_id]))[label.task_id]
        return _json({"task": task_view(task, sess["labeler_id"]),
                      "label": label_view(label, sess["labeler_id"], len(task.responses)),
                      "editable_until": self.editable_until(label)})

    async def api_stats(self, request: Request) -> Response:
        sess = await self.user(request, admin=True)
        if isinstance(sess, Response):
            return sess

        def compute() -> dict:
            settings = self.store.settings
            return {**stats.summary(self.store.labels(), self.store.tasks(), settings.flags, self.store.counts(),
                                    settings.min_reliability), "versions": lineage.per_version(self.store)}
        return _json(await run_in_threadpool(compute))

    async def api_tasks(self, request: Request) -> Response:
        """GET /api/tasks?offset=&limit=: one page of the task list (admins)."""
        sess = await self.user(request, admin=True)
        if isinstance(sess, Response):
            return sess
        offset = _query_int(request, "offset", 0, 0, 10**12)
        limit = _query_int(request, "limit", PAGE_SIZE, 1, 500)
        return _json({"offset": offset, "limit": limit, **await run_in_threadpool(self.store.task_page, offset, limit)})

    async def api_task(self, request: Request) -> Response:
        """GET /api/tasks/{id}: a task in stored order with sources, and every version of its labels (admins)."""
        sess = await self.user(request, admin=True)
        if isinstance(sess, Response):
            return sess
        task_id = _path_int(request, "task_id")
        task = (await run_in_threadpool(self.store.tasks_by_id, [task_id])).get(task_id)
        if task is None:
            return _error(404, f"no task {task_id}")
        labels = await run_in_threadpool(lambda: self.store.labels(task_id, history=True))
        return _json({"task": {"id": task.id, "prompt": task.prompt, "want": task.want_labels, "gold": task.gold_ranking,
                               "responses": [r.__dict__ for r in task.responses], "meta": task.meta},
                      "labels": [lab.__dict__ for lab in labels]})

    async def export_file(self, request: Request) -> Response:
        sess = await self.user(request, admin=True)
        if isinstance(sess, Response):
            return sess
        fmt = request.path_params["fmt"]
        if fmt not in export.FORMATS:
            return _error(404, f"unknown format {fmt!r}; choose one of {', '.join(export.FORMATS)}")
        rows = await run_in_threadpool(export.export_rows, self.store, fmt)
        return Response(export.to_jsonl(rows), media_type="application/jsonl",
                        headers={**SECURITY_HEADERS, "Content-Disposition": f'attachment; filename="{fmt}.jsonl"'})

    def routes(self) -> list:
        return [
            Route("/", self.page), Route("/label", self.page), Route("/admin", self.page),
            Route("/login", self.login_page, methods=["GET"]), Route("/login", self.login, methods=["POST"]),
            Route("/logout", self.logout, methods=["POST"]),
            Route("/api/me", self.me), Route("/api/next", self.next_task),
            Route("/api/submit", self.submit, methods=["POST"]), Route("/api/labels/{label_id}", self.own_label),
            Route("/api/stats", self.api_stats), Route("/api/tasks", self.api_tasks),
            Route("/api/tasks/{task_id}", self.api_task), Route("/export/{fmt}", self.export_file),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ]


def _path_int(request: Request, name: str) -> int:
    value = request.path_params[name]
    if not value.isdigit() or len(value) > 18:
        raise FeedbackError(f"{request.url.path}: '{value}' is not an id")
    return int(value)


def _query_int(request: Request, name: str, default: int, low: int, high: int) -> int:
    value = request.query_params.get(name)
    if value is None:
        return default
    if not value.isdigit() or not low <= int(value[:19]) <= high:
        raise FeedbackError(f"query parameter {name}={value[:40]!r}: expected a whole number from {low} to {high}")
    return int(value)


def build_app(store: FeedbackStore, max_body_bytes: int = MAX_BODY_BYTES) -> Starlette:
    handlers = {**error_handlers(_error, "the pages /login, /label, /admin or the /api endpoints (docs/feedback.md)"),
                FeedbackError: _store_error}
    return Starlette(routes=LabelApp(store, max_body_bytes).routes(), exception_handlers=handlers)
