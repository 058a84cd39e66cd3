"""The board's HTTP app (Starlette) over a ``RunManager``.

    GET  /                              the page (static/index.html)
    GET  /static/...                    page assets (JS, CSS, vendored uPlot)
    GET  /api/recipes                   built-in recipes + configs, .py/.yaml in the runs folder
    GET  /api/config?recipe=R&config=C  typed form fields for a config + its YAML
    POST /api/validate                  {recipe, config, overrides} -> {errors}
    GET  /api/runs                      every run (status, last step, loss, tokens/s, checkpoints)
    POST /api/runs                      {name, recipe, config, overrides} -> launch `tune run`
    GET  /api/runs/{name}               one run
    GET  /api/runs/{name}/metrics?offset=N   metrics.jsonl rows from byte N on (poll)
    GET  /api/runs/{name}/log           tail of the run's log
    GET  /api/runs/{name}/config[?download=1]  resolved config.yaml
    POST /api/runs/{name}/stop          Ctrl-C the run (SIGKILL after a grace period)

Errors are JSON ``{"errors": [one line each]}`` with status 400 (bad input) or 404.

Security. With a ``token`` (required by `tune board` for any host but loopback) every request,
the page and its assets included, must carry it: ``Authorization: Bearer T``, ``?token=T`` (the
URL printed at start; the answer then sets an HttpOnly SameSite=Strict cookie so the page's
own requests carry it) or that cookie. Without a token (loopback bind) the Host header must
name a loopback host, which defeats DNS rebinding. POSTs must be ``application/json``, so a
cross-site form cannot post (a browser needs a CORS preflight for JSON, which is never granted).
"""

from __future__ import annotations

import asyncio
import hmac
from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from tunelab.cli.board_app.runs import NotFound, RunManager
from tunelab.errors import ConfigError, TunelabError, path_error

__all__ = ["COOKIE", "LOOPBACK_HOSTS", "MAX_BODY", "create_app"]

STATIC_DIR = Path(__file__).resolve().parent / "static"
COOKIE = "tunelab_board_token"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
MAX_BODY = 1 << 20  # bytes of a POST body (a launch or validate request is a few hundred)


def _host_name(header: str) -> str:
    if header.startswith("["):  # [::1]:8080
        return header[1 : header.find("]")]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class _Guard(BaseHTTPMiddleware):
    def __init__(self, app, token: str | None):
        super().__init__(app)
        self.token = token

    async def dispatch(self, request: Request, call_next):
        if self.token is None:
            if _host_name(request.headers.get("host", "")) not in LOOPBACK_HOSTS:
                return PlainTextResponse("forbidden host", status_code=403)
        else:
            auth = request.headers.get("authorization", "")
            given = (auth[7:] if auth.lower().startswith("bearer ") else "") or request.query_params.get(
                "token", "") or request.cookies.get(COOKIE, "")
            if not hmac.compare_digest(given.encode(), self.token.encode()):
                # says nothing about runs: no listing, no page, no launch
                return JSONResponse({"errors": ["token required: open the URL `tune board` printed"]},
                                    status_code=401)
        if request.method == "POST" and request.headers.get("content-type", "").split(";")[0] != "application/json":
            return JSONResponse({"errors": ["POST bodies must be application/json"]}, status_code=415)
        if request.method == "POST":  # the length is read before the body is: a huge one is never read
            length = request.headers.get("content-length", "")
            if not length.isdigit():
                return JSONResponse({"errors": ["POST bodies need a Content-Length"]}, status_code=411)
            if int(length) > MAX_BODY:
                return JSONResponse({"errors": [f"request body over {MAX_BODY} bytes"]}, status_code=413)
        response = await call_next(request)
        if self.token is not None and request.query_params.get("token"):
            response.set_cookie(COOKIE, self.token, httponly=True, samesite="strict")
        return response


def _errors(exc: Exception, status: int = 400) -> JSONResponse:
    from tunelab.training.config import error_lines

    return JSONResponse({"errors": error_lines(exc)}, status_code=status)


def create_app(runs_dir: str | Path, *, token: str | None = None, manager: RunManager | None = None) -> Starlette:
    """The board app for ``runs_dir``.

    Args:
        runs_dir: folder of runs (one sub-folder per run).
        token: required on every request when set (non-loopback binds); None = loopback only.
        manager: an existing RunManager (tests); default one over ``runs_dir``.
    """
    runs = manager or RunManager(runs_dir)

    async def call(fn, *args, status_404=True):
        """Run blocking file/process work off the event loop; map errors to JSON."""
        try:
            result = await asyncio.to_thread(fn, *args)
        except NotFound as e:
            return _errors(e, 404 if status_404 else 400)
        except TunelabError as e:
            return _errors(e, getattr(e, "http_status", 400))
        except OSError as e:  # a path from the request the OS refuses (too long, ...)
            if (line := path_error(e)) is None:
                raise
            return _errors(line)
        return result if isinstance(result, Response) else JSONResponse(result)

    async def body(request: Request) -> dict:
        try:
            data = await request.json()
        except ValueError:
            data = None
        return data if isinstance(data, dict) else {}

    def text_fields(d: dict, names: tuple[str, ...]) -> JSONResponse | None:
        """A 400 naming the first of ``names`` that is not a string (a JSON null or number would
        otherwise become a run named "None")."""
        wrong = [n for n in names if not isinstance(d.get(n, ""), str)]
        return _errors(ConfigError(f"'{wrong[0]}' must be a string")) if wrong else None

    async def index(request: Request):
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-store"})

    async def recipes(request: Request):
        return await call(runs.recipes)

    async def config(request: Request):
        q = request.query_params
        return await call(runs.config_form, q.get("recipe", ""), q.get("config", ""), status_404=False)

    async def validate(request: Request):
        d = await body(request)
        if bad := text_fields(d, ("recipe", "config")):
            return bad

        def check():  # problems with the config are a 400 too, with the same lines
            errors = runs.validate(d.get("recipe", ""), d.get("config", ""), d.get("overrides") or [])
            return JSONResponse({"errors": errors}, status_code=400 if errors else 200)

        return await call(check, status_404=False)

    async def list_runs(request: Request):
        return await call(lambda: {"runs_dir": str(runs.runs_dir), "runs": runs.list_runs()})

    async def launch(request: Request):
        d = await body(request)
        if bad := text_fields(d, ("name", "recipe", "config")):
            return bad
        return await call(runs.launch, d.get("name", ""), d.get("recipe", ""), d.get("config", ""),
                          d.get("overrides") or [], status_404=False)

    async def run_info(request: Request):
        return await call(runs.info, request.path_params["name"])

    async def metrics(request: Request):
        try:
            offset = int(request.query_params.get("offset", "0"))
        except ValueError:
            offset = 0
        return await call(runs.metrics, request.path_params["name"], offset)

    async def log(request: Request):
        return await call(lambda n: {"log": runs.log_tail(n)}, request.path_params["name"])

    async def run_config(request: Request):
        name = request.path_params["name"]

        def make():
            text = runs.config_yaml(name)
            headers = {"Content-Disposition": f'attachment; filename="{name}.yaml"'} \
                if request.query_params.get("download") else {}
            return PlainTextResponse(text, media_type="application/yaml" if headers else "text/plain",
                                     headers=headers)

        return await call(make)

    async def stop(request: Request):
        return await call(runs.stop, request.path_params["name"])

    app = Starlette(
        routes=[
            Route("/", index),
            Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
            Route("/api/recipes", recipes),
            Route("/api/config", config),
            Route("/api/validate", validate, methods=["POST"]),
            Route("/api/runs", list_runs),
            Route("/api/runs", launch, methods=["POST"]),
            Route("/api/runs/{name}", run_info),
            Route("/api/runs/{name}/metrics", metrics),
            Route("/api/runs/{name}/log", log),
            Route("/api/runs/{name}/config", run_config),
            Route("/api/runs/{name}/stop", stop, methods=["POST"]),
        ],
        middleware=[Middleware(_Guard, token=token)],
    )
    app.state.runs = runs
    return app
