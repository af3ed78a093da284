"""The web app's widgets: header, API banner, upload, result cards, history and feedback.

:class:`DandelionApp` renders the view model of :mod:`dashboards.client` with ipywidgets. A
background thread re-checks the API every few seconds: while it is down or its model is not
ready the banner says so and uploads are disabled; when it comes back the banner goes away by
itself. Widget updates from that thread and from upload/button handlers share one lock.
"""

from __future__ import annotations

import base64
import html
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import ipywidgets as w

from dandelion_lib.core.config import Settings
from dandelion_lib.core.errors import DandelionError
from dandelion_lib.core.images import DEFAULT_MAX_PIXELS
from dandelion_lib.core.labels import NEITHER, UNCERTAIN, UNKNOWN
from dashboards.client import (
    ApiClient,
    ApiUnavailableError,
    Health,
    History,
    ModelInfo,
    Result,
    content_type,
    make_thumbnail,
    percent,
)

log = logging.getLogger(__name__)

CLASS_COLORS = ("#e0b000", "#3a9d23", "#1f77b4", "#d62728", "#8c564b", "#e377c2")
"""Colours of the class labels, in class order (the first two: dandelion yellow, grass green)."""
ANSWER_COLORS = {UNCERTAIN: "#7a7a7a", UNKNOWN: "#7b3fa0"}
HISTORY_COLUMNS = ("time", "file", "label", "confidence", "model_version", "feedback", "error")
"""Columns of the on-page table (the CSV has all of ``client.CSV_COLUMNS``)."""

STYLE = """
<style>
.celltag_dev-only { display: none !important; }
.dl-app { max-width: 980px; font-family: var(--jp-ui-font-family, sans-serif); }
.dl-header h2 { margin: 0 0 4px 0; }
.dl-model { color: #444; font-size: 14px; }
.dl-banner { background: #fff4e5; border: 1px solid #f0a030; border-left: 6px solid #e07b00;
  padding: 10px 14px; border-radius: 4px; color: #5a3200; }
.dl-card { border: 1px solid #ddd; border-radius: 6px; padding: 8px; margin: 6px 0; width: 100%; }
.dl-label { display: inline-block; padding: 2px 10px; border-radius: 10px; color: white;
  font-weight: bold; }
.dl-file { font-weight: bold; margin-right: 8px; }
.dl-error { color: #b00020; }
.dl-unknown { color: #4a2363; font-weight: bold; margin-top: 4px; }
.dl-bar { display: flex; width: 320px; height: 14px; border-radius: 7px; overflow: hidden;
  background: #eee; margin: 6px 0 2px 0; }
.dl-legend { font-size: 12px; color: #555; }
.dl-noprev { width: 120px; height: 90px; display: flex; align-items: center;
  justify-content: center; background: #f3f3f3; color: #888; font-size: 12px; }
.dl-history table { border-collapse: collapse; font-size: 12px; }
.dl-history th, .dl-history td { border-bottom: 1px solid #ddd; padding: 3px 8px;
  text-align: left; vertical-align: top; }
.dl-history th { white-space: nowrap; }
.dl-looked { font-size: 11px; color: #555; max-width: 160px; }
</style>
"""


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def label_colors(labels: Sequence[str]) -> dict[str, str]:
    """The colour of each class label (by its position) and of ``uncertain`` and ``unknown``."""
    classes = {lab: CLASS_COLORS[i % len(CLASS_COLORS)] for i, lab in enumerate(labels)}
    return classes | ANSWER_COLORS


def label_html(label: str, labels: Sequence[str]) -> str:
    """A coloured badge for a class of ``labels``, ``uncertain`` or ``unknown``."""
    color = label_colors(labels).get(label, ANSWER_COLORS[UNCERTAIN])
    return (
        f'<span class="dl-label dl-label-{_esc(label)}" style="background:{color}">'
        f"{_esc(label)}</span>"
    )


def probability_bar_html(probabilities: dict[str, float]) -> str:
    """A stacked bar of the class probabilities with a legend underneath."""
    segments = []
    legend = []
    colors = label_colors(list(probabilities))
    for lab, value in probabilities.items():
        p = max(0.0, min(1.0, float(value)))
        color = colors[lab]
        segments.append(
            f'<div class="dl-bar-{lab}" style="width:{100 * p:.2f}%;background:{color}"></div>'
        )
        legend.append(f"{lab} {percent(p)}")
    return (
        f'<div class="dl-bar" title="{_esc(" · ".join(legend))}">{"".join(segments)}</div>'
        f'<div class="dl-legend">{_esc(" · ".join(legend))}</div>'
    )


def _classes(result: Result, labels: Sequence[str]) -> list[str]:
    """The model's labels (the keys of the answer's probabilities), else ``labels``."""
    return list(result.probabilities) or list(labels)


def unknown_message(labels: list[str]) -> str:
    """What an ``unknown`` answer tells the user, e.g. "This doesn't look like a dandelion
    or a grass photo"."""
    return f"This doesn't look like {' or '.join(f'a {lab}' for lab in labels)} photo"


def neither_text(labels: list[str]) -> str:
    """``"neither dandelion nor grass"``: what ``neither`` feedback says."""
    return "neither " + " nor ".join(labels)


def title(labels: Sequence[str]) -> str:
    """The app's title: "Dandelion or grass?" for the default labels."""
    return " or ".join(labels).capitalize() + "?"


def intro_html(labels: Sequence[str]) -> str:
    """What the app does, in one paragraph, naming the class labels."""
    classes = " or ".join(f"<b>{_esc(lab)}</b>" for lab in labels)
    return (
        f"<p>Upload one or more photos: each is classified as {classes}, <b>uncertain</b> when "
        "the model is not sure, or <b>unknown</b> when the photo looks like neither. Tell us "
        "whether it was right: your feedback improves the next model.</p>"
    )


def result_summary_html(result: Result, labels: Sequence[str]) -> str:
    """File name, label badge (or the error) and the confidence line of one result; an
    ``unknown`` answer says the photo looks like neither class instead."""
    name = f'<span class="dl-file">{_esc(result.filename)}</span>'
    if not result.ok:
        return f'{name}<div class="dl-error">Not classified: {_esc(result.error)}</div>'
    classes = _classes(result, labels)
    badge = label_html(str(result.label), classes)
    if result.unknown:
        note = unknown_message(classes)
        return f'{name}{badge}<div class="dl-unknown">{_esc(note)}</div>'
    if result.uncertain:
        note = (
            f"uncertain: the model is not confident enough to decide "
            f"(confidence {percent(result.confidence)})"
        )
    else:
        note = f"confidence {percent(result.confidence)}"
    return f'{name}{badge}<div class="dl-confidence">{_esc(note)}</div>'


def history_html(history: History) -> str:
    """The session history as an HTML table, newest first."""
    if not len(history):
        return '<div class="dl-history"><i>No images classified yet.</i></div>'
    head = "".join(f"<th>{_esc(c.replace('_', ' '))}</th>" for c in HISTORY_COLUMNS)
    rows = []
    for row in history.rows():
        shown = {
            **row,
            "time": str(row["time"])[11:19],  # HH:MM:SS (UTC); the CSV has the full time
            # an 'unknown' answer has no class, so no confidence in one (the CSV keeps it)
            "confidence": ""
            if row["confidence"] == "" or row["label"] == UNKNOWN
            else percent(float(row["confidence"])),
        }
        rows.append("<tr>" + "".join(f"<td>{_esc(shown[c])}</td>" for c in HISTORY_COLUMNS))
    body = "</tr>".join(rows) + "</tr>"
    return f'<div class="dl-history"><table><tr>{head}</tr>{body}</table></div>'


def csv_link_html(history: History, filename: str = "dandelion-history.csv") -> str:
    """A download link carrying the history CSV as a data: URL."""
    if not len(history):
        return ""
    data = base64.b64encode(history.to_csv()).decode("ascii")
    return (
        f'<a class="dl-csv" download="{_esc(filename)}" '
        f'href="data:text/csv;charset=utf-8;base64,{data}">Download history (CSV)</a>'
    )


class DandelionApp:
    """The whole app; display ``app.widget``, then call ``app.start()`` for auto-recovery."""

    def __init__(
        self,
        client: ApiClient,
        *,
        health_interval_s: float = 5.0,
        max_image_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.client = client
        self.health_interval_s = health_interval_s
        self.max_image_pixels = max_image_pixels
        self.labels = client.labels
        self.history = History(self.labels)
        self.health: Health | None = None
        self.model: ModelInfo | None = None
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

        self.header = w.HTML()
        self.banner = w.HTML(layout=w.Layout(display="none"))
        self.banner.add_class("dl-banner-box")
        self.upload = w.FileUpload(
            accept="image/*", multiple=True, description="Upload photos", disabled=True
        )
        self.upload.add_class("dl-upload")
        self.status = w.HTML()
        self.status.add_class("dl-status")
        self.explain = w.Checkbox(
            value=False,
            description="Show where the model looked",
            indent=False,
            layout=w.Layout(width="auto"),
        )
        self.explain.add_class("dl-explain-toggle")
        self._previews: list[tuple[w.Image, w.HTML, bytes, bytes]] = []
        """Cards' (image, caption, photo, photo with the map) that can show the map."""
        self.results = w.VBox()
        self.results.add_class("dl-results")
        self.history_table = w.HTML(history_html(self.history))
        self.history_table.add_class("dl-history-box")
        self.download = w.HTML()
        self.download.add_class("dl-download")
        self.widget = w.VBox(
            [
                w.HTML(STYLE),
                self.header,
                self.banner,
                w.HTML(intro_html(self.labels)),
                w.HBox([self.upload, self.explain, self.status]),
                self.results,
                w.HTML("<h3>This session</h3>"),
                self.download,
                self.history_table,
            ]
        )
        self.widget.add_class("dl-app")
        self.upload.observe(self._on_upload, names="value")
        self.explain.observe(self._on_explain, names="value")
        self._render_header()

    @classmethod
    def from_settings(cls, settings: Settings, api_url: str | None = None) -> DandelionApp:
        client = ApiClient(
            api_url or settings.serving.api_url,
            timeout=settings.app.app_request_timeout_s,
            labels=settings.labels,
        )
        return cls(
            client,
            health_interval_s=settings.app.app_health_interval_s,
            max_image_pixels=settings.images.max_image_pixels,
        )

    # --- API state ---------------------------------------------------------------------------
    def check(self) -> Health:
        """Ask the API whether it is ready (and which model it serves); update the page."""
        health = self.client.health()
        model = None
        if health.ready:
            try:
                model = self.client.model()
            except DandelionError as exc:
                health = Health(False, reachable=True, reason=str(exc))
        with self._lock:
            self.health = health
            if model is not None:
                self.model = model
            self._render_header()
        return health

    def _render_header(self) -> None:
        model = self.model.headline if self.model else "unknown"
        self.header.value = (
            f'<div class="dl-header"><h2>{_esc(title(self.labels))}</h2>'
            f'<div class="dl-model">Model: <span class="dl-model-line">{_esc(model)}</span>'
            "</div></div>"
        )
        health = self.health
        if health is None or health.ready:
            self.banner.value = ""
            self.banner.layout.display = "none"
            self.upload.disabled = health is None
            return
        self.banner.value = (
            f'<div class="dl-banner"><b>{_esc(health.title)}</b>: '
            f"{_esc(health.reason.rstrip('. '))}. "
            f"Uploads are paused; this page re-checks every {self.health_interval_s:g} s and "
            "resumes by itself.</div>"
        )
        self.banner.layout.display = None
        self.upload.disabled = True

    def start(self) -> DandelionApp:
        """Check the API now, then keep re-checking in a background thread."""
        self._stop.clear()
        self.check()
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="api-health", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.health_interval_s + 5)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.wait(self.health_interval_s):
            try:
                self.check()
            except Exception:  # keep polling whatever happens; never kill the page
                log.exception("API health check failed")

    # --- uploads -----------------------------------------------------------------------------
    def _on_upload(self, change: dict[str, Any]) -> None:
        files = change.get("new") or ()
        if not files:
            return
        try:
            self.classify([(f["name"], bytes(f["content"])) for f in files])
        finally:
            self.upload.value = ()

    def classify(self, files: list[tuple[str, bytes]]) -> list[Result]:
        """Classify uploaded files one by one, adding a card and a history row for each.

        Once the API turns out to be unavailable, the remaining files are not sent (their
        cards say so) and the banner takes over.
        """
        results = []
        unavailable: str | None = None
        for i, (name, data) in enumerate(files, 1):
            self.status.value = f"Classifying {i} of {len(files)}: {_esc(name)} …"
            if unavailable:
                result = Result(filename=name, size=len(data), error=f"not sent: {unavailable}")
            else:
                try:
                    result = self.client.predict(name, data, explain=self.explain.value)
                except ApiUnavailableError as exc:
                    unavailable = str(exc)
                    result = Result(filename=name, size=len(data), error=unavailable)
            results.append(result)
            with self._lock:
                self.history.add(result)
                self.results.children = (self._card(result, data), *self.results.children)
                self._render_history()
        self.status.value = ""
        if unavailable:
            self.check()
        return results

    def _render_history(self) -> None:
        self.history_table.value = history_html(self.history)
        self.download.value = csv_link_html(self.history)

    def _on_explain(self, change: dict[str, Any]) -> None:
        """Switch every card that has a map between the photo and the photo with the map
        (new uploads ask for maps while the toggle is on)."""
        with self._lock:
            for image, caption, plain, looked in self._previews:
                image.value = looked if change["new"] else plain
                caption.layout.display = None if change["new"] else "none"

    def _preview(self, result: Result, data: bytes, thumb: bytes) -> w.Widget:
        """The card's photo; with an explanation, one that the toggle switches to the map."""
        image = w.Image(value=thumb, format="jpeg", layout=w.Layout(width="120px"))
        explanation = result.explanation
        looked = None
        if explanation is not None:
            looked = make_thumbnail(data, max_pixels=self.max_image_pixels, explanation=explanation)
        if looked is None or explanation is None:
            return image
        image.add_class("dl-preview-explained")
        caption = w.HTML(
            f'<div class="dl-looked">Red: where the model found {_esc(explanation["class"])}</div>'
        )
        caption.add_class("dl-looked-box")
        self._previews.append((image, caption, thumb, looked))
        shown = bool(self.explain.value)
        image.value = looked if shown else thumb
        caption.layout.display = None if shown else "none"
        return w.VBox([image, caption])

    def _card(self, result: Result, data: bytes) -> w.Widget:
        thumb = make_thumbnail(data, max_pixels=self.max_image_pixels) if result.ok else None
        preview: w.Widget
        if thumb is not None:
            preview = self._preview(result, data, thumb)
        elif result.ok:  # no Pillow: the browser scales the photo the API accepted
            mime = content_type(result.filename)
            kind = mime.removeprefix("image/") if mime.startswith("image/") else "jpeg"
            preview = w.Image(value=data, format=kind, layout=w.Layout(width="120px"))
        else:
            preview = w.HTML('<div class="dl-noprev">no preview</div>')
        parts: list[w.Widget] = [w.HTML(result_summary_html(result, self.labels))]
        if result.ok and result.explain_note:
            note = w.HTML(
                '<div class="dl-legend">This model cannot show where it looked '
                f"({_esc(result.explain_note)})</div>"
            )
            note.add_class("dl-explain-note")
            parts.append(note)
        if result.ok:
            if not result.unknown:  # the two classes' shares mean little for neither class
                parts.append(w.HTML(probability_bar_html(result.probabilities)))
            parts.append(self._feedback_box(result, data if thumb is not None else None))
        card = w.HBox([preview, w.VBox(parts)], layout=w.Layout(align_items="center"))
        card.add_class("dl-card")
        card.add_class("dl-result-error" if not result.ok else f"dl-result-{result.label}")
        return card

    def _feedback_box(self, result: Result, image: bytes | None) -> w.Widget:
        note = w.HTML()
        note.add_class("dl-feedback-note")
        buttons = []
        for text, correct_label in result.feedback_choices():
            button = w.Button(
                description=text,
                tooltip=f"It is {_said(result, correct_label, self.labels)}",
                layout=w.Layout(width="auto"),
            )
            button.add_class("dl-feedback")
            button.add_class(f"dl-feedback-{correct_label}")
            buttons.append(button)
        for button, (_, correct_label) in zip(buttons, result.feedback_choices(), strict=True):
            button.on_click(self._feedback_handler(result, correct_label, image, buttons, note))
        return w.HBox([*buttons, note], layout=w.Layout(align_items="center"))

    def _feedback_handler(
        self,
        result: Result,
        correct_label: str,
        image: bytes | None,
        buttons: list[w.Button],
        note: w.HTML,
    ) -> Callable[[w.Button], None]:
        """The click handler of one feedback button (sends the photo along with the verdict)."""

        def handle(clicked: w.Button) -> None:
            for b in buttons:
                b.disabled = True
            try:
                self.client.feedback(
                    str(result.prediction_id), correct_label, image=image, filename=result.filename
                )
            except DandelionError as exc:
                note.value = f'<span class="dl-error">Feedback not recorded: {_esc(exc)}</span>'
                for b in buttons:
                    b.disabled = False
                if isinstance(exc, ApiUnavailableError):
                    self.check()
                return
            with self._lock:
                result.feedback = correct_label
                clicked.button_style = "success"
                note.value = (
                    f'<span class="dl-feedback-ok">Feedback recorded: it is '
                    f"{_esc(_said(result, correct_label, self.labels))}. Thank you!</span>"
                )
                self._render_history()

        return handle


def _said(result: Result, correct_label: str, labels: Sequence[str]) -> str:
    """What a feedback label says about the photo: the class, or "neither X nor Y"."""
    if correct_label == NEITHER:
        return neither_text(_classes(result, labels))
    return correct_label
