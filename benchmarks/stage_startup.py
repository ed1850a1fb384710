"""Where a stage's wall goes before and around its work: imports, then each call the stage makes, timed.

Run it in a pipeline workspace whose earlier stages have run (for example the one `pipeline_gpu.py` leaves in
/tmp/florence-ops-pipeline), with that workspace first on PYTHONPATH:

    cd /tmp/florence-ops-pipeline && PYTHONPATH=$PWD python <repo>/benchmarks/stage_startup.py evaluate

It times the imports (torch, transformers, datasets, the CLI, the stage module), then runs the stage as
`florence-ops <stage>` does, with the functions the stage module calls (model loads, the cache check, answering,
report writing...) wrapped so that each call prints its duration (CUDA synchronised) and when it ended. The stage
writes its outputs as usual. For what Python spends importing, add `python -X importtime`.
"""

from __future__ import annotations

import time

START = time.perf_counter()


def mark(what: str) -> None:
    print(f"{what:<34} at {time.perf_counter() - START:6.2f} s", flush=True)


import functools  # noqa: E402
import importlib  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402

mark("import torch")
import transformers  # noqa: E402, F401

mark("import transformers")
import datasets  # noqa: E402, F401

mark("import datasets")
from florence_ops import cli  # noqa: E402, F401
from florence_ops.config import load_params  # noqa: E402

mark("import florence_ops.cli")

CALLS = {
    "train": ["set_seed", "make_accelerator", "load_pretrained", "freeze", "ImageTable", "vision_source", "_rows",
              "_live", "fit", "save_trained", "cache_key", "open_cache", "build_cache", "CheckpointStore"],
    "evaluate": ["Accelerator", "read_questions", "labeled_rows", "ImageTable", "load_trained", "vision_source",
                 "predict", "score_predictions", "aggregate", "write_html_report", "write_predictions", "write_json",
                 "write_type_plot_data", "cache_key", "open_cache", "_same_weights", "cached_source"],
}  # fmt: skip


def timed(name: str, function):
    @functools.wraps(function)
    def call(*args, **kwargs):
        start = time.perf_counter()
        result = function(*args, **kwargs)
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        end = time.perf_counter()
        print(f"  {name:<32} {end - start:6.2f} s (ends at {end - START:6.2f} s)", flush=True)
        return result

    return call


def main(stage: str) -> None:
    logging.basicConfig(level=logging.INFO, format="%(relativeCreated)7.0f ms %(name)s: %(message)s")
    module = importlib.import_module(f"florence_ops.stages.{stage}")
    mark(f"import florence_ops.stages.{stage}")
    for name in CALLS[stage]:
        if hasattr(module, name):
            setattr(module, name, timed(name, getattr(module, name)))
    params = load_params("params.yaml", {})
    getattr(module, stage)(params)
    mark("stage done")


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in CALLS:
        sys.exit(f"usage: stage_startup.py {{{','.join(CALLS)}}}")
    main(sys.argv[1])
