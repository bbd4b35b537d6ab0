"""A job's command line: `--config FILE` and dotted overrides, its run, its printed report, its exit code."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from blipinpaint.config import Config, parse_args
from blipinpaint.errors import ConfigError, JobError
from rayjobs import cluster


def job_main(name: str, doc: str, run: Callable[[Config], object], report: Callable[[object], None],
             argv: list[str] | None = None) -> int:
    """A job's command line: parse the config, run, print the report; a bad config exits 2."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = parse_args(argv, description=doc.split("\n")[0])
    cluster.job_name = name  # the line a lost head ends the job with names the job
    try:
        result = run(cfg)
    except ConfigError as err:
        print(f"{name}: {err}", file=sys.stderr)
        return 2
    except JobError as err:
        print(f"{name}: {err}", file=sys.stderr)
        return 1
    report(result)
    return 0
