"""Each operator's report as the short Markdown summary the App shows (tables of per-class counts,
skipped references with their reasons, evaluation figures, missing values as "-"). The report
itself stays in the result (``result["report"]``) for scripts."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

MISSING = "-"
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR")  # pycocotools' figures, in its order


def metric(value) -> str:
    """A figure with 3 decimals; missing, or pycocotools' -1 (no ground truth of that size), as "-"."""
    return MISSING if value is None or value < 0 else f"{value:.3f}"


def table(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    """A Markdown table ("-" for empty cells); an empty string when there is no row."""
    rows = [[MISSING if value in (None, "") else str(value) for value in row] for row in rows]
    if not rows:
        return ""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def bullets(items: Iterable[str]) -> str:
    return "\n".join(f"- {item}" for item in items if item)


def join(*parts: str) -> str:
    return "\n\n".join(part for part in parts if part)


def counts_table(counts: dict[str, int], negative_counts: dict[str, int] | None = None) -> str:
    """Shots per class, and negatives per class when given."""
    if negative_counts is None:
        return table(("Class", "Shots"), sorted(counts.items()))
    names = sorted(set(counts) | set(negative_counts))
    return table(("Class", "Shots", "Negatives"), ((n, counts.get(n, 0), negative_counts.get(n, 0)) for n in names))


def skipped_table(skipped: list[dict], title: str = "Skipped references") -> str:
    if not skipped:
        return ""
    rows = ((s.get("reference_id"), s.get("class_name"), s.get("reason")) for s in skipped)
    return join(f"**{title}** ({len(skipped)})", table(("Reference", "Class", "Reason"), rows))


def failed_table(failed: list[dict]) -> str:
    if not failed:
        return ""
    rows = ((f.get("sample_id") or f.get("label_id"), f.get("reason")) for f in failed)
    return join(f"**Not processed** ({len(failed)})", table(("Sample or label", "Reason"), rows))


def build(report: dict) -> str:
    total = sum(report["counts"].values())
    head = f"Memory bank **{report['key']}**: {total} reference(s) of {len(report['classes'])} class(es)."
    return join(head, counts_table(report["counts"]), skipped_table(report["skipped"]))


def segment(report: dict) -> str:
    if "shards" in report:  # a sharded run: what was queued
        rows = ((s["shard"], s["samples"], s["operation_id"]) for s in report["shards"])
        head = f"Queued {len(report['shards'])} shard(s) into **{report['field']}** for `fiftyone delegated launch` workers."
        left = report.get("left_to_queued_shards")
        waiting = f"{left} sample(s) were left to shards queued before." if left else ""
        return join(head, table(("Shard", "Samples", "Operation"), rows), waiting)
    done = (
        f"{report['tracks']} track(s) over {report['frames']} frame(s) of {report['videos']} video(s)"
        if "videos" in report  # a video dataset: tracks
        else f"{report['instances']} instance(s) in {report['processed']} sample(s)"
    )
    head = f"**{report['field']}**: {done}" + (
        f"; {report['skipped_existing']} sample(s) already had predictions." if report["skipped_existing"] else "."
    )
    return join(head, bullets([report.get("note")]), failed_table(report["failed"]))


def boxes_to_masks(report: dict) -> str:
    head = (
        f"**{report['field']}**: {report['filled']} mask(s) filled, {report['kept']} kept, "
        f"in {report['samples']} sample(s)."
    )
    return join(head, failed_table(report["failed"]))


def evaluation(report: dict) -> str:
    boxes_or_masks = "instance masks" if report["use_masks"] else "boxes"
    evaluated = f"{report['videos']} video(s)" if "videos" in report else f"{report['samples']} sample(s)"
    head = (
        f"Evaluation **{report['eval_key']}** against `{report['gt_field']}` on {evaluated}, "
        f"{len(report['classes'])} class(es), with {boxes_or_masks}: FiftyOne COCO mAP **{metric(report['mAP'])}** "
        "(details in the Model Evaluation panel)."
    )
    rows = [
        (iou_type, *(metric((figures or {}).get(name)) for name in METRICS))
        for iou_type, figures in report["pycocotools"].items()
    ]
    figures = join("**pycocotools**", table(("IoU type", *METRICS), rows))
    return join(head, figures, bullets(report["notes"]))


def matched_reference(report: dict) -> str:
    kind = "negative reference" if report["negative"] else "reference"
    where = f"label of `{report['field']}`" if report["field"] else "label no longer in the dataset"
    head = (
        f"Matched {kind} **{report['reference_id']}** of class **{report['class_name']}** in memory bank "
        f"**{report['bank_key']}** ({where}, sample {report['sample_id']}), opened and selected."
    )
    return join(head, bullets([report.get("note")]))


def bank_update(report: dict) -> str:
    """Adding or removing references."""
    if "added" in report:
        role = "negative reference(s)" if report["negative"] else "shot(s)"
        head = f"Memory bank **{report['bank_key']}**: {report['added']} {role} added."
        extra = skipped_table(report["skipped"], "Not added")
    else:
        count = len(report["removed"])
        head = f"Memory bank **{report['bank_key']}**: {count} entr{'y' if count == 1 else 'ies'} removed."
        dropped = report["dropped_classes"]
        extra = f"Classes dropped (no shot left): {', '.join(dropped)}" if dropped else ""
    return join(head, counts_table(report["counts"], report["negative_counts"]), extra)


def exported(report: dict) -> str:
    return f"Memory bank **{report['bank_key']}** written to `{report['directory']}`."


def imported(report: dict) -> str:
    total = sum(report["counts"].values())
    head = f"Memory bank **{report['bank_key']}** imported: {total} reference(s) of {len(report['classes'])} class(es)."
    return join(head, counts_table(report["counts"]))


def deleted(report: dict) -> str:
    return f"Memory bank **{report['deleted']}** deleted."
