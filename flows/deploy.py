"""Serve the retraining flow on the cron of params.yaml (`schedule.cron` in `schedule.timezone`), one run at a time.

Schedules need a running Prefect server (`prefect server start`, with PREFECT_API_URL pointing at it): the
ephemeral server that `python flows/retrain.py` starts runs flows but schedules nothing. From the repository root:
`python -m flows.deploy`. prefect.yaml declares the deployment for a work pool of machines instead (`prefect
deploy`): the same schedule, each run in a clean clone with `remotes=True`.
"""

from __future__ import annotations

import argparse
import logging

from prefect import serve
from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron

from florence_ops.config import PARAMS_FILE, Params, load_params
from flows.retrain import PROJECT_ROOT, retrain

DEPLOYMENT_NAME = "scheduled"  # prefect.yaml uses the same name: serve it or deploy it to a pool, not both
log = logging.getLogger(__name__)


def retrain_deployment(params: Params) -> RunnerDeployment:
    """The retraining deployment: the cron of `params.schedule`, at most one run at a time (later ones queue)."""
    return retrain.to_deployment(
        name=DEPLOYMENT_NAME,
        schedules=[Cron(params.schedule.cron, timezone=params.schedule.timezone)],
        concurrency_limit=1,
        description="Retrain on the current data; promote the model if it beats the champion.",
    )


def main(argv: list[str] | None = None) -> None:
    """Serve the deployment until interrupted; its schedule is paused when serving stops."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(PROJECT_ROOT / PARAMS_FILE), help="params file with `schedule`")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    params = load_params(args.params)
    schedule = params.schedule
    log.info("serving %s/%s on '%s' (%s)", retrain.name, DEPLOYMENT_NAME, schedule.cron, schedule.timezone)
    serve(retrain_deployment(params), limit=1)


if __name__ == "__main__":
    main()
