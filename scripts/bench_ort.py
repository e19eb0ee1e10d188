#!/usr/bin/env python3
"""ONNX Runtime baseline on the CPU for `lidar_ptq bench`: the same dense network (2D
backbone, neck, head of a model config, BatchNorm folded into the convolutions as an
inference deployment would; src/model/graph.rs and scripts/bench_torch.py build the same
one) timed with ONNX Runtime in FP32 and in INT8 (static QDQ quantization: u8 activations,
per-channel s8 weights, the tool's default for CNNs). Weights are random: timing only.

Usage (scripts/setup-ort.sh makes the venv):
  .venv-ort/bin/python scripts/bench_ort.py config/models/nuscenes_pillar.yaml [--threads 2]
Prints one JSON object: milliseconds per forward (median of --iters after warm-up).
"""
import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import numpy as np
import onnx
import onnxruntime as ort
import yaml
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_static,
)


class Builder:
    """Accumulates ONNX nodes and initializers; counts multiply-adds as it goes."""

    def __init__(self, seed):
        self.nodes, self.inits, self.n = [], [], 0
        self.rng = np.random.default_rng(seed)
        self.macs = 0

    def name(self, base):
        self.n += 1
        return f"{base}_{self.n}"

    def weight(self, shape, fan_in):
        w = (self.rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        name = self.name("w")
        self.inits.append(numpy_helper.from_array(w, name))
        return name

    def bias(self, c):
        name = self.name("b")
        self.inits.append(numpy_helper.from_array(np.zeros(c, np.float32) + 0.01, name))
        return name

    def conv(self, x, cin, cout, k, s, p, hw, relu=True):
        ho, wo = (hw[0] + 2 * p - k) // s + 1, (hw[1] + 2 * p - k) // s + 1
        y = self.name("conv")
        self.nodes.append(
            helper.make_node(
                "Conv",
                [x, self.weight((cout, cin, k, k), cin * k * k), self.bias(cout)],
                [y],
                kernel_shape=[k, k],
                strides=[s, s],
                pads=[p, p, p, p],
            )
        )
        self.macs += cout * cin * k * k * ho * wo
        return (self.relu(y) if relu else y), (ho, wo)

    def deconv(self, x, cin, cout, k, hw):
        y = self.name("deconv")
        self.nodes.append(
            helper.make_node(
                "ConvTranspose",
                [x, self.weight((cin, cout, k, k), cin), self.bias(cout)],
                [y],
                kernel_shape=[k, k],
                strides=[k, k],
            )
        )
        self.macs += cin * cout * k * k * hw[0] * hw[1]
        return self.relu(y), (hw[0] * k, hw[1] * k)

    def relu(self, x):
        y = self.name("relu")
        self.nodes.append(helper.make_node("Relu", [x], [y]))
        return y


def dense_model(cfg, bev):
    b = Builder(0)
    c = cfg["pillar_features"]["widths"][-1]
    x, hw = "bev", bev
    ups = []
    bb = cfg["backbone_2d"]
    for level, up in zip(bb["levels"], bb["upsample"]):
        for j in range(level["layers"] + 1):
            x, hw = b.conv(x, c, level["channels"], 3, level["stride"] if j == 0 else 1, 1, hw)
            c = level["channels"]
        if up["stride"] < 1:
            k = round(1 / up["stride"])
            u, _ = b.conv(x, c, up["channels"], k, k, 0, hw)
        else:
            k = round(up["stride"])
            u, _ = b.deconv(x, c, up["channels"], k, hw)
        ups.append(u)
    if len(ups) > 1:
        cat = b.name("cat")
        b.nodes.append(helper.make_node("Concat", ups, [cat], axis=1))
    else:
        cat = ups[0]
    neck_c = sum(u["channels"] for u in bb["upsample"])
    h = cfg["head"]
    sc = h["shared_channels"]
    # The neck's output size: level 1's size divided by its upsample factor.
    s1 = bb["levels"][0]["stride"]
    f1 = bb["upsample"][0]["stride"]
    head_hw = (round(bev[0] / s1 * f1), round(bev[1] / s1 * f1))
    shared, hw = b.conv(cat, neck_c, sc, 3, 1, 1, head_hw)
    outs = []
    for classes in h["tasks"]:
        subs = [(s["out"], s.get("num_conv", 2)) for s in h["sub_heads"]]
        subs.append((len(classes), h.get("hm_num_conv", 2)))
        for out, num_conv in subs:
            y = shared
            for _ in range(num_conv - 1):
                y, _ = b.conv(y, sc, sc, 3, 1, 1, hw)
            y, _ = b.conv(y, sc, out, 3, 1, 1, hw, relu=False)
            outs.append((y, out))
    graph = helper.make_graph(
        b.nodes,
        "centerpoint_dense",
        [helper.make_tensor_value_info("bev", TensorProto.FLOAT, [1, cfg["pillar_features"]["widths"][-1], bev[0], bev[1]])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, [1, oc, *hw]) for o, oc in outs],
        b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model, b.macs


def bev_input(rng, c, bev):
    """A BEV map ~10% occupied, like a scan's pillars (ReLU output: non-negative)."""
    occ = rng.random((1, 1, *bev)) < 0.1
    return (np.abs(rng.standard_normal((1, c, *bev))) * occ).astype(np.float32)


class Reader(CalibrationDataReader):
    def __init__(self, inputs):
        self.it = iter([{"bev": x} for x in inputs])

    def get_next(self):
        return next(self.it, None)


def time_ms(path, x, threads, iters, warmup):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    for _ in range(warmup):
        sess.run(None, {"bev": x})
    out = []
    for _ in range(iters):
        t = time.perf_counter()
        sess.run(None, {"bev": x})
        out.append((time.perf_counter() - t) * 1e3)
    return statistics.median(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--calib", type=int, default=4, help="random BEV maps for INT8 calibration")
    a = ap.parse_args()
    cfg = yaml.safe_load(open(a.config))
    if cfg["voxelization"].get("encoder", "pillar") != "pillar":
        raise SystemExit(f"{a.config}: only pillar models have a dense-only network")
    pr = cfg["input"]["point_range"]
    cs = cfg["voxelization"]["cell_size"]
    bev = (round((pr[4] - pr[1]) / cs[1]), round((pr[3] - pr[0]) / cs[0]))
    c = cfg["pillar_features"]["widths"][-1]
    model, macs = dense_model(cfg, bev)
    rng = np.random.default_rng(1)
    x = bev_input(rng, c, bev)
    res = {
        "onnxruntime": ort.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": a.threads,
        "config": a.config,
        "bev": list(bev),
        "dense_gmac": macs / 1e9,
        "iters": a.iters,
    }
    with tempfile.TemporaryDirectory() as d:
        fp32 = os.path.join(d, "fp32.onnx")
        int8 = os.path.join(d, "int8.onnx")
        onnx.save(model, fp32)
        res["fp32_dense_ms"] = time_ms(fp32, x, a.threads, a.iters, a.warmup)
        quantize_static(
            fp32,
            int8,
            Reader([bev_input(rng, c, bev) for _ in range(a.calib)]),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
        )
        res["int8_dense_ms"] = time_ms(int8, x, a.threads, a.iters, a.warmup)
    res["fp32_gflops"] = 2 * macs / 1e6 / res["fp32_dense_ms"]
    res["int8_gops"] = 2 * macs / 1e6 / res["int8_dense_ms"]
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
