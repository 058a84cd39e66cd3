"""`tune board [--runs DIR] [--host 127.0.0.1] [--port 8080]`: a web page for runs.

Lists the runs under DIR (each a recipe's output_dir), draws their live curves (loss, eval loss,
lr, tokens/s, grad norm; DPO reward accuracy and margins) overlaid, launches `tune run` from a
form built from a config (refusing what the CLI refuses), stops runs, shows log tails and the
resolved config. Needs the optional ``board`` extra (``pip install 'tunelab[board]'``).

Binds to 127.0.0.1 by default. Any other host requires a token: a random one is printed at
start as part of the URL, and every request must carry it. A port that cannot be bound is a
one-line error (exit 1), before any URL is printed.

Runs launched from the page stop with the board (Ctrl-C to it stops them the way the page's
stop button does; resume them later with resume=true). With --detach they keep training after
the board exits; a board started later on the same folder finds them (running or finished)
from their folders and can stop them.
"""

from __future__ import annotations

import argparse
import secrets
import socket
import sys
from pathlib import Path

from tunelab.errors import ConfigError

__all__ = ["add_parser", "cmd_board", "leave_runs", "listen", "needs_token"]

DEFAULT_RUNS = "/tmp/tunelab/runs"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "board",
        help="web page to launch runs and watch their live loss curves",
        description=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--runs", default=DEFAULT_RUNS, metavar="DIR",
                   help=f"folder of runs, one output_dir per run (default {DEFAULT_RUNS})")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; others need the token)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    p.add_argument("--detach", action="store_true",
                   help="runs launched from the page keep training when the board exits (default: stopped with it)")
    p.set_defaults(func=cmd_board)


def needs_token(host: str) -> bool:
    """Only loopback binds go without a token."""
    from tunelab.cli.board_app.server import LOOPBACK_HOSTS

    return host not in LOOPBACK_HOSTS


def cmd_board(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from tunelab.cli.board_app.server import create_app
    except ModuleNotFoundError as e:
        raise ConfigError(f"tune board needs the board extra ({e.name} is missing): "
                          "pip install 'tunelab[board]'") from None
    runs_dir = Path(args.runs).expanduser().resolve()
    sock = listen(args.host, args.port)  # before any URL is printed: a taken port is an error, not a dead link
    token = secrets.token_urlsafe(24) if needs_token(args.host) else None
    app = create_app(runs_dir, token=token)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    url = f"http://{shown}:{args.port}/" + (f"?token={token}" if token else "")
    print(f"tune board: runs under {runs_dir}", flush=True)
    print(f"open {url}", flush=True)
    if token:
        print(f"token: {token} (required on every request; send it as ?token=, a cookie or "
              "'Authorization: Bearer')", flush=True)
    try:
        uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    except KeyboardInterrupt:
        pass  # Ctrl-C is how a board is stopped (asyncio re-raises it when it cancelled a request)
    finally:
        sock.close()
        leave_runs(app.state.runs, detach=args.detach)
    return 0


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port``.

    Raises:
        ConfigError: the address cannot be bound (in use, not this machine's, no permission).
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise ConfigError(f"tune board: cannot listen on {host}:{port} ({e.strerror or e}); check --host") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart need not wait out TIME_WAIT
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise ConfigError(f"tune board: cannot listen on {host}:{port} ({e.strerror or e}); pick another --port "
                          "or stop what uses it") from None
    return sock


def leave_runs(runs, *, detach: bool) -> None:
    """On the board's exit: stop the runs it launched that still train, or (``detach``) say
    they go on."""
    from tunelab.cli.board_app.runs import STOP_GRACE_S

    left = runs.running()
    if not left:
        return
    if detach:
        print(f"note: {len(left)} run(s) still training ({', '.join(left)}), detached; a new `tune board "
              f"--runs {runs.runs_dir}` shows them and can stop them", file=sys.stderr)
        return
    runs.stop_all(grace_s=STOP_GRACE_S)  # Ctrl-C first: the recipe exits cleanly, its lock released
    print(f"stopped {len(left)} run(s) this board launched ({', '.join(left)}); continue one with "
          "resume=true (or start the board with --detach to leave runs training)", file=sys.stderr)
