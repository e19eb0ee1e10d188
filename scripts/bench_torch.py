#!/usr/bin/env python3
"""PyTorch baseline for `lidar_ptq bench --device cuda`: the same dense network (2D
backbone, neck, head of a model config, BatchNorm folded into the convolutions as an
inference deployment would) on the same GPU, timed in FP32, TF32 and FP16
(channels-last), eagerly and replayed as a CUDA graph. Weights are random (timing only).

Usage: python3 scripts/bench_torch.py config/models/nuscenes_pillar.yaml [--iters 50]
Prints one JSON object (milliseconds per forward, median of --iters after warm-up).
"""
import argparse
import json
import math
import statistics

import torch
import torch.nn as nn
import yaml


def conv(cin, cout, k, s, p, relu=True):
    layers = [nn.Conv2d(cin, cout, k, s, p, bias=True)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class Dense(nn.Module):
    """Backbone levels, upsampling neck with concat, shared conv and per-task sub-heads,
    built from the config as src/model/graph.rs builds it."""

    def __init__(self, cfg):
        super().__init__()
        c = cfg["pillar_features"]["widths"][-1]
        self.levels = nn.ModuleList()
        self.ups = nn.ModuleList()
        b = cfg["backbone_2d"]
        for level, up in zip(b["levels"], b["upsample"]):
            mods = []
            for j in range(level["layers"] + 1):
                mods.append(conv(c, level["channels"], 3, level["stride"] if j == 0 else 1, 1))
                c = level["channels"]
            self.levels.append(nn.Sequential(*mods))
            if up["stride"] < 1:
                k = round(1 / up["stride"])
                self.ups.append(conv(c, up["channels"], k, k, 0))
            else:
                k = round(up["stride"])
                self.ups.append(
                    nn.Sequential(nn.ConvTranspose2d(c, up["channels"], k, k, bias=True), nn.ReLU(inplace=True))
                )
        neck_c = sum(u["channels"] for u in b["upsample"])
        h = cfg["head"]
        sc = h["shared_channels"]
        self.shared = conv(neck_c, sc, 3, 1, 1)
        self.heads = nn.ModuleList()
        for classes in h["tasks"]:
            subs = [(s["out"], s.get("num_conv", 2)) for s in h["sub_heads"]]
            subs.append((len(classes), h.get("hm_num_conv", 2)))
            for out, num_conv in subs:
                mods = [conv(sc, sc, 3, 1, 1) for _ in range(num_conv - 1)]
                mods.append(conv(sc, out, 3, 1, 1, relu=False))
                self.heads.append(nn.Sequential(*mods))

    def forward(self, x):
        ups = []
        for level, up in zip(self.levels, self.ups):
            x = level(x)
            ups.append(up(x))
        x = torch.cat(ups, 1) if len(ups) > 1 else ups[0]
        x = self.shared(x)
        return [h(x) for h in self.heads]


def macs(model, x):
    total = 0

    def hook(m, inp, out):
        nonlocal total
        if isinstance(m, nn.Conv2d):
            total += out.numel() * m.in_channels * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, nn.ConvTranspose2d):
            total += inp[0].numel() * m.out_channels * m.kernel_size[0] * m.kernel_size[1]

    hs = [m.register_forward_hook(hook) for m in model.modules()]
    with torch.no_grad():
        model(x)
    for h in hs:
        h.remove()
    return total


def time_ms(fn, iters, warmup):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b))
    return statistics.median(out)


def run(model, x, iters, warmup, graph):
    with torch.no_grad():
        if not graph:
            return time_ms(lambda: model(x), iters, warmup)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                model(x)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            model(x)
        return time_ms(g.replay, iters, warmup)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    a = ap.parse_args()
    cfg = yaml.safe_load(open(a.config))
    pr = cfg["input"]["point_range"]
    cs = cfg["voxelization"]["cell_size"]
    nx, ny = round((pr[3] - pr[0]) / cs[0]), round((pr[4] - pr[1]) / cs[1])
    c = cfg["pillar_features"]["widths"][-1]
    torch.manual_seed(0)
    dev = torch.device("cuda")
    model = Dense(cfg).to(dev).eval()
    # A BEV map ~10% occupied, like a scan's pillars.
    x = torch.randn(1, c, ny, nx, device=dev) * (torch.rand(1, 1, ny, nx, device=dev) < 0.1)
    res = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "config": a.config,
        "bev": [ny, nx],
        "dense_gmac": macs(model, x) / 1e9,
        "iters": a.iters,
    }
    torch.backends.cudnn.benchmark = True
    for tf32 in (False, True):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        name = "tf32" if tf32 else "fp32"
        res[f"{name}_ms"] = run(model, x, a.iters, a.warmup, False)
        res[f"{name}_graph_ms"] = run(model, x, a.iters, a.warmup, True)
    torch.backends.cudnn.allow_tf32 = False
    half = model.half().to(memory_format=torch.channels_last)
    xh = x.half().to(memory_format=torch.channels_last)
    res["fp16_ms"] = run(half, xh, a.iters, a.warmup, False)
    res["fp16_graph_ms"] = run(half, xh, a.iters, a.warmup, True)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
