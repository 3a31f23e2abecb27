"""Try a model in the browser: a small web page and a JSON API.

    python serve.py CHECKPOINT_OR_ONNX [--host 127.0.0.1] [--port 8000] [--top_k 5]

  GET  /          the page: drop or pick a photo, see it beside a bar chart of the top classes
  POST /predict   the photo as multipart form field "file"; answers the JSON object that
                  predict.py --json gives per image:
                  {"image": "rose.jpg", "predictions": [{"class": "3", "name": "rose",
                  "probability": 0.87}, ...]}; errors as {"error": "..."} with a 4xx status.
                  POST /predict?explain=1 adds "heatmap", as predict.py --explain --json does
                  (a checkpoint only; the page asks for it and draws it over the photo)
  GET  /health    {"status": "ok", "model": ..., "backend": ..., "classes": N}

Why FastAPI (on Starlette) and uvicorn: both are well kept and widely used; the async server
reads uploads without tying up a thread per slow client, multipart parsing comes from
python-multipart, and the whole stack installs from PyPI as pure Python or small wheels.

Safe to leave running: binds to 127.0.0.1 unless --host says otherwise; an upload over
--max_upload_mb gets 413 as soon as its Content-Length (or the bytes read so far) pass the limit,
without reading the rest; anything that does not decode as an image gets 415; the upload's
file name is only echoed back, never used as a path; an upload stalled for a minute gets 408;
past --max_concurrent requests in progress the answer is 503. Model and images go through
inference.load_predictor and decode.load_rgb/eval_array, and the answer is
inference.prediction_object, so answers are those of predict.py.

Needs the optional packages of the serve extra (fastapi, uvicorn, python-multipart:
pip install -e '.[serve]'; and those of the export extra for an .onnx model).
"""
import argparse
import importlib.util
import logging
import os
import socket
import sys
import threading

from .. import errors
from ..app import heat_page, inference, serve_page
from ..data import decode
from ..errors import UserError
from ..version import __version__

log = logging.getLogger("serve")
INSTALL_HINT = "pip install -e '.[serve]'"
# Room for the multipart boundaries and headers around the file itself.
MULTIPART_OVERHEAD = 64 * 1024
UPLOAD_TIMEOUT_S = 60
# Open connections uvicorn accepts before it answers 503 itself: a bound on sockets and tasks
# well above --max_concurrent, so that /health and the page still answer under load.
MAX_CONNECTIONS = 256


def build_parser():
    p = argparse.ArgumentParser(
        description="Serve a model from train.py (checkpoint) or export.py (.onnx) as a web "
                    "page and a JSON API.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("model", metavar="CHECKPOINT_OR_ONNX",
                   help="checkpoint.pth written by train.py, or model.onnx or model.tflite written "
                        "by export.py")
    p.add_argument("--host", default="127.0.0.1", metavar="ADDR",
                   help="address to listen on; 0.0.0.0 opens it to the network "
                        "(default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, metavar="N",
                   help="port to listen on; 0 picks a free one (default: 8000)")
    p.add_argument("--top_k", type=int, default=5, metavar="K",
                   help="how many of the most likely classes to answer with (default: 5)")
    p.add_argument("--max_upload_mb", type=float, default=10.0, metavar="MB",
                   help="largest photo accepted, in megabytes (default: 10)")
    p.add_argument("--max_concurrent", type=int, default=8, metavar="N",
                   help="requests to /predict in progress at once; more get 503 (default: 8)")
    p.add_argument("--gpu", nargs="?", const="cuda", metavar="DEVICE",
                   help="run the model on an accelerator, as in predict.py (default: the CPU)")
    p.add_argument("--precision", choices=inference.PRECISIONS, default="auto",
                   help=inference.PRECISION_HELP)
    return p


def main(argv=None):
    return errors.run_main(build_parser, run, argv)


def run(args):
    require_serving()
    if args.top_k < 1:
        raise UserError(f"--top_k {args.top_k}: must be 1 or more")
    if args.max_upload_mb <= 0 or args.max_concurrent < 1:
        raise UserError("--max_upload_mb and --max_concurrent must be more than 0")
    predictor = inference.load_predictor(args.model, args.gpu, args.precision)
    app = create_app(predictor, os.path.basename(args.model), top_k=args.top_k,
                     max_upload_bytes=int(args.max_upload_mb * 1e6),
                     max_concurrent=args.max_concurrent)
    sock = bind(args.host, args.port)
    host, port = sock.getsockname()[:2]
    print(f"serving {args.model} on http://{'[' + host + ']' if ':' in host else host}:{port}/ "
          f"(Ctrl+C to stop)", flush=True)
    serve(app, sock)
    return 0


def require_serving():
    """fastapi, uvicorn and python-multipart are optional: say in one line how to get them."""
    for module, package in (("fastapi", "fastapi"), ("uvicorn", "uvicorn"),
                            ("python_multipart", "python-multipart")):
        if importlib.util.find_spec(module) is None:
            raise UserError(f"serve.py needs the optional package {package}: {INSTALL_HINT}")


def bind(host, port):
    """Open the listening socket ourselves: a busy port becomes a one-line error, and port 0
    gives a free port whose number we can print."""
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
        sock.listen(128)
    except (OSError, IndexError) as err:
        raise UserError(f"cannot listen on {host}:{port} ({getattr(err, 'strerror', err)}); "
                        f"choose another --port or --host") from None
    return sock


def serve(app, sock, access_log=True):
    """Run uvicorn on an open socket until Ctrl+C (or server.should_exit)."""
    server = make_server(app, access_log)
    server.run(sockets=[sock])


def make_server(app, access_log=True):
    import uvicorn
    config = uvicorn.Config(app, log_level="info" if access_log else "warning",
                            access_log=access_log, timeout_keep_alive=5,
                            limit_concurrency=MAX_CONNECTIONS)
    return uvicorn.Server(config)


# ---------------------------------------------------------------------------------------------
# The application
# ---------------------------------------------------------------------------------------------
class ApiError(Exception):
    def __init__(self, status, message):
        super().__init__(message)
        self.status, self.message = status, message


def create_app(predictor, model_name, top_k=5, max_upload_bytes=10_000_000, max_concurrent=8):
    """The FastAPI app around a predictor (see inference.load_predictor)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    app = FastAPI(title="image classifier", docs_url=None, redoc_url=None, openapi_url=None)
    model = Model(predictor, top_k)
    in_progress = {"n": 0}  # touched only on the event loop's thread: no lock needed
    page, script_hash = serve_page.render_page(model_name, len(model.classes), max_upload_bytes,
                                               *model.page_heatmap)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):  # 404, 405 ...: the same JSON shape as our errors
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc):
        return JSONResponse({"error": "bad request"}, status_code=400)

    @app.exception_handler(ApiError)
    async def api_error(request, exc):
        headers = {"Retry-After": "1"} if exc.status == 503 else None
        if exc.status == 413:
            headers = {"Connection": "close"}  # the rest of the body is never read
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=headers)

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(page, headers=serve_page.page_headers(script_hash))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "backend": model.backend,
                "classes": len(model.classes), "top_k": model.top_k,
                "unknown_threshold": model.unknown_threshold}

    @app.post("/predict")
    async def predict_endpoint(request: Request):
        if in_progress["n"] >= max_concurrent:
            raise ApiError(503, f"busy: {max_concurrent} requests in progress; try again")
        in_progress["n"] += 1
        try:
            name, data = await read_upload(request, max_upload_bytes)
            batch = await run_in_threadpool(model.preprocess_bytes, data)
            if model.explain_asked(request):  # ?explain=1
                probs, heatmap = await run_in_threadpool(model.explained, batch)
                _, novelty = await run_in_threadpool(model.scores, batch)
                return model.answer(name, probs, heatmap, novelty)
            probs, novelty = await run_in_threadpool(model.scores, batch)
            return model.answer(name, probs, novelty=novelty)
        finally:
            in_progress["n"] -= 1

    return app


class Model:
    """The predictor, its names, and one inference at a time: a single run already uses every
    core, so parallel runs would only make each other slower."""

    def __init__(self, predictor, top_k):
        self.predictor = predictor
        self.classes = list(predictor.classes)
        self.names = list(predictor.class_names or self.classes)
        self.top_k = min(top_k, len(self.classes))
        self.backend = {"OnnxPredictor": "onnxruntime", "LiteRTPredictor": "litert"}.get(
            type(predictor).__name__, "torch")
        # None for a model without the unknown verdict's data: its answers then have no verdict
        self.unknown_threshold = getattr(predictor, "unknown_threshold", None)
        self.lock = threading.Lock()
        self.explain_error = heat_page.explain_error(predictor)  # None where ?explain=1 works
        # render_page's explain and crop_pct: whether the page asks for and draws the heatmap
        self.page_heatmap = (self.explain_error is None, predictor.preprocess["crop_pct"])

    def explain_asked(self, request):
        """Whether the request asks for the heatmap (?explain=1); 400 where there is none."""
        asked = request.query_params.get("explain", "0") not in ("0", "false", "")
        if asked and self.explain_error:
            raise ApiError(400, self.explain_error)
        return asked

    def preprocess_bytes(self, data):
        try:
            return decode.load_eval_array(data, self.predictor.preprocess)[None]
        except decode.IMAGE_ERRORS as err:
            raise ApiError(415, f"not a usable image: {decode.describe_image_error(err)}; "
                                f"send a JPEG, HEIC, PNG, WebP, BMP, TIFF or GIF photo") from None

    def probabilities(self, batch):
        with self.lock:
            return self.predictor.probabilities(batch)[0]

    def explained(self, batch):
        """(probabilities, the top class's heatmap) of a batch of one photo."""
        with self.lock:
            probs, maps = self.predictor.explain(batch)
        return probs[0], maps[0]

    def scores(self, batch):
        """(probabilities, novelty or None) of a batch of one image."""
        with self.lock:
            probs, novelty = inference.batch_scores(self.predictor, batch)
        return probs[0], (None if novelty is None else float(novelty[0]))

    def answer(self, image_name, probs, heatmap=None, novelty=None):
        return inference.prediction_object(image_name, probs, self.top_k, self.classes,
                                           self.names, heatmap, novelty,
                                           self.unknown_threshold)


async def read_upload(request, limit):
    """(file name, bytes) of form field "file", reading at most limit bytes of the body."""
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    body = await read_body(request, limit + MULTIPART_OVERHEAD, limit)
    if not body:
        raise ApiError(400, "empty request: send the photo as multipart form field 'file'")
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise ApiError(400, "send the photo as multipart/form-data, in form field 'file'")

    async def replay():  # hand the body we already hold to Starlette's multipart parser
        return {"type": "http.request", "body": body, "more_body": False}
    try:
        form = await Request(request.scope, replay).form(max_files=1, max_fields=8)
    except (HTTPException, ValueError, KeyError) as err:
        raise ApiError(400, f"malformed multipart body ({getattr(err, 'detail', err)})") from None
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise ApiError(400, "no file in form field 'file'")
    data = await upload.read()
    if not data:
        raise ApiError(400, "the uploaded file is empty")
    if len(data) > limit:
        raise ApiError(413, f"the photo is over the {limit / 1e6:g} MB limit")
    return safe_name(upload.filename), data


async def read_body(request, body_limit, file_limit):
    """The request body, refused with 413 as soon as it is known to be too large: from its
    Content-Length before reading anything, else while reading, without reading the rest."""
    import anyio
    too_large = ApiError(413, f"the upload is over the {file_limit / 1e6:g} MB limit")
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise ApiError(400, "bad Content-Length")
        if int(length) > body_limit:
            raise too_large
    body = bytearray()
    try:
        with anyio.fail_after(UPLOAD_TIMEOUT_S):  # a stalled upload must not hold its slot
            async for chunk in request.stream():
                body += chunk
                if len(body) > body_limit:
                    raise too_large
    except TimeoutError:
        raise ApiError(408, f"the upload took over {UPLOAD_TIMEOUT_S}s; try again") from None
    return bytes(body)


def safe_name(filename):
    """The upload's name for display only: its last path part, printable, at most 200 chars."""
    name = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if ch.isprintable())[:200]
    return name or "upload"


if __name__ == "__main__":
    sys.exit(main())
