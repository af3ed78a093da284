"""``dandelion feedback``: list and review user feedback on predictions."""

from __future__ import annotations

import argparse
import json

from dandelion_lib.core.config import get_settings
from dandelion_lib.data.feedback import FeedbackRecord, FeedbackStore
from dandelion_lib.data.review import ReviewItem, ReviewQueue


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print JSON lines")
    sub = parser.add_subparsers(dest="action", required=True)
    listing = sub.add_parser("list", help="feedback, newest first", parents=[common])
    state = listing.add_mutually_exclusive_group()
    state.add_argument("--pending", action="store_true", help="only feedback not reviewed yet")
    state.add_argument("--reviewed", action="store_true", help="only reviewed feedback")
    listing.add_argument("--limit", type=int, default=50, help="at most N rows (default 50)")
    queue = sub.add_parser(
        "queue",
        help="pending feedback, most informative first (the reviewer page's order)",
        parents=[common],
    )
    queue.add_argument("--limit", type=int, default=50, help="at most N rows (default 50)")
    review = sub.add_parser(
        "review",
        help="accept or reject feedback for the next dataset (several ids: one transaction)",
        parents=[common],
    )
    review.add_argument("feedback_id", nargs="+")
    decision = review.add_mutually_exclusive_group(required=True)
    decision.add_argument("--accept", action="store_true")
    decision.add_argument("--reject", action="store_true")
    sub.add_parser(
        "accepted", help="accepted feedback with images (input for ingestion)", parents=[common]
    )


def cli(args: argparse.Namespace) -> int:
    store = FeedbackStore.from_settings(get_settings())
    try:
        if args.action == "queue":
            _print_queue(ReviewQueue(store).pending(args.limit), as_json=args.json)
            return 0
        records = _records(store, args)
    finally:
        store.close()
    for r in records:
        print(json.dumps(r.to_dict()) if args.json else _record_line(r))
    return 0


def _records(store: FeedbackStore, args: argparse.Namespace) -> list[FeedbackRecord]:
    """The records the ``list``, ``review`` or ``accepted`` action shows."""
    if args.action == "list":
        reviewed = True if args.reviewed else False if args.pending else None
        return store.list_feedback(reviewed=reviewed, limit=args.limit)
    if args.action == "review":
        return ReviewQueue(store).review_many(args.feedback_id, accepted=bool(args.accept))
    return store.accepted()


def _record_line(r: FeedbackRecord) -> str:
    decision = "pending" if r.reviewed_at is None else ("accepted" if r.accepted else "rejected")
    return (
        f"{r.feedback_id}  {r.created_at:%Y-%m-%d %H:%M}  {r.correct_label:<10} "
        f"model said {r.predicted_label:<10} v{r.model_version}  {decision:<8} "
        f"{r.image_key or '-'}"
    )


def _print_queue(items: list[ReviewItem], *, as_json: bool) -> None:
    for item in items:
        r = item.feedback
        if as_json:
            row = {**r.to_dict(), "answer": item.answer, "confidence": item.confidence}
            print(json.dumps({**row, "reason": item.reason}))
        else:
            confidence = "-" if item.confidence is None else f"{item.confidence:.2f}"
            print(
                f"{r.feedback_id}  {item.reason:<12} {r.correct_label:<10} "
                f"model said {item.answer or '?':<10} {confidence:>5}  v{r.model_version}  "
                f"{r.image_key or '-'}"
            )
