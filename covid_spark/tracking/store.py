"""Where a run's MLflow record goes: the tracking URI a config resolves to (``local``: an SQLite store
beside the run dir), where a new experiment keeps its artifacts, and a one-try probe of the store."""
from __future__ import annotations

import os
import socket
import urllib.error
import urllib.request
from typing import Mapping

from covid_spark.config import TRACKING_LOCAL as LOCAL
from covid_spark.data.rundir import LOCAL_TRACKING_ARTIFACTS, RunDir

ENV_URI = "MLFLOW_TRACKING_URI"
PROBE_TIMEOUT_S = 5
# MLflow's HTTP defaults (7 retries, backoff factor 2, 120 s timeout) wait many minutes on a server
# that is down. With these, one request gives up after 3 tries of at most 6 s and 2 s of backoff:
# 20 s, after a probe of at most 5 s. Values set in the environment win.
HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
               "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "6"}


def tracking_config(config: Mapping) -> dict:
    """The ``tracking`` section; a config without one (written before it existed) has tracking off."""
    return {"mlflow_uri": "", "experiment": "covid-spark"} | dict(config.get("tracking") or {})


def resolve_uri(config: Mapping, run_dir: str) -> str | None:
    """The tracking URI this run logs to, or None when tracking is off.

    The config's ``tracking.mlflow_uri`` wins over ``MLFLOW_TRACKING_URI``; ``local`` becomes
    ``sqlite:///<run-dir>/../mlflow.db``.
    """
    cfg = tracking_config(config)
    uri = cfg["mlflow_uri"] or os.environ.get(ENV_URI, "").strip()
    if not uri:
        return None
    if uri == LOCAL:
        return "sqlite:///" + RunDir(run_dir).local_tracking_db
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else uri


def artifact_root(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: ``mlartifacts/`` beside an SQLite store's file (for
    ``local``, ``RunDir.local_tracking_artifacts``), else the store's choice.

    MLflow's default for an SQLite store is ``./mlruns`` in the working directory, which would scatter
    artifacts wherever a job happened to start.
    """
    if uri.startswith("sqlite:///"):
        db = uri[len("sqlite:///"):]
        return "file://" + os.path.join(os.path.dirname(os.path.abspath(db)), LOCAL_TRACKING_ARTIFACTS)
    return None


def probe(uri: str, timeout: float | None = None) -> str | None:
    """Why ``uri`` cannot be reached (a short reason), or None when it can.

    A server is reachable when it answers HTTP at all (an error status included: authentication is
    MLflow's business); an SQLite store when its folder exists. One try, no retries, at most
    ``timeout`` (:data:`PROBE_TIMEOUT_S`) seconds.
    """
    timeout = PROBE_TIMEOUT_S if timeout is None else timeout
    if uri.startswith(("http://", "https://")):
        url = f"{uri}/api/2.0/mlflow/experiments/search?max_results=1"
        try:
            with urllib.request.urlopen(url, timeout=timeout):
                return None
        except urllib.error.HTTPError:
            return None
        except (urllib.error.URLError, OSError, socket.timeout) as error:
            reason = getattr(error, "reason", error)
            return f"no answer within {timeout:g} s" if isinstance(reason, socket.timeout) else str(reason)
    if uri.startswith("sqlite:///"):
        folder = os.path.dirname(os.path.abspath(uri[len("sqlite:///"):]))
        return None if os.path.isdir(folder) else f"folder {folder} does not exist"
    return None
