"""Run an app with uvicorn: in the foreground (the CLI) or in a background thread
(tests, benchmarks, notebooks, evaluation against a local server)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from steerlab.errors import SteerlabError


def run(app: Any, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve ``app`` until interrupted (uvicorn's own access log is off: steerlab logs JSON)."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)


@contextmanager
def background(app: Any, host: str = "127.0.0.1", port: int = 0,
               startup_timeout: float = 60.0) -> Iterator[str]:
    """Serve ``app`` in a thread; yield its base URL (``port=0`` picks a free port).

    Example:
        >>> with background(create_app(lm, {})) as url:       # doctest: +SKIP
        ...     OpenAI(base_url=f"{url}/v1", api_key="x").models.list()
    """
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound_port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                           lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]},
                              name="steerlab-serve-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise SteerlabError(f"The server on {host}:{bound_port} did not start; see the log.")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{bound_port}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        sock.close()
