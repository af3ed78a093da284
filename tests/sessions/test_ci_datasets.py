"""scripts/fetch-test-datasets.py, which gives CI the datasets the tests read
(DANDELION_TEST_DATASET, DANDELION_OOD_DATASET): run against loopback servers holding the
shared copies in the published URL layouts, it rebuilds both in the layout the tests expect."""

from __future__ import annotations

import functools
import http.server
import importlib.util
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from PIL import Image

from dandelion_lib.core.config import DEFAULT_SOURCE
from tests.conftest import GREENR, OOD_DEV, ROOT

SCRIPT = ROOT / "scripts" / "fetch-test-datasets.py"


@pytest.fixture(scope="module")
def script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fetch_test_datasets", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Quiet(http.server.SimpleHTTPRequestHandler):
    requests: list[str]

    def do_GET(self) -> None:
        self.requests.append(self.path)
        super().do_GET()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def published(tmp_path: Path) -> Iterator[tuple[str, list[str]]]:
    """A loopback server with greenr at /greenr and ood-dev's sources at /raw/<repo>/HEAD/."""
    root = tmp_path / "www"
    (root / "greenr").mkdir(parents=True)
    for label in ("dandelion", "grass"):
        (root / "greenr" / label).symlink_to(GREENR / label)
    sources = (ROOT / "scripts" / "ood-dev-sources.tsv").read_text().splitlines()
    for line in sources:
        if line and not line.startswith(("#", "file\t")):
            name, repo, path = line.split("\t")
            target = root / "raw" / repo / "HEAD" / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(OOD_DEV / name)
    requests: list[str] = []
    handler = type("Handler", (_Quiet,), {"requests": requests})
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=str(root))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requests
    finally:
        server.shutdown()
        server.server_close()


def test_fetches_both_datasets_in_the_tests_layout(
    script: ModuleType, published: tuple[str, list[str]], tmp_path: Path
) -> None:
    base, requests = published
    dest = tmp_path / "datasets"
    args = [str(dest), "--greenr-url", f"{base}/greenr", "--raw-url", f"{base}/raw"]
    assert script.main(args) == 0
    for label in ("dandelion", "grass"):
        names = sorted(p.name for p in (dest / "greenr" / label).iterdir())
        assert names == [f"{i:08d}.jpg" for i in range(200)]
        assert (dest / "greenr" / label / "00000007.jpg").read_bytes() == (
            GREENR / label / "00000007.jpg"
        ).read_bytes()
    kinds = {p.name: len(list(p.glob("*.jpg"))) for p in (dest / "ood-dev").iterdir()}
    assert kinds == {k: len(list((OOD_DEV / k).glob("*.jpg"))) for k in kinds}
    assert set(kinds) == {"objects", "daisy", "roses", "sunflowers", "tulips"}
    assert not list(dest.rglob("*.part"))
    with Image.open(dest / "ood-dev" / "objects" / "n02787622_banjo.jpg") as photo:
        assert photo.format == "JPEG" and photo.mode == "RGB" and max(photo.size) <= 500

    requests.clear()
    assert script.main(args) == 0  # a re-run fetches nothing
    assert requests == []


def test_a_missing_file_fails_with_one_line(
    script: ModuleType,
    published: tuple[str, list[str]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    base, _ = published
    args = [str(tmp_path / "d"), "--greenr-url", f"{base}/nowhere", "--raw-url", f"{base}/raw"]
    assert script.main(args) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 400 and all("404" in line for line in err)


def test_defaults_follow_the_project(script: ModuleType) -> None:
    """The default greenr URL is the pipeline's default source; Pillow is the lock's."""
    assert script.GREENR_URL == DEFAULT_SOURCE
    pin = re.search(r"^pillow==(\S+)", (ROOT / "requirements.lock").read_text(), re.M)
    assert pin and f'"pillow=={pin.group(1)}"' in SCRIPT.read_text()
