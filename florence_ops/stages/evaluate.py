"""Stage `evaluate`: answer the evaluation split with the model before and after fine-tuning, and report.

Writes `reports/metrics.json` (ANLS, the tutorial's Levenshtein similarity, exact match, counts, per question type,
and the same figures for the base model under `before`), `reports/predictions.jsonl`, the plot data of ANLS by
question type, and the self-contained `reports/report.html`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from accelerate import Accelerator

from florence_ops.artifacts import (
    BEFORE_COLUMNS,
    METRICS_FILE,
    PREDICTION_COLUMNS,
    PREDICTIONS_FILE,
    REPORT_HTML_FILE,
    TRAINED_MODEL_DIR,
    TYPE_PLOTS_DIR,
    write_json,
)
from florence_ops.config import Params
from florence_ops.data.processed import ImageTable, read_questions
from florence_ops.data.streaming import ParquetPages
from florence_ops.errors import UserError
from florence_ops.generation import Decoding, answer_across_processes
from florence_ops.launch import launch, needs_launch
from florence_ops.metrics import aggregate, score_predictions
from florence_ops.model_inputs import Collator
from florence_ops.modeling import load_model, load_trained
from florence_ops.reports import write_html_report, write_predictions, write_type_plot_data
from florence_ops.vision.sources import PixelSource, cached_source
from florence_ops.vision.stage_cache import open_or_build_cache

log = logging.getLogger(__name__)
COLUMNS = ["questionId", "question", "answers", "image_id", "question_types"]


def evaluate(params: Params) -> dict:
    """Score the base and the fine-tuned model on `evaluate.split`; write the reports; return metrics.

    With `evaluate.num_processes > 1` the stage starts itself in that many processes (one per GPU); each answers a
    share of the questions and the main process writes the reports.
    """
    processed, reports = Path(params.paths.processed), Path(params.paths.reports)
    if needs_launch(params.evaluate.num_processes):
        launch("evaluate", params, params.evaluate.num_processes)
        return json.loads((reports / METRICS_FILE).read_text())
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    if accelerator.num_processes != params.evaluate.num_processes:
        wanted, started = params.evaluate.num_processes, accelerator.num_processes
        raise UserError(f"evaluate.num_processes is {wanted} but {started} process(es) started")
    rows = read_questions(processed, params.evaluate.split).select_columns(COLUMNS).to_list()
    rows = labeled_rows(rows, params.evaluate.split)[: params.evaluate.max_questions]
    images = ImageTable(processed)
    tuned = load_trained(Path(params.paths.train) / TRAINED_MODEL_DIR, params.paths.base_model, params.model)
    # The train stage saved the base model's processor beside the fine-tuned model: both passes use that one.
    base = load_model(params.paths.base_model, params.model), tuned[1]
    source = vision_source(params, base, tuned, images, rows, accelerator.device)
    before = predict(accelerator, base, rows, source, params)
    after = predict(accelerator, tuned, rows, source, params)
    if not accelerator.is_main_process:
        return {}
    scored = score_predictions(prediction_rows(rows, after))
    scored_before = score_predictions(prediction_rows(rows, before))
    metrics, metrics_before = aggregate(scored), aggregate(scored_before)
    for row, old in zip(scored, scored_before):
        row.update(zip(BEFORE_COLUMNS, (old["prediction"], old["anls"])))
    result = {**metrics, "anls_gain": _gain(metrics, metrics_before), "before": metrics_before}
    write_json(reports / METRICS_FILE, result)
    write_predictions(reports / PREDICTIONS_FILE, scored)
    write_type_plot_data(reports / TYPE_PLOTS_DIR, metrics["by_type"], metrics_before["by_type"])
    examples = params.evaluate.report_examples
    # A few pages, each read from its row group: an ImageTable that has not read pages yet would make its Arrow copy
    # of every page for them.
    pages = images if images.opened else ParquetPages(processed, keep=1)
    write_html_report(reports / REPORT_HTML_FILE, metrics, metrics_before, scored, lambda i: pages[i], examples)
    log.info("ANLS %.4f (before fine-tuning %.4f) on %d questions", metrics["anls"] or 0, metrics_before["anls"] or 0,
             metrics["n_questions"])  # fmt: skip
    return result


def labeled_rows(rows: list[dict], split: str) -> list[dict]:
    """The rows that have answers to score against; questions without answers (an unlabeled split's) are skipped."""
    labeled = [row for row in rows if row["answers"]]
    if not labeled:
        raise UserError(f"evaluate.split {split!r} has no questions with answers to score; evaluate a labeled split")
    if len(labeled) < len(rows):
        log.info("skipping %d question(s) without answers in %s", len(rows) - len(labeled), split)
    return labeled


def vision_source(params: Params, base, tuned, images: ImageTable, rows: list[dict], device: torch.device):
    """The train stage's vision-feature cache when both models share its frozen tower, so the before and after
    passes read the same tower output; pages decoded in DataLoader workers otherwise."""
    (base_model, processor), (tuned_model, _) = base, tuned
    pixels = PixelSource(images, processor.image_processor)
    tower = base_model.model.vision_tower
    if not _same_weights(tower, tuned_model.model.vision_tower):
        return pixels
    cache = open_or_build_cache(params, tower, processor.image_processor, images, device, verify=True, build=False)
    if cache is None:
        return pixels
    log.info("answering from the cached vision features in %s", cache.folder)
    return cached_source(cache, [row["image_id"] for row in rows], device)


def predict(accelerator, loaded, rows: list[dict], source, params: Params) -> list[str]:
    """Answers of one model to `rows`, batched as `evaluate` configures, shared among the processes."""
    model, processor = loaded
    model.to(accelerator.device)
    cfg = params.evaluate
    collator = Collator(processor.tokenizer, params.train.prompt, params.train.max_question_tokens, 0, train=False)
    decoding = Decoding(cfg.batch_size, cfg.num_beams, cfg.max_new_tokens, params.train.precision)
    return answer_across_processes(accelerator, model, rows, collator, source, decoding, cfg.num_workers)


def _same_weights(first: torch.nn.Module, second: torch.nn.Module) -> bool:
    a, b = first.state_dict(), second.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def prediction_rows(rows: list[dict], predictions: list[str]) -> list[dict]:
    """Predictions file rows (`PREDICTION_COLUMNS`): id, question, accepted answers, prediction, types, image."""
    values = (
        (r["questionId"], r["question"], r["answers"], p, r["question_types"], r["image_id"])
        for r, p in zip(rows, predictions)
    )
    return [dict(zip(PREDICTION_COLUMNS, v)) for v in values]


def _gain(after: dict, before: dict) -> float | None:
    if after["anls"] is None or before["anls"] is None:
        return None
    return after["anls"] - before["anls"]
