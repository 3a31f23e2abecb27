"""The page of export.py --format web in headless Chromium: time to the answer and agreement
with the checkpoint, at phone (400 px) and desktop (1280 px) widths.

    python bench/web_bench.py WEB_DIR CHECKPOINT PHOTO_DIR [--photos 16] [--large 4] [--repeats 3]

WEB_DIR is the exported folder (its runtime local: --web_runtime), served on 127.0.0.1 by a
static server. Each width and repeat gets two fresh browsers (empty cache), one for PHOTO_DIR's
photos and one for "large" photos (12-megapixel JPEGs made by enlarging the first photos, with
mild noise: a phone camera's size), so that each kind has a first answer right after the page
has loaded. Photos are chosen one by one through the page's file input, as a user does. Two
times per answer: the page's own ("page": from the chosen file to the drawn chart) and the
bench's ("wall": from selenium's choosing to seeing the answer, event dispatch and polling
included, an upper bound). The goal: the first answer after the page has loaded within 1 s on
a 2-core machine. Prints the load average with each run: other programs slow the page down.
"""
import argparse
import glob
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image

from imgclf.app.inference import load_predictor
from imgclf.data import decode
from imgclf.export import browser

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
    """Choose the photo in the page's file input; the page's answer (probabilities, timing)
    with timing["wall"]: ms from choosing to the answer seen by the bench."""
    from selenium.webdriver.common.by import By
    driver.execute_script("window.imgclf.last = null")
    start = time.perf_counter()
    driver.find_element(By.ID, "file").send_keys(path)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        answer = driver.execute_script(
            "const a = window.imgclf.last; return a && {probabilities: a.probabilities, "
            "timing: a.timing}")
        if answer:
            answer["timing"]["wall"] = 1000 * (time.perf_counter() - start)
            return answer
        time.sleep(0.005)
    raise RuntimeError(f"no answer for {path}")


def run_session(url, screen, paths, screenshot=None):
    """A fresh browser: load the page, choose the photos. (seconds to ready, [answers])."""
    with browser.headless_chromium(1280, 900) as driver:
        screen(driver)
        start = time.perf_counter()
        browser.open_page(driver, url)
        ready = time.perf_counter() - start
        answers = [choose(driver, p) for p in paths]
        if screenshot:  # the page with the last of the photos
            driver.execute_script("window.scrollTo(0, 0)")
            driver.save_screenshot(screenshot)
    return ready, answers


def agreement(answers, reference):
    probs = np.asarray([a["probabilities"] for a in answers])
    same = int((probs.argmax(1) == reference.argmax(1)).sum())
    return f"max |diff| {np.abs(probs - reference).max():.1e}, top-1 same {same}/{len(probs)}"


def spread(values, unit="ms"):
    """'median / max' of values."""
    fmt = "{:.0f}" if unit == "ms" else "{:.1f}"
    return f"{fmt.format(np.median(values))} / {fmt.format(np.max(values))} {unit}"


def report_screen(name, runs, reference):
    """runs: {kind: [(ready, answers) per repeat]}; prints one block per kind."""
    print(f"{name}:")
    for kind, sessions in runs.items():
        answers = [a for _, session in sessions for a in session]
        firsts = [session[0]["timing"] for _, session in sessions]
        first_wall = [t["wall"] for t in firsts]
        print(f"  {kind:<5} page ready {spread([r for r, _ in sessions], 's')}; "
              f"first answer page {spread([t['shown'] for t in firsts])}, wall "
              f"{spread(first_wall)} (max/goal {max(first_wall) / GOAL_MS:.2f}); "
              f"all {len(answers)} answers page {spread([a['timing']['shown'] for a in answers])}"
              f", wall {spread([a['timing']['wall'] for a in answers])}")
        parts = {k: np.median([a["timing"][k] for a in answers])
                 for k in ("decode", "preprocess", "model")}
        print("        median " + ", ".join(f"{k} {v:.0f} ms" for k, v in parts.items())
              + "; vs the checkpoint: "
              + agreement(answers, np.concatenate([reference[kind]] * len(sessions))))


def parse_args(argv):
    p = argparse.ArgumentParser(description="Time the web export's page in headless Chromium.")
    p.add_argument("web_dir", metavar="WEB_DIR")
    p.add_argument("checkpoint", metavar="CHECKPOINT")
    p.add_argument("photo_dir", metavar="PHOTO_DIR")
    p.add_argument("--photos", type=int, default=16, metavar="N",
                   help="photos of PHOTO_DIR to choose, spread over it (default: 16)")
    p.add_argument("--large", type=int, default=4, metavar="N",
                   help="12-megapixel JPEGs made from the first photos (default: 4)")
    p.add_argument("--repeats", type=int, default=3, metavar="N",
                   help="fresh browsers per width and kind of photo (default: 3)")
    p.add_argument("--screenshot", metavar="PNG",
                   help="save the phone-sized page with its last answer there (default: none)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    found = sorted(glob.glob(os.path.join(args.photo_dir, "**", "*.jpg"), recursive=True))
    small = [found[i] for i in np.linspace(0, len(found) - 1, args.photos).round().astype(int)]
    predictor = load_predictor(args.checkpoint, precision="fp32")
    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as tmp, browser.serve_folder(args.web_dir) as (url, _):
        photos = {"small": small, "large": make_large(small[:args.large], tmp)}
        reference = {kind: np.concatenate([predictor.probabilities(
            decode.load_eval_array(path, predictor.preprocess)[None]) for path in paths])
            for kind, paths in photos.items()}
        print(f"times as median / max over the repeats; goal: first answer within {GOAL_MS} ms")
        for name, screen in SCREENS:
            runs = {kind: [] for kind in photos}
            for repeat in range(args.repeats):
                for kind, paths in photos.items():
                    shot = (args.screenshot if screen is browser.phone_screen and kind == "small"
                            and repeat == 0 else None)
                    runs[kind].append(run_session(url, screen, paths, shot))
            report_screen(name, runs, reference)
            print(f"  load average now: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
