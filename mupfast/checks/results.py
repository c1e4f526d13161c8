"""What every check writes: a standard JSON file and its picture, and the names they show.

``write_result_files`` writes ``<name>.json`` (inf/nan as null) and ``<name>.png`` side by side;
:data:`LABELS` is how a parametrization is named in tables and plots.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

LABELS = {"sp": "SP", "mup": "μP", "completep": "CompleteP", "hyperp": "HyperP"}


def json_clean(obj: Any) -> Any:
    """inf/nan → None, so the JSON is standard."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_clean(v) for v in obj]
    return obj


def write_result_files(result: dict, out: str | Path, name: str, plot) -> tuple[Path, Path]:
    """Write ``<name>.json`` (standard JSON) and ``<name>.png`` (drawn by ``plot``) into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    js, png = out / f"{name}.json", out / f"{name}.png"
    js.write_text(json.dumps(json_clean(result), indent=1) + "\n")
    plot(result, png)
    return js, png
