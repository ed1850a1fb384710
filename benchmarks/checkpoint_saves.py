"""What an epoch's end costs the training path: the best model and the checkpoint saved in place, as before, or copied
to host buffers kept from save to save and written in the background (`florence_ops.checkpointing.BackgroundWrites`).

Builds Florence-2-base's or -large's shape from the real checkpoint's config (`--shape`), prepares it with fused
AdamW (its state filled by one step) and a scheduler through accelerate as the train stage does, then saves an
epoch's end `--rounds` times each way, after a round not counted: `save_trained` (the best model) and
`CheckpointStore.save` (accelerate's state). `path_s` is the time the training loop waits; `written_s` the time until
the background writes are on disk.

    PYTHONPATH=. python benchmarks/checkpoint_saves.py --reference ../shared/reference/florence-2-base-ft \\
        [--shape large-shape] [--rounds 3] [--folder /tmp/florence-ops-saves] [--out reports/benchmarks]

Writes <out>/checkpoint_saves[_large]_<device-slug>.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from accelerate import Accelerator  # noqa: E402
from transformers import get_scheduler  # noqa: E402

from florence_ops.artifacts import write_json  # noqa: E402
from florence_ops.base_models import build_reference_model, build_reference_processor  # noqa: E402
from florence_ops.checkpointing import BackgroundWrites, CheckpointStore  # noqa: E402
from florence_ops.modeling import freeze  # noqa: E402
from florence_ops.precision import mixed_precision  # noqa: E402
from florence_ops.stages.train import save_trained  # noqa: E402
from florence_ops.training import DocVQAObjective, make_optimizer  # noqa: E402


def epoch_end(acc, state, processor, folder: Path, step: int, writes: BackgroundWrites | None) -> dict:
    store = CheckpointStore(folder / "checkpoints", "bench", writes=writes)
    _sync()
    start = time.perf_counter()
    save_trained(acc, state[0], processor, store.best, writes)
    store.save(acc, {"step": step, "epoch": step}, state)
    _sync()
    path = time.perf_counter() - start
    if writes is not None:
        writes.wait()
    return {"path_s": round(path, 3), "written_s": round(time.perf_counter() - start, 3)}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reference", default=str(REPO.parent / "shared" / "reference" / "florence-2-base-ft"))
    parser.add_argument("--shape", default="base-shape", choices=["base-shape", "large-shape"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--folder", default="/tmp/florence-ops-saves")
    parser.add_argument("--out", default=str(REPO / "reports" / "benchmarks"))
    args = parser.parse_args(argv)
    folder = Path(args.folder)
    processor = build_reference_processor(args.reference)
    model = build_reference_model(args.shape, args.reference, processor, 1234)
    freeze(model, ["vision_tower"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    acc = Accelerator(mixed_precision=mixed_precision("auto", device), cpu=device.type == "cpu")
    objective = DocVQAObjective(model)
    optimizer = make_optimizer(objective, 1e-4, 0.01, device)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=5, num_training_steps=1000)
    objective, optimizer, scheduler = acc.prepare(objective, optimizer, scheduler)
    for param in objective.parameters():
        if param.requires_grad:
            param.grad = torch.zeros_like(param)
    optimizer.step()  # fills AdamW's state, as after the first step
    scheduler.step()
    state = (objective, optimizer, scheduler)
    rounds = {"in_place": [], "background": []}
    background = BackgroundWrites()  # one per run, as the train stage keeps it: its host buffers serve every save
    for i in range(args.rounds + 1):  # the first round (imports, first writes, host buffers) is not counted
        for way, writes in (("in_place", None), ("background", background)):
            shutil.rmtree(folder, ignore_errors=True)
            timing = epoch_end(acc, state, processor, folder, i + 1, writes)
            print(way, timing, flush=True)
            if i:
                rounds[way].append(timing)
    shutil.rmtree(folder, ignore_errors=True)
    slug = (torch.cuda.get_device_name() if device.type == "cuda" else "cpu").lower().replace(" ", "-")
    median = {way: {key: statistics.median(r[key] for r in runs) for key in ("path_s", "written_s")}
              for way, runs in rounds.items()}  # fmt: skip
    report = {"benchmark": "checkpoint_saves", "device": slug, "shape": args.shape, "torch": torch.__version__,
              "trainable_parameters": sum(p.numel() for p in objective.parameters() if p.requires_grad),
              "folder": str(folder), "rounds": rounds, "median": median}  # fmt: skip
    suffix = "" if args.shape == "base-shape" else "_large"
    write_json(Path(args.out, f"checkpoint_saves{suffix}_{slug}.json"), report)
    print(json.dumps(median))
    return report


if __name__ == "__main__":
    main()
