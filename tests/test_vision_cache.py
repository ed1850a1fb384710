"""A damaged vision-feature cache is detected and rebuilt, never read into training."""

import logging
import os
import shutil

import numpy as np
import pytest
from safetensors.torch import load_file

from tests.conftest import tiny_params

pytestmark = pytest.mark.slow
NO_VALIDATION = {"epochs": 1, "train.eval_every_epoch": False}


def _overwrite(path, fraction: float = 0.5, size: int = 4096) -> None:
    """Random bytes over part of the file's data, header left intact."""
    with open(path, "r+b") as stream:
        stream.seek(int(os.path.getsize(path) * fraction))
        stream.write(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())


def _truncate(path) -> None:
    with open(path, "r+b") as stream:
        stream.truncate(os.path.getsize(path) * 2 // 3)


@pytest.mark.parametrize("damage", [_overwrite, _truncate], ids=["bytes-overwritten", "truncated"])
def test_damaged_cache_is_rebuilt_and_training_is_unchanged(prepared, tmp_path, caplog, damage):
    from florence_ops.stages.train import train

    root = tmp_path / "ws"
    shutil.copytree(prepared, root)
    params = tiny_params(root, **NO_VALIDATION)
    train(params)
    clean = load_file(root / "models/train/model/model.safetensors")
    (features,) = (root / ".cache/vision_features").glob("*/features.npy")
    damage(features)

    with caplog.at_level(logging.WARNING, logger="florence_ops.vision.cache"):
        train(params)  # `dvc repro -f train`, or a new experiment, on the damaged cache
    assert any("is damaged" in record.getMessage() for record in caplog.records), "damage must be reported"
    rebuilt = load_file(root / "models/train/model/model.safetensors")
    for name, tensor in clean.items():
        assert (rebuilt[name] == tensor).all(), f"{name}: training read the damaged cache"
    (again,) = (root / ".cache/vision_features").glob("*/features.npy")
    from florence_ops.vision.cache import VisionFeatureCache

    VisionFeatureCache(again.parent).verify()  # the rebuilt cache is whole


def test_evaluate_does_not_answer_from_a_damaged_cache(prepared, tmp_path, caplog):
    """The features file is not fsynced (a crash can tear it): evaluation verifies the checksums before reading it,
    and answers from the pages when they fail."""
    from florence_ops.stages.evaluate import evaluate
    from florence_ops.stages.train import train

    root = tmp_path / "ws"
    shutil.copytree(prepared, root)
    params = tiny_params(root, **NO_VALIDATION)
    train(params)
    (features,) = (root / ".cache/vision_features").glob("*/features.npy")
    _overwrite(features)

    with caplog.at_level(logging.INFO):
        evaluate(params)
    messages = [record.getMessage() for record in caplog.records]
    assert any("is damaged" in message for message in messages), "the damage must be found before reading"
    assert not any("answering from the cached vision features" in message for message in messages)
    assert not features.parent.exists(), "the damaged cache is deleted"


def test_open_checks_size_and_verify_checks_every_chunk(tmp_path):
    import torch

    from florence_ops.vision.cache import open_cache
    from florence_ops.vision.cache_build import build_cache

    ids = [f"page{i}" for i in range(10)]
    pages = [(ids[i : i + 4], torch.arange(i, min(i + 4, 10)).float()) for i in range(0, 10, 4)]
    encode = lambda rows: rows.view(-1, 1, 1, 1).expand(-1, 8, 6, 6) / 7  # noqa: E731 - a stand-in tower
    cache = build_cache(tmp_path, "key", ids, pages, encode)
    assert torch.equal(cache.features(["page3"]).float(), (torch.full((1, 8, 6, 6), 3.0) / 7).bfloat16().float())
    open_cache(tmp_path, "key", verify=True).verify()

    _overwrite(tmp_path / "key/features.npy", fraction=0.9, size=16)
    assert open_cache(tmp_path, "key") is not None, "size and shape still match: only the checksum can tell"
    assert open_cache(tmp_path, "key", verify=True) is None and not (tmp_path / "key").exists()

    build_cache(tmp_path, "key", ids, pages, encode)
    _truncate(tmp_path / "key/features.npy")
    assert open_cache(tmp_path, "key") is None, "a truncated cache must not even open"


def test_a_failed_build_leaves_the_cache_in_place_and_nothing_beside_it(tmp_path):
    """A build that stops halfway (a tower that fails, a kill) leaves the published cache of that key as it was, and
    no half-written folder on the disk."""
    import torch

    from florence_ops.vision.cache import open_cache
    from florence_ops.vision.cache_build import build_cache

    ids = ["page0", "page1", "page2"]
    build_cache(tmp_path, "key", ids, [(ids, torch.ones(3, 2))], lambda rows: rows)

    def failing_pages():
        yield ids[:2], torch.zeros(2, 2)
        raise RuntimeError("the page loader died")

    with pytest.raises(RuntimeError, match="page loader died"):
        build_cache(tmp_path, "key", ids, failing_pages(), lambda rows: rows)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["key"]
    assert torch.equal(open_cache(tmp_path, "key", verify=True).features(ids).float(), torch.ones(3, 2))


def test_resident_features_equal_the_mapped_ones(tmp_path):
    """Features held in device memory (here the CPU's) are the cache's, row for row, gathered by page id; they are
    read in chunks (here of two pages: a full chunk and a short one)."""
    import torch

    from florence_ops.model_inputs import TextBatch
    from florence_ops.vision.cache_build import build_cache
    from florence_ops.vision.sources import CachedSource, ResidentSource, tower_output

    ids = [f"page{i}" for i in range(7)]
    pages = [(ids[i : i + 3], torch.randn(len(ids[i : i + 3]), 4, 2, 2)) for i in range(0, 7, 3)]
    cache = build_cache(tmp_path, "key", ids, pages, lambda rows: rows)
    asked = ["page5", "page1", "page5", "page6"]
    resident = ResidentSource(cache, ["page6", "page1", "page5"], torch.device("cpu"), chunk=2)
    mapped = CachedSource(cache)
    cpu = torch.device("cpu")
    assert torch.equal(resident.prepare(resident.load(asked), cpu), mapped.prepare(mapped.load(asked), cpu))
    # as training reads them: the features are the tower's output (no tower runs, so no model is needed)
    batch = TextBatch(torch.zeros(4, 1, dtype=torch.long), torch.ones(4, 1, dtype=torch.long), asked)
    assert torch.equal(tower_output(None, resident, batch, cpu), mapped.prepare(mapped.load(asked), cpu))


class _MarkingPages:
    """A DataLoader collate function that marks, in a file, that a worker has started on the pages."""

    def __init__(self, marker):
        self.marker = marker

    def __call__(self, ids):
        import torch

        self.marker.touch()
        return list(ids), torch.tensor([float(i[4:]) for i in ids])


def test_the_warm_up_runs_while_the_workers_decode_the_first_pages(tmp_path):
    """A compiling tower's first call (the warm-up) starts once the DataLoader's workers are decoding pages, so the
    two happen at once; the cache holds the same features as one built without it."""
    import time

    import torch
    from torch.utils.data import DataLoader

    from florence_ops.vision.cache_build import build_cache

    ids = [f"page{i}" for i in range(6)]
    marker = tmp_path / "worker-started"
    encode = lambda rows: rows.view(-1, 1, 1).expand(-1, 3, 2) / 5  # noqa: E731 - a stand-in tower
    seen = []

    def warm_up():
        deadline = time.monotonic() + 10
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        seen.append(marker.exists())

    loader = DataLoader(ids, batch_size=4, num_workers=1, collate_fn=_MarkingPages(marker))
    cache = build_cache(tmp_path / "warm", "key", ids, loader, encode, warm_up=warm_up)
    assert seen == [True], "the warm-up ran before any worker had started on the pages"
    plain = build_cache(tmp_path / "plain", "key", ids, [(ids[:4], torch.arange(4.0)), (ids[4:], torch.arange(4.0, 6))],
                        encode)  # fmt: skip
    assert torch.equal(cache.features(ids), plain.features(ids))


def test_warm_up_encodes_one_full_batch_of_the_first_page():
    """The warm-up calls the encoder once, with the batch size it will be compiled for (or all pages, if fewer)."""
    from types import SimpleNamespace

    import torch
    from PIL import Image

    from florence_ops.vision.encoder import warm_up
    from florence_ops.vision.sources import PixelSource

    colours = {"a": (10, 20, 30), "b": (40, 50, 60), "c": (70, 80, 90)}
    images = {name: Image.new("RGB", (5, 4), colour) for name, colour in colours.items()}
    source = PixelSource(images, SimpleNamespace(rescale_factor=1 / 255, image_mean=[0.5] * 3, image_std=[0.5] * 3))
    for batch_size, expected in ((2, 2), (8, 3)):
        calls = []
        warm_up(calls.append, source, ["a", "b", "c"], batch_size, torch.device("cpu"))
        assert len(calls) == 1 and calls[0].shape == (expected, 4, 5, 3)
        assert torch.equal(calls[0], source.load(["a"]).expand(expected, 4, 5, 3))


def test_tower_in_the_step_computes_the_features_the_cache_holds(prepared, tmp_path):
    """`train.vision_cache: false` runs the frozen tower inside the step as the cache build does: the same batches of
    pages (`model.vision_batch_size`, here two to a micro-batch) give the cached features (stored in bf16)."""
    import torch

    from florence_ops.data.processed import ImageTable
    from florence_ops.modeling import load_pretrained
    from florence_ops.vision.sources import PixelSource
    from florence_ops.vision.stage_cache import encoded_source, open_or_build_cache

    params = tiny_params(prepared, **{"model.vision_batch_size": 4, "paths.vision_cache": str(tmp_path)})
    model, processor = load_pretrained(params.paths.base_model, params.model)
    tower, images, device = model.model.vision_tower.eval(), ImageTable(params.paths.processed), torch.device("cpu")
    cache = open_or_build_cache(params, tower, processor.image_processor, images, device, verify=False, build=True)
    source = encoded_source(params, tower, PixelSource(images, processor.image_processor), images.ids, device, 8)
    assert source.gives_tower_output and not source.cached
    encode, calls = source.encode, []
    source.encode = lambda pages: calls.append(len(pages)) or encode(pages)
    for start in range(0, len(images.ids), 8):
        ids = images.ids[start : start + 8]
        calls.clear()
        encoded = source.prepare(source.load(ids), device)
        assert calls == [min(4, len(ids) - i) for i in range(0, len(ids), 4)]  # model.vision_batch_size a call
        assert encoded.dtype == torch.float32 and not encoded.requires_grad
        assert torch.equal(encoded.to(torch.bfloat16), cache.features(ids))


def test_tower_in_the_step_runs_outside_the_steps_autocast(prepared):
    """A training step runs under bf16 autocast on a GPU; the frozen tower's bf16 copy inside it must not (on an H200
    autocast handed the fused fc1+GELU matmul fp32 activations: 'mat1 and mat2 must have the same dtype')."""
    import torch

    from florence_ops.data.processed import ImageTable
    from florence_ops.modeling import load_pretrained
    from florence_ops.vision.encoder import tower_encoder
    from florence_ops.vision.sources import PixelSource

    params = tiny_params(prepared)
    model, processor = load_pretrained(params.paths.base_model, params.model)
    tower, images = model.model.vision_tower.eval(), ImageTable(params.paths.processed)
    seen = []
    tower.register_forward_pre_hook(lambda *_: seen.append(torch.is_autocast_enabled("cpu")))  # copied with the tower
    encode = tower_encoder(tower, PixelSource(images, processor.image_processor), torch.device("cpu"), torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        encode(PixelSource(images, processor.image_processor).load(images.ids[:2]))
    assert seen == [False]


def _train_cache(params, image_ids, root):
    """The train stage's own build of the cache of `image_ids` under `root` (its folder), as `vision_source` runs it."""
    import torch

    from florence_ops.data.processed import ImageTable
    from florence_ops.modeling import load_pretrained
    from florence_ops.vision.stage_cache import open_or_build_cache

    model, processor = load_pretrained(params.paths.base_model, params.model)
    images = ImageTable(params.paths.processed)
    assert images.ids == image_ids
    params.paths.vision_cache = str(root)
    cache = open_or_build_cache(params, model.model.vision_tower.eval(), processor.image_processor, images,
                                torch.device("cpu"), verify=True, build=True)  # fmt: skip
    return cache.folder


def test_preprocess_builds_the_cache_that_train_opens_with_the_bytes_of_train_s_own_build(prepared, tmp_path, caplog):
    """`data.encode_pages`: the preprocess stage leaves the vision cache of the pages it wrote under the key the train
    stage asks for, so train opens it and builds nothing; its index and features are those of train's own build."""
    from florence_ops.data.processed import ImageTable
    from florence_ops.stages.preprocess import preprocess
    from florence_ops.stages.train import train

    root = tmp_path / "ws"
    shutil.copytree(prepared, root, ignore=shutil.ignore_patterns("processed", ".cache"))
    params = tiny_params(root, **{"data.encode_pages": True, **NO_VALIDATION})
    preprocess(params)
    (built,) = (root / ".cache/vision_features").iterdir()
    ids = ImageTable(params.paths.processed).ids
    own = _train_cache(tiny_params(root), ids, tmp_path / "train-built")
    assert built.name == own.name, "the key train asks for"
    assert (built / "index.json").read_text() == (own / "index.json").read_text()
    assert (built / "features.npy").read_bytes() == (own / "features.npy").read_bytes()

    with caplog.at_level(logging.INFO, logger="florence_ops.vision"):
        train(params)
    messages = [record.getMessage() for record in caplog.records]
    assert any(f"vision cache of {len(ids)} pages opened and verified" in m for m in messages)
    assert not any("vision cache built" in m for m in messages), "train must not build the cache again"


def test_a_build_in_preprocess_skips_quarantined_pages_and_rewrites_the_header(prepared, tmp_path):
    """Pages that preprocess tried but quarantined are not in the cache: it holds the pages written, its features
    file says how many, and its key is that of those pages."""
    import torch

    from florence_ops.data.images import rgb_png
    from florence_ops.data.processed import ImageTable
    from florence_ops.modeling import load_pretrained
    from florence_ops.vision.cache import VisionFeatureCache
    from florence_ops.vision.preprocess_build import PreprocessBuild
    from florence_ops.vision.stage_cache import cache_recipe

    images = ImageTable(prepared / "data/processed")
    written = images.ids[:2] + images.ids[3:]  # the third page quarantined after the build started
    params = tiny_params(prepared, **{"paths.vision_cache": str(tmp_path / "cache")})
    build = PreprocessBuild(params, images.ids)
    for image_id in written:
        build.add(image_id, rgb_png(np.asarray(images[image_id])))
    build.finish(written)
    (folder,) = (tmp_path / "cache").iterdir()
    assert np.load(folder / "features.npy", mmap_mode="r").shape[0] == len(written)
    cache = VisionFeatureCache(folder)
    cache.verify()
    assert cache.meta["ids"] == written
    model, processor = load_pretrained(params.paths.base_model, params.model)
    recipe = cache_recipe(params, model.model.vision_tower, processor.image_processor, written, torch.device("cpu"))
    assert folder.name == recipe.key


def test_a_build_that_fails_in_preprocess_leaves_preprocess_done_and_the_cache_to_train(prepared, tmp_path, caplog,
                                                                                        monkeypatch):  # fmt: skip
    """The cache built in preprocess is a head start: when it fails (here the tower does not load), preprocess still
    writes its outputs, says so in one warning and leaves nothing under the cache's folder."""
    from florence_ops import modeling
    from florence_ops.stages.preprocess import preprocess

    def broken(*args, **kwargs):
        raise OSError("no weights in models/base")

    monkeypatch.setattr(modeling, "load_pretrained", broken)
    root = tmp_path / "ws"
    shutil.copytree(prepared, root, ignore=shutil.ignore_patterns("processed", ".cache"))
    params = tiny_params(root, **{"data.encode_pages": True})
    with caplog.at_level(logging.WARNING, logger="florence_ops.vision"):
        summary = preprocess(params)
    assert summary["n_images"] > 0 and (root / "data/processed/images.parquet").is_file()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["vision cache not built in preprocess (OSError: no weights in models/base); the train stage "
                        "builds it"]  # fmt: skip
    assert not (root / ".cache/vision_features").exists() or not any((root / ".cache/vision_features").iterdir())


def test_a_build_in_preprocess_gives_the_threads_feeding_workers_short_gil_turns(prepared, tmp_path, monkeypatch):
    """While the build's thread loads the tower (seconds of Python), the threads that feed preprocess's workers and
    collect their pages get the GIL every 0.5 ms, not every 5; the stage leaves the process's time slice as it was."""
    import sys
    import threading

    from florence_ops import modeling
    from florence_ops.stages.preprocess import preprocess
    from florence_ops.vision.preprocess_build import PreprocessBuild

    real, seen = modeling.load_pretrained, []

    def load_pretrained(*args, **kwargs):  # the real load, run by the build's thread
        seen.append(sys.getswitchinterval())
        return real(*args, **kwargs)

    monkeypatch.setattr(modeling, "load_pretrained", load_pretrained)
    root = tmp_path / "ws"
    shutil.copytree(prepared, root, ignore=shutil.ignore_patterns("processed", ".cache"))
    before = sys.getswitchinterval()
    params = tiny_params(root, **{"data.encode_pages": True})
    preprocess(params)
    assert seen == [0.0005]
    assert sys.getswitchinterval() == before
    assert len(list((root / ".cache/vision_features").glob("*/features.npy"))) == 1, "the cache is built"

    build = PreprocessBuild(params, ["page"])  # preprocess failing after the build started
    build.add("page", b"not a png")
    build.abandon()
    assert sys.getswitchinterval() == before

    def refuse(thread):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", refuse)
    with pytest.raises(RuntimeError, match="can't start new thread"):
        PreprocessBuild(params, ["page"]).add("page", b"not a png")
    assert sys.getswitchinterval() == before


def test_a_train_stage_that_finds_the_cache_makes_no_arrow_copy_of_the_pages(prepared, tmp_path, monkeypatch):
    """With the pages' features cached, the train stage reads no page, so it leaves no copy of `images.parquet` in
    datasets' cache (at DocVQA's size 3 GB for every version of the file, and about a second of the stage's start)."""
    import datasets
    import pyarrow as pa

    from florence_ops.stages.preprocess import preprocess
    from florence_ops.stages.train import train

    root = tmp_path / "ws"
    shutil.copytree(prepared, root, ignore=shutil.ignore_patterns("processed", ".cache"))
    params = tiny_params(root, **{"data.encode_pages": True, **NO_VALIDATION})
    preprocess(params)  # builds the cache, from the pages as it writes them
    arrow_cache = tmp_path / "datasets-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", arrow_cache)
    train(params)
    assert (root / "models/train/model/model.safetensors").is_file()
    columns = [pa.ipc.open_stream(path).schema.names for path in arrow_cache.rglob("*.arrow")]
    assert columns, "the questions are read through datasets' cache"
    assert not [names for names in columns if "image" in names], "no Arrow copy of the pages"


def test_an_evaluate_stage_that_finds_the_cache_makes_no_arrow_copy_of_the_pages(prepared, tmp_path, monkeypatch):
    """With the pages' features cached, evaluate answers without reading a page; the HTML report's example pages are
    read from their row groups, so the stage leaves no copy of `images.parquet` in datasets' cache either, and the
    report still shows the pages."""
    import datasets
    import pyarrow as pa

    from florence_ops.stages.evaluate import evaluate
    from florence_ops.stages.preprocess import preprocess
    from florence_ops.stages.train import train

    root = tmp_path / "ws"
    shutil.copytree(prepared, root, ignore=shutil.ignore_patterns("processed", ".cache"))
    params = tiny_params(root, **{"data.encode_pages": True, **NO_VALIDATION})
    preprocess(params)
    train(params)
    arrow_cache = tmp_path / "datasets-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", arrow_cache)
    evaluate(params)
    columns = [pa.ipc.open_stream(path).schema.names for path in arrow_cache.rglob("*.arrow")]
    assert columns, "the questions are read through datasets' cache"
    assert not [names for names in columns if "image" in names], "no Arrow copy of the pages"
    report = (root / "reports/report.html").read_text()
    assert report.count("data:image/jpeg;base64,") >= params.evaluate.report_examples


def test_pages_are_opened_once_in_the_process_that_forks_the_loader_workers(prepared, tmp_path, monkeypatch):
    """A loader whose workers read pages (the cache's build, a tower that trains) has them opened where it is made:
    its workers share datasets' memory-mapped copy instead of each making or finding it again, at every epoch's
    fork."""
    from florence_ops.data import processed
    from florence_ops.data.processed import ImageTable
    from florence_ops.modeling import load_pretrained
    from florence_ops.vision.sources import PixelSource, page_loader

    real, opened_in = processed._from_parquet, tmp_path / "opened"

    def from_parquet(path, features):
        with open(opened_in, "a") as stream:
            stream.write(f"{os.getpid()}\n")
        return real(path, features)

    monkeypatch.setattr(processed, "_from_parquet", from_parquet)
    params = tiny_params(prepared)
    _, processor = load_pretrained(params.paths.base_model, params.model)
    images = ImageTable(prepared / "data/processed")
    pixels = PixelSource(images, processor.image_processor)
    pages = [ids for ids, _ in page_loader(pixels, images.ids, batch_size=2, num_workers=2)]
    assert sum(pages, []) == images.ids
    assert opened_in.read_text().split() == [str(os.getpid())]
