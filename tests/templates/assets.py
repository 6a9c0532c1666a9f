"""Real chat templates and tokenizers, fetched from pinned PyPI packages into a cache on disk.

Nothing here is committed: the vocabularies keep their models' licenses, so the test suite
fetches them itself, once, with `pip download`, into ``$PLPOST_TEST_CACHE`` (default
``~/.cache/plpost-tests``). Every entry is built under a file lock in a temporary folder and
renamed into place when complete, so parallel runs are safe and an interrupted fetch leaves
nothing half-built. A fetch that fails raises `FetchError`: the tests that need it fail with
the pip command and its output, they are never skipped.

Where everything comes from:
- templates: the ``trl`` wheel's ``trl/chat_templates/`` (originals and ``*_training.jinja``),
  the ``llama-cpp-python`` sdist's ``vendor/llama.cpp/models/templates/`` (copies of the
  templates that model repositories ship), and the ``axolotl`` wheel's
  ``axolotl/utils/chat_templates/templates/`` for Mistral v3 (``mistral_v2v3.jinja``: the
  Mistral-7B-Instruct-v0.3 template, which neither of the others ships);
- tokenizers: the same sdist's ``ggml-vocab-*.gguf`` vocabularies, converted by transformers
  (``gguf_file=``) and saved as ``tokenizer.json`` (converting takes up to a minute, loading the
  saved one seconds); Mistral v3 (SentencePiece) and Nemo (Tekken) from the files that the
  installed ``mistral-common`` ships, whose encoder is the reference for their token ids.

Some families have no vocabulary in these packages; they get a stand-in, named ``*-standin``:
the nearest real vocabulary with the family's turn markers added as special tokens, which is
what their masks depend on (see SUPERVISION.md).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import transformers
from filelock import FileLock

TRL = "trl==1.16.0"
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
AXOLOTL = "axolotl==0.19.0"
GGUF_VOCABULARIES = ("qwen2", "llama-bpe", "phi-3", "gemma-4")


class FetchError(RuntimeError):
    """A package, template or tokenizer that the real-template tests need could not be fetched or built."""


def cache_root() -> Path:
    return Path(os.environ.get("PLPOST_TEST_CACHE") or Path.home() / ".cache" / "plpost-tests")


def cached(name: str, build: Callable[[Path], None]) -> Path:
    """cache_root()/name, made once by `build(folder)` under a lock and renamed into place when complete."""
    root = cache_root()
    final = root / name
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):
        if final.is_dir():  # another process built it while this one waited
            return final
        partial = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
        try:
            build(partial)
            partial.rename(final)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    return final


def pip_download(requirement: str, destination: Path, *, sdist: bool = False) -> Path:
    """The one distribution file of `requirement` (a wheel, or the sdist), downloaded with pip, no dependencies."""
    package = requirement.split("==")[0]
    # --no-binary names only this package: its build backend, which pip installs to read the
    # sdist's metadata, may still come as wheels.
    kind = ["--no-binary", package] if sdist else ["--only-binary", ":all:"]
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--ignore-requires-python", *kind,
        "--dest", str(destination), requirement,
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise FetchError(
            f"`pip {' '.join(command[3:])}` failed (exit {result.returncode}). The real-template tests fetch "
            f"their files from PyPI into {cache_root()} (set PLPOST_TEST_CACHE to use another cache, e.g. one "
            f"filled beforehand on a machine with PyPI access).\n{(result.stdout + result.stderr)[-3000:]}"
        )
    files = sorted(destination.iterdir())
    if len(files) != 1:
        raise FetchError(f"`pip download {requirement}` left {[f.name for f in files]}, expected one file")
    return files[0]


def _extract_from_wheel(requirement: str, folder_in_wheel: str, suffix: str) -> Callable[[Path], None]:
    def build(into: Path) -> None:
        with tempfile.TemporaryDirectory() as download:
            wheel = pip_download(requirement, Path(download))
            with zipfile.ZipFile(wheel) as archive:
                for member in archive.namelist():
                    if member.startswith(folder_in_wheel) and member.endswith(suffix):
                        (into / Path(member).name).write_bytes(archive.read(member))
        if not any(into.iterdir()):
            raise FetchError(f"{requirement} has no {folder_in_wheel}*{suffix}")

    return build


def trl_templates() -> Path:
    """The folder of the trl wheel's chat templates (``*.jinja``)."""
    return cached(f"{TRL}/chat_templates", _extract_from_wheel(TRL, "trl/chat_templates/", ".jinja"))


def axolotl_templates() -> Path:
    """The folder of the axolotl wheel's chat templates (``*.jinja``)."""
    return cached(
        f"{AXOLOTL}/chat_templates", _extract_from_wheel(AXOLOTL, "axolotl/utils/chat_templates/templates/", ".jinja")
    )


def llama_cpp_models() -> Path:
    """llama.cpp's ``models/`` folder from the llama-cpp-python sdist: ``templates/*.jinja`` and the
    ``ggml-vocab-*.gguf`` vocabularies used here (the rest of the 76 MB sdist is not kept)."""

    def build(into: Path) -> None:
        wanted_vocabularies = {f"ggml-vocab-{name}.gguf" for name in GGUF_VOCABULARIES}
        (into / "templates").mkdir()
        with tempfile.TemporaryDirectory() as download:
            sdist = pip_download(LLAMA_CPP_PYTHON, Path(download), sdist=True)
            with tarfile.open(sdist) as archive:
                for member in archive:
                    path = Path(member.name)
                    if "/vendor/llama.cpp/models/" not in member.name or not member.isfile():
                        continue
                    if path.parent.name == "templates" and path.suffix == ".jinja":
                        target = into / "templates" / path.name
                    elif path.parent.name == "models" and path.name in wanted_vocabularies:
                        target = into / path.name
                    else:
                        continue
                    target.write_bytes(archive.extractfile(member).read())
        missing = sorted(name for name in wanted_vocabularies if not (into / name).is_file())
        if missing or not any((into / "templates").iterdir()):
            raise FetchError(f"{LLAMA_CPP_PYTHON} sdist lacks {missing or 'models/templates/'}")

    return cached(f"{LLAMA_CPP_PYTHON}/models", build)


def mistral_common_file(name: str) -> Path:
    """A tokenizer file that the installed mistral-common ships (``mistral_common/data/``)."""
    import mistral_common

    path = Path(mistral_common.__file__).parent / "data" / name
    if not path.is_file():
        raise FetchError(f"mistral-common {mistral_common.__version__} ships no data/{name}")
    return path


# A stand-in's additions: (special tokens to add, other tokens to add, {role: token} to set).
Additions = tuple[tuple[str, ...], tuple[str, ...], dict[str, str]]
QWEN_TEXT_TOKENS = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>")
STANDINS: dict[str, tuple[str, Additions]] = {
    # Qwen2.5 and Qwen3 add these to the Qwen2 vocabulary (as tokens that are not special).
    "qwen-standin": ("qwen2", ((), QWEN_TEXT_TOKENS, {})),
    "deepseek-r1-distill-qwen-standin": ("qwen2", (
        ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"), ("<think>", "</think>"),
        {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>"},
    )),
    # SmolLM3 uses the Llama 3 vocabulary with ChatML turn markers.
    "smollm3-standin": ("llama-bpe", (("<|im_start|>", "<|im_end|>"), ("<think>", "</think>"), {"eos_token": "<|im_end|>"})),
    # Gemma 2 and 3 share the Gemma 4 vocabulary's pieces; their turn markers are named differently.
    "gemma3-standin": ("gemma-4", (("<start_of_turn>", "<end_of_turn>"), (), {})),
}


def _gguf_tokenizer(name: str):
    from transformers import AutoTokenizer

    models = llama_cpp_models()
    # transformers reads a model config from the GGUF to pick the tokenizer class, and its
    # reader rejects Gemma 4's per-layer key/value head counts: name the class instead.
    tokenizer_type = {"gemma-4": "gemma"}.get(name)
    return AutoTokenizer.from_pretrained(models, gguf_file=f"ggml-vocab-{name}.gguf", tokenizer_type=tokenizer_type)


def _mistral_v3_tokenizer():
    from transformers import LlamaTokenizer

    with tempfile.TemporaryDirectory() as folder:
        shutil.copy(mistral_common_file("mistral_instruct_tokenizer_240323.model.v3"), Path(folder) / "tokenizer.model")
        return LlamaTokenizer.from_pretrained(folder)


def _mistral_nemo_tokenizer():
    from transformers.integrations.mistral import convert_tekken_tokenizer

    return convert_tekken_tokenizer(str(mistral_common_file("tekken_240718.json")))


def tokenizer_folder(name: str) -> Path:
    """A tokenizer saved by transformers (tokenizer.json), ready for `AutoTokenizer.from_pretrained`.

    Names: the GGUF vocabularies (GGUF_VOCABULARIES), ``mistral-v3``, ``mistral-nemo`` and the STANDINS.
    Keyed by the transformers version too: a conversion is only as good as the converter.
    """

    def build(into: Path) -> None:
        if name in STANDINS:
            from transformers import AutoTokenizer

            base, (special, plain, roles) = STANDINS[name]
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder(base))
            tokenizer.add_special_tokens({"additional_special_tokens": list(special)})
            tokenizer.add_tokens(list(plain))
            for role, token in roles.items():
                setattr(tokenizer, role, token)
        elif name in GGUF_VOCABULARIES:
            tokenizer = _gguf_tokenizer(name)
        elif name == "mistral-v3":
            tokenizer = _mistral_v3_tokenizer()
        elif name == "mistral-nemo":
            tokenizer = _mistral_nemo_tokenizer()
        else:
            raise KeyError(f"no tokenizer named {name!r}")
        tokenizer.chat_template = None  # the tests always name the template they render with
        tokenizer.save_pretrained(into)
        for template in into.glob("chat_template*"):
            template.unlink()

    return cached(f"tokenizers-transformers-{transformers.__version__}/{name}", build)
