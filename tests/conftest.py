"""Test-wide environment: no telemetry, a private Prefect home, and the repository root."""

import os
import tempfile
from pathlib import Path

_home = Path(tempfile.mkdtemp(prefix="mtl-test-prefect-"))
os.environ.setdefault("PREFECT_HOME", str(_home))
os.environ["DVC_NO_ANALYTICS"] = "1"
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["GX_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

REPO_ROOT = Path(__file__).resolve().parents[1]
