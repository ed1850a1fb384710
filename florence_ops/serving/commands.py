"""Arguments and entry points of `florence-ops predict` and `florence-ops serve` (wired up by `florence_ops.cli`)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from florence_ops.artifacts import REGISTRY_REFERENCE
from florence_ops.config import Params, load_params
from florence_ops.errors import UserError

PREDICT_EXAMPLES = """examples:
  florence-ops predict --image scan.png --question "What is the invoice number?"
  florence-ops predict --image report.pdf --page 3 --question "Who signed it?" --model models/champion
  florence-ops predict --input questions.jsonl --output answers.jsonl
  florence-ops predict --submission reports/docvqa_test_submission.json   # the processed test split
"""


def add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    """`predict`: one of --image with --question, --input with --output, or --submission."""
    parser.add_argument("--model", help="model directory in the Hugging Face layout (default: paths.export)")
    parser.add_argument("--image", type=Path, help="a page image or PDF")
    parser.add_argument("--page", type=int, help="page number of a PDF, from 1 (default: 1)")
    parser.add_argument("--question", help="the question about --image")
    parser.add_argument("--input", type=Path, help="JSONL of questions, as the local source's annotations.jsonl")
    parser.add_argument("--output", type=Path, help="JSONL written with each --input line and its answer or error")
    parser.add_argument("--submission", type=Path, help="write the DocVQA leaderboard file for --split here")
    parser.add_argument("--split", default="test", help="processed split answered for --submission (default: test)")
    parser.add_argument("--batch-size", type=int, help="questions per generate call (default: predict.batch_size)")
    parser.epilog, parser.formatter_class = PREDICT_EXAMPLES, argparse.RawDescriptionHelpFormatter


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """`serve`: the model directory and the few settings people change on the command line."""
    parser.add_argument(
        "--model",
        help="model directory (default: paths.export; models/champion for the champion), "
        "or registry:<artifact>#<stage> to serve and follow the registry (registry:florence-docvqa#prod)",
    )
    parser.add_argument("--git-remote", help="git URL of the registry for --model registry:... (registry.git_remote)")
    parser.add_argument("--host", help="bind address: 127.0.0.1 (default, this machine only) or 0.0.0.0 / :: to "
                        "expose the server to the network (set a token first: serve.api_token_env)")  # fmt: skip
    parser.add_argument("--port", type=int, help="port (default: serve.port)")
    parser.add_argument("--max-batch-size", type=int, help="requests per generate call (serve.max_batch_size)")
    parser.add_argument("--batch-timeout", type=float, help="longest wait for a batch, s (serve.batch_timeout_s)")


def params_for(path: str, overrides: dict) -> Params:
    """params.yaml with command-line overrides; the built-in defaults when the file is absent (a bare model dir)."""
    overrides = {key: value for key, value in overrides.items() if value is not None}
    return load_params(path if Path(path).is_file() else os.devnull, overrides)


def run_predict(args: argparse.Namespace) -> int:
    """Answer as the arguments say; print the answer or a summary line."""
    from florence_ops.serving.answering import load_answerer
    from florence_ops.serving.predict import answer_page, predict_jsonl, require_file, write_submission

    modes = [args.image is not None, args.input is not None, args.submission is not None]
    if sum(modes) != 1:
        raise UserError("give one of --image (with --question), --input (with --output) or --submission")
    if args.image is not None and not args.question:
        raise UserError("--image needs --question")
    if args.input is not None and args.output is None:
        raise UserError("--input needs --output")
    if args.page is not None and args.page < 1:
        raise UserError(f"--page counts from 1, got {args.page}")
    for path in (args.image, args.input):
        if path is not None:
            require_file(path)  # before the model loads: a wrong path fails at once
    params = params_for(args.params, {"predict.batch_size": args.batch_size})
    model_dir = Path(args.model or params.paths.export)
    answerer = load_answerer(model_dir, params, params.predict.batch_size)
    if args.image is not None:
        print(answer_page(answerer, args.image.read_bytes(), args.question, params, args.page))
        return 0
    if args.input is not None:
        summary = predict_jsonl(answerer, args.input, args.output, params)
        print(f"answered {summary['answered']} of {summary['questions']} questions ({summary['errors']} errors, "
              f"recorded in the output) in {summary['seconds']} s -> {args.output}")  # fmt: skip
        return 0
    summary = write_submission(answerer, Path(params.paths.processed), args.split, args.submission)
    print(f"answered {summary['questions']} {args.split} questions in {summary['seconds']} s -> {args.submission}")
    return 0


def run_serve(args: argparse.Namespace) -> int:
    """Run the server until interrupted."""
    from florence_ops.serving.server import ServerFailed, serve

    overrides = {"serve.host": args.host, "serve.port": args.port, "serve.max_batch_size": args.max_batch_size,
                 "serve.batch_timeout_s": args.batch_timeout, "registry.git_remote": args.git_remote}  # fmt: skip
    params = params_for(args.params, overrides)
    if params.serve.host != "127.0.0.1":
        print(
            f"warning: serving on {params.serve.host}: anyone who can reach this machine can use the model"
            f"{'' if _token_set(params) else ' (no token set: ' + params.serve.api_token_env + ')'}",
            file=sys.stderr,
        )
    model, replica = args.model or params.paths.export, None
    if model.startswith(REGISTRY_REFERENCE):  # fetched before the server starts: an unreadable registry is one line
        from florence_ops.serving.replica import Replica  # GTO and DVC load only for a registry entry

        replica = Replica.for_reference(model, params)
        model = replica.start()
    try:
        serve(Path(model), params, replica)
    except ServerFailed as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def _token_set(params: Params) -> bool:
    return bool(os.environ.get(params.serve.api_token_env))
