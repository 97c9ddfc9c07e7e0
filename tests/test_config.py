from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from imgtune.config import Config, ConfigError, build_config


def test_flags_override_file_and_defaults_are_written_out(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  path: d\n  img_size: 96\ntrain:\n  lr: 0.01\n  epochs: 7\n")
    cfg = build_config(f, {"train.lr": 0.002, "data.batch_size": None})
    assert cfg.data.img_size == 96 and cfg.train.epochs == 7
    assert cfg.train.lr == 0.002  # flag beats file
    assert cfg.data.batch_size == 32  # None = flag not given
    again = build_config(overrides=None, base=__import__("yaml").safe_load(cfg.to_yaml()))
    assert again == cfg
    assert "label_smoothing" in cfg.to_yaml()  # every default is written out


def test_unknown_key_lists_valid_keys(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("data: {path: d}\ntrain: {learning_rate: 0.1}\n")
    with pytest.raises(ConfigError) as e:
        build_config(f)
    msg = str(e.value)
    assert "train.learning_rate" in msg and "unknown key" in msg and "lr" in msg and str(f) in msg


def test_bad_choice_repeats_value_and_lists_choices() -> None:
    with pytest.raises(ConfigError) as e:
        build_config(overrides={"data.path": "d", "data.augment": "extreme"})
    assert "data.augment" in str(e.value) and "'extreme'" in str(e.value) and "'standard'" in str(e.value)


def test_nothing_to_train_is_rejected() -> None:
    with pytest.raises(ConfigError, match="nothing would be trained"):
        build_config(overrides={"data.path": "d", "train.epochs": 0, "train.epochs_frozen": 0})


def test_config_is_frozen() -> None:
    cfg = Config(data={"path": "d"})  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        cfg.seed = 3  # type: ignore[misc]


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        build_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        build_config(bad)
