"""What swapping attention does to a pretrained model, in plaintext (the exact JAX SPU runs).

    secptune bench swap [--policies aby3,aby3-rfa] [--hybrids 15,20,25] [--n 192] [--features 32]

For SmolLM2-135M and each attention configuration (softmax; RFA in every layer; hybrids that keep
softmax in the first K layers), on ``--n`` MR test snippets with the task's template:

* zero-shot accuracy (argmax of the verbalizer logits, and thresholded at the median score:
  a calibrated reading), and the correlation of the per-example score
  logit(" positive") - logit(" negative") with the softmax model's;
* teacher-forced attention-output error per layer: each layer's attention input is taken from
  the softmax model and run through the swapped attention; reported as the mean over layers of
  ||out - out_softmax|| / ||out_softmax||;
* greedy continuation of "The capital of France is".
Tuned accuracy is ``secptune bench accuracy --policy <policy>``.
"""
from __future__ import annotations

import argparse
import dataclasses

import numpy as np

from bench.common import RESULTS, markdown_table, save


def attention_errors(bundle, rfa_config, batch_embeds, mask) -> list[float]:
    """Per layer: relative error of the swapped attention on the softmax model's own inputs."""
    from spu_models import llama

    soft_cfg = dataclasses.replace(bundle.config, attention="softmax")
    model = llama.LlamaForCausalLM(soft_cfg)
    _, inter = model.apply({"params": bundle.params}, inputs_embeds=batch_embeds, attention_mask=mask,
                           method=model.hidden, capture_intermediates=True, mutable=["intermediates"])
    layers = inter["intermediates"]["model"]["layers"]
    cos, sin, m4 = llama.layer_inputs(soft_cfg, mask)
    real = np.asarray(mask, bool)
    errs = []
    for i in range(soft_cfg.num_hidden_layers):
        x = layers[str(i)]["input_layernorm"]["__call__"][0]
        want = layers[str(i)]["self_attn"]["__call__"][0][0]
        p = {"params": bundle.params["model"]["layers"][str(i)]["self_attn"]}
        got, _ = llama.Attention(rfa_config, i).apply(p, x, cos, sin, m4)
        d = np.linalg.norm(np.asarray(got - want)[real], axis=-1)
        n = np.linalg.norm(np.asarray(want)[real], axis=-1)
        errs.append(float(np.mean(d / np.maximum(n, 1e-6))))
    return errs


def main(argv=None):
    ap = argparse.ArgumentParser(prog="secptune bench swap")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--policy", default="aby3-rfa", help="the RFA policy whose attention settings are swapped in")
    ap.add_argument("--hybrids", default="10,20", help="K: hybrids keeping softmax in layers 0..K-1")
    ap.add_argument("--features", default="", help="comma list: also try these feature counts (all layers)")
    ap.add_argument("--n", type=int, default=192)
    ap.add_argument("--task", default="mr")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from spu_models import llama
    from tuning.encode import make_batch
    from tuning.generate import greedy
    from tuning.models import load_model
    from tuning.policy import load_policy
    from tuning.tasks import load_task

    base = load_model(args.model)
    pol = load_policy(args.policy)
    task = load_task(args.task)
    rng = np.random.default_rng(0)
    test = [task.test[i] for i in rng.permutation(len(task.test))[: args.n]]
    words = [task.verbalizer[l] for l in task.labels]
    labels = np.array([task.labels.index(l) for _, l in test])
    batch = make_batch(base, [task.prompt(t) for t, _ in test], words)
    L = batch["select"].shape[1]
    sel = np.asarray(batch["select"])
    mask = jnp.asarray(np.flip(np.cumsum(np.flip(sel, -1), -1), -1))  # 1 up to each last real token

    configs = [("softmax", dataclasses.replace(base.config, attention="softmax"))]
    rfa = dataclasses.replace(base.config, attention="rfa", rfa=pol.rfa, softmax_layers=())
    configs.append((f"RFA {pol.rfa.kind} m={pol.rfa.features}, all layers", rfa))
    for m in [int(x) for x in args.features.split(",") if x]:
        configs.append((f"RFA {pol.rfa.kind} m={m}, all layers",
                        dataclasses.replace(rfa, rfa=dataclasses.replace(pol.rfa, features=m))))
    for K in [int(x) for x in args.hybrids.split(",") if x]:
        configs.append((f"RFA {pol.rfa.kind} m={pol.rfa.features}, softmax in layers 0-{K - 1}",
                        dataclasses.replace(rfa, softmax_layers=tuple(range(K)))))

    rows, scores = [], {}
    for name, cfg in configs:
        model = llama.LlamaForCausalLM(cfg)

        @jax.jit
        def logits(params, embeds, mask, select, rows_):
            h = model.apply({"params": params}, inputs_embeds=embeds, attention_mask=mask, method=model.hidden)
            return model.apply({"params": params}, jnp.einsum("bl,blh->bh", select, h), rows_,
                               method=model.head_select)
        out = []
        for i in range(0, args.n, 32):
            sl = slice(i, i + 32)
            out.append(np.asarray(logits(base.params, jnp.asarray(batch["embeds"][sl]), mask[sl],
                                         jnp.asarray(batch["select"][sl]), jnp.asarray(batch["rows"]))))
        lg = np.concatenate(out)
        s = lg[:, 0] - lg[:, 1]  # positive - negative (labels order: positive, negative)
        scores[name] = s
        acc = float((lg.argmax(-1) == labels).mean())
        pred_m = np.where(s > np.median(s), 0, 1)
        accm = float((pred_m == labels).mean())
        errs = attention_errors(dataclasses.replace(base, config=cfg), cfg, jnp.asarray(batch["embeds"]), mask) \
            if cfg.attention == "rfa" else [0.0] * cfg.num_hidden_layers
        rfa_layers = [i for i in range(cfg.num_hidden_layers) if cfg.layer_attention(i) == "rfa"]
        g = greedy(dataclasses.replace(base, config=cfg), "The capital of France is", 4)
        rows.append({"attention": name, "RFA layers": len(rfa_layers), "zero-shot acc": round(acc, 3),
                     "acc (median threshold)": round(accm, 3),
                     "corr with softmax": round(float(np.corrcoef(s, scores["softmax"])[0, 1]), 3),
                     "attn rel err (RFA layers, mean)": round(float(np.mean([errs[i] for i in rfa_layers])), 3)
                     if rfa_layers else 0.0,
                     "greedy 'The capital of France is'": repr(g)})
        print(rows[-1], flush=True)
    table = markdown_table(rows, list(rows[0]))
    table += (f"\n{args.model}, plaintext float32 (the programs SPU runs), {args.n} {args.task} test snippets, "
              f"{L} tokens padded; template {task.template!r}. Attention error: teacher-forced (each layer's "
              "input from the softmax model), relative L2 per token, mean over the RFA layers.\n")
    save(f"swap_{args.task}_{pol.name}", {"rows": rows, "args": vars(args)}, table, args.out)
