"""`tune board [--runs DIR] [--host 127.0.0.1] [--port 8080]`: a web page for runs.

Lists the runs under DIR (each a recipe's output_dir), draws their live curves (loss, eval loss,
lr, tokens/s, grad norm; DPO reward accuracy and margins) overlaid, launches `tune run` from a
form built from a config (refusing what the CLI refuses), stops runs, shows log tails and the
resolved config. Needs the optional ``board`` extra (``pip install 'tunelab[board]'``).

Binds to 127.0.0.1 by default. Any other host requires a token: a random one is printed at
start as part of the URL, and every request must carry it.
"""

from __future__ import annotations

import argparse
import secrets
import sys
from pathlib import Path

from tunelab.errors import ConfigError

__all__ = ["add_parser", "cmd_board", "needs_token"]

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
    token = secrets.token_urlsafe(24) if needs_token(args.host) else None
    app = create_app(runs_dir, token=token)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    url = f"http://{shown}:{args.port}/" + (f"?token={token}" if token else "")
    print(f"tune board: runs under {runs_dir}", flush=True)
    print(f"open {url}", flush=True)
    if token:
        print(f"token: {token} (required on every request; send it as ?token=, a cookie or "
              "'Authorization: Bearer')", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    left = app.state.runs.running()
    if left:
        print(f"note: {len(left)} run(s) still training ({', '.join(left)}); they go on, and a new "
              "`tune board` on the same folder can stop them", file=sys.stderr)
    return 0
