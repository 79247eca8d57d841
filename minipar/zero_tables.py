"""The ZeRO paper's model-state tables, computed (figure 1's rows, Table 1) and rounded as printed.

Rajbhandari et al. 2020: figure 1 gives the per-GPU bytes of DP and ZeRO 1/2/3 for
Φ = 7.5e9 on 64 GPUs; Table 1 the per-device GB of P_os, P_os+g, P_os+g+p for
7.5B, 128B and 1T parameters at 1 to 1024 data-parallel GPUs. Both come from
formulas.model_state_bytes_formula; the rounding here reproduces the printed digits.
"""
from decimal import ROUND_FLOOR, ROUND_HALF_UP, Decimal

from minipar.formulas import bytes_per_param, gb, model_state_breakdown, model_state_bytes_formula

STAGES = (("DP (no ZeRO)", 0), ("ZeRO-1  P_os", 1), ("ZeRO-2  P_os+g", 2), ("ZeRO-3  P_os+g+p", 3))

# ZeRO paper (Rajbhandari et al. 2020), Table 1: per-device memory (GB) of
# P_os, P_os+g, P_os+g+p, mixed precision with Adam (K = 12), as printed.
TABLE1_MODELS = (("7.5B", 7.5e9), ("128B", 128e9), ("1T", 1e12))
TABLE1_DP = (1, 4, 16, 64, 256, 1024)
PUBLISHED_TABLE1 = {
    "7.5B": {1: ("120", "120", "120"), 4: ("52.5", "41.3", "30"), 16: ("35.6", "21.6", "7.5"),
             64: ("31.4", "16.6", "1.88"), 256: ("30.4", "15.4", "0.47"), 1024: ("30.1", "15.1", "0.12")},
    "128B": {1: ("2048", "2048", "2048"), 4: ("896", "704", "512"), 16: ("608", "368", "128"),
             64: ("536", "284", "32"), 256: ("518", "263", "8"), 1024: ("513", "257", "2")},
    "1T": {1: ("16000", "16000", "16000"), 4: ("7000", "5500", "4000"), 16: ("4750", "2875", "1000"),
           64: ("4187", "2218", "250"), 256: ("4046", "2054", "62.5"), 1024: ("4011", "2013", "15.6")},
}


def figure1_round(value):
    """One decimal, half up, no trailing '.0' (ZeRO figure 1: 120, 31.4, 16.6, 1.9)."""
    return _strip(Decimal(value).quantize(Decimal("0.1"), rounding=ROUND_HALF_UP))


def table1_round(value):
    """How ZeRO's Table 1 prints GB: from 100 up the fraction is dropped
    (4187.5 -> 4187), from 10 one decimal, below two, half up, no trailing zeros."""
    value = Decimal(value)
    if value >= 100:
        return _strip(value.quantize(Decimal("1"), rounding=ROUND_FLOOR))
    step = Decimal("0.1") if value >= 10 else Decimal("0.01")
    return _strip(value.quantize(step, rounding=ROUND_HALF_UP))


def _strip(d):
    text = f"{d:f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def table1():
    """Table 1 computed from the formulas: {model: {N: (P_os, P_os+g, P_os+g+p) strings}}."""
    return {name: {n: tuple(table1_round(gb(model_state_bytes_formula(phi, n, stage)))
                            for stage in (1, 2, 3))
                   for n in TABLE1_DP}
            for name, phi in TABLE1_MODELS}


def _formula(precision, stage, cats):
    """'4Φ + 12Φ/N' style text for the summed categories `cats`."""
    sizes = bytes_per_param(precision)
    shard = model_state_breakdown(1, 2, stage, precision)      # Φ=1, N=2: sharded parts are halved
    full = sum(sizes[c] for c in cats if shard[c] == sizes[c])
    part = sum(sizes[c] for c in cats if shard[c] != sizes[c])
    terms = ([f"{full}Φ"] if full else []) + ([f"{part}Φ/N"] if part else [])
    return " + ".join(terms) or "0"


def print_zero_table(phi, n, precision, offload, model_parallel=1):
    """One row per ZeRO stage: the formula and GB per GPU (device and host with
    --offload, where the optimizer part master + m + v lives on the host)."""
    sizes = bytes_per_param(precision)
    k = sizes["master"] + sizes["optim_m"] + sizes["optim_v"]
    split = f" / {model_parallel} model-parallel ranks" if model_parallel > 1 else ""
    print("Model-state memory per GPU (ZeRO, Rajbhandari et al. 2020)")
    print(f"  Φ = {phi:.4g} parameters{split}, N = {n} data-parallel GPUs, "
          f"precision {precision} (K = {k}), 1 GB = 1e9 bytes")
    phi = phi / model_parallel
    on_device, optimizer = ("param", "grad"), ("master", "optim_m", "optim_v")
    if offload:
        print(f"  {'strategy':<18}{'device formula':<16}{'device GB':>10}   {'host formula':<14}{'host GB':>8}")
    else:
        print(f"  {'strategy':<18}{'formula':<16}{'GB/GPU':>8}")
    for label, stage in STAGES:
        if offload:
            device, host = model_state_bytes_formula(phi, n, stage, precision, offload=True)
            print(f"  {label:<18}{_formula(precision, stage, on_device):<16}{figure1_round(gb(device)):>10}"
                  f"   {_formula(precision, stage, optimizer):<14}{figure1_round(gb(host)):>8}")
        else:
            total = model_state_bytes_formula(phi, n, stage, precision)
            print(f"  {label:<18}{_formula(precision, stage, on_device + optimizer):<16}"
                  f"{figure1_round(gb(total)):>8}")


def print_table1():
    print("ZeRO paper Table 1: per-device model-state memory (GB), mixed precision, Adam (K = 12)")
    print((f"  {'':>5}" + "".join(f"   {name + ' model':<23}" for name, _ in TABLE1_MODELS)).rstrip())
    print(f"  {'DP':>5}" + "   P_os    P_os+g  P_os+g+p" * len(TABLE1_MODELS))
    computed = table1()
    for n in TABLE1_DP:
        cells = "".join(f"   {a:<8}{b:<8}{c:<7}" for a, b, c in (computed[m][n] for m, _ in TABLE1_MODELS))
        print(f"  {n:>5}{cells}".rstrip())
