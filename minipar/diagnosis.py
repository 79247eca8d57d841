"""From a parity failure's pattern to its likely cause, in one line.

parity.check knows every quantity that diverged on every rank. Which ones, and how,
points at the mistake far better than "the first row that failed":

    the loss differs                  the forward is wrong (a cut, a forward collective, a mask)
    every gradient is k x serial      a sum where a mean belongs (k = dp, M, or tp)
    backward order                    a wrong gradient flows from where it is made toward the
                                      embedding; the differing gradient NEAREST THE LOSS sits
                                      next to the mistake, e.g. ln_2's grad wrong while mlp.fc's
                                      agrees: what carries dL/dx from fc back to ln_2 (Megatron's
                                      f, whose backward all-reduces over tp) lost its sum
    gradients agree, ||g|| does not   the clipping norm is reduced over the wrong ranks
    gradients agree, the update not   the optimizer step, its bias-correction t, or the
                                      all-gather of the updated shards (ZeRO)

`likely_cause` only names the suspect; the evidence (which quantity, rank, error)
is printed next to it, so a wrong guess still leaves the facts on the page.
"""
import math
import re

# where a parameter sits in the forward pass: backward visits them in the reverse order
_BLOCK = re.compile(r"blocks\.(\d+)\.(ln_1|attn\.c_attn|attn\.c_proj|ln_2|mlp\.fc|mlp\.proj)\.")
_IN_BLOCK = ["ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.fc", "mlp.proj"]
_CONSUMER = {"ln_1": "attn.c_attn", "ln_2": "mlp.fc"}        # the column-parallel layer each LN feeds
_ROW_PARALLEL = ("attn.c_proj", "mlp.proj")                   # outputs summed by g over tp
_LINEAR = ("attn.c_attn", "attn.c_proj", "mlp.fc", "mlp.proj", "lm_head")


def depth(name):
    """Forward position of a parameter: wte, wpe < blocks.0.ln_1 < ... < ln_f < lm_head."""
    hit = _BLOCK.match(name)
    if hit:
        return (1 + int(hit.group(1)), _IN_BLOCK.index(hit.group(2)))
    return {"ln_f": (10 ** 6, 0), "lm_head": (10 ** 6, 1)}.get(name.split(".")[0], (0, 0))


def _layer(name):
    """'blocks.1.mlp.fc.weight' -> ('blocks.1', 'mlp.fc'); others -> (None, first part)."""
    hit = _BLOCK.match(name)
    return (f"blocks.{hit.group(1)}", hit.group(2)) if hit else (None, name.split(".")[0])


def _replicated(name):
    """Parameters every tp rank holds whole: LayerNorms, wpe, row-parallel biases."""
    _, layer = _layer(name)
    return layer in ("ln_1", "ln_2", "ln_f", "wpe") or (layer in _ROW_PARALLEL and name.endswith(".bias"))


def _factor(scales):
    """The common integer factor k of every scale, or None."""
    ks = [s for s in scales if s is not None and math.isfinite(s)]
    if not ks or len(ks) < len(scales):
        return None
    k = round(ks[0])
    if k < 2 or any(abs(s - k) > 1e-6 * k for s in ks):
        return None
    return k


def _sum_not_mean(k, layout):
    if layout is None:
        return f"every differing gradient is {k}x the serial one: a sum where a mean belongs"
    why = []
    if k == layout.dp:
        why.append(f"summed over the dp={k} ranks instead of averaged (op='sum' where 'avg' belongs)")
    if k == layout.micro_batches:
        why.append(f"the loss of each of the M={k} micro-batches not divided by M")
    if k == layout.tp:
        why.append(f"an extra all-reduce (sum) over the tp={k} ranks of an already replicated gradient")
    return (f"every differing gradient is {k}x the serial one: " + (" or ".join(why) if why
            else "a sum where a mean belongs"))


def likely_cause(bad, n_rows, layout=None, group_size=1, all_names=()):
    """One phrase naming the likely mistake behind the failing rows.

    bad: [(rank, quantity, name, err, scale)] over every rank (scale = <got, want>/<want, want>,
    the factor a wrongly scaled gradient carries, or None); n_rows: {quantity: rows per rank}."""
    tp = layout.tp if layout is not None else 1
    sp = layout is not None and layout.sequence_parallel
    by_qty = {}
    for rank, qty, name, err, scale in bad:
        by_qty.setdefault(qty, []).append((rank, name, err, scale))
    if "loss" in by_qty:
        if not all(math.isfinite(r[2]) for r in by_qty["loss"]):
            return ("the loss is not finite where the serial one is: an overflow, e.g. exp() of logits "
                    "without the (global, over tp) max subtracted first")
        return _forward_cause(layout)
    grads = by_qty.get("grad", [])
    if not grads:
        if "grad_norm" in by_qty:
            scale = by_qty["grad_norm"][0][3]
            direction = ("too small: it misses other ranks' squares" if scale is not None and scale < 1
                         else "too large: a replica counted more than once (norm_owner)")
            return ("every gradient agrees but the global gradient norm does not (" + direction + "): the "
                    "clipping norm must sum each serial entry once over every rank holding distinct "
                    "gradients (ZeRO: all of dp; TP/PP: the model-parallel ranks)")
        if any(q in by_qty for q in ("param", "m", "v")):
            return ("every gradient agrees but the update does not: the optimizer step (Adam's step t, "
                    "bias correction, lr, weight decay) or, under ZeRO, the all-gather of the updated "
                    "shards")
        return "a quantity differs"
    k = _factor([r[3] for r in grads])
    if k is not None:
        return _sum_not_mean(k, layout)
    names = {r[1] for r in grads}
    ranks = sorted({r[0] for r in grads})
    near = nearest(names)
    block, layer = _layer(near)
    consumer = _consumer(block, layer, all_names)
    # the layer after it agrees (a tied head also embeds, so its grad differs anyway)
    consumer_ok = consumer is not None and (consumer == "wte" or
                                            not any(n.startswith(consumer + ".") for n in names))
    if names == {"wte.weight"} and layout is not None and layout.pp > 1:
        return ("only the tied embedding's gradient differs: the first and last stage each hold part of "
                "dL/dwte and must sum them (all-reduce over the embed group)")
    if tp > 1 and sp and all(_replicated(n) for n in names):
        return ("only replicated weights' gradients differ (LayerNorm, wpe, row-parallel biases): under "
                "sequence parallelism each tp rank holds a partial sum over its T/tp chunk; they must be "
                "all-reduced over tp")
    if tp > 1 and consumer_ok:
        what = ("sequence parallelism's gather before it does not reduce-scatter dL/dx in backward" if sp
                else "f's backward does not all-reduce dL/dx over tp")
        after = ("the tied head wte" if consumer == "wte" else consumer)
        return (f"{what}: grad of {near}, whose output reaches {after} through f, is the differing "
                f"gradient nearest the loss" + ("" if consumer == "wte" else f", while {consumer}'s agree"))
    if tp > 1 and layer in _ROW_PARALLEL and name_scale(grads, near) == tp:
        return (f"g's backward is not the identity: grad of {near} is {tp}x the serial one (an extra "
                f"all-reduce over tp)")
    if (layout is not None and layout.pp > 1 and layout.schedule == "zb-h1"
            and all(_layer(n)[1] in _LINEAR for n in names)):
        return ("only weight gradients of Linear layers differ (dW, db: what ZB-H1's deferred W steps "
                "compute), so B was right: a W step skipped, or one reading a received gradient that a "
                "later receive overwrote (a receive buffer reused across micro-batches)")
    if len(ranks) < group_size and (layout is None or layout.pp == 1):
        return (f"gradients differ on ranks {ranks} only (of {group_size}): what those ranks receive or "
                f"reduce, nearest the loss at {near}")
    return (f"the differing gradient nearest the loss is {near}: the mistake is in the backward of "
            f"the layer after it or in how its gradient is reduced")


def nearest(names):
    """The parameter nearest the loss (the last in forward order) among `names`."""
    return max(sorted(names), key=depth)


def _consumer(block, layer, all_names):
    """The column-parallel layer a LayerNorm's output feeds (through f under TP), or None."""
    if layer == "ln_f":
        return "lm_head" if "lm_head.weight" in all_names else "wte"
    return f"{block}.{_CONSUMER[layer]}" if layer in _CONSUMER else None


def name_scale(grads, name):
    """The scale of `name`'s gradient rows if they agree on an integer, else None."""
    return _factor([r[3] for r in grads if r[1] == name])


def _forward_cause(layout):
    """The loss differs: the forward pass is wrong. Where to look, by layout."""
    where = []
    if layout is not None and layout.tp > 1:
        where.append("TP: g's forward all-reduce, c_attn cut into whole heads, per-head dropout keys, "
                     "the vocab-parallel loss")
    if layout is not None and layout.pp > 1:
        where.append("PP: the activation a stage received (micro-batch, tag, buffer) or the layer split")
    if layout is not None and layout.zero == 3:
        where.append("ZeRO-3: a unit's parameters gathered before its forward")
    if layout is not None and layout.dp > 1:
        where.append("DP: each rank's slice of the global batch, or parameters that drifted apart")
    return "the loss differs, so the forward pass does" + (" (" + "; ".join(where) + ")" if where else "")
