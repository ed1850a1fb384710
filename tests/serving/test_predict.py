"""`florence-ops predict`: the answers evaluation gives, for one page, a JSONL file (with per-line errors) and the
DocVQA submission of an unlabeled split."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest

from florence_ops.cli import main
from tests.serving.conftest import evaluation_answers, raw_pages, write_params


@pytest.fixture(scope="module")
def expected(served) -> dict[str, str]:
    return evaluation_answers(served, served / "models/export", "validation")


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["predict", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_one_page_answer_is_the_evaluation_answer(served, expected, capsys, tmp_path):
    record = raw_pages(served, "validation")[0]
    page = tmp_path / "page.png"
    page.write_bytes(record["image"]["bytes"])  # the original page: predict resizes it as preprocess did
    params = str(served / "params.yaml")
    code, out, _ = run_cli(capsys, "--params", params, "--image", str(page), "--question", record["question"])
    assert code == 0
    assert out.rstrip("\n") == expected[record["questionId"]] and out.strip()


def test_bad_single_page_is_a_one_line_error(served, capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    params = str(served / "params.yaml")
    code, _, err = run_cli(capsys, "--params", params, "--image", str(tmp_path / "notes.txt"), "--question", "Why?")
    assert code == 2 and err.splitlines()[-1] == "error: not_an_image: not a known image format (12 bytes)"
    code, _, err = run_cli(capsys, "--params", params, "--image", str(tmp_path / "notes.txt"))
    assert code == 2 and err.splitlines()[-1] == "error: --image needs --question"


def test_jsonl_answers_every_line_and_records_errors(served, expected, capsys, tmp_path):
    from PIL import Image

    records = raw_pages(served, "validation")[:6]
    (tmp_path / "scans").mkdir()
    lines = []
    for record in records:
        name = f"scans/{record['docId']}.png"
        (tmp_path / name).write_bytes(record["image"]["bytes"])
        lines.append({"question_id": record["questionId"], "question": record["question"], "image": name})
    Image.open(tmp_path / lines[0]["image"]).save(tmp_path / "scans/doc.pdf")  # a one-page PDF of the first page
    lines += [
        {"question_id": "pdf", "question": "What is this document?", "image": "scans/doc.pdf", "page": 1},
        {"question_id": "pdf-p2", "question": "What is this document?", "image": "scans/doc.pdf", "page": 2},
        {"question_id": "missing", "question": "Who?", "image": "scans/nowhere.png"},
        {"question_id": "blank", "question": "  ", "image": lines[0]["image"]},
    ]
    text = "".join(json.dumps(line) + "\n" for line in lines) + "{not json\n"
    (tmp_path / "questions.jsonl").write_text(text)
    output = tmp_path / "out/answers.jsonl"
    params = str(served / "params.yaml")
    code, out, _ = run_cli(
        capsys, "--params", params, "--input", str(tmp_path / "questions.jsonl"), "--output", str(output)
    )
    assert code == 0
    assert out.startswith("answered 7 of 11 questions (4 errors, recorded in the output)")
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(rows) == 11
    assert [row["answer"] for row in rows[:6]] == [expected[r["questionId"]] for r in records]
    assert isinstance(rows[6]["answer"], str) and rows[6]["answer"]
    errors = {row.get("question_id", row.get("line")): (row["error"], row["detail"]) for row in rows[7:]}
    assert errors == {
        "pdf-p2": ("page_missing", "page 2 asked, the PDF has 1 page(s)"),
        "missing": ("image_missing", "scans/nowhere.png cannot be read"),
        "blank": ("question_empty", "question is empty or whitespace"),
        11: ("malformed_json", "Expecting property name enclosed in double quotes at column 2"),
    }


def test_submission_for_an_unlabeled_split(served, capsys, tmp_path):
    """A processed split whose answers are empty (as preprocess keeps DocVQA's test split) becomes the leaderboard
    file: every questionId once, as an integer, with the answer evaluation's engine gives."""
    from datasets import Dataset

    from florence_ops.data.processed import QUESTION_FEATURES, read_questions

    processed = tmp_path / "processed"
    shutil.copytree(served / "data/processed", processed)
    rows = read_questions(processed, "validation").to_list()
    unlabeled = [{**row, "questionId": str(57000 + i), "answers": []} for i, row in enumerate(rows)]
    Dataset.from_list(unlabeled, features=QUESTION_FEATURES).to_parquet(processed / "test.parquet")
    params = write_params(tmp_path, **{"paths.processed": str(processed)})
    submission = tmp_path / "submission.json"
    code, out, _ = run_cli(capsys, "--params", str(params), "--model", str(served / "models/export"),
                           "--submission", str(submission))  # fmt: skip
    assert code == 0 and out.startswith(f"answered {len(rows)} test questions")
    expected = evaluation_answers(served, served / "models/export", "test", processed)
    written = json.loads(submission.read_text())
    assert [item["questionId"] for item in written] == [57000 + i for i in range(len(rows))]
    assert {str(item["questionId"]): item["answer"] for item in written} == expected
    assert all(set(item) == {"questionId", "answer"} for item in written)


def two_page_pdf(served, folder) -> tuple[str, list[str]]:
    """A PDF of two validation pages in `folder`, and the question asked about each page in the data."""
    from PIL import Image

    records = raw_pages(served, "validation")[:2]
    first, second = (Image.open(io.BytesIO(r["image"]["bytes"])).convert("RGB") for r in records)
    path = folder / "doc.pdf"
    first.save(path, save_all=True, append_images=[second])
    return str(path), [r["question"] for r in records]


def test_page_counts_from_one(served, capsys, tmp_path):
    """--page 0 or below is an error, not the first page; a page asked of the library from 0 is `page_missing`."""
    from florence_ops.data.images import InvalidImage
    from florence_ops.serving.pages import model_page

    pdf, _ = two_page_pdf(served, tmp_path)
    params = str(served / "params.yaml")
    for page in ("0", "-1"):
        code, out, err = run_cli(capsys, "--params", params, "--image", pdf, "--page", page, "--question", "Why?")
        assert (code, out, err.splitlines()[-1]) == (2, "", f"error: --page counts from 1, got {page}")
    with pytest.raises(InvalidImage, match="page_missing: page 0 asked: pages count from 1"):
        model_page(Path(pdf).read_bytes(), (32, 32), 10**8, page=0)


def test_jsonl_page_zero_is_that_lines_error(served, capsys, tmp_path):
    pdf, questions = two_page_pdf(served, tmp_path)
    lines = [{"question_id": f"p{page}", "question": questions[0], "image": "doc.pdf", "page": page} for page in (0, 1)]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    params = str(served / "params.yaml")
    code, out, _ = run_cli(capsys, "--params", params, "--input", str(tmp_path / "q.jsonl"), "--output",
                           str(tmp_path / "a.jsonl"))  # fmt: skip
    zero, one = (json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines())
    assert code == 0 and out.startswith("answered 1 of 2 questions (1 errors")
    assert (zero["error"], zero["detail"]) == ("field_invalid", "page must be an integer from 1, got 0")
    assert "answer" not in zero
    assert "error" not in one and isinstance(one["answer"], str)


def test_directory_is_not_reported_as_not_found(served, capsys, tmp_path):
    (tmp_path / "scans").mkdir()
    params = str(served / "params.yaml")
    for flags in (["--image", str(tmp_path / "scans"), "--question", "Why?"],
                  ["--input", str(tmp_path / "scans"), "--output", str(tmp_path / "a.jsonl")]):  # fmt: skip
        code, _, err = run_cli(capsys, "--params", params, *flags)
        assert (code, err.splitlines()[-1]) == (2, f"error: {tmp_path / 'scans'} is a directory, not a file")
    code, _, err = run_cli(capsys, "--params", params, "--image", str(tmp_path / "nowhere.png"), "--question", "Why?")
    assert (code, err.splitlines()[-1]) == (2, f"error: {tmp_path / 'nowhere.png'} not found")
    (tmp_path / "q.jsonl").write_text(json.dumps({"question_id": "d", "question": "Why?", "image": "scans"}) + "\n")
    code, _, _ = run_cli(capsys, "--params", params, "--input", str(tmp_path / "q.jsonl"), "--output",
                         str(tmp_path / "a.jsonl"))  # fmt: skip
    row = json.loads((tmp_path / "a.jsonl").read_text())
    assert (code, row["error"], row["detail"]) == (0, "image_missing", "scans is a directory, not a file")


def test_pixel_limit_errors_name_predicts_setting(served, capsys, tmp_path):
    """predict decodes pages under preprocess's limit, data.max_image_pixels, and says so for PDFs too."""
    pdf, _ = two_page_pdf(served, tmp_path)
    image = tmp_path / "page.png"
    image.write_bytes(raw_pages(served, "validation")[0]["image"]["bytes"])
    params = str(write_params(tmp_path, **{"data.max_image_pixels": 1000}))
    model = str(served / "models/export")
    code, _, err = run_cli(capsys, "--params", params, "--model", model, "--image", pdf, "--question", "Why?")
    assert (code, err.splitlines()[-1]) == (2, "error: image_too_large: page 1 at 150 dpi exceeds "
                                               "data.max_image_pixels=1000")  # fmt: skip
    code, _, err = run_cli(capsys, "--params", params, "--model", model, "--image", str(image), "--question", "Why?")
    assert code == 2 and err.splitlines()[-1].startswith("error: image_too_large: over data.max_image_pixels=1000: ")


def question_of(tokenizer, prompt: str, tokens: int) -> str:
    """A question whose encoder text (<s>, prompt, question, </s>) is exactly `tokens` tokens long."""
    from florence_ops.model_inputs import build_prompt

    question = "date"
    while len(tokenizer(build_prompt(prompt, question)).input_ids) < tokens:
        question += " date"
    assert len(tokenizer(build_prompt(prompt, question)).input_ids) == tokens
    return question


@pytest.fixture(scope="module")
def asking(served):
    """The exported model's tokenizer and settings (prompt, max_question_tokens from florence_ops.json)."""
    from florence_ops.modeling import load_processor
    from florence_ops.serving.model_dir import read_settings
    from tests.conftest import tiny_params

    params = tiny_params(served)
    model_dir = served / "models/export"
    return load_processor(model_dir, params.model).tokenizer, read_settings(model_dir, params)


def test_question_limit_refuses_exactly_what_the_collator_would_cut(asking):
    from florence_ops.model_inputs import Collator, build_prompt
    from florence_ops.serving.answering import question_problem

    tokenizer, settings = asking
    limit = settings.max_question_tokens
    collator = Collator(tokenizer, settings.prompt, limit, 0, train=False)
    at, over = (question_of(tokenizer, settings.prompt, n) for n in (limit, limit + 1))
    for question, cut in ((at, False), (over, True)):
        whole = tokenizer(build_prompt(settings.prompt, question)).input_ids
        fed = collator([{"question": question, "image_id": "p"}]).input_ids[0].tolist()
        assert (fed != whole) is cut
    assert question_problem(tokenizer, settings, at) is None
    problem = question_problem(tokenizer, settings, over)
    assert (problem.reason, problem.detail) == (
        "question_too_long",
        f"the prompt and question are {limit + 1} tokens, over the model's limit of {limit} (max_question_tokens in "
        "the model directory's florence_ops.json): shorten the question",
    )


def test_limit_of_a_directory_without_settings_names_params_yaml(served, tmp_path):
    from florence_ops.serving.model_dir import read_settings
    from tests.conftest import tiny_params

    settings = read_settings(tmp_path, tiny_params(served))
    assert settings.limit_setting == "train.max_question_tokens in params.yaml"


def test_question_over_the_limit_is_an_error_not_a_cut_answer(served, asking, capsys, tmp_path):
    tokenizer, settings = asking
    limit = settings.max_question_tokens
    record = raw_pages(served, "validation")[0]
    (tmp_path / "page.png").write_bytes(record["image"]["bytes"])
    params = str(served / "params.yaml")
    over = question_of(tokenizer, settings.prompt, limit + 1)
    code, out, err = run_cli(capsys, "--params", params, "--image", str(tmp_path / "page.png"), "--question", over)
    assert (code, out) == (2, "")
    assert err.splitlines()[-1] == (f"error: question_too_long: the prompt and question are {limit + 1} tokens, over "
                                    f"the model's limit of {limit} (max_question_tokens in the model directory's "
                                    "florence_ops.json): shorten the question")  # fmt: skip
    at = question_of(tokenizer, settings.prompt, limit)
    lines = [{"question_id": "at", "question": at, "image": "page.png"},
             {"question_id": "over", "question": over, "image": "page.png"}]  # fmt: skip
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    code, _, _ = run_cli(capsys, "--params", params, "--input", str(tmp_path / "q.jsonl"), "--output",
                         str(tmp_path / "a.jsonl"))  # fmt: skip
    answered, refused = (json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines())
    assert code == 0 and "error" not in answered and isinstance(answered["answer"], str)
    assert refused["error"] == "question_too_long" and "answer" not in refused
    assert f"over the model's limit of {limit} (max_question_tokens" in refused["detail"]
