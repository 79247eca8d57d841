"""How big a model and a run are: Φ of a GPT or an MoE, and the bytes one rank of minipar.train needs.

Φ from a model shape (GPT, Megatron's count): 12·L·h² + (V + s)·h, i.e.
attention 4h² + MLP 8h² per layer plus token and position embeddings (the
output layer tied to the token embedding); biases and LayerNorm weights add
13·L·h + 2h. `run_bytes_per_rank` is minipar.train's check that a run fits this
machine (inputs.py), from the formulas of formulas.py.
"""
from minipar.formulas import activation_bytes_formula, model_state_bytes_formula

ACTIVATION_BYTES = {"mixed": 2, "fp32": 4, "fp64": 8}   # fp16 activations under mixed, as Megatron


def gpt_param_count(n_layers, hidden, vocab, seq_len, biases=False, tied_embeddings=True):
    """Φ of a GPT: 12·L·h² + (V + s)·h (+ 13·L·h + 2h with biases and LayerNorms,
    + V·h when the output layer is not tied to the token embedding)."""
    phi = 12 * n_layers * hidden ** 2 + (vocab + seq_len) * hidden
    if biases:
        phi += 13 * n_layers * hidden + 2 * hidden
    if not tied_embeddings:
        phi += vocab * hidden
    return phi


def moe_param_counts(phi, n_layers, hidden, experts, top_k, moe_every=1):
    """(total, active) Φ when every moe_every-th MLP (8h² each) becomes E experts and a router
    (h·E): total = Φ + M·((E-1)·8h² + hE), active per token = Φ + M·((k-1)·8h² + hE),
    M = L // moe_every MoE layers (biases left out, as in Φ)."""
    m = n_layers // moe_every
    router = hidden * experts
    return (phi + m * ((experts - 1) * 8 * hidden ** 2 + router),
            phi + m * ((top_k - 1) * 8 * hidden ** 2 + router))


def run_bytes_per_rank(cfg, layout, batch, eval_samples=0, check=False):
    """The least memory one rank of `minipar.train` needs, {part: bytes} and "total", from
    formulas.py: model states (ZeRO formula over dp for Φ/(tp·pp), Offload's host part
    included: the same machine), the saved activations of the micro-batches one pipeline
    stage keeps in flight (Korthikanti et al.: min(p, m) under 1F1B, m under GPipe), the
    logits of those micro-batches and of the evaluation batch, and the serial run that
    `--check` keeps beside it. `cfg` a GPTConfig, `layout` an engine Layout."""
    size = ACTIVATION_BYTES[cfg.precision]
    t, lay = layout.tp, layout
    phi = gpt_param_count(cfg.n_layer, cfg.d_model, cfg.vocab_size, cfg.seq_len, biases=True,
                          tied_embeddings=cfg.tied_embeddings)
    states = model_state_bytes_formula(phi / (t * lay.pp), lay.dp, lay.zero, cfg.precision, lay.offload)
    b = batch / (lay.dp * lay.micro_batches)                        # one micro-batch
    in_flight = lay.micro_batches if lay.schedule == "gpipe" else min(lay.pp, lay.micro_batches)
    masks = 1 if cfg.dropout else 0

    def activations(b, t, layers, sp):
        return activation_bytes_formula(cfg.seq_len, b, cfg.d_model, cfg.n_head, t, sp, size, masks) * layers

    parts = {"model states": sum(states) if lay.offload else states,
             "activations": activations(b, t, cfg.n_layer / lay.pp, lay.sequence_parallel) * in_flight,
             "logits": 2 * b * cfg.seq_len * cfg.vocab_size / t * size * in_flight,
             "evaluation": eval_samples * cfg.seq_len * (cfg.vocab_size + 4 * cfg.d_model) * size}
    if check:
        parts["--check serial run"] = (model_state_bytes_formula(phi, 1, 0, cfg.precision)
                                       + activations(batch, 1, cfg.n_layer, False)
                                       + 2 * batch * cfg.seq_len * cfg.vocab_size * size)
    parts["total"] = sum(parts.values())
    return parts
