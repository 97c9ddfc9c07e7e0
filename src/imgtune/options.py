"""Command-line options generated from the config's declarations, through one table of flag -> config key.

Each `Flag` names a config key; its help text, its default, its choices and what the scratch recipe changes
all come from the key's declaration in config.py (`setting(...)`), so `imgtune train --help` cannot drift from
the defaults that training really uses. `with_flags(FLAGS)` adds the options to a typer command; the command
receives them as `**flags` and turns them into config overrides with `overrides(FLAGS, flags)`.
`reference_markdown()` writes the same declarations as the option tables of docs/options.md
(`python -m imgtune.options > docs/options.md`; a test fails when that file is stale).
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args, get_origin

import typer
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from imgtune.config import PRESETS, RECIPES, Config, ConfigError
from imgtune.optim import OPTIMIZERS, SCHEDULES
from imgtune.tracking import MONITORS

Parse = Callable[[str], Mapping[str, Any]]  # the flag's text -> {config key: value}


@dataclass(frozen=True)
class Flag:
    key: str  # dotted config key: "train.epochs_frozen"
    name: str = ""  # the option; default: --<last part of the key, dashed>
    off: str = ""  # a boolean's negative form (default --no-<name>)
    parse: Parse | None = None  # for values a shell cannot hand over as they are (lists, "auto")
    metavar: str = ""
    extra: str = ""  # words after the key's help that only make sense on the command line
    aliases: tuple[str, ...] = ()  # other names for it: timm's train.py names users type from habit
    const: Any = None  # set: a flag without a value that sets the key to this (timm's --model-ema)

    @property
    def option(self) -> str:
        return self.name or "--" + self.key.rsplit(".", 1)[-1].replace("_", "-")

    @property
    def switch(self) -> str:
        """How typer declares it: a boolean as --name/--no-name (or its own negative form)."""
        if field(self.key).annotation is not bool:
            return self.option
        return f"{self.option}/{self.off or '--no-' + self.option.removeprefix('--')}"

    @property
    def names(self) -> tuple[str, ...]:
        return (self.switch, *self.aliases)

    @property
    def param(self) -> str:
        return self.key.replace(".", "__") + ("__const" if self.const is not None else "")


def field(key: str) -> FieldInfo:
    """The declaration of a dotted config key."""
    model: type[BaseModel] = Config
    *sections, leaf = key.split(".")
    for part in sections:
        annotation = model.model_fields[part].annotation
        assert isinstance(annotation, type) and issubclass(annotation, BaseModel), key
        model = annotation
    return model.model_fields[leaf]


def _extra(info: FieldInfo, name: str) -> str:
    extra = info.json_schema_extra
    return str(extra.get(name, "")) if isinstance(extra, dict) else ""


def _show(value: Any, info: FieldInfo) -> str:
    if value is None:
        return _extra(info, "unset") or "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list | tuple):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) if value else "none"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, BaseModel):  # train.stage1 / stage2: a section of overrides
        return "all unset"
    return str(value)


def _recipe_default(key: str) -> dict[str, Any]:
    """{recipe: value} for the recipes that change this key's default."""
    found = {}
    for recipe, bundle in RECIPES.items():
        node: Any = bundle
        for part in key.split("."):
            node = node.get(part, ...) if isinstance(node, dict) else ...
        if node is not ...:
            found[recipe] = node
    return found


def _registry(key: str) -> dict[str, Any] | None:
    """The registry whose names a key takes (read when used: names registered later count too)."""
    registries: dict[str, dict[str, Any]] = {
        "optimizer": OPTIMIZERS, "schedule": SCHEDULES, "monitor": MONITORS, "augment": PRESETS,
    }  # fmt: skip
    return registries.get(key.rsplit(".", 1)[-1])


def choices(key: str) -> list[str]:
    """The valid values of a key with a fixed set of them: Literal types and the registries."""
    registry = _registry(key)
    if registry is not None:
        return list(registry)
    return [str(v) for a in _members(field(key).annotation) if get_origin(a) is Literal for v in get_args(a)]


def _members(annotation: Any) -> tuple[Any, ...]:
    """The types of a union (X | None), or the annotation alone."""
    return get_args(annotation) if get_origin(annotation) in (types.UnionType, typing.Union) else (annotation,)


def default_text(key: str, recipes: bool = True) -> str:
    """The default as help and docs show it, with what each recipe changes: "8; scratch recipe: 30"."""
    info = field(key)
    if info.is_required():
        return "required"
    default = info.get_default(call_default_factory=True)
    if key.startswith("data.aug."):  # a preset's value unless set: the default preset's, and the recipes'
        return _preset_default(key, info, recipes)
    text = _show(default, info)
    for recipe, value in _recipe_default(key).items() if recipes else ():
        if value != default:
            text += f"; {recipe} recipe: {_show(value, info)}"
    return text


def _preset_default(key: str, info: FieldInfo, recipes: bool) -> str:
    leaf = key.rsplit(".", 1)[-1]
    preset = str(field("data.augment").default)
    default = PRESETS[preset].get(leaf, info.default)
    text = f"{_show(default, info)} ({preset} preset)"
    for recipe, name in _recipe_default("data.augment").items() if recipes else ():
        value = PRESETS[name].get(leaf, info.default)
        if value != default:
            text += f"; {recipe} recipe ({name}): {_show(value, info)}"
    return text


def help_text(flag: Flag, recipes: bool = False) -> str:
    info = field(flag.key)
    if flag.const is not None:
        return f"{flag.extra}: {flag.key} = {_show(flag.const, info)}."
    words = info.description or ""
    if flag.extra:
        words += f"; {flag.extra}"
    options = choices(flag.key)
    if options and not _is_literal(info.annotation):  # typer lists a Literal's choices itself
        words += f" ({'|'.join(options)})"
    return f"{words[:1].upper()}{words[1:]} [{default_text(flag.key, recipes)}]."


def _is_literal(annotation: Any) -> bool:
    return any(get_origin(a) is Literal for a in _members(annotation))


def _cli_type(flag: Flag) -> Any:
    """What typer parses: the key's own type (optional: None means "not given"), text when `parse` reads it."""
    if flag.parse is not None:
        return str | None
    if flag.const is not None:
        return bool | None
    annotation: Any = field(flag.key).annotation
    return annotation if type(None) in _members(annotation) else annotation | None


def _registered(key: str) -> Callable[[Any], Any] | None:
    """A flag's check against its registry when it is parsed: a usage error (exit 2) naming the choices."""
    registry = _registry(key)
    if registry is None:
        return None

    def check(value: str | None) -> str | None:
        if value is not None and value not in registry:
            raise typer.BadParameter(f"{value!r} is not one of {', '.join(map(repr, registry))}")
        return value

    return check


def _parameter(flag: Flag, recipes: bool) -> inspect.Parameter:
    option = typer.Option(
        *flag.names, help=help_text(flag, recipes), metavar=flag.metavar or None, show_default=False,
        callback=_registered(flag.key),
    )  # fmt: skip
    return inspect.Parameter(
        flag.param, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[_cli_type(flag), option]
    )


def with_flags(flags: Sequence[Flag], recipes: bool = False) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Add one option per Flag to a typer command that takes `**flags` (they arrive keyed by Flag.param).
    recipes: the command applies config.RECIPES (train), so the help says what each one changes."""

    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        own = [p for p in inspect.signature(command).parameters.values() if p.kind is not p.VAR_KEYWORD]
        hints = typing.get_type_hints(command, include_extras=True)
        generated = [_parameter(f, recipes) for f in flags]
        generated_names = {p.name for p in generated}

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> None:
            given = {k: v for k, v in kwargs.items() if k in generated_names}
            command(**{k: v for k, v in kwargs.items() if k not in generated_names}, **given)

        params = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in own] + generated
        wrapper.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        del wrapper.__wrapped__  # typer must read the generated signature, not the command's own
        return wrapper

    return decorate


def overrides(flags: Sequence[Flag], given: Mapping[str, Any]) -> dict[str, Any]:
    """{config key: value} of the flags given (None: not given), parsed where a flag has its own reader."""
    out: dict[str, Any] = {}
    for flag in flags:
        value = given.get(flag.param)
        if value is None or (flag.const is not None and not value):
            continue
        if flag.const is not None:
            out[flag.key] = flag.const
        elif flag.parse is not None:
            out.update(flag.parse(value))
        else:
            out[flag.key] = value
    return out


# --------------------------------------------------------------------------------------- the flag readers


def numbers(kind: type, example: str) -> Callable[[str, str], list[Any]]:
    def read(text: str, flag: str) -> list[Any]:
        try:
            return [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise ConfigError(f"{flag} {text!r}: expected comma-separated {kind.__name__}s, e.g. {example}") from None

    return read


def _list_of(key: str, kind: type, example: str) -> Parse:
    flag = "--" + key.rsplit(".", 1)[-1].replace("_", "-")
    return lambda text: {key: numbers(kind, example)(text, flag)}


def _number_or_auto(key: str, auto_key: str, kind: type, flag: str) -> Parse:
    def read(text: str) -> dict[str, Any]:
        if text == "auto":
            return {auto_key: True}
        try:
            return {key: kind(text)}
        except ValueError:
            raise ConfigError(f"{flag} {text!r}: expected a {kind.__name__} or 'auto'") from None

    return read


# ------------------------------------------------------------------------------ flag -> config key, once

TIMM_EMA_DECAY = 0.9998  # timm train.py's --model-ema-decay default (with the warm-up it is min(D, (1+t)/(10+t)))

_DATA = [
    Flag("data.img_size"),
    Flag("data.resize"),
    Flag("data.batch_size", parse=_number_or_auto("data.batch_size", "data.auto_batch", int, "--batch-size"),
         metavar="N|auto", extra="'auto' on a CUDA GPU: the largest that fits"),
    Flag("data.augment"),
    Flag("data.labels", metavar="folder|filename|FILE.csv"),
    Flag("data.label_pattern", metavar="REGEX"),
    Flag("data.label_columns", parse=_list_of("data.label_columns", str, "path,label,split"), metavar="COLUMNS"),
    Flag("data.valid_fraction"),
    Flag("data.split_file"),
    Flag("data.exclude"),
    Flag("data.relabel"),
    Flag("data.class_names"),
    Flag("data.cache"),
    Flag("data.workers"),
]  # fmt: skip
_MODEL = [
    Flag("model.name", name="--model"),
    Flag("model.pretrained", off="--scratch"),
    Flag("model.weights"),
    Flag("model.head", parse=_list_of("model.head", int, "500 or 1024,256"), metavar="SIZES"),
    Flag("model.dropout", aliases=("--drop",)),
    Flag("model.drop_path"),
]
_TRAIN = [
    Flag("train.epochs_frozen"),
    Flag("train.epochs"),
    Flag("train.head_input"),
    Flag("train.head_solver"),
    Flag("train.lr", parse=_number_or_auto("train.lr", "train.lr_find", float, "--lr"), metavar="LR|auto",
         extra="'auto': the LR finder before each stage"),
    Flag("train.optimizer", aliases=("--opt",)),
    Flag("train.schedule", aliases=("--sched",)),
    Flag("train.warmup_fraction", name="--warmup"),
    Flag("train.step_size"),
    Flag("train.milestones", parse=_list_of("train.milestones", int, "10,20"), metavar="EPOCHS"),
    Flag("train.gamma"),
    Flag("train.momentum"),
    Flag("train.weight_decay"),
    Flag("train.unfreeze"),
    Flag("train.lr_decay", aliases=("--layer-decay",)),
    Flag("train.bn"),
    Flag("train.bn_frozen_stage"),
    Flag("train.label_smoothing", aliases=("--smoothing",)),
    Flag("train.mixup"),
    Flag("train.cutmix"),
    Flag("data.aug.erase", name="--random-erasing", aliases=("--reprob",)),
    Flag("train.grad_clip", aliases=("--clip-grad",)),
    Flag("train.grad_clip_mode", aliases=("--clip-mode",)),
    Flag("train.accumulate"),
    Flag("train.ema", aliases=("--model-ema-decay",)),
    Flag("train.ema", name="--model-ema", const=TIMM_EMA_DECAY, extra="timm's --model-ema: weight EMA at its decay"),
    Flag("train.balance"),
    Flag("train.monitor"),
    Flag("train.patience"),
    Flag("train.precision"),
    Flag("train.feature_views"),
    Flag("train.feature_store"),
    Flag("train.compile"),
    Flag("train.deterministic"),
    Flag("train.tensorboard"),
    Flag("train.mlflow"),
    Flag("train.calibrate"),
    Flag("train.report"),
]  # fmt: skip
_RUN = [Flag("out"), Flag("seed"), Flag("device")]

TRAIN_FLAGS = [*_MODEL, *_DATA, *_TRAIN, *_RUN]
_BATCH = Flag("data.batch_size")  # compare and lr-find: a number only (no GPU probe there)
COMPARE_FLAGS = [
    _MODEL[2],
    Flag("data.img_size"),
    Flag("train.epochs_frozen"),
    Flag("train.epochs"),
    _BATCH,
    Flag("seed"),
]
LR_FIND_FLAGS = [_MODEL[0], Flag("data.img_size"), _BATCH, Flag("train.optimizer")]
CHECK_FLAGS = [f for f in _DATA if f.key.startswith("data.label")] + [Flag("data.valid_fraction"), Flag("seed")]
ISSUES_FLAGS = [*CHECK_FLAGS, Flag("data.split_file"), _MODEL[0], Flag("model.weights"), Flag("data.img_size"),
                Flag("data.resize")]  # fmt: skip


# ------------------------------------------------------------------------------------------ the docs


def all_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, info in model.model_fields.items():
        annotation = info.annotation
        nested = name in ("data", "model", "train", "aug")  # sections of keys (train.stage1/2: one row each)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel) and nested:
            keys += all_keys(annotation, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def reference_markdown() -> str:
    """docs/options.md: every config key with its flag, default, meaning and when to change it."""
    by_key: dict[str, Flag] = {}
    for f in TRAIN_FLAGS:
        by_key.setdefault(f.key, f)
    sections = {"data": "Data (`data.*`)", "model": "Model (`model.*`)", "train": "Training (`train.*`)"}
    lines = [
        "# Options", "",
        "<!-- generated by `python -m imgtune.options > docs/options.md` from the declarations in "
        "src/imgtune/config.py; tests/test_options.py fails when this file is stale -->", "",
        "Every key is a YAML key (`--config FILE`), `--set KEY=VALUE` on the command line and a field of "
        "`imgtune.Config`; the keys with a flag are flags of `imgtune train` too. Defaults are those of the "
        "`transfer` recipe, with what the `scratch` recipe (chosen for the built-in CNNs) changes. Unknown keys "
        "and bad values are refused when the config loads, with the key, the value and the valid choices.", "",
    ]  # fmt: skip
    current = ""
    for key in all_keys(Config):
        section = key.split(".")[0] if "." in key else "run"
        if section != current:
            current = section
            lines += ["", f"## {sections.get(section, 'Run (top level)')}", "",
                      "| key | flag | default | what it is | when to change it |", "|---|---|---|---|---|"]  # fmt: skip
        info = field(key)
        flag = by_key.get(key)
        option = f"`{f'{flag.switch} {flag.metavar}'.strip()}`" if flag else ""
        others = [a for f in TRAIN_FLAGS if f.key == key for a in (*f.aliases, *([f.option] if f is not flag else []))]
        if others:
            option += " (also " + ", ".join(f"`{a}`" for a in others) + ")"
        what = info.description or ""
        options = choices(key)
        if options:
            what += f" (`{'`, `'.join(options)}`)"
        cells = [f"`{key}`", option, default_text(key), what, _extra(info, "when")]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    intro = "Options of the other commands that set config keys (with the same meaning as for train):"
    lines += ["", "## Commands", "", intro, ""]
    for command, flags in (("compare", COMPARE_FLAGS), ("lr-find", LR_FIND_FLAGS), ("data check", CHECK_FLAGS),
                           ("data issues", ISSUES_FLAGS)):  # fmt: skip
        lines.append(f"- `imgtune {command}`: " + ", ".join(f"`{f.option}` (`{f.key}`)" for f in flags))
    return "\n".join(lines) + "\n"


def main() -> None:
    print(reference_markdown(), end="")


if __name__ == "__main__":
    main()
