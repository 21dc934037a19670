"""Config plumbing: where conf/ lives, composing configs outside `@hydra.main`, the single
`build()` around `hydra.utils.instantiate`, and turning Hydra's errors into one line.

`rlx train` validates its overrides with `check_overrides()` before handing them to Hydra,
so a misspelled key or an unknown group option costs one line, not a page.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Iterable, Iterator

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, InstantiationException, MissingConfigException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from rlx.errors import RlxError
from rlx.paths import CONF_DIR

GROUPS = ("algo", "model", "optimizer", "quantizer", "data", "reward", "rollout", "weighting", "regularizer", "logger",
          "hooks", "experiment")  # rlx train
# Groups of one command only, in conf/<command>/<group>/ (the command's config adds that folder to
# Hydra's search path), so `rlx quantize method=wanda` is Hydra's own unknown-option error.
COMMAND_GROUPS = {"quantize": ("method",), "prune": ("method",)}
ALL_GROUPS = (*GROUPS, *(f"{c}/{g}" for c, groups in COMMAND_GROUPS.items() for g in groups))  # as `rlx ls` names them

# `${rlx_conf:quantize}`: conf/quantize as an absolute path, for `hydra.searchpath`.
OmegaConf.register_new_resolver("rlx_conf", lambda sub="": str(CONF_DIR / sub), replace=True)


def group_options(group: str, command: str | None = None) -> list[str]:
    """The options of a config group: the YAML files in conf/<group>/, or in conf/<command>/<group>/
    for a group of one command (`group` may also be written "quantize/method")."""
    folder = CONF_DIR / command / group if command in COMMAND_GROUPS and group in COMMAND_GROUPS[command] \
        else CONF_DIR / group
    if not folder.is_dir():
        raise RlxError(f"unknown config group {group!r}; groups: {', '.join(ALL_GROUPS)}")
    return sorted(p.stem for p in folder.glob("*.yaml"))


def require_complete(cfg: DictConfig) -> None:
    """A value a config declares required (`???`) and nobody gave stops the run in one line."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise RlxError(f"Missing mandatory value: {', '.join(missing)} (the config marks it ???): add {missing[0]}=...")


@contextmanager
def _hydra_context() -> Iterator[None]:
    # compose() needs a global Hydra; keep any that is already there (inside a running task).
    saved = GlobalHydra.instance().hydra if GlobalHydra.instance().is_initialized() else None
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            yield
    finally:
        GlobalHydra.instance().clear()
        if saved is not None:
            GlobalHydra.instance().initialize(saved)


def compose_config(name: str = "train", overrides: Iterable[str] = ()) -> DictConfig:
    """Compose conf/<name>.yaml with overrides, as `@hydra.main` would (no run dir, no sweep)."""
    overrides = list(overrides)
    try:
        with _hydra_context():
            return compose(config_name=name, overrides=overrides)
    except HydraException as e:
        raise RlxError(explain(e, name, overrides)) from None


def explain(e: Exception, name: str = "train", overrides: list[str] | None = None) -> str:
    """One line for a Hydra composition error: what was wrong and what is valid."""
    if isinstance(e, MissingConfigException) and e.missing_cfg_file and "/" in e.missing_cfg_file:
        group, option = e.missing_cfg_file.rsplit("/", 1)
        valid = e.options or group_options(group, name)
        return f"unknown {group} option {option!r}; valid: {', '.join(valid)}"
    text = str(e)
    m = re.search(r"Could not override '([^']+)'", text)
    given = {o.split("=")[0].lstrip("+~") for o in overrides or []}
    if m and m.group(1) in given:  # the user's key (not a config's own defaults list): say what keys there are
        key = m.group(1)
        parent, _, leaf = key.rpartition(".")
        base = compose_config(name, [o for o in overrides or [] if not o.split("=")[0].lstrip("+~").startswith(key)])
        node = OmegaConf.select(base, parent) if parent else base
        keys = ", ".join(sorted(node.keys())) if isinstance(node, DictConfig) else "(not a mapping)"
        return f"unknown key {key!r} (use +{key}=... to add one); keys of {parent or 'the config'}: {keys}"
    if "Error parsing override" in text:
        return text.splitlines()[0] + " (see `rlx train -- --help` for the override grammar)"
    return " ".join(line.strip() for line in text.splitlines()[:2])


def check_overrides(name: str, overrides: list[str]) -> None:
    """Compose once per value of each sweep (`a=1,2`), so a bad value fails before any job runs."""
    try:
        parsed = OverridesParser.create().parse_overrides([o for o in overrides if not o.startswith("-")])
    except HydraException as e:
        raise RlxError(explain(e, name, overrides)) from None
    fixed = [o.input_line for o in parsed if not o.is_sweep_override() and not o.key_or_group.startswith("hydra")]
    sweeps = [o for o in parsed if o.is_sweep_override() and not o.key_or_group.startswith("hydra")]
    first = [f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}" for o in sweeps]
    candidates = [fixed + first]
    for i, o in enumerate(sweeps):
        for value in list(o.sweep_string_iterator())[1:]:
            candidates.append(fixed + first[:i] + [f"{o.get_key_element()}={value}"] + first[i + 1 :])
    for ov in candidates:
        validate(compose_config(name, ov))


def validate(cfg: DictConfig) -> None:
    """Type-check the parts of the config that have a schema (the trainer section)."""
    from rlx.loop import TrainerConfig

    if "trainer" in cfg:
        TrainerConfig.from_config(cfg.trainer)


def build(node: DictConfig, **runtime_kwargs):
    """The one call that turns a `_target_` node into an object (Hydra 1.4 will need an
    allow-list for `_target_`; it goes here)."""
    try:
        return instantiate(node, **runtime_kwargs)
    except InstantiationException as e:
        cause = e.__cause__ or e
        if isinstance(cause, RlxError):
            raise cause from None
        target = node.get("_target_", "?") if isinstance(node, DictConfig) else "?"
        raise RlxError(f"cannot build {target}: {str(cause).splitlines()[0]}") from None
    except OmegaConfBaseException as e:
        raise RlxError(str(e).splitlines()[0]) from None
