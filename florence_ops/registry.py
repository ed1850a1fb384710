"""The model registry: versions and stages of the exported model are git tags written by GTO; its bytes live in the
DVC remote. The one home of these facts: the flow's gate, the `florence-ops registry` commands and serving replicas
all go through here.

As in iterative's example-gto and DVC's model registry: `florence-docvqa@v0.0.3` registers the commit whose dvc.lock
names a model, `florence-docvqa#prod#5` assigns that version a stage, and the latest assignment of a stage wins (a
rollback is a new assignment of an earlier version). Any machine resolves `name#prod` from the git remote
(`registry.git_remote`) and fetches that commit's model directory from the DVC remote, as `dvc artifacts get <repo>
<name> --stage prod` does. With no git remote the tags live in this clone only: one machine.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import gto.api
from gto.constants import VersionSort
from gto.exceptions import ArtifactNotFound, GTOException

from florence_ops.artifacts import CHAMPION_FILE, METRICS_FILE, REGISTRY_FILE, publish_directory, write_json
from florence_ops.config import PARAMS_FILE, Params, RegistryConfig
from florence_ops.errors import ConfigError, UserError
from florence_ops.params_file import parse_value
from florence_ops.promotion import MetricsError, Verdict, judge, read_champion

log = logging.getLogger(__name__)
LOCK_FILE = "dvc.lock"  # DVC's record of the pipeline's outputs: at a version's commit, it names the model


class RegistryError(UserError):
    """The registry cannot be read or written: no such remote, version or stage; a failed fetch or push."""


@dataclass(frozen=True)
class ModelVersion:
    """A registered version of the artifact: where its model is (`commit`) and what it scored there."""

    artifact: str
    version: str
    stages: tuple[str, ...]  # the stages it holds now
    tag: str  # the tag behind what was asked: the stage's assignment, else the registration
    commit: str
    metrics: dict[str, Any] | None  # the commit's metrics file; None where it has none

    def as_dict(self) -> dict[str, Any]:
        """The version as plain data, for reports and /healthz."""
        return {**asdict(self), "stages": list(self.stages)}


@dataclass(frozen=True)
class Promotion:
    """What `promote_if_better` decided: the gate's verdict, the version that held the stage, the one registered."""

    verdict: Verdict
    champion: ModelVersion | None  # None: no version held the stage (the candidate had to beat the base model)
    registered: ModelVersion | None  # None: rejected

    def as_dict(self) -> dict[str, Any]:
        """The decision as plain data, for the run's history."""
        return {"champion": self.champion and self.champion.as_dict(),
                "registered": self.registered and self.registered.as_dict()}  # fmt: skip


def _git(cwd: Path | None, *args: str, env: Mapping[str, str] | None = None, stdin: str | None = None) -> str:
    """`git <args>` in `cwd`; its output, stripped. RegistryError with git's last line when it fails."""
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, env={**os.environ, **(env or {})},
                          input=stdin)  # fmt: skip
    if done.returncode:
        lines = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
        raise RegistryError(f"git {args[0]} failed: {lines[-1]}")
    return done.stdout.strip()


def git_remote(repo: Path | None, cfg: RegistryConfig) -> str | None:
    """The URL of `registry.git_remote` (a URL, a path, or the name of one of `repo`'s remotes); None when unset."""
    remote = cfg.git_remote.strip()
    if not remote:
        return None
    if repo is not None and (repo / ".git").exists():
        try:
            return _git(repo, "remote", "get-url", remote)
        except RegistryError:
            pass  # not a remote's name: a URL or a path
    return remote


def source_of(repo: Path | None, cfg: RegistryConfig) -> str:
    """Where the registry's tags are read: the git remote, or `repo` itself when there is none."""
    url = git_remote(repo, cfg)
    if url is None and repo is None:
        raise RegistryError("no registry to read: set registry.git_remote (or --git-remote), or run in the clone")
    return url or str(repo)


@contextmanager
def registry_view(source: str) -> Iterator[Path]:
    """A local git repository holding the tags and commits of `source`: `source` itself when it is a local clone,
    else a temporary clone of it without a checkout (file contents are read from git objects, not a work tree)."""
    if Path(source, ".git").exists():
        yield Path(source)
        return
    with tempfile.TemporaryDirectory(prefix="florence-registry-") as clone:
        _git(None, "clone", "--quiet", "--no-checkout", "--filter=blob:none", source, clone)
        yield Path(clone)


def tags_digest(source: str) -> str:
    """A digest of every tag of `source` (git ls-remote): it changes whenever a version is registered or assigned."""
    return hashlib.sha1(_git(None, "ls-remote", "--tags", source).encode()).hexdigest()


def _report_at(view: Path, commit: str, name: str = METRICS_FILE) -> dict[str, Any] | None:
    """The file `name` of the reports folder of `commit` (where its params.yaml puts it); None when it has none."""
    try:
        reports = parse_value(_git(view, "show", f"{commit}:{PARAMS_FILE}"))["paths"]["reports"]  # YAML 1.2, as DVC
        return json.loads(_git(view, "show", f"{commit}:{Path(reports, name).as_posix()}"))
    except (RegistryError, ConfigError, json.JSONDecodeError, KeyError, TypeError):
        return None


def versions(view: Path, params: Params) -> list[ModelVersion]:
    """Every registered version, newest first, with the stages each holds now and its metrics.

    A stage is held by the registered version assigned to it last, as `dvc artifacts get --stage` reads the tags
    (GTO's `which` would answer the highest version number in the stage instead, and a rollback could not win).
    Unlike DVC, an assignment whose version has no registration tag is left out, and so is the version: `register`
    pushes both tags at once, but a reader may see one before the other (a push updates its refs one by one), and
    GTO would name the version by its commit.
    """
    name = params.registry.artifact
    shown = _read_tags(gto.api.show, view, name, registered_only=True, assignments_per_version=-1,
                       versions_per_stage=1, sort=VersionSort.Timestamp)  # fmt: skip
    return [
        ModelVersion(
            name,
            entry["version"],
            tuple(s["stage"] for s in entry["stages"]),
            entry["ref"],
            entry["commit_hexsha"],
            _report_at(view, entry["commit_hexsha"]),
        )  # fmt: skip
        for entry in shown
        if entry["registrations"]
    ]


def _read_tags(read: Callable[..., list[Any]], *args: Any, **kwargs: Any) -> list[Any]:
    """GTO's `read` of the artifact's tags: [] before a version is registered; RegistryError (one line) for tags GTO
    refuses, such as a second version tagged by hand on a registered commit."""
    try:
        return read(*args, **kwargs)
    except ArtifactNotFound:
        return []
    except GTOException as error:
        raise RegistryError(f"the registry's tags cannot be read: {' '.join(str(error).split())}") from None


def resolve(view: Path, params: Params, stage: str | None = None) -> ModelVersion | None:
    """The version holding `stage` (default `registry.stage`) in the repository `view`; None when none does. Its
    `tag` is the assignment that put it there."""
    stage = stage or params.registry.stage
    for version in versions(view, params):
        if stage in version.stages:
            events = [e for e in history(view, params) if e["stage"] == stage and e["version"] == version.version]
            return dataclasses.replace(version, stages=(stage,), tag=events[-1]["ref"])
    return None


def champion_record(repo: Path | None, params: Params) -> dict[str, Any] | None:
    """The champion record committed with the version holding `registry.stage` (params, data fingerprint, metrics
    and run id of the run that made it), read from the registry (the git remote, else the clone `repo`); None when
    no version holds the stage or its commit holds no record."""
    with registry_view(source_of(repo, params.registry)) as view:
        version = resolve(view, params)
        return version and _report_at(view, version.commit, CHAMPION_FILE)


def history(view: Path, params: Params) -> list[dict[str, Any]]:
    """Registrations and stage assignments, oldest first: time, event, version, stage, commit, author, tag."""
    events = _read_tags(gto.api.history, view, params.registry.artifact)
    keys = ("event", "version", "stage", "commit", "author", "ref")
    rows = [{"timestamp": e["timestamp"].isoformat(), **{k: e.get(k) for k in keys}} for e in events]
    return sorted(rows, key=lambda row: (row["timestamp"], row["ref"]))


def _sync_tags(repo: Path, url: str | None) -> None:
    if url is not None:  # GTO numbers versions and assignments from the tags it sees: see every machine's first
        _git(repo, "fetch", "--quiet", "--force", url, "+refs/tags/*:refs/tags/*")


def _push_tags(repo: Path, url: str | None, tags: list[str]) -> None:
    if url is not None:  # a tag carries its commit with it
        _git(repo, "push", "--quiet", url, *(f"refs/tags/{tag}" for tag in tags))


def _assign(repo: Path, params: Params, version: str) -> str:
    """Assign `registry.stage` to `version` with GTO; the tag's name."""
    cfg = params.registry
    # GTO orders assignments by their tags' times, to the second: a second assignment within the same second could
    # lose to the first. Waiting for the next second keeps the latest assignment the one that wins.
    last = max((e["timestamp"] for e in history(repo, params) if e["event"] == "assignment"), default="")
    while datetime.now(UTC).replace(microsecond=0).isoformat() <= last:
        time.sleep(0.05)
    event = gto.api.assign(repo, cfg.artifact, cfg.stage, version=version, force=True, push=False)
    return event.tag


def register(repo: Path, params: Params, commit: str) -> ModelVersion:
    """Register `commit` as the artifact's next version and assign it `registry.stage`; push both tags."""
    url = git_remote(repo, params.registry)
    _sync_tags(repo, url)
    registration = gto.api.register(repo, params.registry.artifact, ref=commit, push=False)
    assignment = _assign(repo, params, registration.version)
    _push_tags(repo, url, [registration.tag, assignment])
    log.info("registered %s %s on %s: %s", params.registry.artifact, registration.version, commit[:12], assignment)
    return resolve(repo, params)


def rollback(repo: Path, params: Params, version: str) -> ModelVersion:
    """Assign `registry.stage` to an earlier `version` (a new assignment, so the history keeps both); push it."""
    url = git_remote(repo, params.registry)
    _sync_tags(repo, url)
    known = [v.version for v in versions(repo, params)]
    if version not in known:
        raise RegistryError(f"unknown version {version!r} of {params.registry.artifact} (known: "
                            f"{', '.join(known) or 'none'})")  # fmt: skip
    current = resolve(repo, params)
    if current is not None and current.version == version:
        raise RegistryError(f"{version} already holds {params.registry.stage}")
    _push_tags(repo, url, [_assign(repo, params, version)])
    return resolve(repo, params)


def model_commit(repo: Path, params: Params, message: str, record: Mapping[str, Any] | None = None) -> str:
    """A commit of the workspace as it is now, on top of HEAD: its tracked files, dvc.lock (which names the model)
    and the metrics file, made through a private index: the branch, the index and the files stay as they are. HEAD
    when nothing changed. `record`, the run's champion record, is the commit's `paths.reports/champion.json`;
    without one the commit holds none (another model's record would describe the wrong model)."""
    index = Path(repo, _git(repo, "rev-parse", "--git-path", "index"))
    model_files = [name for name in (LOCK_FILE, Path(params.paths.reports, METRICS_FILE).as_posix())
                   if (repo / name).is_file()]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="florence-registry-index-") as folder:
        private = {"GIT_INDEX_FILE": str(Path(folder, "index"))}
        if index.exists():
            shutil.copy2(index, private["GIT_INDEX_FILE"])
        _git(repo, "add", "--update", env=private)
        _git(repo, "add", "--", *model_files, env=private)
        record_file = Path(params.paths.reports, CHAMPION_FILE).as_posix()
        _git(repo, "rm", "--cached", "--quiet", "--ignore-unmatch", "--", record_file, env=private)
        if record is not None:
            blob = _git(repo, "hash-object", "-w", "--stdin", stdin=json.dumps(record, indent=2, default=str) + "\n")
            _git(repo, "update-index", "--add", "--cacheinfo", f"100644,{blob},{record_file}", env=private)
        tree = _git(repo, "write-tree", env=private)
    head = _git(repo, "rev-parse", "HEAD")
    if tree == _git(repo, "rev-parse", "HEAD^{tree}"):
        return head
    return _git(repo, "commit-tree", tree, "-p", head, "-m", message)


def push_model(repo: Path, params: Params) -> None:
    """Push the exported model's bytes to the DVC remote (`registry.dvc_remote`, else the default remote)."""
    from dvc.repo import Repo

    try:
        with Repo(str(repo)) as dvc:
            dvc.push(targets=[str(repo / params.paths.export)], remote=params.registry.dvc_remote or None)
    except Exception as error:  # DVC's errors (no remote, no credentials, network) become one line
        raise RegistryError(f"dvc push of {params.paths.export} failed: {' '.join(str(error).split())}") from None


def fetch(source: str, params: Params, version: ModelVersion, target: Path) -> Path:
    """Download `version`'s model directory from the DVC remote into `target`, all or nothing.

    Each file is checked against the hash DVC recorded for it at the version's commit (a corrupt or truncated copy
    in the remote fails the fetch); `REGISTRY_FILE` beside the weights says which version the directory is.
    """
    from dvc.repo import Repo

    remote = params.registry.dvc_remote or None
    try:
        with (
            publish_directory(target) as staging,
            Repo.open(url=source, rev=version.commit, subrepos=True, uninitialized=True, remote=remote) as repo,
        ):
            _download_checked(repo, repo.artifacts.get_path(params.registry.artifact), staging, version)
            write_json(staging / REGISTRY_FILE, {**version.as_dict(), "fetched_at": datetime.now(UTC).isoformat()})
    except RegistryError:
        raise
    except Exception as error:  # DVC's and the file system's errors become one line
        raise RegistryError(f"fetching {version.version} failed: {' '.join(str(error).split())}") from None
    return target


def _download_checked(repo: Any, path: str, staging: Path, version: ModelVersion) -> None:
    """Download `path` of the DVC repository `repo` into the empty `staging`; check each file's recorded md5."""
    from dvc.fs import download

    staging.rmdir()
    download(repo.dvcfs, path, str(staging))
    for file in repo.dvcfs.find(path):
        expected, name = repo.dvcfs.info(file).get("md5"), Path(file).relative_to(path)
        if expected and hashlib.md5((staging / name).read_bytes()).hexdigest() != expected:
            raise RegistryError(f"{name} of {version.version} does not match the hash DVC recorded at "
                                f"{version.commit[:12]}: corrupt in the DVC remote")  # fmt: skip


def promote_if_better(
    repo: Path, params: Params, candidate_metrics: Mapping[str, Any], record: Mapping[str, Any] | None = None
) -> Promotion:
    """The retraining gate, against the registry: register and assign `registry.stage` to the workspace's model when
    it beats the version holding that stage.

    1. Resolve the version holding the stage (from the git remote; without one, from `repo`'s tags) and read the
       metrics file of its commit from git. 2. `promotion.judge`: the candidate must beat it on `promotion.metric` by
       more than `promotion.margin`; with no version yet, it must beat the base model (`before` in its metrics).
    3. On a win: commit the workspace's tracked files (dvc.lock, metrics, the run's champion `record`: what a later
       run compares its data and params with) without moving HEAD (`model_commit`), push
       the model's bytes to the DVC remote when there is a git remote (other machines fetch them from there), then
       register the commit as the next version and assign it the stage, tags pushed. `models/champion` is the
       caller's local copy, if it keeps one.
    Outside git (no git remote, `repo` not a clone) there is no registry: the candidate is judged against the local
    champion's record (`paths.reports/champion.json`) and nothing is registered. Raises RegistryError (one line)
    when the registry cannot be read or written, MetricsError for metrics without `promotion.metric`.
    """
    cfg, metric = params.registry, params.promotion.metric
    if git_remote(repo, cfg) is None and not (repo / ".git").exists():
        record = read_champion(repo / params.paths.reports / CHAMPION_FILE)  # no git: the local champion's record
        return Promotion(judge(candidate_metrics, record, metric, params.promotion.margin), None, None)
    with registry_view(source_of(repo, cfg)) as view:
        champion = resolve(view, params)
    if champion is not None and champion.metrics is None:
        raise MetricsError(f"{champion.tag}: commit {champion.commit[:12]} holds no {params.paths.reports}/"
                           f"{METRICS_FILE}")  # fmt: skip
    verdict = judge(candidate_metrics, champion and {"metrics": champion.metrics}, metric, params.promotion.margin)
    if not verdict.promote:
        return Promotion(verdict, champion, None)
    commit = model_commit(repo, params, f"{cfg.artifact}: {verdict.reason}", record)
    if git_remote(repo, cfg) is not None:
        push_model(repo, params)
    return Promotion(verdict, champion, register(repo, params, commit))
