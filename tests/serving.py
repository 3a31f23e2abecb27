"""serve.py's app on a free port in a thread, for the tests and bench/serve_load.py."""
import contextlib
import threading
import time

from imgclf.cli import serve


@contextlib.contextmanager
def background_server(app, host="127.0.0.1"):
    """Serve app on a free port in a thread, for tests and benchmarks: yields the base URL."""
    sock = serve.bind(host, 0)
    server = serve.make_server(app, access_log=False)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
