"""GPU answer-generation throughput: the common recipe's evaluation against florence-ops' batched evaluator.

Same model and shapes as gpu_train_step.py (Florence-2-base built from a config, random weights, 768x768 images,
questions of 12-24 tokens, mean 18, four questions per document). Variants:

- recipe_beam3: one question at a time, fp32, processor-style input (577 image placeholder ids + text ids),
  `model.generate(input_ids=..., pixel_values=..., num_beams=3, max_new_tokens=N)`, ids copied to the host each time.
- recipe_greedy: the same with num_beams=1 (context only).
- engine_{greedy,beam3}: the project's evaluator itself, `florence_ops.generation.answer` (its own ordering: a
  document's questions share a batch and its image goes through the vision tower once; batches of `--batch`; bf16
  autocast; `generate_ids`), with pixels through the vision tower; the tokenizer is a stub over precomputed ids.
- engine_1q_per_doc_{greedy,beam3}: the same with every question on its own image (no sharing: the worst case).
- engine_cached_{greedy,beam3}: the same with the vision tower's output already on the GPU (cached source).

Fairness: a random model stops at random, so every variant generates exactly N new tokens: the model's generation
config gets `min_new_tokens = max_new_tokens = N` and no forced EOS; `no_repeat_ngram_size` is 0 on both sides (the
hub's Florence-2 config sets 3 for the recipe, which would only slow the recipe further). The number of generated tokens
is checked and reported. Pixels and features are precomputed on the GPU for both sides (no image decoding or
preprocessing, no detokenising). Each pass over the questions is timed with a synchronised host clock after a warm-up.

    PYTHONPATH=. python benchmarks/gpu_generation.py [--out reports/benchmarks] [--questions 256]
    PYTHONPATH=. python benchmarks/gpu_generation.py --tiny --device cpu --questions 8 --recipe-questions 2  # smoke

Writes <out>/generation_<device-slug>.json and prints a table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_train_step import (  # noqa: E402
    PAD,
    REPO,
    DeviceFeatures,
    DevicePixels,
    build_model,
    device_slug,
    environment,
    peak_gib,
    processor_ids,
    profile_steps,
    random_pixels,
    random_text,
    sync,
)
from transformers import BatchEncoding  # noqa: E402

from florence_ops.artifacts import write_json  # noqa: E402
from florence_ops.generation import Decoding, answer  # noqa: E402
from florence_ops.model_inputs import Collator  # noqa: E402
from florence_ops.precision import autocast_dtype, describe  # noqa: E402

QUESTIONS_PER_DOCUMENT = 4


def make_questions(shapes, n: int, gen: torch.Generator) -> list[dict]:
    """n tokenized questions (ids without padding) with the document each is about."""
    lengths = torch.randint(12, 25, (n,), generator=gen).tolist()
    text = random_text(shapes, n, gen, question_lengths=lengths)
    return [
        {"ids": text["input_ids"][i, : lengths[i]], "image": i // QUESTIONS_PER_DOCUMENT, "own_image": i}
        for i in range(n)
    ]


@torch.no_grad()
def recipe_pass(model, shapes, questions, pixels, beams: int, new_tokens: int, device) -> list[int]:
    """The recipe's evaluation: one question at a time, fp32, processor-style input. Returns new-token counts."""
    counts = []
    for q in questions:
        input_ids = processor_ids(shapes, q["ids"][None]).to(device)
        out = model.generate(
            input_ids=input_ids, pixel_values=pixels[q["image"] : q["image"] + 1],
            num_beams=beams, max_new_tokens=new_tokens,
        )  # fmt: skip
        counts.append(out.cpu().shape[1] - 1)  # minus the decoder start token
    return counts


class IdTokenizer:
    """Stands in for the BART tokenizer: question i's text is "i" and its token ids are precomputed."""

    pad_token_id = PAD

    def __init__(self, ids: list[torch.Tensor]):
        self.ids = ids

    def __call__(self, texts, padding=False, truncation=False, max_length=None, return_tensors=None):
        if isinstance(texts, str):
            return BatchEncoding({"input_ids": self.ids[int(texts)].tolist()})
        rows = [self.ids[int(t)] for t in texts]
        ids = torch.full((len(rows), max(len(r) for r in rows)), PAD, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, : len(r)], mask[i, : len(r)] = r, 1
        return BatchEncoding({"input_ids": ids, "attention_mask": mask})

    def batch_decode(self, ids, skip_special_tokens=True):
        return [" ".join(map(str, row)) for row in ids.tolist()]


def engine_pass(model, questions, source, decoding: Decoding, device, per_document: bool) -> list[int]:
    """florence_ops.generation.answer itself (order, batching, bf16 autocast, generate_ids); returns token counts."""
    tokenizer = IdTokenizer([q["ids"] for q in questions])
    collator = Collator(tokenizer, "", max_question_tokens=1024, max_answer_tokens=32, train=False)
    key = "image" if per_document else "own_image"
    rows = [{"question": str(i), "image_id": str(q[key])} for i, q in enumerate(questions)]
    answers = answer(model, rows, collator, source, decoding, device)
    return [len(a.split()) - 1 for a in answers]  # generated ids minus the decoder start token


def measure(name, run, warm, n_questions: int, repeats: int, device, extra: dict, profile_path=None) -> dict:
    reset_memory_only(device)
    warm()
    times, counts = [], []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        counts = run()
        sync(device)
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    peak = peak_gib(device)
    profile_steps(lambda i: warm(), 0, 1, device, f"{name} (warm-up set)", profile_path)
    return {
        "variant": name,
        **extra,
        "questions": n_questions,
        "pass_s_median": round(median, 3),
        "questions_per_s": round(n_questions / median, 2),
        "new_tokens_min": min(counts),
        "new_tokens_max": max(counts),
        "peak_gib": None if peak is None else round(peak, 2),
    }


def reset_memory_only(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="toy-size model and 128x128 images (smoke test)")
    parser.add_argument("--questions", type=int, default=256, help="questions per engine pass")
    parser.add_argument("--recipe-questions", type=int, default=48, help="questions per recipe pass")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3, help="timed engine passes (median); the recipe times one")
    parser.add_argument("--out", default=str(REPO / "reports" / "benchmarks"))
    parser.add_argument("--profile", action="store_true", help="also write <out>/profile_generation_<slug>.txt")
    parser.add_argument("--variants", nargs="+", default=["engine", "engine_1q_per_doc", "engine_cached"])
    parser.add_argument("--beams", type=int, nargs="+", default=[1, 3])
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    model, shapes = build_model(args.tiny, device)
    model.eval()
    config = model.generation_config
    config.min_new_tokens = args.new_tokens  # every variant generates exactly --new-tokens tokens
    config.max_new_tokens = args.new_tokens
    config.forced_eos_token_id = None
    config.no_repeat_ngram_size = 0
    gen = torch.Generator().manual_seed(1)
    questions = make_questions(shapes, args.questions, gen)
    documents = (args.questions + QUESTIONS_PER_DOCUMENT - 1) // QUESTIONS_PER_DOCUMENT
    pixels = random_pixels(shapes, args.questions, device, gen)  # image i: document i, or question i's own
    print(f"{len(questions)} questions on {documents} documents; {environment(device)}", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    profile_path = out / f"profile_generation_{device_slug(device)[0]}.txt" if args.profile else None
    if profile_path is not None:
        profile_path.write_text("")
    results = []
    recipe_questions = questions[: args.recipe_questions]
    for beams, name in ((3, "recipe_beam3"), (1, "recipe_greedy")):
        run = lambda: recipe_pass(model, shapes, recipe_questions, pixels, beams, args.new_tokens, device)  # noqa: B023,E731
        warm = lambda: recipe_pass(model, shapes, questions[:3], pixels, beams, args.new_tokens, device)  # noqa: B023,E731
        row = measure(name, run, warm, len(recipe_questions), 1, device,
                      {"precision": "fp32", "batch": 1, "num_beams": beams,
                       "questions_per_document": QUESTIONS_PER_DOCUMENT},
                      profile_path if beams == 3 else None)  # fmt: skip
        results.append(row)
        print(row, flush=True)

    with torch.no_grad():
        features = torch.cat([model.model.vision_tower(pixels[i : i + 8]).last_hidden_state.to(torch.bfloat16)
                              for i in range(0, documents, 8)])  # fmt: skip
    precision = describe(autocast_dtype(Decoding().precision, device))  # what `answer` decides
    variants = [  # name, source, questions per document
        ("engine", DevicePixels(pixels), QUESTIONS_PER_DOCUMENT),
        ("engine_1q_per_doc", DevicePixels(pixels), 1),
        ("engine_cached", DeviceFeatures(features), QUESTIONS_PER_DOCUMENT),
    ]
    for prefix, source, per_doc in variants:
        if prefix not in args.variants:
            continue
        for beams in args.beams:
            name = f"{prefix}_{'greedy' if beams == 1 else 'beam3'}"
            decoding = Decoding(args.batch, beams, args.new_tokens)
            shared = per_doc > 1
            run = lambda: engine_pass(model, questions, source, decoding, device, shared)  # noqa: B023,E731
            warm = lambda: engine_pass(model, questions[: args.batch], source, decoding, device, shared)  # noqa: B023,E731
            row = measure(name, run, warm, len(questions), args.repeats, device,
                          {"precision": precision, "batch": args.batch, "num_beams": beams,
                           "questions_per_document": per_doc},
                          profile_path if name == "engine_greedy" else None)  # fmt: skip
            results.append(row)
            print(row, flush=True)

    recipe = results[0]["questions_per_s"]
    for row in results:
        row["ratio_vs_recipe_beam3"] = round(row["questions_per_s"] / recipe, 2)
    ratio = {r["variant"]: r["ratio_vs_recipe_beam3"] for r in results}
    acceptance = {
        "greedy_ge_40x": ratio.get("engine_greedy", 0) >= 40,
        "beam3_ge_10x": ratio.get("engine_beam3", 0) >= 10,
    }
    report = {
        "benchmark": "generation",
        **environment(device),
        "model": {"architecture": "tiny" if args.tiny else "Florence-2-base (random weights)",
                  "parameters": sum(p.numel() for p in model.parameters()),
                  "attn_implementation": model.config._attn_implementation},
        "shapes": asdict(shapes) | {"question_tokens": "12-24 (mean 18)",
                                    "questions_per_document": QUESTIONS_PER_DOCUMENT},
        "decoding": {"new_tokens": args.new_tokens, "forced": "min_new_tokens = max_new_tokens, no forced EOS",
                     "no_repeat_ngram_size": 0, "engine_batch": args.batch,
                     "engine": "florence_ops.generation.answer (its own order and batching; tokenizer stubbed)"},
        "timing": {"engine": f"median of {args.repeats} passes over {len(questions)} questions after a warm-up batch",
                   "recipe": f"one pass over {len(recipe_questions)} questions after 3 warm-up questions",
                   "clock": "host perf_counter, cuda synchronised around each pass"},
        "conditions": "random weights and inputs; pixels and cached features precomputed on the device "
                      "(image decoding, preprocessing and detokenising excluded on both sides)",
        "results": results,
        "acceptance": acceptance,
    }  # fmt: skip
    path = out / f"generation_{report['device_slug']}.json"
    write_json(path, report)
    print(f"{'variant':<24}{'beams':>6}{'batch':>6}{'q/s':>10}{'x recipe':>10}{'tokens':>8}{'peak GiB':>10}")
    for r in results:
        print(f"{r['variant']:<24}{r['num_beams']:>6}{r['batch']:>6}{r['questions_per_s']:>10.2f}"
              f"{r['ratio_vs_recipe_beam3']:>10.2f}{r['new_tokens_max']:>8}{(r['peak_gib'] or 0):>10.2f}")  # fmt: skip
    print("acceptance:", acceptance)
    print("wrote", path)
    return report


if __name__ == "__main__":
    main()
