# CI lines for the optional extras (tests/test_export.py, tests/test_serve.py), to merge into .ci/run.
# PY is the Python that runs the tests (the project's venv). Without these, those tests skip.
PY=${PY:-python}
# ONNX export, onnxruntime, FastAPI/uvicorn/python-multipart: pinned wheels, about 30 MB, seconds.
"$PY" -m pip install -q -r requirements-export.txt
# The browser test: selenium drives Debian's chromium through chromium-driver.
"$PY" -m pip install -q selenium==4.51.0
# --no-install-recommends skips ~70 desktop packages (avahi, cups, perl...); the page needs a font.
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium chromium-driver fonts-liberation >/dev/null
