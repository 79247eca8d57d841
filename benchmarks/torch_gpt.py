# .venv-torch/bin/python benchmarks/torch_gpt.py   (a worker: bench_torch.py starts it and talks to it)
"""The bench GPT in PyTorch eager, as a worker process timed in turns against minipar.

Same architecture as minipar.nn.GPT: token + position embedding, n_layer pre-LN
blocks (LayerNorm, causal self-attention through torch's fused
scaled_dot_product_attention, LayerNorm, MLP with tanh GELU), final LayerNorm,
tied lm_head, mean cross-entropy over targets != -1, torch.optim.AdamW with
its defaults for this device, same betas/lr/eps. Same batches (minipar.data is
pure NumPy, so this process imports it too). One thread.

Protocol (JSON lines): the first line on stdin is the config
{"gpt": {...GPTConfig fields}, "batch": B, "lr": .., "betas": [..], "eps": ..};
then each line "step <n>" runs one training step and answers
{"cpu_s": .., "wall_s": .., "minflt": .., "loss": ..}; "rss" answers {"max_rss_mb": ..}; "attention B H T D"
times one forward + backward of the causal fused attention alone {"cpu_s": ..}; EOF ends it.
torch is never imported by minipar: only this optional worker needs it.
"""
import json
import pathlib
import resource
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))   # minipar.data (NumPy only)
from minipar.data import ReverseTask  # noqa: E402


class Block(torch.nn.Module):
    def __init__(self, c, n_head, dtype):
        super().__init__()
        self.n_head = n_head
        self.ln_1 = torch.nn.LayerNorm(c, dtype=dtype)
        self.c_attn = torch.nn.Linear(c, 3 * c, dtype=dtype)
        self.c_proj = torch.nn.Linear(c, c, dtype=dtype)
        self.ln_2 = torch.nn.LayerNorm(c, dtype=dtype)
        self.fc = torch.nn.Linear(c, 4 * c, dtype=dtype)
        self.proj = torch.nn.Linear(4 * c, c, dtype=dtype)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).view(B, T, 3, self.n_head, C // self.n_head).unbind(2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True)                     # (B, H, T, D)
        x = x + self.c_proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.proj(F.gelu(self.fc(self.ln_2(x)), approximate="tanh"))


class GPT(torch.nn.Module):
    def __init__(self, cfg, dtype):
        super().__init__()
        c = cfg["d_model"]
        self.wte = torch.nn.Embedding(cfg["vocab_size"], c, dtype=dtype)
        self.wpe = torch.nn.Embedding(cfg["seq_len"], c, dtype=dtype)
        self.blocks = torch.nn.ModuleList(Block(c, cfg["n_head"], dtype) for _ in range(cfg["n_layer"]))
        self.ln_f = torch.nn.LayerNorm(c, dtype=dtype)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        logits = self.ln_f(x) @ self.wte.weight.T                              # tied head (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)


def main():
    torch.set_num_threads(1)
    setup = json.loads(sys.stdin.readline())
    cfg = setup["gpt"]
    dtype = {"fp32": torch.float32, "fp64": torch.float64}[cfg["precision"]]
    torch.manual_seed(0)
    model = GPT(cfg, dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=setup["lr"], betas=tuple(setup["betas"]),
                            eps=setup["eps"], weight_decay=0.0)
    task = ReverseTask(n_digits=cfg["seq_len"] // 2)
    indices = list(range(setup["batch"]))
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "rss":
            reply = {"max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        elif cmd[0] == "attention":
            q, k, v = (torch.randn(*map(int, cmd[1:]), dtype=dtype, requires_grad=True) for _ in range(3))
            cpu = time.process_time()
            F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
            reply = {"cpu_s": time.process_time() - cpu}
        else:
            x, y = (torch.from_numpy(a) for a in task.batch(int(cmd[1]), indices))
            cpu, wall = time.process_time(), time.perf_counter()
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            opt.zero_grad(set_to_none=True)
            loss = model(x, y)
            loss.backward()
            opt.step()
            reply = {"cpu_s": time.process_time() - cpu, "wall_s": time.perf_counter() - wall,
                     "minflt": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults, "loss": loss.item()}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
