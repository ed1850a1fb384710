"""`florence-ops <stage>`: run one pipeline stage with params.yaml (what each `dvc.yaml` stage calls);
`florence-ops predict` and `florence-ops serve`: answer questions with a trained model; `florence-ops registry`: the
model registry."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from florence_ops.config import load_params
from florence_ops.errors import ConfigError

STAGES = ("download", "preprocess", "train", "evaluate", "export")
COMMANDS = {
    **{stage: f"run the {stage} stage" for stage in STAGES},
    "predict": "answer questions about pages with a model directory",
    "serve": "serve a model directory (or a registry entry) over HTTP (OpenAI chat completions, a page at /)",
    "registry": "show the model registry's versions and history, or roll a stage back",
}


def run_stage(name: str, params_path: str = "params.yaml", machine_rank: int | None = None):
    """Load and validate params, then run stage `name` (train as machine `machine_rank` of `train.num_machines`);
    returns what the stage returns."""
    params = load_params(params_path)
    if name == "train":
        from florence_ops.stages.train import train

        return train(params, machine_rank)
    if name == "download":
        from florence_ops.stages.download import download as stage
    elif name == "preprocess":
        from florence_ops.stages.preprocess import preprocess as stage
    elif name == "evaluate":
        from florence_ops.stages.evaluate import evaluate as stage
    else:
        from florence_ops.stages.export import export as stage
    return stage(params)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `florence-ops` console command."""
    from florence_ops.serving.commands import add_predict_arguments, add_serve_arguments, run_predict, run_serve

    parser = argparse.ArgumentParser(prog="florence-ops", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name in COMMANDS:
        sub = commands.add_parser(name, help=COMMANDS[name])
        sub.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    commands.choices["train"].add_argument(
        "--machine-rank", type=int, default=None, metavar="R",
        help="with train.num_machines > 1: this machine's rank (0: the one where `dvc repro` runs and outputs land)",
    )  # fmt: skip
    add_predict_arguments(commands.choices["predict"])
    add_serve_arguments(commands.choices["serve"])
    from florence_ops.registry_commands import add_registry_arguments, run_registry

    add_registry_arguments(commands.choices["registry"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from florence_ops.errors import UserError

    start = time.perf_counter()
    try:
        _temp_dir_for_sockets()
        if args.command == "predict":
            return run_predict(args)
        if args.command == "serve":
            return run_serve(args)
        if args.command == "registry":
            return run_registry(args)
        result = run_stage(args.command, args.params, getattr(args, "machine_rank", None))
    except (ConfigError, UserError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    logging.getLogger("florence_ops.cli").info("stage %s finished in %.1f s", args.command, time.perf_counter() - start)
    if isinstance(result, dict):
        print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict | list)}, default=str))
    return 0


def _temp_dir_for_sockets() -> None:
    """DataLoader workers and the server's request queue talk over local sockets under TMPDIR: move to a short temp
    dir where TMPDIR is too long for them (`processes.temp_dir_for_sockets`), saying so."""
    import tempfile

    from florence_ops.errors import UserError
    from florence_ops.processes import temp_dir_for_sockets

    try:
        replaced = temp_dir_for_sockets()
    except OSError as error:
        raise UserError(str(error)) from None
    if replaced is not None:
        logging.getLogger("florence_ops.cli").warning(
            "TMPDIR %s is too long for local sockets (DataLoader workers, the server's request queue); this "
            "command's processes use %s", replaced, tempfile.gettempdir()
        )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
