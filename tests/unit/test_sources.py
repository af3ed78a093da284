"""Naming the labelled sources of ``DANDELION_SOURCE`` (dandelion_lib.data.sources)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dandelion_lib.core.config import DEFAULT_SOURCE, Settings
from dandelion_lib.data.httpsource import HttpSource
from dandelion_lib.data.ingest import make_source, make_sources
from dandelion_lib.data.rejections import IngestError
from dandelion_lib.data.sources import (
    CombinedSource,
    FolderSource,
    absolute_source_specs,
    default_source_name,
    parse_source_specs,
)


def test_default_names() -> None:
    assert default_source_name(DEFAULT_SOURCE) == "greenr"
    assert default_source_name(DEFAULT_SOURCE + "/") == "greenr"
    assert default_source_name("https://host/photos/lawn/") == "lawn"
    assert default_source_name("http://host:8000") == "host"
    assert default_source_name("../shared/datasets/indomain-dev/") == "indomain-dev"
    assert default_source_name("file:///photos/my%20lawn") == "my lawn"
    assert default_source_name("s3://shared-photos") == "shared-photos"
    assert default_source_name("s3://bucket/team/lawn/") == "lawn"


def test_bucket_sources_in_a_list(tmp_path: Path) -> None:
    settings = Settings(workdir=tmp_path / "work", s3_endpoint_url="http://127.0.0.1:9")
    sources = make_sources(
        f"s3://shared-photos,s3://b/team/lawn/,mine=s3://b/p,{tmp_path}", settings
    )
    assert [type(s).__name__ for s in sources] == ["S3Source"] * 3 + ["FolderSource"]
    assert [s.origin for s in sources] == ["shared-photos", "lawn", "mine", tmp_path.name]
    assert [s.description for s in sources[:3]] == [
        "s3://shared-photos",
        "s3://b/team/lawn",
        "s3://b/p",
    ]
    with pytest.raises(IngestError, match="are the same"):
        make_sources("s3://b/p,other=s3://b/p/", settings)
    with pytest.raises(IngestError, match=r"s3://bucket\[/prefix\]"):
        make_sources("x=s3:///nobucket", settings)


def test_a_list_of_sources_named_or_not_in_its_order() -> None:
    value = f" {DEFAULT_SOURCE} , mine=/photos/lawn,,file:///data/x, b.2=http://h/p?a=b "
    assert parse_source_specs(value) == [
        ("greenr", DEFAULT_SOURCE),
        ("mine", "/photos/lawn"),
        ("x", "file:///data/x"),
        ("b.2", "http://h/p?a=b"),
    ]
    assert parse_source_specs("/photos/lawn") == [("lawn", "/photos/lawn")]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            "/a/lawn,/b/lawn",
            r"two sources are named 'lawn' \(/a/lawn and /b/lawn\).*lawn-2=/b/lawn",
        ),
        ("x=/a,x=/b", "two sources are named 'x'"),
        ("feedback=/a", "reserved name"),
        ("/data/negatives", "reserved name.*another-name=/data/negatives"),
        (" , ", "DANDELION_SOURCE is empty"),
    ],
)
def test_names_must_be_unique_and_not_reserved(value: str, message: str) -> None:
    with pytest.raises(IngestError, match=message):
        parse_source_specs(value)


def test_make_sources_names_each_source(tmp_path: Path) -> None:
    settings = Settings(workdir=tmp_path)
    greenr, mine = make_sources(f"{DEFAULT_SOURCE},mine={tmp_path / 'lawn'}", settings)
    assert isinstance(greenr, HttpSource) and greenr.origin == "greenr"
    assert isinstance(mine, FolderSource) and mine.origin == "mine"
    assert mine.root == tmp_path / "lawn"
    greenr.close()
    # make_source: one spec as before, the default from the settings, several combined
    single = make_source(str(tmp_path / "lawn"), settings)
    assert isinstance(single, FolderSource) and single.origin == "lawn"
    assert make_source(None, settings.updated(source=str(tmp_path))).origin == tmp_path.name
    both = make_source(f"a={tmp_path / 'a'},b={tmp_path / 'b'}", settings)
    assert isinstance(both, CombinedSource) and [p.origin for p in both.parts] == ["a", "b"]
    with pytest.raises(IngestError, match="are the same"):
        make_sources(f"a={tmp_path / 'a'},b={tmp_path / 'x' / '..' / 'a'}", settings)


def test_absolute_specs_keep_each_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lawn").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "lawn")
    assert absolute_source_specs("lawn") == str(tmp_path / "lawn")
    assert absolute_source_specs(f"link,m=lawn,{DEFAULT_SOURCE},n=http://h/x") == ",".join(
        [
            f"link={tmp_path / 'lawn'}",
            f"m={tmp_path / 'lawn'}",
            DEFAULT_SOURCE,
            "n=http://h/x",
        ]
    )
