"""The two checkpoints the stack serves, and their remote keys. Run in the *project* environment, in a subprocess
(``python -m ndif_stack.models prepare MODELS_DIR``), so the caller's process keeps its RNG and imports untouched.

* the embedded model: ``nslens.synthetic.build_embedded_model()`` (trained once, cached under ``NSLENS_HOME``);
* a random Llama (seeded, 2 layers, d_model 64, grouped-query attention) that this module writes itself with
  ``save_pretrained``, with the embedded model's tokenizer.

A model's id is its checkpoint directory (an absolute path): ``TransformersModel(id, ...)`` loads it locally, and
the same string, in the remote key, is what the server loads. Prints one JSON line: ``[{"id", "model_key",
"size_bytes"}, ...]`` (the embedded model first), also to OUT_JSON when given.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

TASK = "text-generation"
# Bump the version when the architecture or seed changes: the directory name is the model's id.
RANDOM_LLAMA = {
    "name": "tiny-random-llama-v1",
    "seed": 1234,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}


def embedded_checkpoint() -> Path:
    override = os.environ.get("NSLENS_NDIF_EMBEDDED")  # an already built checkpoint directory
    if override:
        return Path(override).resolve()
    try:
        from nslens.synthetic import build_embedded_model
    except ImportError:  # moved to nslens.embedded
        from nslens.embedded import build_embedded_model
    return Path(build_embedded_model()).resolve()


def random_llama_checkpoint(models_dir: Path, tokenizer_dir: Path) -> Path:
    """Write the random Llama (once; a file lock serialises concurrent writers, the directory appears whole)."""
    out = (models_dir / RANDOM_LLAMA["name"]).resolve()
    if (out / "config.json").exists():
        return out
    from nslens.files import file_lock

    with file_lock(models_dir / f".{RANDOM_LLAMA['name']}.lock"):
        if (out / "config.json").exists():
            return out
        import torch
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        spec = {k: v for k, v in RANDOM_LLAMA.items() if k not in ("name", "seed")}
        cfg = LlamaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, tie_word_embeddings=False, **spec)
        torch.manual_seed(RANDOM_LLAMA["seed"])
        model = LlamaForCausalLM(cfg).eval()
        tmp = Path(tempfile.mkdtemp(prefix=f".{RANDOM_LLAMA['name']}-", dir=models_dir))
        try:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out


def model_key(model_id: str) -> str:
    """The remote key nnsight's client sends for ``TransformersModel(model_id, task=TASK)`` (computed by nnsight
    itself, with its repo-id cache seeded so it does not ask the Hub)."""
    import nnsight.modeling.huggingface as hf
    from nnsight.modeling.transformers import TransformersModel
    from transformers import AutoTokenizer

    hf._ID_CACHE.setdefault(model_id, model_id)
    tok = AutoTokenizer.from_pretrained(model_id)
    return TransformersModel(model_id, tokenizer=tok, task=TASK).to_model_key()


def checkpoint_bytes(path: Path) -> int:
    """The weights' size as stored (the checkpoints are float32 and are served as float32)."""
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def prepare(models_dir: Path, which: str = "all") -> list[dict]:
    embedded = embedded_checkpoint()
    llama = random_llama_checkpoint(models_dir, embedded)
    chosen = (embedded, llama) if which == "all" else (llama,)
    return [{"id": str(p), "model_key": model_key(str(p)), "size_bytes": checkpoint_bytes(p)} for p in chosen]


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3, 4) or argv[0] != "prepare" or (argv[2:] or ["all"])[0] not in ("all", "llama"):
        print("usage: python -m ndif_stack.models prepare MODELS_DIR [all|llama [OUT_JSON]]", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = json.dumps(prepare(Path(argv[1]), (argv[2:] or ["all"])[0]))
    if len(argv) == 4:
        tmp = Path(argv[3] + ".tmp")
        tmp.write_text(result)
        os.replace(tmp, argv[3])
    print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
