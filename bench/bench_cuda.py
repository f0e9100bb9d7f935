"""The GPU decode step taken apart: time per operation against the memory-bandwidth limit.

    python bench/bench_cuda.py MODEL.gguf [--depth 512] [--tokens 32] [--json OUT.json]

Measures, on the current CUDA device, in one run: the device-to-device copy bandwidth (bytes read +
written per second: the practical limit of memory-bound kernels); prefill of `depth` random tokens;
decode tokens/s with CUDA graphs (the number `pyengine bench --device cuda` reports); then the same
decode with every operation timed by CUDA events (graphs off) and, per operation, the bytes it must
read per token (weights of the layers and experts it touches, the KV cache rows attention reads)
and the bandwidth that implies. The last line is the decode limit: copy bandwidth / bytes per token.
Set PYENGINE_CUDA_EMULATOR=1 to run it on the CPU emulator (the numbers then mean nothing; it checks
the script)."""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from pyengine import cuda
from pyengine.engine import Engine


def bytes_per_token(eng: Engine, n_keys: int) -> dict[str, float]:
    """Bytes each profiled operation reads for one decoded token, from the file's tensor sizes."""
    t = eng.model_file.tensors
    hp = eng.hparams
    first = eng._model.first_gpu_layer
    k = int(hp.n_expert_used) / int(hp.n_expert)  # share of an expert tensor one token reads
    kv_row = 2 * 4 * int(hp.n_head_kv) * int(hp.head_dim)  # f32 K and V of one position
    out = dict.fromkeys(("qkv", "attn_out", "router", "experts_gate_up", "experts_down", "attention",
                         "output_head"), 0.0)

    def size(name: str) -> int:
        return int(t[name].data.nbytes) if name in t else 0

    for layer in range(first, int(hp.n_layer)):
        p = f"blk.{layer}."
        out["qkv"] += size(p + "attn_q.weight") + size(p + "attn_k.weight") + size(p + "attn_v.weight")
        out["attn_out"] += size(p + "attn_output.weight")
        if not eng.cpu_moe:
            out["router"] += size(p + "ffn_gate_inp.weight")
            out["experts_gate_up"] += k * (size(p + "ffn_gate_exps.weight") + size(p + "ffn_up_exps.weight"))
            out["experts_down"] += k * size(p + "ffn_down_exps.weight")
        window = int(hp.sliding_window) if hp.swa_layers[layer] else n_keys
        out["attention"] += min(n_keys, window) * kv_row
    out["output_head"] = size("output.weight") or size("token_embd.weight")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--depth", type=int, default=512, help="prompt tokens before decoding (default 512)")
    ap.add_argument("--tokens", type=int, default=32, help="decoded tokens per measurement (default 32)")
    ap.add_argument("--n-gpu-layers", type=int, default=None)
    ap.add_argument("--cpu-moe", action="store_true")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()

    cu = cuda.backend()
    info = cu.device_info(0)
    copy_bw = cu.copy_bandwidth()
    eng = Engine(args.model, n_ctx=args.depth + 2 * args.tokens + 16, n_batch=512, device="cuda",
                 n_gpu_layers=args.n_gpu_layers, cpu_moe=args.cpu_moe)
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, eng.n_vocab, args.depth)
    t0 = time.perf_counter()
    eng.eval(prompt)
    pp = args.depth / (time.perf_counter() - t0)

    def decode() -> float:
        toks = rng.integers(0, eng.n_vocab, args.tokens)
        t0 = time.perf_counter()
        for tok in toks:
            eng.eval([int(tok)])
        return args.tokens / (time.perf_counter() - t0)

    decode()  # warm-up (captures the graph)
    eng.truncate(args.depth)
    tg = decode()
    eng.truncate(args.depth)
    eng._model.profile(True)
    decode()
    prof = eng._model.profile_results()
    eng._model.profile(False)

    need = bytes_per_token(eng, args.depth + args.tokens // 2)
    per_tok_ms = {op: ms / args.tokens for op, (ms, calls) in prof.items() if calls}
    total_ms = sum(per_tok_ms.values())
    total_bytes = sum(need.values())
    print(f"device: {info['name']} ({cu.BACKEND}), copy bandwidth {copy_bw / 1e9:.0f} GB/s (read + write)")
    print(f"model: {args.model}; GPU memory: weights {eng._model.weight_bytes / 2**30:.2f} GiB, "
          f"scratch {eng._model.scratch_bytes / 2**30:.2f} GiB, KV cache {eng._cache.nbytes / 2**30:.2f} GiB")
    print(f"prefill {args.depth} tokens: {pp:.1f} tok/s; decode (graphs): {tg:.1f} tok/s\n")
    print("| operation | ms/token | share | MB/token | GB/s | % of copy bandwidth |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    rows = []
    for op, ms in sorted(per_tok_ms.items(), key=lambda kv: -kv[1]):
        mb = need.get(op, 0.0) / 1e6
        gbs = need.get(op, 0.0) / (ms / 1e3) / 1e9 if ms > 0 and op in need else float("nan")
        rows.append({"op": op, "ms_per_token": ms, "mb_per_token": mb, "gb_s": gbs})
        pct = f"{100 * gbs * 1e9 / copy_bw:.0f}%" if op in need else ""
        print(f"| {op} | {ms:.3f} | {100 * ms / total_ms:.0f}% | {mb:.1f} | "
              f"{'' if op not in need else f'{gbs:.0f}'} | {pct} |")
    limit = copy_bw / total_bytes
    print(f"\nper token: {total_bytes / 1e6:.0f} MB in {total_ms:.2f} ms profiled "
          f"({total_bytes / (total_ms / 1e3) / 1e9:.0f} GB/s); decode limit at the copy bandwidth "
          f"{limit:.0f} tok/s; measured {tg:.1f} tok/s = {100 * tg / limit:.0f}% of it")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": info, "backend": cu.BACKEND, "copy_bandwidth": copy_bw, "prefill_tps": pp,
                       "decode_tps": tg, "bytes_per_token": total_bytes, "ops": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
