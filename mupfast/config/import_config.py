"""``mupfast import-config cerebras PARAMS.yaml --out CONFIG.yaml [section.key=value ...]``.

Translates another trainer's config into a mupfast config that trains the same μP model
(:mod:`mupfast.config.cerebras` for Cerebras Model Zoo). The written file starts with a comment
naming its source and listing, one line each, what it trains differently from the source; the
same lines go to stderr. Overrides after the source file apply to the result (``data.corpus=…``).
It is checked like any config before it is written, so the file it writes always loads.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from mupfast.atomic import write_text_atomically
from mupfast.config.cerebras import from_model_zoo
from mupfast.config.load import apply_override, config_from_dict, read_yaml_file
from mupfast.config.validate import validate
from mupfast.errors import ConfigError

#: Formats that can be imported → the function that translates a parsed file.
IMPORTERS = {"cerebras": from_model_zoo}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.usage = "mupfast import-config {cerebras} PARAMS.yaml --out CONFIG.yaml [section.key=value ...]"
    parser.add_argument("--out", help="the mupfast config to write")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")


def import_config(source: str, params: str | Path, overrides: list[str] = ()) -> tuple[str, list[str]]:
    """The text of the mupfast config translated from ``params``, and the notes in it."""
    if source not in IMPORTERS:
        raise ConfigError(f"import-config: unknown source {source!r} (known: {', '.join(IMPORTERS)})")
    params = Path(params)
    raw = read_yaml_file(params, "import-config: file")
    try:
        imported = IMPORTERS[source](raw)
    except ConfigError as e:
        raise ConfigError(f"{params}: {e}") from None
    for item in overrides:
        apply_override(imported.config, item)
    validate(config_from_dict(imported.config))
    header = [f"# Imported from {params} by `mupfast import-config {source}`."]
    if imported.notes:
        header.append("# Trained differently from the source (key: value: what this config does instead):")
        header += [f"#   {note}" for note in imported.notes]
    body = yaml.safe_dump(imported.config, sort_keys=False, allow_unicode=True)
    return "\n".join(header) + "\n" + body, imported.notes


def run(args: argparse.Namespace) -> int:
    """The ``import-config`` verb: its source and file arrive first among the positional arguments."""
    if len(args.overrides) < 2:
        raise ConfigError(
            "import-config: expected a source and a file, e.g. import-config cerebras params.yaml --out c.yaml"
        )
    if not args.out:
        raise ConfigError("import-config: --out CONFIG.yaml is required")
    source, params, *overrides = args.overrides
    out = Path(args.out)
    if out.exists() and not args.force:
        raise ConfigError(f"--out: {out} exists (pass --force to replace it)")
    text, notes = import_config(source, params, overrides)
    write_text_atomically(out, text)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {out} from {params} ({len(notes)} note{'s' if len(notes) != 1 else ''})")
    return 0
