"""Ingestion from a local folder: validation, idempotence, quality gates, the CLI."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from dandelion_lib.core.config import Settings
from dandelion_lib.core.storage import LocalStore, ObjectStore
from dandelion_lib.data import dataset
from dandelion_lib.data.ingest import add_accepted_feedback, ingest
from dandelion_lib.data.quality import DatasetQualityError
from dandelion_lib.data.rejections import SourceUnavailableError
from dandelion_lib.data.review import ReviewQueue
from tests.conftest import free_port
from tests.integration.conftest import FaultServer

D, G = "dandelion", "grass"


def _copy(greenr: Path, dest: Path, label: str, indices: range) -> None:
    (dest / label).mkdir(parents=True, exist_ok=True)
    for i in indices:
        shutil.copy(greenr / label / f"{i:08d}.jpg", dest / label / f"{i:08d}.jpg")


def _image_bytes(size: tuple[int, int], fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 180, 20)).save(buf, fmt)
    return buf.getvalue()


@pytest.fixture
def folder(greenr_dir: Path, tmp_path: Path) -> Path:
    """30 real images per label plus one of every kind of bad file."""
    root = tmp_path / "src"
    _copy(greenr_dir, root, D, range(30))
    _copy(greenr_dir, root, G, range(30))
    real = (greenr_dir / D / "00000100.jpg").read_bytes()
    (root / D / "truncated.jpg").write_bytes(real[: len(real) // 3])
    (root / D / "notes.jpg").write_text("<html>not an image</html>")
    (root / D / "empty.jpg").write_bytes(b"")
    (root / D / "bomb.png").write_bytes(_image_bytes((2000, 1000), "PNG"))
    (root / D / "tiny.png").write_bytes(_image_bytes((20, 20), "PNG"))
    (root / D / "icon.ico").write_bytes(_image_bytes((64, 64), "ICO"))
    (root / D / ".hidden.jpg").write_bytes(real)  # hidden files are not part of the source
    (root / G / "as-gif.gif").write_bytes(_image_bytes((64, 48), "GIF"))  # valid, other format
    shutil.copy(root / G / "00000004.jpg", root / G / "copy-of-4.jpg")  # exact duplicate
    (root / "README.txt").write_text("not a label folder")
    return root


def _settings(tmp_path: Path, source: Path | str, **kw: object) -> Settings:
    return Settings(workdir=tmp_path / "work", source=str(source), max_image_pixels=1_000_000, **kw)  # type: ignore[arg-type]


def test_folder_validation_and_idempotent_rerun(
    folder: Path, store: ObjectStore, tmp_path: Path
) -> None:
    report = ingest(_settings(tmp_path, folder), store=store, progress=False)
    reasons = {Path(r.source).name: r.reason for r in report.rejected}
    assert reasons == {
        "truncated.jpg": "truncated",
        "notes.jpg": "not_an_image",
        "empty.jpg": "empty",
        "bomb.png": "too_large",
        "tiny.png": "too_small",
        "icon.ico": "unsupported_format",
    }
    assert report.total == 30 + 6 + 30 + 2 and report.fetched == report.total
    assert report.duplicates == 1 and report.new == report.images == 61
    df = dataset.load_manifest(store)
    assert df["label"].value_counts().to_dict() == {D: 30, G: 31}
    gif = df[df["source"].str.endswith("as-gif.gif")].iloc[0]
    assert gif["format"] == "GIF" and gif["key"].endswith(".gif") and gif["width"] == 64
    assert not df["source"].str.contains("hidden").any()
    assert dataset.load_report(store)["reasons"]["too_large"] == 1

    # Unchanged folder: nothing read again, same version.
    again = ingest(_settings(tmp_path, folder), store=store, progress=False)
    assert (again.version, again.fetched, again.new, again.unchanged) == (report.version, 0, 0, 61)

    # One new image: a new version; the old one stays as it was.
    shutil.copy(folder / G / "00000004.jpg", folder / G / "x.jpg")
    Image.open(folder / G / "x.jpg").rotate(90, expand=True).save(folder / G / "x.jpg")
    third = ingest(_settings(tmp_path, folder), store=store, progress=False)
    assert third.created and third.version != report.version and third.new == 1
    assert dataset.list_versions(store) == sorted([report.version, third.version])
    assert len(dataset.load_manifest(store, report.version)) == 61
    assert len(dataset.load_manifest(store)) == 62


def test_same_images_same_version_from_folder_and_http(
    greenr_dir: Path, http_source: FaultServer, tmp_path: Path
) -> None:
    """The same images from same-named sources (the origin counts): the same version."""
    a = ingest(
        _settings(tmp_path, f"greenr={greenr_dir}", max_per_class=25),
        store=LocalStore(tmp_path / "a"),
        progress=False,
    )
    b = ingest(
        _settings(tmp_path, f"greenr={http_source.url}", max_per_class=25),
        store=LocalStore(tmp_path / "b"),
        progress=False,
    )
    assert a.images == b.images == 50 and a.version == b.version
    other_seed = ingest(
        _settings(tmp_path, f"greenr={greenr_dir}", max_per_class=25, split_seed=7),
        store=LocalStore(tmp_path / "c"),
        progress=False,
    )
    assert other_seed.version != a.version


def test_too_few_images_fails_loudly_and_writes_no_version(folder: Path, tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    with pytest.raises(
        DatasetQualityError, match=r"class 'dandelion' has 30 valid images, below the minimum of 31"
    ):
        ingest(_settings(tmp_path, folder, min_images_per_class=31), store=store, progress=False)
    assert dataset.list_versions(store) == [] and not store.exists(dataset.LATEST_KEY)


def test_class_imbalance_fails_loudly(greenr_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "src"
    _copy(greenr_dir, root, D, range(40))
    _copy(greenr_dir, root, G, range(10))
    store = LocalStore(tmp_path / "store")
    with pytest.raises(
        DatasetQualityError, match=r"class balance 4.00:1 .* worse than the limit 3:1"
    ):
        ingest(_settings(tmp_path, root, min_images_per_class=5), store=store, progress=False)
    assert not store.exists(dataset.LATEST_KEY)
    ok = ingest(
        _settings(tmp_path, root, min_images_per_class=5, max_class_imbalance=4.0),
        store=store,
        progress=False,
    )
    assert ok.images == 50


def test_extend_keeps_previous_images(greenr_dir: Path, tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    first, second = tmp_path / "first", tmp_path / "second"
    for label in (D, G):
        _copy(greenr_dir, first, label, range(25))
        _copy(greenr_dir, second, label, range(25, 30))
    ingest(_settings(tmp_path, first, min_images_per_class=5), store=store, progress=False)
    report = ingest(
        _settings(tmp_path, second, min_images_per_class=5),
        store=store,
        extend=True,
        progress=False,
    )
    df = dataset.load_manifest(store)
    assert report.images == len(df) == 60 and df["sha256"].is_unique


def test_missing_source_folder(tmp_path: Path) -> None:
    with pytest.raises(SourceUnavailableError, match="does not exist"):
        ingest(_settings(tmp_path, tmp_path / "nope"), store=LocalStore(tmp_path / "s"))
    (tmp_path / "half" / D).mkdir(parents=True)
    with pytest.raises(SourceUnavailableError, match="no sub-folder for label"):
        ingest(_settings(tmp_path, tmp_path / "half"), store=LocalStore(tmp_path / "s"))


def _cli(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "DANDELION_WORKDIR": str(tmp_path / "work"), **env}
    return subprocess.run(
        [sys.executable, "-m", "dandelion_lib.cli", "ingest", *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_success_and_one_line_errors(greenr_dir: Path, tmp_path: Path) -> None:
    ok = _cli(tmp_path, "--source", str(greenr_dir), "--max-per-class", "25", "--json")
    assert ok.returncode == 0, ok.stderr
    report = json.loads(ok.stdout)
    assert report["images"] == 50 and report["created"] is True
    store = LocalStore(tmp_path / "work" / "store")
    assert dataset.latest_version(store) == report["version"]

    unreachable = f"http://127.0.0.1:{free_port()}/data"
    bad = _cli(tmp_path, DANDELION_SOURCE=unreachable, DANDELION_HTTP_BACKOFF_S="0.01")
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
    assert f"cannot reach {unreachable}" in bad.stderr and "DANDELION_SOURCE" in bad.stderr


def test_progress_bar_when_asked(
    greenr_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = _settings(tmp_path, greenr_dir, max_per_class=10, min_images_per_class=5)
    ingest(settings, store=LocalStore(tmp_path / "a"), progress=True)
    assert "ingest:   0%|" in capsys.readouterr().err
    ingest(settings, store=LocalStore(tmp_path / "b"))  # not a terminal: no bar
    assert "ingest" not in capsys.readouterr().err


def test_invalid_setting_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from dandelion_lib.cli.ingest import load_settings
    from dandelion_lib.core.config import get_settings
    from dandelion_lib.data.rejections import IngestError

    monkeypatch.setenv("DANDELION_LABELS", '["dandelion", "Grass/x"]')
    get_settings.cache_clear()
    try:
        with pytest.raises(IngestError, match=r"^invalid setting labels \(DANDELION_LABELS\)"):
            load_settings()
    finally:
        get_settings.cache_clear()


# --- the negatives source (photos that are neither class) ---------------------------------


@pytest.fixture
def negatives(ood_dir: Path, tmp_path: Path) -> Path:
    """Six photos of each of two kinds from ood-dev, one non-image, a top-level list."""
    root = tmp_path / "neg"
    for kind in ("objects", "daisy"):
        (root / kind).mkdir(parents=True)
        for p in sorted((ood_dir / kind).glob("*.jpg"))[:6]:
            shutil.copy(p, root / kind / p.name)
    (root / "objects" / "broken.jpg").write_text("not a photo")
    (root / "SOURCES.tsv").write_text("file\trepository\n")  # top level: not a photo
    return root


def test_negatives_are_ingested_as_their_own_source(
    greenr_dir: Path, negatives: Path, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    _copy(greenr_dir, src, D, range(25))
    _copy(greenr_dir, src, G, range(25))
    # the same bytes as a labelled photo and as a negative: a conflict, never both
    shutil.copy(src / D / "00000000.jpg", negatives / "daisy" / "looks-familiar.jpg")
    store = LocalStore(tmp_path / "s")
    settings = _settings(tmp_path, src, negatives_source=str(negatives))
    report = ingest(settings, store=store, progress=False)

    df = dataset.load_manifest(store, report.version)
    neg = df[df["label"] == "unknown"]
    assert len(neg) == 12  # 6 + 6 photos; the broken file and the conflict are out
    assert sorted(r.reason for r in report.rejected) == [
        "label_conflict",
        "label_conflict",
        "not_an_image",
    ]
    assert set(neg["split"]) == {"train", "test"}
    assert {dataset.negative_kind(s) for s in neg["source"]} == {"objects", "daisy"}
    assert report.classes["unknown"]["total"] == 12
    assert "negatives" in report.source
    # The quality gates count the classes only: 24 dandelions (one in conflict) still pass.
    assert report.classes[D]["total"] == 24
    # Same inputs, same version; without negatives, another version.
    again = ingest(settings, store=store, progress=False)
    assert again.version == report.version and not again.created
    plain = ingest(_settings(tmp_path, src), store=store, progress=False)
    assert plain.version != report.version


def test_missing_negatives_folder_writes_nothing(greenr_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    _copy(greenr_dir, src, D, range(25))
    _copy(greenr_dir, src, G, range(25))
    store = LocalStore(tmp_path / "s")
    with pytest.raises(SourceUnavailableError, match="DANDELION_NEGATIVES_SOURCE"):
        ingest(
            _settings(tmp_path, src, negatives_source=str(tmp_path / "nope")),
            store=store,
            progress=False,
        )
    (tmp_path / "flat").mkdir()
    with pytest.raises(SourceUnavailableError, match="no sub-folders"):
        ingest(
            _settings(tmp_path, src, negatives_source=str(tmp_path / "flat")),
            store=store,
            progress=False,
        )
    assert list(store.list("datasets/")) == []


def test_accepted_feedback_joins_the_next_version(
    greenr_dir: Path, ood_dir: Path, tmp_path: Path
) -> None:
    """Reviewed, accepted feedback images enter with the label the user gave (``neither``:
    a negative); rejected and unreviewed feedback never does."""
    from dandelion_lib.core.storage import open_store
    from dandelion_lib.data.feedback import FeedbackStore, PredictionRecord

    src = tmp_path / "src"
    _copy(greenr_dir, src, D, range(25))
    _copy(greenr_dir, src, G, range(25))
    settings = _settings(tmp_path, src)
    store = open_store(settings=settings)
    before = ingest(settings, store=store, progress=False)  # no feedback database yet: fine

    feedback = FeedbackStore.from_settings(settings)
    queue = ReviewQueue(feedback)
    photos = {
        "neither": (ood_dir / "objects").glob("*.jpg"),
        G: (greenr_dir / G).glob("0000019*.jpg"),
        D: (greenr_dir / D).glob("0000018*.jpg"),
    }
    decisions = {"neither": True, G: True, D: False}
    ids: dict[str, list[str]] = {}
    for label, files in photos.items():
        for n, path in enumerate(sorted(files)[:3]):
            data = path.read_bytes()
            pid = f"{label}-{n}"
            feedback.record_predictions(
                [
                    PredictionRecord(
                        pid,
                        "dandelion",
                        "dandelion",
                        0.9,
                        {"dandelion": 0.9, "grass": 0.1},
                        model_name="dandelion",
                        model_version="3",
                    )
                ]
            )
            record = feedback.add_feedback(pid, label, data)
            ids.setdefault(label, []).append(record.feedback_id)
            if n < 2:  # the third of each stays pending
                queue.review(record.feedback_id, accepted=decisions[label])
    feedback.close()

    after = ingest(settings, store=store, progress=False)
    assert after.version != before.version
    df = dataset.load_manifest(store, after.version)
    from_feedback = df[df["source"].str.startswith("feedback:")]
    got = {(r.label, r.source.removeprefix("feedback:")) for r in from_feedback.itertuples()}
    want = {("unknown", i) for i in ids["neither"][:2]} | {(G, i) for i in ids[G][:2]}
    assert got == want
    assert {dataset.negative_kind(s) for s in df[df["label"] == "unknown"]["source"]} == {
        "feedback"
    }
    assert "accepted feedback (4)" in after.source

    off = ingest(settings.updated(**{"ingest_feedback": False}), store=store, progress=False)
    assert off.version == before.version

    # Retraining's ingestion: the latest version (``before`` again) plus the accepted photos
    # it lacks gives the same version as ingesting the source with them; then none waits.
    added = add_accepted_feedback(settings, store=store, progress=False)
    assert added is not None and added.version == after.version
    assert add_accepted_feedback(settings, store=store, progress=False) is None

    # Provenance: the version's report names, per accepted photo, the model version that
    # answered, what it answered and when the reviewer accepted it.
    report = dataset.load_report(store, after.version)
    entries = {e["feedback_id"]: e for e in report["feedback"]}
    assert set(entries) == {i for _, i in want}
    for e in entries.values():
        assert (e["model_name"], e["model_version"]) == ("dandelion", "3")
        assert e["predicted_label"] == "dandelion"
        assert e["reviewed_at"] and e["sent_at"] <= e["reviewed_at"]
        row = df[df["source"] == f"feedback:{e['feedback_id']}"].iloc[0]
        assert (e["sha256"], e["label"], e["split"]) == (row.sha256, row.label, row.split)


def test_feedback_never_relabels_a_photo_of_the_dataset(greenr_dir: Path, tmp_path: Path) -> None:
    """Accepted feedback that gives a dataset photo another label is a ``label_conflict``:
    listed in the report, left out; the dataset's label stands, in a full ingestion and when
    retraining extends the latest version, and the photo does not count as waiting."""
    from dandelion_lib.core.storage import open_store
    from dandelion_lib.data.feedback import FeedbackStore, PredictionRecord

    src = tmp_path / "src"
    _copy(greenr_dir, src, D, range(25))
    _copy(greenr_dir, src, G, range(25))
    settings = _settings(tmp_path, src)
    store = open_store(settings=settings)
    before = ingest(settings, store=store, progress=False)
    photo = sorted((src / D).iterdir())[3]

    feedback = FeedbackStore.from_settings(settings)
    queue = ReviewQueue(feedback)
    ids = []
    new_photo = sorted((greenr_dir / G).glob("*.jpg"))[-1]
    for pid, data in (("p", photo.read_bytes()), ("q", new_photo.read_bytes())):
        feedback.record_predictions(
            [PredictionRecord(pid, "dandelion", "dandelion", 0.6, {"dandelion": 0.6, "grass": 0.4})]
        )
        record = feedback.add_feedback(pid, G, data)
        queue.review(record.feedback_id, accepted=True)
        ids.append(record.feedback_id)
    assert queue.awaiting_dataset().count == 1  # the conflicting photo does not wait
    feedback.close()

    extended = add_accepted_feedback(settings, store=store, progress=False)
    full = ingest(settings, store=store, progress=False)
    assert extended is not None and extended.created and full.version == extended.version
    for report in (extended, full):
        conflicts = [r for r in report.rejected if r.reason == "label_conflict"]
        assert [(r.source, r.label) for r in conflicts] == [(f"feedback:{ids[0]}", G)]
        assert "dandelion" in conflicts[0].detail and "stands" in conflicts[0].detail
    df = dataset.load_manifest(store)
    assert len(df) == len(dataset.load_manifest(store, before.version)) + 1
    sha = df[df["source"].str.endswith(photo.name)]["sha256"].iloc[0]
    assert df[df["sha256"] == sha]["label"].tolist() == [D]
    assert df[df["source"] == f"feedback:{ids[1]}"]["label"].tolist() == [G]


def test_only_image_data_enters_the_store(greenr_dir: Path, tmp_path: Path) -> None:
    """A photo with a ZIP or HTML payload appended is stored without it, keyed (and listed in
    the manifest) by the sha256 of the stored bytes; the same photo with and without a
    payload is one image."""
    import zipfile

    src = tmp_path / "src"
    _copy(greenr_dir, src, D, range(25))
    _copy(greenr_dir, src, G, range(25))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("index.html", "<html><script>alert(1)</script></html>")
    payload = buf.getvalue()
    dandelion0 = (greenr_dir / D / "00000000.jpg").read_bytes()
    grass30 = (greenr_dir / G / "00000030.jpg").read_bytes()
    (src / D / "polyglot-of-0.jpg").write_bytes(dandelion0 + payload)
    (src / G / "polyglot-30.jpg").write_bytes(grass30 + b"<html><body>hi</body></html>")
    settings = _settings(tmp_path, src)
    store = LocalStore(tmp_path / "store")
    report = ingest(settings, store=store, progress=False)

    assert report.images == 51 and report.duplicates == 1 and not report.rejected
    df = dataset.load_manifest(store, report.version)
    assert hashlib.sha256(grass30).hexdigest() in set(df["sha256"])
    for row in df.itertuples():
        stored = store.get_bytes(row.key)
        assert hashlib.sha256(stored).hexdigest() == row.sha256 and row.sha256 in row.key
        assert row.bytes == len(stored)
        assert b"<html>" not in stored and not zipfile.is_zipfile(io.BytesIO(stored))
    assert {k for k in store.list("raw/")} == set(df["key"])
    index = json.loads(store.get_bytes("ingest/index.json"))
    entry = index["sources"][str(src / G / "polyglot-30.jpg")]
    assert entry["sha256"] == hashlib.sha256(grass30).hexdigest()
    assert (
        entry["original_sha256"]
        == hashlib.sha256((src / G / "polyglot-30.jpg").read_bytes()).hexdigest()
    )

    again = ingest(settings, store=store, progress=False)
    assert again.version == report.version and again.new == 0
