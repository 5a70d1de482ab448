"""The web app: static page and JSON API over the desk, with a Content-Security-Policy, a Host check and
token authentication."""

from pathlib import Path

from align.annotate.desk import Desk, Refused
from data_schemas.rankings import Submission

RESOURCES = Path(__file__).resolve().parent.parent / "resources" / "annotate"


STATIC = {  # the only files the server hands out: no path from a request ever reaches the file system
    "annotate.js": "text/javascript",
    "organiser.js": "text/javascript",
    "common.js": "text/javascript",
    "style.css": "text/css",
}


MAX_BODY = 64 * 1024  # bytes of a request body: a judgment with a 2,000-character note is under 10 KiB
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def make_app(desk: Desk, allowed_hosts: list[str] | None = None):
    """The HTTP layer over a desk (a FastAPI app): two static pages and a small JSON API behind bearer tokens.
    (This module has no `from __future__ import annotations`: FastAPI reads the route annotations below, which
    name classes imported here, where the import costs nothing until a server starts.)"""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    app = FastAPI(title="align annotate", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts or ["127.0.0.1", "localhost"])

    @app.middleware("http")
    async def gatekeeper(request: Request, call_next):
        """Before any body is read (issue 34 B15: 150-300 MB bodies were read, then refused with 400): the token,
        a JSON content type (a cross-site `text/plain` POST needs no preflight) and the declared size; a body
        sent without a size is counted as it arrives and cut off at MAX_BODY."""
        if request.method == "POST":
            if desk.tokens.who(_bearer(request)) is None:
                return JSONResponse({"error": "no valid token: open the link `align annotate add-annotator` "
                                     "printed for you"}, status_code=401)  # fmt: skip
            if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
                return JSONResponse({"error": "send the judgment as application/json"}, status_code=415)
            declared = request.headers.get("content-length")
            if declared is None or not declared.isdigit() or int(declared) > MAX_BODY:
                return JSONResponse({"error": f"the body must declare its size, at most {MAX_BODY} bytes"},
                                    status_code=413)  # fmt: skip
        return await call_next(request)

    @app.middleware("http")
    async def headers(request: Request, call_next):
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Cache-Control"] = "no-store"
        return response

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError):
        said = []
        for e in exc.errors()[:3]:
            where = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "request"
            said.append(f"{where}: {e.get('msg', 'invalid')}")
        return JSONResponse({"error": "; ".join(said) or "invalid request"}, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(Refused)
    async def refused(request: Request, exc: Refused):
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    def who(request: Request, role: str = "annotator") -> str:
        found = desk.tokens.who(_bearer(request))
        if found is None:
            raise Refused(401, "no valid token: open the link `align annotate add-annotator` printed for you")
        if role == "organiser" and found[1] != "organiser":
            raise Refused(403, "this page is for the organiser (add-annotator --organiser)")
        return found[0]

    @app.get("/")
    def page():
        return FileResponse(RESOURCES / "annotate.html", media_type="text/html")

    @app.get("/organiser")
    def organiser_page():
        return FileResponse(RESOURCES / "organiser.html", media_type="text/html")

    @app.get("/static/{name}")
    def static(name: str):
        if name not in STATIC:
            raise Refused(404, "no such file")
        return FileResponse(RESOURCES / name, media_type=STATIC[name])

    @app.get("/api/health")
    def health():
        return {"ok": True, "samples_ready": len(desk.samples)}

    @app.get("/api/next")
    def next_prompt(request: Request):
        return desk.next_for(who(request))

    @app.post("/api/judgments")
    def judge(request: Request, judgment: Submission):
        return desk.submit(who(request), judgment)

    @app.get("/api/stats")
    def stats(request: Request):
        who(request, "organiser")
        return desk.stats()

    return app


def _bearer(request) -> str | None:
    auth = request.headers.get("authorization", "")
    return auth[7:].strip() if auth.lower().startswith("bearer ") else None
