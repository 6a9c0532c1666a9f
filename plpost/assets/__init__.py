"""The tiny tokenizer, base model and datasets shipped inside plpost.

They let the default demo and every test run offline. `scripts/build_assets.py` rebuilds them.
The datasets: data/addition/ (sft.jsonl 20,000 rows, preference.jsonl 6,000, prompts.jsonl 4,000,
eval.jsonl 300) and data/calculator/sft.jsonl (4,000 rows, half of them offering the `add` tool of
plpost.tasks.calculator; its prompts and evaluation are the addition files).
Refer to them with `plpost:` names wherever a model or data path is accepted:

    resolve_pretrained("plpost:tiny")                         # tokenizer + model folder
    resolve_pretrained("plpost:data/addition/sft.jsonl")      # a bundled data file
"""

from __future__ import annotations

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent
BUNDLED_PREFIX = "plpost:"


def bundled_names() -> list[str]:
    """Every `plpost:` name that resolves: model folders (they hold a config.json) and data files."""
    model_dirs = [path.parent for path in ASSETS_DIR.glob("*/config.json")]
    data_files = [path for path in (ASSETS_DIR / "data").rglob("*") if path.is_file()]
    return sorted(BUNDLED_PREFIX + path.relative_to(ASSETS_DIR).as_posix() for path in model_dirs + data_files)


def resolve_pretrained(name_or_path: str) -> str:
    """The local path for a bundled `plpost:` name; any other string is returned unchanged.

    "plpost:tiny" -> the bundled model folder; "plpost:data/addition/sft.jsonl" -> that file.
    Anything else (a Hub name, a local path) passes through, so loading it stays the real thing.
    Raises FileNotFoundError, listing the bundled names, for a `plpost:` name that is not bundled.
    """
    if not name_or_path.startswith(BUNDLED_PREFIX):
        return name_or_path
    relative = name_or_path[len(BUNDLED_PREFIX) :]
    name = BUNDLED_PREFIX + relative.strip("/")
    if name in bundled_names():
        return str(ASSETS_DIR / relative.strip("/"))
    # Matching against the listing (not just checking the path exists) also refuses
    # "plpost:../x" and Python source files, which are not assets.
    available = ", ".join(bundled_names()) or "none (run scripts/build_assets.py)"
    raise FileNotFoundError(f"{name_or_path!r} is not a bundled plpost asset; available: {available}")
