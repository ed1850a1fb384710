"""Stage `export`: the fine-tuned model as users load it, with a model card.

`paths.export` holds safetensors weights (LoRA adapters merged in), the processor, a generation config with the
decoding the evaluation used, florence_ops.json with the prompt and question-token limit (what `florence-ops predict`
and `serve` need beside the weights), and README.md with the metrics and params. It loads offline with
`AutoModelForImageTextToText.from_pretrained(path)` and `AutoProcessor.from_pretrained(path)`, and its processor's
`post_process_generation(text, task="<DocVQA>", ...)` works as in Florence-2's examples (see `save_processor`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from florence_ops.artifacts import HEADLINE_METRICS, METRICS_FILE, TRAINED_MODEL_DIR, publish_directory
from florence_ops.config import Params, pick
from florence_ops.modeling import load_trained, save_processor
from florence_ops.serving.model_dir import write_settings
from florence_ops.templating import template_source

log = logging.getLogger(__name__)
MODEL_CARD_TEMPLATE = "model_card.md.j2"
CARD_TITLE = "Florence-2 fine-tuned for document question answering"
LICENSE = "mit"  # Florence-2's license, which a fine-tune of it inherits


def export(params: Params) -> Path:
    """Write the exported model directory atomically and return its path."""
    target = Path(params.paths.export)
    model, processor = load_trained(Path(params.paths.train) / TRAINED_MODEL_DIR, params.paths.base_model, params.model)
    generation = model.generation_config
    generation.num_beams = params.evaluate.num_beams
    generation.max_new_tokens = params.evaluate.max_new_tokens
    generation.no_repeat_ngram_size = 0  # Florence-2's default of 3 corrupts answers that repeat an n-gram
    generation.early_stopping = params.evaluate.num_beams > 1
    metrics = json.loads((Path(params.paths.reports) / METRICS_FILE).read_text())
    with publish_directory(target) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        save_processor(processor, staging)
        model_card(params, metrics).save(staging / "README.md")
        train = params.train
        write_settings(staging, train.prompt, train.max_question_tokens, train.precision, metrics)  # predict, serve
    log.info("exported to %s", target)
    return target


def model_card(params: Params, metrics: dict) -> ModelCard:
    """A short Hugging Face model card: what the model is, how to load it, its metrics and training params; its front
    matter is what the hub reads (license, base model, dataset, ANLS in model-index, tags, pipeline)."""
    before = metrics.get("before", {})
    return ModelCard.from_template(
        card_data(params, metrics),
        template_str=template_source(MODEL_CARD_TEMPLATE),
        base_model=params.model.name,
        revision=params.model.revision,
        source=params.data.source,
        prompt_literal=json.dumps(params.train.prompt),
        split=params.evaluate.split,
        metric_rows=[(name, _fmt(metrics.get(name)), _fmt(before.get(name))) for name in HEADLINE_METRICS],
        type_rows=[(name, _fmt(v.get("anls")), v.get("n_questions")) for name, v in metrics.get("by_type", {}).items()],
        hyperparameters=json.dumps(pick(params, ("lr", "epochs", "batch_size", "seed", "train")), indent=2),
    )


def card_data(params: Params, metrics: dict) -> ModelCardData:
    """The card's front matter, with the fine-tuned model's ANLS as a model-index result on the evaluated split."""
    if params.data.source == "hf":
        dataset_id = dataset_name = params.data.hf.dataset
    else:
        dataset_id, dataset_name = params.data.source, f"{params.data.source} documents (florence-ops)"
    results = [
        EvalResult(
            task_type="document-question-answering",
            dataset_type=dataset_id,
            dataset_name=dataset_name,
            dataset_split=params.evaluate.split,
            metric_type=name,
            metric_name=label,
            metric_value=metrics[name],
        )
        for name, label in (("anls", "ANLS"), ("exact_match", "Exact match"))
        if metrics.get(name) is not None
    ]
    return ModelCardData(
        license=LICENSE,
        base_model=params.model.name,
        datasets=[dataset_id] if params.data.source == "hf" else None,
        metrics=["anls"],
        model_name=CARD_TITLE,
        eval_results=results or None,
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        tags=["florence-2", "docvqa", "florence-ops"],
    )


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4f}" if isinstance(value, float) else str(value)
