"""What the model configs (`GPTConfig`, `BertConfig`) share: a preset by name with fields
overridden, and a saved config read back strictly.

Both configs are frozen dataclasses with the same names for the same things (`n_embd`,
`n_layer`, `n_head`, `intermediate_size` with None for 4 x `n_embd`, `norm_eps`, the
`mlp_width` property); a family is one config class, one presets table and these two calls.
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


def config_from_name(cls: type, presets: dict[str, dict], name: str, overrides: dict, what: str = "model"):
    """`cls` built from the preset `name` of `presets`, with `overrides` applied; a UserError
    names an unknown preset (a `what` preset: "GPT", "encoder"), listing every family's,
    or an unknown field."""
    if name not in presets:
        other = [w for w, table in PRESET_TABLES.items() if name in table]
        mine = [w for w, table in PRESET_TABLES.items() if table is presets]
        if other and mine:
            raise UserError(f"{name!r} is an {other[0]} preset, not a {mine[0]} one")
        raise UserError(f"unknown {what} preset {name!r}; choose one of: {all_presets_text()}")
    check_fields(cls, overrides)
    return cls(**{**presets[name], **overrides})


def config_from_dict(cls: type, d: dict, renamed: dict[str, str] | None = None):
    """`cls` from a saved config (a run folder's `"model"` section).

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
    return cls(**values)
