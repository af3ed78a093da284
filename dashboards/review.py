"""The reviewer page's widgets: the queue of pending feedback, decisions and the live count.

:class:`ReviewPage` shows :meth:`ReviewQueue.pending
<dandelion_lib.data.review.ReviewQueue.pending>` (most informative first; the rule is the
library's) as cards: the photo (read from the object store by its key), the model's answer and
confidence, the user's label, the model version. Each card has *Accept* and *Reject*; ticked
cards are decided together (one transaction). A count of accepted photos that the latest
dataset version does not have yet (:meth:`ReviewQueue.awaiting_dataset`) is refreshed after
each decision and by a background thread, so decisions of other reviewers and new dataset
versions show up by themselves.

Beside each photo the card shows where the model looked (:class:`Looked`): the page sends the
stored photo to the API (``POST /predict?explain=true&purpose=review``,
:class:`~dashboards.client.ApiClient`, as the app does, but not counted as a user's prediction) once per card, after the cards are shown, and draws the map over the photo
with the app's renderer (:func:`~dashboards.client.make_thumbnail`). The map is the model the
API serves now (its version is named, and the one that answered the feedback when they
differ). When the API is unavailable, or its model cannot explain, the card says so in one
line and the rest of the page works as before.

The page reads the feedback database and the object store directly (the reviewer page is an
internal tool; see docs/user-guide.md), asks the API only for the maps, and imports no
TensorFlow.
"""

from __future__ import annotations

import datetime as dt
import html
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

import ipywidgets as w

from dandelion_lib.core.config import Settings
from dandelion_lib.core.errors import DandelionError
from dandelion_lib.core.images import DEFAULT_MAX_PIXELS
from dandelion_lib.core.labels import NEITHER
from dandelion_lib.data.feedback import FeedbackStore
from dandelion_lib.data.review import AwaitingDataset, ReviewItem, ReviewQueue
from dashboards.client import ApiClient, ApiUnavailableError, Result, make_thumbnail, percent
from dashboards.ui import label_html, neither_text

log = logging.getLogger(__name__)

REASONS = {
    "disagreement": ("The user disagrees with the model", "#b00020"),
    "uncertain": ("The model was uncertain", "#7a7a7a"),
    "unknown": ("The model answered unknown", "#7b3fa0"),
    "agreement": ("The user agrees with the model", "#3a9d23"),
}

STYLE = """
<style>
.celltag_dev-only { display: none !important; }
.dl-review { max-width: 1100px; font-family: var(--jp-ui-font-family, sans-serif); }
.dl-review h2 { margin: 0 0 4px 0; }
.dl-count { background: #eef6ee; border: 1px solid #9cc99c; border-left: 6px solid #3a9d23;
  padding: 8px 12px; border-radius: 4px; }
.dl-review-error { background: #fdecee; border: 1px solid #e08a94; border-left: 6px solid #b00020;
  padding: 8px 12px; border-radius: 4px; color: #5a0010; }
.dl-item { border: 1px solid #ddd; border-radius: 6px; padding: 6px; margin: 4px 0; width: 100%; }
.dl-reason { display: inline-block; padding: 1px 8px; border-radius: 8px; color: white;
  font-size: 12px; }
.dl-item-meta { color: #555; font-size: 12px; }
.dl-label { display: inline-block; padding: 2px 10px; border-radius: 10px; color: white;
  font-weight: bold; }
.dl-noprev { width: 120px; height: 90px; display: flex; align-items: center;
  justify-content: center; background: #f3f3f3; color: #888; font-size: 12px; }
.dl-looked, .dl-looked-none { width: 140px; color: #555; font-size: 11px; line-height: 1.3; }
</style>
"""


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def said_text(correct_label: str, labels: Iterable[str]) -> str:
    """What the user's label says: the class, or "neither dandelion nor grass"."""
    return neither_text(list(labels)) if correct_label == NEITHER else correct_label


def item_html(item: ReviewItem, labels: Sequence[str]) -> str:
    """The text of one queue card: why it is up there, the model's answer and confidence,
    the user's label, the model version and when the feedback came."""
    fb = item.feedback
    reason, color = REASONS.get(item.reason, (item.reason, "#7a7a7a"))
    if item.answer is None:
        answer = "<i>not recorded</i>"
    else:
        badge = label_html(item.answer, labels)
        answer = f"{badge} confidence {_esc(percent(item.confidence))}"
        if item.answer != fb.predicted_label:
            answer += f" (top class {_esc(fb.predicted_label)})"
    when = fb.created_at.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f'<span class="dl-reason dl-reason-{_esc(item.reason)}" style="background:{color}">'
        f"{_esc(reason)}</span>"
        f'<div class="dl-item-answer">Model answered: {answer}</div>'
        f'<div class="dl-item-user">User says: <b>{_esc(said_text(fb.correct_label, labels))}'
        "</b></div>"
        f'<div class="dl-item-meta">model {_esc(fb.model_name or "?")} version '
        f"{_esc(fb.model_version or '?')} · {when} · feedback {_esc(fb.feedback_id)}</div>"
    )


def count_html(awaiting: AwaitingDataset, pending: int) -> str:
    """The live count line: accepted photos waiting for the next dataset, and the backlog."""
    photos = "photo" if awaiting.count == 1 else "photos"
    against = (
        f"latest dataset version {_esc(awaiting.version)}"
        if awaiting.version
        else "no dataset version yet"
    )
    return (
        f'<div class="dl-count"><b class="dl-count-waiting">{awaiting.count}</b> accepted '
        f"{photos} waiting for the next dataset ({awaiting.accepted} accepted in all; "
        f'{against}) · <b class="dl-count-pending">{pending}</b> pending review</div>'
    )


@dataclass(frozen=True)
class Looked:
    """Where the model looked at one card's photo: the photo with the map and its caption, or
    one line saying why there is none."""

    line: str
    """HTML: the caption under the map, or why there is no map."""
    image: bytes | None = None
    """The photo with the map over it (JPEG), at the photo's aspect ratio."""
    lasting: bool = True
    """False when it may change by itself (the API unavailable, a model that cannot explain):
    the page asks again at the next refresh instead of keeping it."""


def no_map(reason: str, *, lasting: bool = True) -> Looked:
    """The one line a card shows instead of the map."""
    return Looked(f'<div class="dl-looked-none">No map: {_esc(reason)}</div>', lasting=lasting)


def looked_caption(result: Result, answered_by: str | None) -> str:
    """The map's caption: the class it shows, and which model version drew it (the API's
    current one), with the version that answered the feedback when that is another."""
    served = result.model_version or "?"
    explained = (result.explanation or {}).get("class", "?")
    text = (
        f"Red: where the model found {explained}. Map by version {served}, the model the "
        "API serves now"
    )
    if answered_by and answered_by != served:
        text += f"; version {answered_by} answered this feedback"
    return f'<div class="dl-looked">{_esc(text)}.</div>'


def show_looked(box: w.VBox, looked: Looked) -> None:
    """Put ``looked`` in a card's box beside the photo: the photo with the map over it and its
    caption, or the one line saying why there is no map."""
    line = w.HTML(looked.line)
    if looked.image is None:
        box.children = [line]
        return
    image = w.Image(value=looked.image, format="jpeg", layout=w.Layout(width="140px"))
    image.add_class("dl-looked-map")
    box.children = [image, line]


@dataclass
class Card:
    """One item's widgets."""

    item: ReviewItem
    select: w.Checkbox
    accept: w.Button
    reject: w.Button
    widget: w.Widget
    preview: w.Widget
    """The photo (or why there is none)."""
    text: w.HTML
    looked: w.VBox | None = None
    """Beside the photo: where the model looked (None: no photo, or no API to ask)."""


class ReviewPage:
    """The reviewer page; display ``page.widget``, then ``page.start()`` for the live count.

    ``client`` is the API that draws the maps of where the model looked (None: no maps).
    """

    def __init__(
        self,
        feedback: FeedbackStore,
        *,
        client: ApiClient | None = None,
        page_size: int = 50,
        refresh_interval_s: float = 10.0,
        max_image_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.feedback = feedback
        self.client = client
        self.queue = ReviewQueue(feedback)
        self.page_size = page_size
        self.refresh_interval_s = refresh_interval_s
        self.max_image_pixels = max_image_pixels
        self.cards: dict[str, Card] = {}
        self.awaiting: AwaitingDataset | None = None
        self.pending = 0
        self._thumbs: dict[str, bytes | None] = {}
        self._looked: dict[str, Looked] = {}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

        self.count = w.HTML()
        self.count.add_class("dl-count-box")
        self.error = w.HTML(layout=w.Layout(display="none"))
        self.error.add_class("dl-error-box")
        self.status = w.HTML()
        self.status.add_class("dl-review-status")
        self.items = w.VBox()
        self.items.add_class("dl-items")
        self.widget = self._layout(self._toolbar())

    def _toolbar(self) -> w.HBox:
        """Select all, the bulk decisions, Refresh, and the status line."""
        self.select_all = w.Checkbox(description="Select all shown", indent=False)
        self.select_all.observe(self._on_select_all, names="value")
        self.accept_selected = w.Button(
            description="Accept selected", button_style="success", icon="check"
        )
        self.reject_selected = w.Button(
            description="Reject selected", button_style="danger", icon="times"
        )
        self.reload = w.Button(description="Refresh", icon="refresh")
        self.accept_selected.on_click(lambda _b: self.decide(self.selected_ids(), True))
        self.reject_selected.on_click(lambda _b: self.decide(self.selected_ids(), False))
        self.reload.on_click(lambda _b: self.refresh())
        return w.HBox(
            [self.select_all, self.accept_selected, self.reject_selected, self.reload, self.status],
            layout=w.Layout(align_items="center"),
        )

    def _layout(self, toolbar: w.HBox) -> w.VBox:
        intro = (
            "<h2>Review feedback</h2><p>Pending feedback, most informative first: "
            "disagreements, then answers the model was unsure of (uncertain, unknown), then "
            "lowest confidence. Accepted photos join the next dataset version under the user's "
            "label (<i>neither</i>: as a photo of neither class); rejected ones never do.</p>"
        )
        page = w.VBox([w.HTML(STYLE), w.HTML(intro), self.count, self.error, toolbar, self.items])
        page.add_class("dl-review")
        return page

    @classmethod
    def from_settings(
        cls, settings: Settings, *, page_size: int = 50, refresh_interval_s: float = 10.0
    ) -> ReviewPage:
        """The page on the settings' feedback database and store, with the maps from the API
        at ``serving.api_url``."""
        client = ApiClient(
            settings.serving.api_url,
            timeout=settings.app.app_request_timeout_s,
            labels=settings.labels,
        )
        return cls(
            FeedbackStore.from_settings(settings),
            client=client,
            page_size=page_size,
            refresh_interval_s=refresh_interval_s,
            max_image_pixels=settings.images.max_image_pixels,
        )

    # --- state -------------------------------------------------------------------------------
    def _guard(self, action: Callable[[], object]) -> bool:
        """Run ``action``; a library error becomes the page's error line (no traceback)."""
        try:
            action()
        except DandelionError as exc:
            self.error.value = f'<div class="dl-review-error">{_esc(exc)}</div>'
            self.error.layout.display = None
            return False
        self.error.value = ""
        self.error.layout.display = "none"
        return True

    def refresh(self) -> bool:
        """Reload the queue and the count, then the maps of new cards; ticked cards that are
        still pending stay ticked."""
        with self._lock:
            return self._guard(self._load)

    def _load(self) -> None:
        queue = self.queue.pending(self.page_size)
        selected = set(self.selected_ids())
        cards = {}
        for item in queue:
            fid = item.feedback.feedback_id
            card = self._card(item)
            card.select.value = fid in selected
            cards[fid] = card
        self.cards = cards
        self.items.children = [c.widget for c in cards.values()] or [
            w.HTML("<p><i>Nothing to review.</i></p>")
        ]
        self._thumbs = {k: v for k, v in self._thumbs.items() if k in cards}
        self._looked = {k: v for k, v in self._looked.items() if k in cards}
        self._count()
        self._show_maps()

    def _count(self) -> None:
        pending = self.queue.count_pending()
        awaiting = self.queue.awaiting_dataset()
        self.pending, self.awaiting = pending, awaiting
        shown = len(self.cards)
        more = f" (showing the first {shown})" if pending > shown else ""
        self.count.value = count_html(awaiting, pending) + _esc(more)

    def refresh_count(self) -> bool:
        """Recount (the background thread's job): other reviewers and ingestions change it."""
        with self._lock:
            return self._guard(self._count)

    def selected_ids(self) -> list[str]:
        """Ticked items, in queue order."""
        return [fid for fid, card in self.cards.items() if card.select.value]

    def decide(self, feedback_ids: list[str], accepted: bool) -> bool:
        """Accept or reject items (all or none: one transaction), then reload the queue."""
        if not feedback_ids:
            self.status.value = "<i>Tick some photos first.</i>"
            return False
        with self._lock:
            ok = self._guard(lambda: self.queue.review_many(feedback_ids, accepted))
            if not ok:
                self.status.value = '<span class="dl-error">Nothing was changed.</span>'
                return False
            n = len(set(feedback_ids))
            verb = "Accepted" if accepted else "Rejected"
            self.status.value = (
                f'<span class="dl-review-done">{verb} {n} item{"s" if n != 1 else ""}.</span>'
            )
            if set(feedback_ids) >= set(self.selected_ids()):
                self.select_all.value = False  # unticks every card
            for fid in feedback_ids:
                if fid in self.cards:
                    self.cards[fid].select.value = False
            return self.refresh()

    def _on_select_all(self, change: dict[str, object]) -> None:
        for card in self.cards.values():
            card.select.value = bool(change["new"])

    # --- cards -------------------------------------------------------------------------------
    def _photo(self, item: ReviewItem) -> bytes | None:
        """The item's photo from the store (None: none sent, or unreadable: logged)."""
        key = item.feedback.image_key
        if not key or self.feedback.store is None:
            return None
        try:
            return self.feedback.store.get_bytes(key)
        except DandelionError as exc:
            log.warning("no photo for feedback %s: %s", item.feedback.feedback_id, exc)
            return None

    def thumbnail(self, item: ReviewItem) -> bytes | None:
        """A JPEG preview of the item's photo (None: no photo sent, missing or unreadable)."""
        fid = item.feedback.feedback_id
        if fid not in self._thumbs:
            data = self._photo(item)
            self._thumbs[fid] = (
                None
                if data is None
                else make_thumbnail(data, size=160, max_pixels=self.max_image_pixels)
            )
        return self._thumbs[fid]

    def where_looked(self, item: ReviewItem) -> Looked:
        """Ask the API where its model looks on the item's photo (one prediction with
        ``explain=true``) and draw the map over the photo; or say why there is no map."""
        data = self._photo(item)
        if self.client is None or data is None:
            return no_map("the photo is unavailable")
        name = PurePosixPath(item.feedback.image_key or "photo.jpg").name
        try:
            result = self.client.predict(name, data, explain=True, review=True)
        except ApiUnavailableError as exc:
            return no_map(str(exc), lasting=False)
        if result.error is not None:
            return no_map(f"the API refused the photo ({result.error})")
        if result.explanation is None:
            why = result.explain_note or "it sent no explanation"
            version = result.model_version or "?"
            return no_map(
                f"the API's model (version {version}) cannot show where it looked ({why})",
                lasting=False,
            )
        image = make_thumbnail(
            data, size=160, max_pixels=self.max_image_pixels, explanation=result.explanation
        )
        if image is None:
            return no_map("the map cannot be drawn on this photo")
        return Looked(looked_caption(result, item.feedback.model_version), image)

    def _show_maps(self) -> None:
        """Fill in the cards' maps, asking the API for those not known yet, card by card (the
        cards are already on the page). Once the API turns out to be unavailable, or its model
        cannot explain, the remaining cards say so without asking; the next refresh asks
        again."""
        gave_up: Looked | None = None
        for fid, card in self.cards.items():
            if card.looked is None:
                continue
            looked = self._looked.get(fid)
            if looked is None:
                looked = gave_up or self.where_looked(card.item)
                if looked.lasting:
                    self._looked[fid] = looked
                else:
                    gave_up = looked
            show_looked(card.looked, looked)

    def _card(self, item: ReviewItem) -> Card:
        fid = item.feedback.feedback_id
        thumb = self.thumbnail(item)
        preview: w.Widget
        looked = None
        if thumb is not None:
            preview = w.Image(value=thumb, format="jpeg", layout=w.Layout(width="140px"))
            if self.client is not None:
                looked = w.VBox()
                looked.add_class("dl-looked-box")
                waiting = '<div class="dl-looked-none">Asking the API where the model looked…</div>'
                show_looked(looked, self._looked.get(fid, Looked(waiting)))
        else:
            text = "no photo sent" if not item.feedback.image_key else "photo unavailable"
            preview = w.HTML(f'<div class="dl-noprev">{text}</div>')
        select = w.Checkbox(description="", indent=False, layout=w.Layout(width="28px"))
        select.add_class("dl-select")
        accept = w.Button(description="Accept", button_style="success", icon="check")
        reject = w.Button(description="Reject", button_style="danger", icon="times")
        accept.add_class("dl-accept")
        reject.add_class("dl-reject")
        accept.on_click(lambda _b: self.decide([fid], True))
        reject.on_click(lambda _b: self.decide([fid], False))
        text = w.HTML(item_html(item, self.feedback.labels))
        parts = [select, preview, *([looked] if looked is not None else [])]
        widget = w.HBox(
            [*parts, w.VBox([text, w.HBox([accept, reject])])],
            layout=w.Layout(align_items="center"),
        )
        widget.add_class("dl-item")
        widget.add_class(f"dl-item-{item.reason}")
        return Card(item, select, accept, reject, widget, preview, text, looked)

    # --- live count ----------------------------------------------------------------------------
    def start(self) -> ReviewPage:
        """Load the queue now, then keep the count fresh in a background thread."""
        self._stop.clear()
        self.refresh()
        if self._thread is None and self.refresh_interval_s > 0:
            self._thread = threading.Thread(target=self._loop, name="review-count", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.refresh_interval_s + 5)
            self._thread = None
        self.feedback.close()
        if self.client is not None:
            self.client.close()

    def _loop(self) -> None:
        while not self._stop.wait(self.refresh_interval_s):
            try:
                self.refresh_count()
            except Exception:  # keep counting whatever happens; never kill the page
                log.exception("review count refresh failed")
