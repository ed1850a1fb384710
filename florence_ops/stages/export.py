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

from florence_ops.artifacts import HEADLINE_METRICS, METRICS_FILE, TRAINED_MODEL_DIR, publish_directory
from florence_ops.config import Params, pick
from florence_ops.modeling import load_trained, save_processor
from florence_ops.serving.model_dir import write_settings

log = logging.getLogger(__name__)


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
        (staging / "README.md").write_text(model_card(params, metrics), encoding="utf-8")
        write_settings(staging, params.train.prompt, params.train.max_question_tokens, metrics)  # for predict, serve
    log.info("exported to %s", target)
    return target


def model_card(params: Params, metrics: dict) -> str:
    """A short Hugging Face model card: what the model is, how to load it, its metrics and training params."""
    before = metrics.get("before", {})
    rows = "\n".join(f"| {name} | {_fmt(metrics.get(name))} | {_fmt(before.get(name))} |" for name in HEADLINE_METRICS)
    types = "\n".join(
        f"| {name} | {_fmt(v.get('anls'))} | {v.get('n_questions')} |" for name, v in metrics.get("by_type", {}).items()
    )
    hyper = pick(params, ("lr", "epochs", "batch_size", "seed", "train"))
    return f"""---
library_name: transformers
pipeline_tag: image-text-to-text
tags: [florence-2, docvqa, florence-ops]
---
# Florence-2 fine-tuned for document question answering

Base model: `{params.model.name}`{f" @ `{params.model.revision}`" if params.model.revision else ""}; data source:
`{params.data.source}`. Produced by the florence-ops pipeline (`dvc repro`).

```python
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

model = AutoModelForImageTextToText.from_pretrained("path/to/this/dir")
processor = AutoProcessor.from_pretrained("path/to/this/dir")
image = Image.open("page.png").convert("RGB")
task = {json.dumps(params.train.prompt)}
inputs = processor(text=task + "What is the invoice number?", images=image, return_tensors="pt")
generated = model.generate(**inputs)  # decoding as in the evaluation, from generation_config.json
text = processor.batch_decode(generated, skip_special_tokens=False)[0]
answer = processor.post_process_generation(text, task=task, image_size=image.size)[task]
print(answer)
```

## Evaluation ({params.evaluate.split} split)
ANLS is the official DocVQA metric; Levenshtein similarity is the popular tutorial's score (first answer only,
case-sensitive) and is shown only for comparison.

| metric | fine-tuned | before fine-tuning |
| --- | --- | --- |
{rows}

| question type | ANLS | questions |
| --- | --- | --- |
{types}

## Training parameters
```json
{json.dumps(hyper, indent=2)}
```
"""


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4f}" if isinstance(value, float) else str(value)
