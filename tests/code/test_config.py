"""Loading the run configuration: what a user writes in params.yaml, a profile or -S is checked at load time."""

import re
from pathlib import Path

import pytest

from tasks_mtl.config import load_config

REPO_PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"


def test_a_named_params_file_must_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match="typo.yaml not found"):
        load_config(tmp_path / "typo.yaml")
    assert load_config(None).tasks  # no file at all: the code defaults


@pytest.mark.parametrize("profile", ["default", "quick"])
def test_dropping_a_task_drops_its_gates_under_every_profile(profile):
    cfg = load_config(REPO_PARAMS, profile=profile, overrides={"tasks.nsp": None})
    assert "nsp" not in cfg.tasks and "nsp" not in cfg.gates.thresholds
    assert set(cfg.gates.thresholds) == set(cfg.tasks)


def test_a_task_dropped_in_params_stays_dropped_under_a_profile_that_configures_it(tmp_path):
    text = REPO_PARAMS.read_text(encoding="utf-8").replace("tasks: {}\n", "tasks:\n  nsp: null\n", 1)
    assert "nsp: null" in text
    (tmp_path / "params.yaml").write_text(text, encoding="utf-8")
    cfg = load_config(tmp_path / "params.yaml", profile="quick")  # quick has its own `nsp: {max_rows: ...}`
    assert "nsp" not in cfg.tasks and "nsp" not in cfg.gates.thresholds


@pytest.mark.parametrize(("key", "value", "message"), [
    ("training.stages.0.weighting", "pcgrd", "unknown weighting 'pcgrd'; choose one of cagrad"),
    ("training.stages.0.sampler", "roundrobin", "unknown sampler 'roundrobin'; choose one of all"),
    ("gates.thresholds.intent.accuracy", 0.5, "names task(s) ['intent'] that the run does not train"),
])
def test_unknown_names_fail_when_the_config_loads(key, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config(REPO_PARAMS, overrides={key: value})


def test_loading_a_config_knows_every_weighting_without_importing_torch():
    import subprocess
    import sys

    from tasks_mtl.config import WEIGHTING_NAMES
    from tasks_mtl.weighting import WEIGHTINGS

    assert sorted(WEIGHTING_NAMES) == sorted(WEIGHTINGS)
    code = "import sys; from tasks_mtl.config import load_config; load_config(None); print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr


def test_a_features_only_stage_needs_tasks_with_features_and_no_freezing():
    from tasks_mtl.config import is_pretraining, load_config

    with pytest.raises(ValueError, match="no n-gram features"):
        load_config(None, overrides={"tasks.mlm.neighbours": False, "training.stages": [
            {"name": "f", "features_only": True, "tasks": ["mlm"], "steps": 2}]})
    with pytest.raises(ValueError, match="does not run the encoder"):
        load_config(None, overrides={"training.stages": [
            {"name": "f", "features_only": True, "freeze_layers": "all", "steps": 2}]})
    cfg = load_config(None)
    assert not is_pretraining(cfg.training.stages[0], cfg.tasks)  # it does not make the encoder pretrained


def test_head_options_belong_to_their_task_types():
    from tasks_mtl.config import load_config

    with pytest.raises(ValueError, match="belong to token_classification"):
        load_config(None, overrides={"tasks.sentiment.window_weights": True})
    with pytest.raises(ValueError, match="belong to token_classification"):
        load_config(None, overrides={"tasks.nsp.crf": True})
    with pytest.raises(ValueError, match="needs pooling: pair"):
        load_config(None, overrides={"tasks.sentiment.pair_overlap": True})
    cfg = load_config(None, overrides={"tasks.ner.window_weights": True})
    assert cfg.tasks["ner"].window_weights and cfg.tasks["nsp"].pair_overlap and cfg.tasks["nsp"].has_features()
