"""Routing statistics of a run: tokens per expert per step, the aux loss, dropped slots, and
the all-to-all traffic of each step from the ledger next to the formula of its routing counts.

Every MoE layer logs each training forward (moe.py `log`); the engine drains the logs after
each step into one record per step (`step_record`), and `summarize_experts` turns the
records of every rank into the report's "experts" entry (collective over the world).

Formula (dispatch.py): one MoE layer and micro-batch sends, from a rank, the rows it
dispatches to other ep ranks and the rows it returns to them, and the same again in
backward:  bytes = 2 * (sent_rows + received_rows) * C * itemsize.
"""
import numpy as np

from minipar.moe import MoE


def drain(blocks):
    """{block index: that layer's statistics summed over the forwards since the last drain}."""
    out = {}
    for b in blocks:
        if not isinstance(b.mlp, MoE):
            continue
        log, b.mlp.log = b.mlp.log, []
        if log:
            out[b.index] = {"tokens": np.sum([s["tokens"] for s in log], axis=0).tolist(),
                            "dropped": int(sum(s["dropped"] for s in log)),
                            "aux": float(np.mean([s["aux"] for s in log])),
                            "sent_rows": int(sum(s["sent_rows"] for s in log)),
                            "received_rows": int(sum(s["received_rows"] for s in log))}
    return out


def all_to_all_formula(layers, row_bytes):
    """all_to_all_v bytes one rank sends in a step, from its routing counts."""
    return sum(2 * (s["sent_rows"] + s["received_rows"]) * row_bytes for s in layers.values())


def step_record(blocks, window, row_bytes):
    """One step: the drained layer statistics, the ledger's all_to_all_v bytes in `window`
    (the comm calls of the step) and the formula's."""
    layers = drain(blocks)
    return {"layers": layers, "ledger_bytes": window.total_bytes(op="all_to_all_v"),
            "formula_bytes": all_to_all_formula(layers, row_bytes)}


def summarize_experts(engine, world):
    """The report's "experts" entry (collective over the world: every rank must call it).
    aux: the global value alpha E sum_i f_i P_i, i.e. the dp mean of each rank's local term."""
    cfg, records = engine.cfg, engine.expert_log
    layer_ids = sorted(records[0]["layers"]) if records else []
    aux = np.array([[r["layers"][i]["aux"] for i in layer_ids] for r in records])   # (steps, layers)
    if engine.metrics_group is not None and engine.metrics_group.size > 1 and aux.size:
        # all-reduce (avg) over dp (metrics ledger): each layer's local aux term of every step
        aux = engine.metrics_group.all_reduce(aux, op="avg")
    mine = {i: {"tokens_per_expert": [r["layers"][i]["tokens"] for r in records],
                "dropped": [r["layers"][i]["dropped"] for r in records],
                "aux_loss": aux[:, j].tolist()} for j, i in enumerate(layer_ids)}
    traffic = {"ledger_bytes_per_step": [r["ledger_bytes"] for r in records],
               "formula_bytes_per_step": [r["formula_bytes"] for r in records]}
    ranks = world.allgather_object((mine, traffic)) if world.size > 1 else [(mine, traffic)]
    layers = {}
    for held, _ in ranks:                        # a layer's statistics are global: any holder's
        for i, s in held.items():
            layers.setdefault(str(i), s)
    per_rank = [t for _, t in ranks]
    return {"experts": cfg.experts, "top_k": cfg.top_k, "moe_every": cfg.moe_every,
            "aux_loss_coef": cfg.aux_loss_coef, "capacity_factor": cfg.capacity_factor,
            "ep": engine.layout.ep, "layers": dict(sorted(layers.items(), key=lambda kv: int(kv[0]))),
            "all_to_all_v": per_rank,
            "traffic_matches_formula": all(t["ledger_bytes_per_step"] == t["formula_bytes_per_step"]
                                           for t in per_rank)}


def format_experts(s, tokens_per_step):
    """A few summary lines: the last step's load per expert, aux loss and drops, and traffic."""
    out = [f"experts: E={s['experts']} top-{s['top_k']} every {s['moe_every']} MLP(s), ep={s['ep']}, "
           f"aux coef {s['aux_loss_coef']}, capacity factor {s['capacity_factor'] or 'none (dropless)'}; "
           f"last step, per MoE layer (ideal load N k / E = {tokens_per_step * s['top_k'] / s['experts']:.1f}):"]
    for i, layer in s["layers"].items():
        out.append(f"  layer {i}: tokens per expert {layer['tokens_per_expert'][-1]}  "
                   f"aux {layer['aux_loss'][-1]:.5f}  dropped {layer['dropped'][-1]}")
    step = [t["ledger_bytes_per_step"][-1] if t["ledger_bytes_per_step"] else 0 for t in s["all_to_all_v"]]
    formula = [t["formula_bytes_per_step"][-1] if t["formula_bytes_per_step"] else 0 for t in s["all_to_all_v"]]
    out.append(f"  all-to-all-v bytes per rank, last step: ledger {step} vs formula {formula}: "
               f"{'equal on every step' if s['traffic_matches_formula'] else 'MISMATCH'}")
    return out
