"""What swapping attention does to a pretrained model, in plaintext (the exact JAX SPU runs).

    secptune bench swap [--policy aby3-rfa] [--hybrids 10,20] [--n 192] [--features 32]
                        [--converted DIR] [--converted-hybrids 2,4]

For SmolLM2-135M and each attention configuration (softmax; RFA in every layer; hybrids that keep
softmax in the first K layers; the model converted by ``secptune convert-attention`` with learned
feature maps in every layer, and hybrids keeping softmax in the K layers whose fit was worst on
the conversion's own validation text), on ``--n`` MR test snippets with the task's template:

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

from bench.common import RESULTS, markdown_table, save, tag_suffix


def attention_errors(bundle, execution, batch_embeds, mask) -> list[float]:
    """Per layer: relative error of the swapped attention (``execution``) on the softmax model's own inputs."""
    from spu_models import llama

    soft_cfg = bundle.config
    model = llama.LlamaForCausalLM(soft_cfg)  # softmax: the default execution
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
        got, _ = llama.Attention(bundle.config, execution, i).apply(p, x, cos, sin, m4)
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
    ap.add_argument("--converted", default="auto",
                    help="a convert-attention output (auto: $SECPTUNE_HOME/models/MODEL-rfa if present; none)")
    ap.add_argument("--converted-hybrids", default="2,4,8",
                    help="K: converted model keeping softmax in the K worst-fitted layers")
    ap.add_argument("--n", type=int, default=192)
    ap.add_argument("--tag", default="", type=tag_suffix, help="suffix of the result files")
    ap.add_argument("--task", default="mr")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from spu_models import llama
    from spu_models.config import Execution
    from tuning.data_owner.encode import make_batch
    from tuning.model_owner.generate import greedy
    from tuning.model_owner.models import load_model
    from tuning.data_owner.tasks import load_task
    from tuning.policy import load_policy

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

    prfa = pol.execution.rfa
    configs = [("softmax", Execution(), base)]
    rfa = Execution(attention="rfa", rfa=prfa)
    configs.append((f"RFA {prfa.kind} m={prfa.features}, all layers", rfa, base))
    for m in [int(x) for x in args.features.split(",") if x]:
        configs.append((f"RFA {prfa.kind} m={m}, all layers",
                        dataclasses.replace(rfa, rfa=dataclasses.replace(prfa, features=m)), base))
    for K in [int(x) for x in args.hybrids.split(",") if x]:
        configs.append((f"RFA {prfa.kind} m={prfa.features}, softmax in layers 0-{K - 1}",
                        dataclasses.replace(rfa, softmax_layers=tuple(range(K))), base))
    configs += converted_configs(args)

    rows, scores = [], {}
    for name, ex, bundle in configs:
        cfg = bundle.config
        model = llama.LlamaForCausalLM(cfg, ex)

        @jax.jit
        def logits(params, embeds, mask, select, rows_):
            h = model.apply({"params": params}, inputs_embeds=embeds, attention_mask=mask, method=model.hidden)
            return model.apply({"params": params}, jnp.einsum("bl,blh->bh", select, h), rows_,
                               method=model.head_select)
        out = []
        for i in range(0, args.n, 32):
            sl = slice(i, i + 32)
            out.append(np.asarray(logits(bundle.params, jnp.asarray(batch["embeds"][sl]), mask[sl],
                                         jnp.asarray(batch["select"][sl]), jnp.asarray(batch["rows"]))))
        lg = np.concatenate(out)
        s = lg[:, 0] - lg[:, 1]  # positive - negative (labels order: positive, negative)
        scores[name] = s
        acc = float((lg.argmax(-1) == labels).mean())
        pred_m = np.where(s > np.median(s), 0, 1)
        accm = float((pred_m == labels).mean())
        errs = attention_errors(bundle, ex, jnp.asarray(batch["embeds"]), mask) \
            if ex.attention == "rfa" else [0.0] * cfg.num_hidden_layers
        rfa_layers = [i for i in range(cfg.num_hidden_layers) if ex.layer_attention(i) == "rfa"]
        g = greedy(dataclasses.replace(bundle, execution=ex), "The capital of France is", 4)
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
    save(f"swap_{args.task}_{pol.name}{args.tag}", {"rows": rows, "args": vars(args)}, table, args.out)


def worst_layers(conversion: dict, k: int) -> tuple:
    """The k layers whose learned map fitted worst (validation output error on the conversion's
    own held-out corpus text: no evaluation data is used to choose them)."""
    order = sorted(conversion["layers"], key=lambda m: -m["val_rel_err"])
    return tuple(sorted(m["layer"] for m in order[:k]))


def converted_configs(args) -> list:
    import json
    from pathlib import Path

    from tuning.model_owner.models import load_model, model_dir, policy_execution
    from tuning.policy import load_policy

    if args.converted == "none":
        return []
    path = model_dir(Path(args.model).name + "-rfa") if args.converted == "auto" else Path(args.converted)
    if not (path / "conversion.json").exists():
        if args.converted != "auto":
            raise ValueError(f"{path}: not a convert-attention output (no conversion.json)")
        return []
    conv = load_model(str(path))
    report = json.loads((path / "conversion.json").read_text())
    ex = policy_execution(conv.config, load_policy("aby3-rfa-learned"))
    m = ex.rfa.features
    win = f", exact window {ex.rfa.window}" if ex.rfa.window else ""
    out = [(f"learned (converted) m={m}{win}, all layers", ex, conv)]
    for K in [int(x) for x in args.converted_hybrids.split(",") if x]:
        layers = worst_layers(report, K)
        out.append((f"learned m={m}{win}, softmax in {K} worst-fitted layers {list(layers)}",
                    dataclasses.replace(ex, softmax_layers=layers), conv))
    return out
