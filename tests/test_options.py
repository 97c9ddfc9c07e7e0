"""The command line is generated from the config's declarations: the help prints the defaults training really
uses, every flag sets its key, and docs/options.md is the same declaration written out."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from imgtune.cli import app
from imgtune.config import RECIPES, Config, TrainConfig
from imgtune.options import COMPARE_FLAGS, LR_FIND_FLAGS, TRAIN_FLAGS, choices, field, reference_markdown

runner = CliRunner()
DOCS = Path(__file__).resolve().parents[1] / "docs" / "options.md"


def _value(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _help_of(command: str) -> dict[str, str]:
    """option -> its help text, from the rendered `imgtune COMMAND --help` (wrapped lines joined)."""
    res = runner.invoke(app, [command, "--help"], terminal_width=100)
    assert res.exit_code == 0, res.output
    entries: dict[str, str] = {}
    current = None
    for line in res.output.splitlines():
        m = re.match(r"^  (--[a-z-]+)(?:, --[a-z-]+)*(?: / --[a-z-]+)?(?: \S+)?(?:\s{2,}(.*))?$", line)
        if m:
            current = m.group(1)
            entries[current] = m.group(2) or ""
        elif current and line.startswith(" " * 10):
            entries[current] += " " + line.strip()
    return {k: re.sub(r"\s+", " ", v).strip() for k, v in entries.items()}


def _matches(shown: str, real: Any) -> bool:
    """The default as the help shows it, read back and compared with the config's real default."""
    shown = re.sub(r" \(\w+ preset\)$", "", shown)  # data.aug keys say which preset their value comes from
    if isinstance(real, bool):
        return shown == ("on" if real else "off")
    if isinstance(real, int | float):
        return float(shown) == pytest.approx(float(real))
    if isinstance(real, list):
        return shown == (",".join(map(str, real)) or "none")
    if real is None:
        return shown not in ("", "0", "on")
    return shown == str(real)


@pytest.mark.parametrize(
    ("command", "flags", "recipes"), [("train", TRAIN_FLAGS, True), ("compare", COMPARE_FLAGS, False),
                                      ("lr-find", LR_FIND_FLAGS, False)],
)  # fmt: skip
def test_help_prints_the_real_defaults(command: str, flags: list[Any], recipes: bool) -> None:
    helps = _help_of(command)
    defaults = Config(data={"path": "d"})  # type: ignore[arg-type]
    scratch = Config.model_validate({**RECIPES["scratch"], "data": {**RECIPES["scratch"]["data"], "path": "d"}})
    for flag in flags:
        text = helps[flag.option]
        if flag.const is not None:  # a flag without a value (timm's --model-ema): says what it sets
            assert f"{flag.key} = {flag.const:g}" in text, (flag.option, text)
            continue
        assert text.lower().startswith(field(flag.key).description[:30].lower()), (flag.option, text)
        m = re.search(r"\[([^\]]*)\]\.$", text)
        assert m, (flag.option, text)
        shown, *others = m.group(1).split("; ")
        assert _matches(shown, _value(defaults, flag.key)), (flag.option, shown, _value(defaults, flag.key))
        scratch_shown = [re.sub(r"^scratch recipe( \(\w+\))?: ", "", o) for o in others]
        if recipes and _value(scratch, flag.key) != _value(defaults, flag.key):
            assert scratch_shown and _matches(scratch_shown[0], _value(scratch, flag.key)), (flag.option, text)
        else:
            assert not scratch_shown, (flag.option, text)


def test_the_drifted_help_is_gone() -> None:
    """The hand-written help once drifted from the code (it said [5] while the default was 8, and x0.1
    backbone): the help is now generated from the config, so it shows the real default (5 again, by now)."""
    train, compare = _help_of("train"), _help_of("compare")
    default = TrainConfig().epochs
    assert f"[{default}; scratch recipe: 30]" in train["--epochs"] and f"[{default}]" in compare["--epochs"]
    assert "x0.1" not in " ".join(train.values())


def _sample(flag: Any, tmp_path: Path) -> tuple[list[str], Any]:
    """Command-line words that set the flag's key to something other than its default, and that value."""
    info = field(flag.key)
    default = info.get_default(call_default_factory=True)
    if flag.const is not None:
        return [flag.option], flag.const
    kinds = set(getattr(info.annotation, "__args__", ())) | {info.annotation}
    if info.annotation is bool:
        on, off = flag.switch.split("/")
        return [off if default else on], not default
    if choices(flag.key):
        value = next(c for c in reversed(choices(flag.key)) if c != default)
        return [flag.option, value], value
    lists = [a for a in kinds if getattr(a, "__origin__", None) is list]
    if lists:  # comma-separated on the command line
        return ([flag.option, "3,4"], [3, 4]) if lists[0].__args__ == (int,) else ([flag.option, "a,b"], ["a", "b"])
    if int in kinds:
        return [flag.option, str((default or 1) + 1)], (default or 1) + 1
    if float in kinds:
        value = 0.07 if default == 0.05 else 0.05
        return [flag.option, str(value)], value
    if Path in kinds:
        return [flag.option, str(tmp_path / flag.param)], tmp_path / flag.param
    return [flag.option, "resnet18"], "resnet18"


def test_every_flag_sets_its_key(tmp_path: Path) -> None:
    """Each flag of train, given a value unlike its default, lands in the resolved config under its key."""
    args, expected = [str(tmp_path)], {}
    for flag in TRAIN_FLAGS:
        words, expected[flag.key] = _sample(flag, tmp_path)
        args += words
    res = runner.invoke(app, ["train", *args, "--recipe", "transfer", "--print-config"])
    assert res.exit_code == 0, res.output
    cfg = Config.model_validate(yaml.safe_load(res.stdout))
    for key, value in expected.items():
        assert _value(cfg, key) == value, key
    names = [n for f in TRAIN_FLAGS for n in (f.option, *f.aliases)]
    assert len(names) == len(set(names)) and len({f.param for f in TRAIN_FLAGS}) == len(TRAIN_FLAGS)  # no flag twice
    assert len(expected) == len({f.key for f in TRAIN_FLAGS})  # --ema and --model-ema share train.ema: the last wins


def test_aliases_set_the_same_key_as_the_flag(tmp_path: Path) -> None:
    for flag in (f for f in TRAIN_FLAGS if f.aliases):
        words, value = _sample(flag, tmp_path)
        res = runner.invoke(app, ["train", str(tmp_path), flag.aliases[0], *words[1:], "--print-config"])
        assert res.exit_code == 0, (flag.aliases, res.output)
        assert _value(Config.model_validate(yaml.safe_load(res.stdout)), flag.key) == value, flag.aliases


def test_auto_values_and_bad_lists() -> None:
    res = runner.invoke(app, ["train", "d", "--batch-size", "auto", "--lr", "auto", "--print-config"])
    cfg = yaml.safe_load(res.stdout)
    assert cfg["data"]["auto_batch"] is True and cfg["train"]["lr_find"] is True and cfg["data"]["batch_size"] == 32
    res = runner.invoke(app, ["train", "d", "--head", "5x", "--print-config"])
    assert res.exit_code != 0 and "--head '5x'" in str(res.exception)


def test_docs_option_tables_are_generated_from_the_config() -> None:
    assert DOCS.read_text() == reference_markdown(), (
        "docs/options.md is stale: python -m imgtune.options > docs/options.md"
    )
    for flag in TRAIN_FLAGS:  # every flag and key is in the table, with its default
        assert f"`{flag.key}`" in DOCS.read_text()
