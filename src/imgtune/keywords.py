"""Config keys as Python keywords, for `imgtune.train("data/flowers", model="resnet18", epochs=5, ...)`.

Each key's last part is its keyword where no other key ends the same way (`epochs` is train.epochs,
`img_size` data.img_size, `hflip` data.aug.hflip); any key also works spelled with `__` for its dots
(`train__stage2__lr=1e-4`); the names of the CLI's flags and their timm aliases are keywords too
(`smoothing`, `reprob`, `layer_decay`, `drop_path`, `model_ema`, `warmup`, `scratch=True`), read by the same
Flag table as the command line, so a keyword and a flag cannot mean different things. `model="resnet18"` is
model.name; a section given as a dict (`train={"lr": 1e-3}`) sets its keys.
"""

from __future__ import annotations

import difflib
from collections import Counter
from collections.abc import Mapping
from typing import Any

from imgtune.config import Config, ConfigError
from imgtune.options import TRAIN_FLAGS, Flag, all_keys

SECTIONS = {"data": "data", "train": "train", "aug": "data.aug", "stage1": "train.stage1", "stage2": "train.stage2"}


def _by_leaf() -> dict[str, str]:
    keys = all_keys(Config)
    counts = Counter(k.rsplit(".", 1)[-1] for k in keys)
    return {k.rsplit(".", 1)[-1]: k for k in keys if counts[k.rsplit(".", 1)[-1]] == 1}


def _flags() -> dict[str, Flag]:
    """keyword -> the Flag it names: every flag's option and aliases, dashes as underscores."""
    table: dict[str, Flag] = {}
    for flag in TRAIN_FLAGS:
        for name in (flag.option, *flag.aliases, *([flag.off] if flag.off else [])):
            table.setdefault(name.removeprefix("--").replace("-", "_"), flag)
    return table


def keyword_overrides(keys: Mapping[str, Any]) -> dict[str, Any]:
    """{dotted config key: value} for the keywords given; an unknown or ambiguous one is a ConfigError naming
    the keys it could mean."""
    leaves, flags = _by_leaf(), _flags()
    out: dict[str, Any] = {}
    for word, value in keys.items():
        if word == "model" and not isinstance(value, Mapping):
            out["model.name"] = value
        elif word in SECTIONS or word == "model":
            out.update({f"{SECTIONS.get(word, word)}.{k}": v for k, v in dict(value).items()})
        elif "__" in word:
            out[word.replace("__", ".")] = value
        elif word in leaves and word not in flags:
            out[leaves[word]] = value
        elif word in flags:
            out.update(_from_flag(word, flags[word], value))
        else:
            raise ConfigError(_unknown(word, leaves, flags))
    return out


def _from_flag(word: str, flag: Flag, value: Any) -> dict[str, Any]:
    if flag.const is not None:  # model_ema=True: the flag without a value
        return {flag.key: flag.const} if value else {}
    if flag.off and word == flag.off.removeprefix("--").replace("-", "_"):
        return {flag.key: not value}
    if flag.parse is not None and isinstance(value, str):  # batch_size="auto", lr="auto", head="500,200"
        return dict(flag.parse(value))
    return {flag.key: value}


def _unknown(word: str, leaves: Mapping[str, str], flags: Mapping[str, Flag]) -> str:
    keys = all_keys(Config)
    shared = [k for k in keys if k.rsplit(".", 1)[-1] == word]
    if shared:
        spelled = ", ".join(k.replace(".", "__") + "=" for k in shared)
        return f"keyword {word!r} is ambiguous: it could be {', '.join(shared)}; write {spelled}"
    close = difflib.get_close_matches(word, list(dict.fromkeys([*leaves, *flags, *SECTIONS])), n=4, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; docs/options.md lists every key"
    return f"unknown keyword {word!r}{hint}"
