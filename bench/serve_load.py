"""A bounded load test of serve.py, on this machine only (127.0.0.1).

    python bench/serve_load.py MODEL [--requests 300] [--concurrency 8] [--image PHOTO]

Starts the server for MODEL (checkpoint or .onnx) on a free port of 127.0.0.1, sends a fixed
number of POST /predict requests, a fixed number at once, one in three of them bad (not an
image, a truncated photo, an empty file, an upload over the size limit), then stops. Prints p50
and p95 latency, requests per second, the answers by status, and the count of 5xx answers,
which must be 0: the exit status is 1 otherwise.
"""
import argparse
import http.client
import io
import json
import os
import select
import socket
import sys
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

sys.path.insert(0, os.path.join(ROOT, "tests"))

import serving  # noqa: E402 (tests/serving.py)
from imgclf.app import inference
from imgclf.cli import serve  # noqa: E402

BAD_KINDS = ("not an image", "truncated", "empty", "oversize")
MAX_UPLOAD_MB = 1.0  # small, so that "oversize" uploads stay cheap to send
EXPECT_CONTINUE_OVER = 64 * 1024  # bodies larger than this wait for the server's go-ahead


def build_parser():
    p = argparse.ArgumentParser(description="Load-test serve.py on 127.0.0.1.")
    p.add_argument("model", metavar="MODEL", help="checkpoint.pth or model.onnx")
    p.add_argument("--requests", type=int, default=300, metavar="N",
                   help="requests to send in all (default: 300)")
    p.add_argument("--concurrency", type=int, default=8, metavar="N",
                   help="requests in flight at once (default: 8)")
    p.add_argument("--bad_every", type=int, default=3, metavar="N",
                   help="every Nth request is a bad one (default: 3)")
    p.add_argument("--image", metavar="PHOTO",
                   help="the good photo to send (default: a generated 500x375 JPEG)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    predictor = inference.load_predictor(args.model)
    app = serve.create_app(predictor, os.path.basename(args.model),
                           max_upload_bytes=int(MAX_UPLOAD_MB * 1e6),
                           max_concurrent=args.concurrency)
    with serving.background_server(app) as url:
        result = run_load(url, payloads(args.image), args.requests, args.concurrency,
                          args.bad_every)
    for line in report_lines(result):
        print(line)
    return 0 if result["5xx"] == 0 else 1


def payloads(image_path=None):
    """kind -> (file name, bytes) for the good photo and each kind of bad upload."""
    if image_path:
        with open(image_path, "rb") as f:
            good = f.read()
    else:
        good = generated_jpeg()
    return {
        "good": (os.path.basename(image_path or "photo.jpg"), good),
        "not an image": ("notes.jpg", b"these are words, not pixels\n" * 40),
        "truncated": ("cut.jpg", good[:len(good) // 3]),
        "empty": ("empty.jpg", b""),
        "oversize": ("huge.jpg", os.urandom(int(MAX_UPLOAD_MB * 1e6) + 200_000)),
    }


def generated_jpeg(width=500, height=375):
    from PIL import Image
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(small).resize((width, height), Image.BICUBIC).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def run_load(url, files, total, concurrency, bad_every):
    """Send total requests, concurrency at once; returns latencies, statuses and errors."""
    host, port = url.split("//")[1].split(":")
    kinds = [BAD_KINDS[(i // bad_every) % len(BAD_KINDS)] if i % bad_every == bad_every - 1
             else "good" for i in range(total)]
    local = threading.local()

    def one(kind):
        client = getattr(local, "client", None) or Client(host, int(port))
        local.client = client
        start = time.perf_counter()
        status, _ = client.post_file("/predict", *files[kind])
        return kind, status, time.perf_counter() - start

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, kinds))
    wall = time.perf_counter() - start
    latencies = np.array([r[2] for r in results])
    statuses = Counter(f"{kind} -> {status}" for kind, status, _ in results)
    return {"requests": total, "concurrency": concurrency, "wall": wall,
            "p50": float(np.percentile(latencies, 50)), "p95": float(np.percentile(latencies, 95)),
            "good_p50": float(np.percentile([r[2] for r in results if r[0] == "good"], 50)),
            "statuses": statuses,
            "5xx": sum(1 for _, s, _ in results if isinstance(s, int) and s >= 500),
            "failed": sum(1 for _, s, _ in results if not isinstance(s, int))}


def report_lines(result):
    lines = [f"{result['requests']} requests, {result['concurrency']} at once, in "
             f"{result['wall']:.1f}s: {result['requests'] / result['wall']:.1f} requests/s",
             f"latency p50 {1000 * result['p50']:.0f} ms, p95 {1000 * result['p95']:.0f} ms "
             f"(good photos alone: p50 {1000 * result['good_p50']:.0f} ms)"]
    lines += [f"  {n:4d}  {what}" for what, n in sorted(result["statuses"].items())]
    lines.append(f"5xx answers: {result['5xx']}; requests with no answer: {result['failed']}")
    return lines


class Client:
    """A keep-alive HTTP client for multipart uploads, on the standard library alone."""

    def __init__(self, host, port, timeout=60):
        self.host, self.port, self.timeout = host, port, timeout
        self.conn = None

    def post_file(self, path, filename, data, field="file", content_type="image/jpeg"):
        """(status, JSON answer); status is an error's name if no answer came back."""
        boundary = uuid.uuid4().hex
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; "
                f"filename=\"{filename}\"\r\nContent-Type: {content_type}\r\n\r\n").encode() + \
            data + f"\r\n--{boundary}--\r\n".encode()
        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        if len(body) > EXPECT_CONTINUE_OVER:
            return self.request_expecting_continue(path, body, headers)
        return self.request("POST", path, body, headers)

    def request_expecting_continue(self, path, body, headers):
        """POST with "Expect: 100-continue": send the body only once the server asks for it.
        A server that refuses the upload from its headers (413) answers at once and closes;
        without this, a client still sending would see a broken pipe instead of the 413."""
        self.close()
        self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            self.conn.putrequest("POST", path)
            for key, value in {**headers, "Content-Length": str(len(body)),
                               "Expect": "100-continue"}.items():
                self.conn.putheader(key, value)
            self.conn.endheaders()
            if self._wait_for_continue():
                self.conn.send(body)
            response = self.conn.getresponse()
            raw = response.read()
        except (ConnectionError, http.client.HTTPException, OSError) as err:
            self.close()
            return type(err).__name__, None
        self.close()
        return response.status, json.loads(raw) if raw else None

    def _wait_for_continue(self, timeout=5.0):
        """True if the server said 100 Continue (consumed here) or said nothing in time;
        False if its final answer is already there."""
        sock = self.conn.sock
        if not select.select([sock], [], [], timeout)[0]:
            return True
        if not sock.recv(13, socket.MSG_PEEK).startswith(b"HTTP/1.1 100"):
            return False
        interim = b""
        while not interim.endswith(b"\r\n\r\n"):
            interim += sock.recv(1)
        return True

    def request(self, method, path, body=None, headers=None):
        while True:
            reused = self.conn is not None
            if not reused:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                self.conn.request(method, path, body=body, headers=headers or {})
                response = self.conn.getresponse()
                raw = response.read()
            except (ConnectionError, http.client.HTTPException, OSError) as err:
                self.close()
                if reused:  # the server may have closed an idle keep-alive connection: retry
                    continue
                return type(err).__name__, None
            if response.getheader("connection", "").lower() == "close":
                self.close()
            try:
                return response.status, json.loads(raw) if raw else None
            except ValueError:
                return response.status, raw

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


if __name__ == "__main__":
    sys.exit(main())
