"""The ingest pool's checkpoints of the source index (``data.pool``), on a real local store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dandelion_lib.core.storage import LocalStore
from dandelion_lib.data.pool import INDEX_KEY, Outcome, SourceIndex, _Checkpoint
from dandelion_lib.data.sources import SourceItem


class _Bar:
    def update(self, n: int) -> None:
        pass


class _CountingIndex(SourceIndex):
    """The real index, counting its saves and the bytes each one wrote."""

    def __init__(self, store: Any) -> None:
        super().__init__(store)
        self.written: list[int] = []

    def save(self) -> None:
        super().save()
        self.written.append(len(self.store.get_bytes(INDEX_KEY)))


def _new(i: int) -> Outcome:
    sha = f"{i:064x}"
    item = SourceItem("grass", f"/photos/grass/{i}.jpg")
    image = {"ext": "jpg", "width": 640, "height": 480, "phash": f"{i:016x}"}
    return Outcome(item, "new", sha256=sha, image=image, entry={"sha256": sha, "size": i})


def test_checkpoints_write_a_bounded_multiple_of_the_final_index(tmp_path: Path) -> None:
    """The index is one document rewritten whole: checkpoints every 50 images would write
    O(N^2) bytes over a run; growing with the index they stay within ~11x its final size."""
    index = _CountingIndex(LocalStore(tmp_path))
    checkpoint = _Checkpoint(index, min_interval_s=0.0)
    n = 20_000
    for i in range(n):
        checkpoint.note(_new(i), _Bar())
    index.save()
    final = index.written[-1]
    assert sum(index.written) <= 12 * final, (len(index.written), sum(index.written), final)
    assert len(index.written) < 60  # 400 saves at a fixed 50 images
    # Early in a run it still saves every 50 images, so a killed run loses little.
    assert len(SourceIndex(LocalStore(tmp_path)).images) == n


def test_the_first_checkpoint_comes_after_fifty_new_images(tmp_path: Path) -> None:
    index = _CountingIndex(LocalStore(tmp_path))
    checkpoint = _Checkpoint(index, min_interval_s=0.0)
    for i in range(49):
        checkpoint.note(_new(i), _Bar())
    assert index.written == []
    checkpoint.note(_new(49), _Bar())
    assert len(index.written) == 1
    assert len(SourceIndex(LocalStore(tmp_path)).images) == 50
