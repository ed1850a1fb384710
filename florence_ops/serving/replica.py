"""A serving replica that follows the model registry: `florence-ops serve --model registry:<artifact>#<stage>`.

The replica resolves the version holding the stage from the git remote (`registry.git_remote` or `--git-remote`),
fetches it from the DVC remote into `registry.replica_dir/versions/<version>` and serves `registry.replica_dir/current`,
a symlink to it. Every `registry.poll_interval_s` it lists the remote's tags (one `git ls-remote`); when they changed
and another version holds the stage, it fetches that version beside the current one and switches the link, and the
model worker swaps it in as it swaps any replaced model directory (`worker.py`): no restart, no failed request.

A version that cannot be fetched (unreachable remote, corrupt bytes) leaves the link, and so the served model, as it
was: one log line, `registry.last_failed_fetch` in `/healthz`, and another try after 2x, 4x ... the interval (at most
5 minutes). A poll that fails (the git remote unreachable, a tag GTO refuses, the link not switched) leaves it too:
`registry.last_failed_check` in `/healthz`, a log line when its error is new, and while the tags stay the same the
next look after 2x, 4x ... the interval, not a clone every poll. A version that fetches but does not load is the
worker's `last_failed_load`, as for any model directory.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from florence_ops import registry
from florence_ops.artifacts import REGISTRY_FILE, REGISTRY_REFERENCE, write_json
from florence_ops.config import Params
from florence_ops.promotion import switch_link
from florence_ops.serving.health import write_replica_status

log = logging.getLogger(__name__)
MAX_RETRY_S = 300.0  # longest wait before fetching a failed version again, or cloning a registry that failed to read


class Replica:
    """Keeps `replica_dir/current` on the version holding `registry.stage` of `registry.artifact` in `source`."""

    def __init__(self, source: str, params: Params):
        self.source, self.params = source, params
        root = Path(params.registry.replica_dir)
        self.link, self.versions = root / "current", root / "versions"
        self.current: registry.ModelVersion | None = None
        self.last_failed_fetch: dict[str, Any] | None = None
        self.last_failed_check: dict[str, Any] | None = None
        self._failed_tags: str | None = None  # the tags listed at the last failed look
        self._tags: str | None = None
        self._status_dir: Path | None = None

    @classmethod
    def for_reference(cls, reference: str, params: Params, repo: Path | None = None) -> Replica:
        """The replica of `registry:<artifact>#<stage>` (either part left out: params.yaml's), reading the git remote
        of params.yaml (or, without one, the clone `repo`, by default the working directory when it is one)."""
        artifact, _, stage = reference.removeprefix(REGISTRY_REFERENCE).partition("#")
        cfg = dataclasses.replace(params.registry, artifact=artifact or params.registry.artifact,
                                  stage=stage or params.registry.stage)  # fmt: skip
        repo = repo or Path.cwd()
        source = registry.source_of(repo if (repo / ".git").exists() else None, cfg)
        return cls(source, dataclasses.replace(params, registry=cfg))

    def start(self) -> Path:
        """Fetch the version holding the stage and link it: the model directory to serve. RegistryError when the
        registry cannot be read, no version holds the stage, or it cannot be fetched."""
        cfg = self.params.registry
        self._tags = registry.tags_digest(self.source)
        version = self._resolve()
        if version is None:
            raise registry.RegistryError(f"no version of {cfg.artifact} holds stage {cfg.stage!r} in {self.source}")
        self._install(version)
        return self.link

    def follow(self, status_dir: Path) -> None:
        """Report to `/healthz` through `status_dir` and poll the registry in a daemon thread from now on."""
        self.report_to(status_dir)
        threading.Thread(target=self._poll, name="registry-follow", daemon=True).start()

    def report_to(self, status_dir: Path) -> None:
        """Write what the replica follows and its last failures to `status_dir`, read by `/healthz`, now and on
        every change."""
        self._status_dir = status_dir
        self._report()

    def _poll(self) -> None:
        while True:
            time.sleep(self.params.registry.poll_interval_s)
            try:
                self.poll()
            except Exception:  # a failure could not be reported (the status file unwritable): keep following
                log.exception("registry: a poll failed")

    def poll(self) -> None:
        """One poll: list the remote's tags and, when `check` would, look at the registry. A failed poll is in
        `/healthz` (`last_failed_check`: its error, the failures in a row, when the next look is due) and logged when
        its error is new. While the tags stay as they were at a failed look, the next look comes only after 2x, 4x
        ... the poll interval (at most MAX_RETRY_S): a registry that cannot be read is not cloned at every poll.
        Tags that changed are looked at at once, and a failure to list them is tried again at the next poll."""
        tags = None
        try:
            tags = registry.tags_digest(self.source)
            failed = self.last_failed_check
            if failed and tags == self._failed_tags and time.time() < failed["retry_at"]:
                return
            self.check(tags)
        except Exception as error:  # an unreachable remote, an unreadable registry, a link not switched
            self._check_failed(error, tags)
            return
        if self.last_failed_check is not None:
            log.info("registry: looked at again after %d failed polls", self.last_failed_check["attempts"])
            self.last_failed_check = self._failed_tags = None
            self._report()

    def check(self, tags: str | None = None) -> None:
        """One look: when the tags (`tags_digest`, listed now unless given) changed or a failed fetch is due again,
        switch to the version holding the stage. The tags count as seen once the look has ended, a failed fetch
        included: a look that raises (the registry unreadable for a moment, the link not switched) is made again, not
        skipped until the tags change once more. A failed fetch is forgotten once its version holds the stage no
        more."""
        tags = tags or registry.tags_digest(self.source)
        failed = self.last_failed_fetch
        if tags == self._tags and not (failed and time.time() >= failed["retry_at"]):
            return
        version = self._resolve()
        if failed and (version is None or version.version != failed["version"]):
            self.last_failed_fetch = failed = None  # the version that failed holds the stage no more
            self._report()
        waiting = failed and time.time() < failed["retry_at"]
        if version is not None and version.version != self.current.version and not waiting:
            try:
                self._install(version)
            except registry.RegistryError as error:
                self._fetch_failed(version, error)
        self._tags = tags

    def _check_failed(self, error: Exception, tags: str | None) -> None:
        failed = self.last_failed_check
        attempts = failed["attempts"] + 1 if failed else 1
        delay = self._backoff(attempts) if tags is not None else self.params.registry.poll_interval_s
        if not failed or failed["error"] != str(error):
            log.warning("registry check failed (serving %s still; next look in %.0f s): %s", self.current.version,
                        delay, error)  # fmt: skip
        now, self._failed_tags = time.time(), tags
        self.last_failed_check = {"error": str(error), "at": now, "attempts": attempts, "retry_at": now + delay}
        self._report()

    def _backoff(self, attempts: int) -> float:
        """The wait after `attempts` failures in a row: 2x, 4x ... the poll interval, at most MAX_RETRY_S (and never
        less than the interval)."""
        interval = self.params.registry.poll_interval_s
        return max(interval, min(interval * 2**attempts, MAX_RETRY_S))

    def _resolve(self) -> registry.ModelVersion | None:
        with registry.registry_view(self.source) as view:
            return registry.resolve(view, self.params)

    def _install(self, version: registry.ModelVersion) -> None:
        """Fetch `version` (unless it is here from before) beside the current one, then switch the link to it."""
        target = self.versions / version.version
        if (target / REGISTRY_FILE).is_file():
            write_json(target / REGISTRY_FILE, version.as_dict())  # here from before: the new assignment's tag
        else:
            registry.fetch(self.source, self.params, version, target)
        self.link.parent.mkdir(parents=True, exist_ok=True)
        switch_link(self.link, target)  # first: a link not switched leaves the replica on its version, to try again
        previous, self.current, self.last_failed_fetch = self.current, version, None
        cfg = self.params.registry
        log.info("registry: %s#%s is %s (%s); serving it from %s (was %s)", cfg.artifact, cfg.stage, version.version,
                 version.tag, target, previous.version if previous else "none")  # fmt: skip
        keep = {target.name, previous.version if previous else None}  # the worker may still serve the previous one
        for old in self.versions.iterdir():
            if old.name not in keep and not old.name.startswith("."):
                shutil.rmtree(old, ignore_errors=True)
        self._report()

    def _fetch_failed(self, version: registry.ModelVersion, error: Exception) -> None:
        failed = self.last_failed_fetch
        attempts = failed["attempts"] + 1 if failed and failed["version"] == version.version else 1
        delay = self._backoff(attempts)
        self.last_failed_fetch = {"version": version.version, "tag": version.tag, "error": str(error),
                                  "at": time.time(), "attempts": attempts, "retry_at": time.time() + delay}  # fmt: skip
        log.warning("registry: %s not fetched (%s); serving %s; next try in %.0f s", version.version, error,
                    self.current.version, delay)  # fmt: skip
        self._report()

    def _report(self) -> None:
        if self._status_dir is not None:
            cfg = self.params.registry
            write_replica_status(self._status_dir, {"artifact": cfg.artifact, "stage": cfg.stage,
                                                    "following": self.current and self.current.version,
                                                    "last_failed_fetch": self.last_failed_fetch,
                                                    "last_failed_check": self.last_failed_check})  # fmt: skip
