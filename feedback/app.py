"""The labeling web app (`tidal label serve DIR`): a Starlette app over a FeedbackStore.

Pages: /login (token -> session cookie), /label (labelers), /admin (researchers, admin token).
API (JSON, same origin): GET /api/me, GET /api/next, POST /api/submit, GET /api/stats,
GET /export/{rankings|comparisons|ratings}. Every POST needs the session's CSRF token
(X-CSRF-Token header, or the form field `csrf`); the login form uses a double-submit cookie.
Model text only ever reaches the page as JSON that the page's script puts in with textContent,
and the Content-Security-Policy allows no inline script, so a completion cannot run code.
"""

from __future__ import annotations

import hmac
import html
import json
import random
import secrets
from pathlib import Path
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from tidal.common.web import BodyTooLarge, drain, read_body
from tidal.feedback import export, stats
from tidal.feedback.store import FeedbackError, FeedbackStore

STATIC = Path(__file__).parent / "static"
SESSION_COOKIE, LOGIN_COOKIE = "tidal_session", "tidal_login_csrf"
MAX_BODY_BYTES = 256 * 1024  # a label is a few hundred bytes; nothing here needs more
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-store",
}


def display_order(task_id: int, labeler_id: int, k: int) -> list[int]:
    """perm[slot] = stored index of the response shown at `slot`: random per (task, labeler), so
    neither the source nor the order the tasks were written in shows, and a reload keeps it."""
    return random.Random(f"{task_id}:{labeler_id}").sample(range(k), k)


def _json(payload, status: int = 200) -> JSONResponse:
    return JSONResponse(payload, status_code=status, headers=SECURITY_HEADERS)


def _page(name: str, status: int = 200, **values: str) -> HTMLResponse:
    text = (STATIC / name).read_text(encoding="utf-8")
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", html.escape(value))
    return HTMLResponse(text, status_code=status, headers=SECURITY_HEADERS)


class LabelApp:
    """The app's request handlers over one store; `routes()` wires them."""

    def __init__(self, store: FeedbackStore, max_body_bytes: int = MAX_BODY_BYTES):
        self.store, self.max_body_bytes = store, max_body_bytes

    async def session(self, request: Request) -> dict | None:
        sid = request.cookies.get(SESSION_COOKIE)
        return None if not sid else await run_in_threadpool(self.store.session, sid)

    async def body_or_error(self, request: Request) -> bytes | Response:
        try:
            return await read_body(request, self.max_body_bytes)
        except BodyTooLarge as e:
            await drain(request)
            return _json({"error": f"body of {e.args[0]} bytes is over the limit of {self.max_body_bytes}"}, 413)

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
            return _json({"error": "not logged in, or the CSRF token is missing"}, 403)
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

    async def me(self, request: Request) -> Response:
        sess = await self.session(request)
        if sess is None:
            return _json({"error": "log in first"}, 401)
        prog = await run_in_threadpool(self.store.progress, sess["labeler_id"])
        return _json({"name": sess["name"], "admin": sess["is_admin"], "csrf": sess["csrf"],
                      "flags": list(self.store.settings.flags), "progress": prog})

    async def next_task(self, request: Request) -> Response:
        sess = await self.session(request)
        if sess is None:
            return _json({"error": "log in first"}, 401)
        task = await run_in_threadpool(self.store.next_task, sess["labeler_id"])
        prog = await run_in_threadpool(self.store.progress, sess["labeler_id"])
        if task is None:
            return _json({"task": None, "progress": prog})
        perm = display_order(task.id, sess["labeler_id"], len(task.responses))
        return _json({"task": {"id": task.id, "prompt": task.prompt,
                               "responses": [{"slot": s, "text": task.responses[i].text} for s, i in enumerate(perm)]},
                      "progress": prog})

    async def submit(self, request: Request) -> Response:
        sess = await self.session(request)
        if sess is None:
            await drain(request)
            return _json({"error": "log in first"}, 401)
        if not self.csrf_ok(sess, request):
            await drain(request)
            return _json({"error": "missing or wrong X-CSRF-Token header"}, 403)
        body = await self.body_or_error(request)
        if isinstance(body, Response):
            return body
        def store_label(req) -> tuple[int, bool]:  # in a worker thread: SQLite blocks
            return self.store.submit(sess["labeler_id"], **_to_stored(req, sess["labeler_id"], self.store))

        try:
            label_id, new = await run_in_threadpool(store_label, json.loads(body))
        except (ValueError, TypeError, KeyError) as e:  # FeedbackError is a ValueError
            status = 409 if isinstance(e, FeedbackError) and "already" in str(e) else 400
            return _json({"error": str(e) if isinstance(e, FeedbackError) else f"malformed submission: {e}"}, status)
        prog = await run_in_threadpool(self.store.progress, sess["labeler_id"])
        return _json({"label_id": label_id, "duplicate": not new, "progress": prog})

    async def api_stats(self, request: Request) -> Response:
        sess = await self.session(request)
        if sess is None or not sess["is_admin"]:
            return _json({"error": "the researcher API needs an admin session"}, 401 if sess is None else 403)

        def compute() -> dict:
            return stats.summary(self.store.labels(), self.store.tasks(), self.store.settings.flags, self.store.counts())
        return _json(await run_in_threadpool(compute))

    async def export_file(self, request: Request) -> Response:
        sess = await self.session(request)
        if sess is None or not sess["is_admin"]:
            return _json({"error": "exports need an admin session"}, 401 if sess is None else 403)
        fmt = request.path_params["fmt"]
        if fmt not in export.FORMATS:
            return _json({"error": f"unknown format {fmt!r}; choose one of {', '.join(export.FORMATS)}"}, 404)
        rows = await run_in_threadpool(export.export_rows, self.store, fmt)
        return Response(export.to_jsonl(rows), media_type="application/jsonl",
                        headers={**SECURITY_HEADERS, "Content-Disposition": f'attachment; filename="{fmt}.jsonl"'})

    def routes(self) -> list:
        return [
            Route("/", self.page), Route("/label", self.page), Route("/admin", self.page),
            Route("/login", self.login_page, methods=["GET"]), Route("/login", self.login, methods=["POST"]),
            Route("/logout", self.logout, methods=["POST"]),
            Route("/api/me", self.me), Route("/api/next", self.next_task),
            Route("/api/submit", self.submit, methods=["POST"]),
            Route("/api/stats", self.api_stats), Route("/export/{fmt}", self.export_file),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ]


def build_app(store: FeedbackStore, max_body_bytes: int = MAX_BODY_BYTES) -> Starlette:
    return Starlette(routes=LabelApp(store, max_body_bytes).routes())


def _to_stored(req: dict, labeler_id: int, store: FeedbackStore) -> dict:
    """Maps a page submission (by display slot) onto the task's stored response order."""
    if not isinstance(req, dict):
        raise FeedbackError("the body must be a JSON object")
    task_id, sub_id = req.get("task_id"), req.get("submission_id")
    if not isinstance(task_id, int):
        raise FeedbackError("'task_id' must be a task number")
    if req.get("skip_reason") is not None:
        if not isinstance(req["skip_reason"], str):
            raise FeedbackError("'skip_reason' must be a string")
        return {"submission_id": sub_id, "task_id": task_id, "skip_reason": req["skip_reason"][:500]}
    task = store.tasks_by_id([task_id]).get(task_id)
    if task is None:
        raise FeedbackError(f"no task {task_id}")
    k = len(task.responses)
    perm = display_order(task_id, labeler_id, k)
    order = req.get("order")
    if not isinstance(order, list) or sorted(x for x in order if isinstance(x, int)) != list(range(k)):
        raise FeedbackError(f"'order' must list the {k} display slots best to worst")
    ranking = [0] * k
    for rank, slot in enumerate(order):
        ranking[perm[slot]] = rank
    likert, flags = req.get("likert"), req.get("flags")
    if likert is not None:
        if not isinstance(likert, list) or len(likert) != k:
            raise FeedbackError(f"'likert' must hold one score per display slot ({k})")
        likert = [likert[perm.index(i)] for i in range(k)]
    if flags is not None:
        if not isinstance(flags, list) or len(flags) != k:
            raise FeedbackError(f"'flags' must hold one list per display slot ({k})")
        flags = [flags[perm.index(i)] for i in range(k)]
    comment = req.get("comment")
    if comment is not None and not isinstance(comment, str):
        raise FeedbackError("'comment' must be a string")
    return {"submission_id": sub_id, "task_id": task_id, "ranking": ranking, "likert": likert, "flags": flags,
            "comment": (comment or "")[:5000] or None}
