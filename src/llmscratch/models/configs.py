"""What the model configs (`GPTConfig`, `BertConfig`) share: a preset by name with fields
overridden, and a saved config read back strictly.

Both configs are frozen dataclasses with the same names for the same things (`n_embd`,
`n_layer`, `n_head`, `intermediate_size` with None for 4 x `n_embd`, `norm_eps`, the
`mlp_width` property); a family is one config class, one presets table and these two calls.
They return the fields and the family's class builds itself (`cls(**preset_fields(...))`), so
the checks run in the config's own `__post_init__` and this module never calls back into the
family's.
"""

from __future__ import annotations

import dataclasses

from ..errors import UserError


def check_fields(cls: type, names, where: str = "") -> None:
    """UserError naming the keys of `names` that are not fields of the dataclass `cls`."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(names) - fields
    if unknown:
        raise UserError(f"unknown {cls.__name__} field(s) {sorted(unknown)}{where}; valid: {sorted(fields)}")


PRESET_TABLES: dict[str, dict[str, dict]] = {}
"""Each family's presets by what it is ("GPT", "encoder"): filled by `config_from_name`'s
callers as their module loads (`register_presets`), so a message can list them all."""


def register_presets(what: str, presets: dict[str, dict]) -> None:
    PRESET_TABLES[what] = presets


def all_presets_text() -> str:
    """Every family's presets, e.g. `"GPT: tiny, mini, ...; encoder: bert-tiny, ..."`."""
    return "; ".join(f"{what}: {', '.join(table)}" for what, table in PRESET_TABLES.items())


def preset_fields(cls: type, presets: dict[str, dict], name: str, overrides: dict, what: str = "model") -> dict:
    """The fields of the preset `name` of `presets` with `overrides` applied, for `cls(**...)`;
    a UserError names an unknown preset (a `what` preset: "GPT", "encoder"), listing every
    family's, or an unknown field."""
    if name not in presets:
        other = [w for w, table in PRESET_TABLES.items() if name in table]
        mine = [w for w, table in PRESET_TABLES.items() if table is presets]
        if other and mine:
            raise UserError(f"{name!r} is an {other[0]} preset, not a {mine[0]} one")
        raise UserError(f"unknown {what} preset {name!r}; choose one of: {all_presets_text()}")
    check_fields(cls, overrides)
    return {**presets[name], **overrides}


def saved_fields(cls: type, d: dict, renamed: dict[str, str] | None = None) -> dict:
    """The fields of a saved config (a run folder's `"model"` section), for `cls(**...)`.

    Args:
        d: the saved fields.
        renamed: `{old name: field}` for fields an older version saved under another name
            (read as the new one, so old run folders load).

    Raises:
        UserError: a key that is no field (and no old name of one), e.g. from a newer version
            or a hand edit: named, rather than silently dropped.
    """
    renamed = renamed or {}
    values = {renamed.get(k, k): v for k, v in d.items()}
    check_fields(cls, values, " in the saved model config")
    return values


MAX_LAYERS = 1000
"""Most layers a config may have: far above any real model (GPT-2 XL 48, Llama 3 405B 126),
and a hand-edited `n_layer: 1000000` is refused at once instead of building a million
modules."""

MAX_PARAMS = 10**13
"""Most parameters a config may describe (ten trillion, over any model that exists); a
bigger one (`n_embd: 1000000000`) is an error, not an allocation that overflows."""


def check_sizes(config, n_params: int) -> None:
    """UserError when a config's sizes are beyond any model (`MAX_LAYERS`, `MAX_PARAMS`):
    checked when a config is made, before anything is allocated (`n_params`: its own
    `estimated_params()`)."""
    name = type(config).__name__
    if config.n_layer > MAX_LAYERS:
        raise UserError(f"{name}.n_layer is {config.n_layer}, over the limit of {MAX_LAYERS} layers")
    if n_params > MAX_PARAMS:
        raise UserError(f"{name} describes {n_params:.3g} parameters (n_embd {config.n_embd}, n_layer "
                        f"{config.n_layer}, vocab_size {config.vocab_size}), over the limit of {MAX_PARAMS:.0e}")


def check_fits_in_memory(config, where: str, bytes_per_param: int = 2) -> None:
    """UserError when the model `config` describes cannot fit in this machine's memory even
    at `bytes_per_param` (2: bf16), before loading it (`where` names the file)."""
    from ..utils import physical_memory

    total = physical_memory()
    n_params = config.estimated_params()
    need = n_params * bytes_per_param
    if total and need > total:
        raise UserError(f"{where}: the model has {n_params / 1e9:.1f}B parameters, "
                        f"{need / 2**30:.0f} GiB even in bf16, more than this machine's "
                        f"{total / 2**30:.0f} GiB of memory")
