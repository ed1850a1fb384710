"""`florence-ops <stage>`: run one pipeline stage with params.yaml (what each `dvc.yaml` stage calls)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from florence_ops.config import ConfigError, load_params

STAGES = ("download", "preprocess", "train", "evaluate", "export")


def run_stage(name: str, params_path: str = "params.yaml"):
    """Load and validate params, then run stage `name`; returns what the stage returns."""
    params = load_params(params_path)
    if name == "download":
        from florence_ops.stages.download import download as stage
    elif name == "preprocess":
        from florence_ops.stages.preprocess import preprocess as stage
    elif name == "train":
        from florence_ops.stages.train import train as stage
    elif name == "evaluate":
        from florence_ops.stages.evaluate import evaluate as stage
    else:
        from florence_ops.stages.export import export as stage
    return stage(params)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `florence-ops` console command."""
    parser = argparse.ArgumentParser(prog="florence-ops", description=__doc__)
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from florence_ops.errors import UserError

    start = time.perf_counter()
    try:
        result = run_stage(args.stage, args.params)
    except (ConfigError, UserError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    logging.getLogger("florence_ops.cli").info("stage %s finished in %.1f s", args.stage, time.perf_counter() - start)
    if isinstance(result, dict):
        print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict | list)}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
