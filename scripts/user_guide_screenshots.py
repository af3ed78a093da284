"""Regenerate the user guide's screenshots (docs/img/app.png, docs/img/app-api-down.png) from
the champion a real pipeline run registered.

    DANDELION_WORKDIR=.dandelion .venv/bin/python scripts/user_guide_screenshots.py \
        [--out docs/img] [--ood ../shared/datasets/ood-dev]

It starts the API and the web app of that work directory on free loopback ports, uploads a
dandelion and a grass photo of the dataset's test split, an everyday object of the negatives'
test split (or of ``--ood``) and a text file in Chromium, saves the page, then stops the API
and saves the page again with its banner. Photos are picked by what the model answers, so the
picture shows each kind of answer.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("DANDELION_CHROMIUM", "/usr/bin/chromium")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise SystemExit(f"{url} did not answer 200 within {timeout:.0f} s")


def pick_photos(ood: Path | None, tmp: Path) -> list[Path]:
    """A confident dandelion and grass of the test split and an object answered unknown."""
    from dandelion_lib.core.config import get_settings
    from dandelion_lib.core.labels import UNKNOWN
    from dandelion_lib.core.storage import open_store
    from dandelion_lib.data import dataset
    from dandelion_lib.lifecycle import registry
    from dandelion_lib.serving.predict import Predictor

    settings = get_settings()
    registry.configure_mlflow(settings)
    predictor = Predictor.load(
        registry.model_uri(settings.tracking.model_name, "champion"), settings
    )
    store = open_store(settings=settings)
    m = dataset.load_manifest(store, predictor.dataset_version)
    test = m[m["split"] == "test"].sort_values("sha256")
    wanted = {"dandelion": "dandelion", "grass": "grass", UNKNOWN: UNKNOWN}
    names = {"dandelion": "garden", "grass": "lawn", UNKNOWN: "party"}
    picked: list[Path] = []
    for label, answer in wanted.items():
        rows = test[test["label"] == label]
        if label == UNKNOWN:
            rows = rows[rows["source"].str.contains("/objects/")]
        candidates = [(k, store.get_bytes(k)) for k in rows["key"].head(20)]
        if label == UNKNOWN and ood is not None and not candidates:
            candidates = [(p.name, p.read_bytes()) for p in sorted(ood.glob("objects/*.jpg"))]
        for key, data in candidates:
            pred = predictor.predict_bytes([data])[0]
            if predictor.decide(pred).label == answer and (
                answer == UNKNOWN or pred.confidence > 0.9
            ):
                path = tmp / f"{names[label]}{Path(key).suffix or '.jpg'}"
                path.write_bytes(data)
                picked.append(path)
                break
        else:
            raise SystemExit(f"no test photo answered {answer!r}")
    notes = tmp / "notes.txt"
    notes.write_text("not a photo\n")
    return [*picked, notes]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "img"))
    parser.add_argument("--ood", default=None, help="ood-dev folder (if no negatives in the data)")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    tmp = Path(tempfile.mkdtemp(prefix="dandelion-shots-"))
    photos = pick_photos(Path(args.ood) if args.ood else None, tmp)
    api_port, app_port = free_port(), free_port()
    env = {
        **os.environ,
        "DANDELION_API_PORT": str(api_port),
        "DANDELION_API_URL": f"http://127.0.0.1:{api_port}",
        "DANDELION_APP_PORT": str(app_port),
    }
    api = subprocess.Popen([sys.executable, "-m", "api"], env=env, cwd=ROOT)
    app = subprocess.Popen([sys.executable, "-m", "dashboards.serve"], env=env, cwd=ROOT)
    out = Path(args.out)
    try:
        wait_http(f"http://127.0.0.1:{api_port}/health/ready", 300)
        wait_http(f"http://127.0.0.1:{app_port}/health/live", 120)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM)
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(f"http://127.0.0.1:{app_port}/", timeout=180_000)
            upload = page.locator(".dl-upload")
            upload.wait_for(timeout=180_000)
            page.wait_for_function(
                "!document.querySelector('.dl-upload').disabled", timeout=120_000
            )
            with page.expect_file_chooser() as chooser:
                upload.click()
            chooser.value.set_files([str(p) for p in photos])
            page.wait_for_function(
                f"document.querySelectorAll('.dl-card').length === {len(photos)}",
                timeout=120_000,
            )
            page.screenshot(path=str(out / "app.png"), full_page=True)
            api.terminate()
            api.wait(60)
            page.locator(".dl-banner").wait_for(timeout=60_000)
            page.screenshot(path=str(out / "app-api-down.png"), full_page=True)
            browser.close()
    finally:
        for proc in (api, app):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {out / 'app.png'} and {out / 'app-api-down.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
