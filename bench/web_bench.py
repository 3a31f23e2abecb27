"""The page of export.py --format web in headless Chromium: time to the answer and agreement
with the checkpoint, at phone (400 px) and desktop (1280 px) widths.

    python bench/web_bench.py WEB_DIR CHECKPOINT PHOTO_DIR [--photos 16] [--large 4]

WEB_DIR is the exported folder (its runtime local: --web_runtime), served on 127.0.0.1 by a
static server. Each width gets a fresh browser (empty cache): the page is loaded, then photos
are chosen one by one through the page's file input, as a user does; the time of an answer is
the page's own, from the file to the drawn chart. "large" photos are 12-megapixel JPEGs made by
enlarging the first photos (with mild noise), to time and check the browser's downscaled
decode of a phone-sized photo. The goal: the first answer after the page has loaded within
1 s on a 2-core machine. Prints the load average too: other programs slow the page down.
"""
import argparse
import glob
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image

from imgclf.export import browser
from imgclf.app.inference import load_predictor
from imgclf.data import decode

GOAL_MS = 1000
SCREENS = (("phone 400 px", browser.phone_screen), ("desktop 1280 px", browser.desktop_screen))


def make_large(paths, folder):
    rng = np.random.default_rng(0)
    out = []
    for i, path in enumerate(paths):
        img = decode.load_rgb(path).resize((4032, 3024), Image.LANCZOS)
        noisy = np.asarray(img).astype(np.int16) + rng.integers(-12, 13, (3024, 4032, 3))
        dest = os.path.join(folder, f"large-{i}.jpg")
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(dest, quality=90)
        out.append(dest)
    return out


def choose(driver, path):
    """Choose the photo in the page's file input; the page's answer (probabilities, timing)."""
    from selenium.webdriver.common.by import By
    driver.execute_script("window.imgclf.last = null")
    driver.find_element(By.ID, "file").send_keys(path)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        answer = driver.execute_script(
            "const a = window.imgclf.last; return a && {probabilities: a.probabilities, "
            "timing: a.timing}")
        if answer:
            return answer
        time.sleep(0.01)
    raise RuntimeError(f"no answer for {path}")


def run_screen(url, screen, small, large, screenshot=None):
    with browser.headless_chromium(1280, 900) as driver:
        screen(driver)
        start = time.perf_counter()
        browser.open_page(driver, url)
        ready = time.perf_counter() - start
        answers = {"small": [choose(driver, p) for p in small]}
        if screenshot:  # the page with the last of the photos of PHOTO_DIR
            driver.execute_script("window.scrollTo(0, 0)")
            driver.save_screenshot(screenshot)
        answers["large"] = [choose(driver, p) for p in large]
    return ready, answers


def agreement(answers, reference):
    probs = np.asarray([a["probabilities"] for a in answers])
    same = int((probs.argmax(1) == reference.argmax(1)).sum())
    return f"max |diff| {np.abs(probs - reference).max():.1e}, top-1 same {same}/{len(probs)}"


def main(argv=None):
    p = argparse.ArgumentParser(description="Time the web export's page in headless Chromium.")
    p.add_argument("web_dir", metavar="WEB_DIR")
    p.add_argument("checkpoint", metavar="CHECKPOINT")
    p.add_argument("photo_dir", metavar="PHOTO_DIR")
    p.add_argument("--photos", type=int, default=16, metavar="N",
                   help="photos of PHOTO_DIR to choose, spread over it (default: 16)")
    p.add_argument("--large", type=int, default=4, metavar="N",
                   help="12-megapixel JPEGs made from the first photos (default: 4)")
    p.add_argument("--screenshot", metavar="PNG",
                   help="save the phone-sized page with its last answer there (default: none)")
    args = p.parse_args(argv)
    found = sorted(glob.glob(os.path.join(args.photo_dir, "**", "*.jpg"), recursive=True))
    small = [found[i] for i in np.linspace(0, len(found) - 1, args.photos).round().astype(int)]
    predictor = load_predictor(args.checkpoint, precision="fp32")
    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as tmp, browser.serve_folder(args.web_dir) as (url, _):
        large = make_large(small[:args.large], tmp)
        reference = {kind: np.concatenate([predictor.probabilities(
            decode.load_eval_array(path, predictor.preprocess)[None]) for path in paths])
            for kind, paths in (("small", small), ("large", large))}
        print(f"{'screen':<16} {'page ready':>10} {'1st answer':>10} {'median':>7} "
              f"{'1st large':>9} {'median':>7}  goal {GOAL_MS} ms")
        for name, screen in SCREENS:
            ready, answers = run_screen(url, screen, small, large,
                                        args.screenshot if screen is browser.phone_screen
                                        else None)
            shown = {k: [a["timing"]["shown"] for a in v] for k, v in answers.items()}
            print(f"{name:<16} {ready:>9.1f}s {shown['small'][0]:>8.0f}ms "
                  f"{np.median(shown['small']):>5.0f}ms {shown['large'][0]:>7.0f}ms "
                  f"{np.median(shown['large']):>5.0f}ms  first/goal "
                  f"{shown['small'][0] / GOAL_MS:.2f}, large {shown['large'][0] / GOAL_MS:.2f}")
            for kind in ("small", "large"):
                parts = {k: np.median([a["timing"][k] for a in answers[kind]])
                         for k in ("decode", "preprocess", "model")}
                print(f"  {kind}: " + ", ".join(f"{k} {v:.0f} ms" for k, v in parts.items())
                      + f"; vs the checkpoint: {agreement(answers[kind], reference[kind])}")
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
