"""Plays a simulated bag to lidar_ptq_node over ROS 2 and collects what it answers.

Used by scripts/test-node-e2e (run inside a loopback-only network namespace). Phases:
  steady  frames at the sensor rate, with malformed clouds (truncated data, no `x`
          field, absurd point_step) slipped in between;
  burst   frames at BURST_FACTOR x the rate (the node must drop, not queue);
  after   frames at the rate again (the node must still answer).
Every cloud is re-stamped with the current time when published (so latency = receive
time - stamp); answers are mapped back to the bag's stamps for scoring. Writes
collected.json (answers with bag stamps) and player.json (counts, latencies, memory).
"""

import argparse
import glob
import json
import math
import os
import threading
import time

import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from mcap.reader import make_reader
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import QoSProfile, qos_profile_sensor_data
from rclpy.serialization import deserialize_message
from sensor_msgs.msg import PointCloud2
from std_msgs.msg import Float64
from vision_msgs.msg import Detection3DArray


def percentile(values, q):
    """Nearest rank, as lidar_ptq::node::stats::percentile_sorted."""
    if not values:
        return None
    v = sorted(values)
    rank = min(max(math.ceil(q * len(v)), 1), len(v))
    return v[rank - 1]


def read_clouds(bag_dir, topic):
    files = sorted(glob.glob(os.path.join(bag_dir, "*.mcap")))
    if not files:
        raise SystemExit(f"player: no .mcap file in {bag_dir}")
    clouds = []
    for path in files:
        with open(path, "rb") as f:
            for _schema, _channel, message in make_reader(f).iter_messages(topics=[topic]):
                msg = deserialize_message(message.data, PointCloud2)
                stamp = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
                clouds.append((stamp, msg))
    clouds.sort(key=lambda c: c[0])
    return clouds


def rss_mb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def alive(pid):
    """Running (a zombie, exited but not yet reaped by the shell, counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def malformed_variants(template):
    """Three broken copies of a real cloud."""
    out = []
    m = PointCloud2()
    m.header.frame_id = template.header.frame_id
    m.height, m.width = template.height, template.width
    m.fields, m.is_bigendian = template.fields, template.is_bigendian
    m.point_step, m.row_step, m.is_dense = template.point_step, template.row_step, template.is_dense
    m.data = bytes(template.data)[: len(template.data) // 2]  # truncated data
    out.append(("truncated", m))
    m = PointCloud2()
    m.header.frame_id = template.header.frame_id
    m.height, m.width = template.height, template.width
    fields = []
    for f in template.fields:
        g = type(f)(name=("q" if f.name == "x" else f.name), offset=f.offset, datatype=f.datatype, count=f.count)
        fields.append(g)
    m.fields, m.is_bigendian = fields, template.is_bigendian
    m.point_step, m.row_step, m.is_dense = template.point_step, template.row_step, template.is_dense
    m.data = template.data  # no `x` field
    out.append(("missing_x", m))
    m = PointCloud2()
    m.header.frame_id = template.header.frame_id
    m.height, m.width = template.height, template.width
    m.fields, m.is_bigendian = template.fields, template.is_bigendian
    m.point_step = 1_000_000_000  # absurd point_step
    m.row_step, m.is_dense = template.row_step, template.is_dense
    m.data = template.data
    out.append(("absurd_point_step", m))
    return out


class Player(Node):
    def __init__(self, ns):
        super().__init__("lidar_ptq_e2e_player")
        self.lock = threading.Lock()
        self.sent = {}  # published stamp -> (bag stamp, frame_id, phase)
        self.malformed_stamps = set()
        self.answers = []  # (recv ns, msg)
        self.processing = []
        self.diagnostics = None
        self.pub = self.create_publisher(PointCloud2, f"{ns}/input/pointcloud", qos_profile_sensor_data)
        reliable = QoSProfile(depth=200)
        self.create_subscription(Detection3DArray, f"{ns}/output/detections", self.on_detections, reliable)
        self.create_subscription(Float64, f"{ns}/debug/processing_time_ms", self.on_processing, reliable)
        self.create_subscription(DiagnosticArray, "/diagnostics", self.on_diagnostics, reliable)
        self.det_topic = f"{ns}/output/detections"

    def on_detections(self, msg):
        now = time.time_ns()
        with self.lock:
            self.answers.append((now, msg))

    def on_processing(self, msg):
        with self.lock:
            self.processing.append(msg.data)

    def on_diagnostics(self, msg):
        for st in msg.status:
            if "lidar_ptq_node" in st.name:
                with self.lock:
                    self.diagnostics = {kv.key: kv.value for kv in st.values}
                    self.diagnostics["_level"] = int.from_bytes(st.level, "little") if isinstance(st.level, bytes) else int(st.level)
                    self.diagnostics["_message"] = st.message

    def publish(self, msg, bag_stamp, phase):
        now = time.time_ns()
        msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(now, 1_000_000_000)
        with self.lock:
            if bag_stamp is None:
                self.malformed_stamps.add(now)
            else:
                self.sent[now] = (bag_stamp, msg.header.frame_id, phase)
        self.pub.publish(msg)

    def answered(self):
        with self.lock:
            return len(self.answers)


def detection_json(d):
    best = max(d.results, key=lambda r: r.hypothesis.score)
    q = d.bbox.center.orientation
    yaw = math.atan2(2.0 * (q.w * q.z + q.x * q.y), 1.0 - 2.0 * (q.y * q.y + q.z * q.z))
    p, s = d.bbox.center.position, d.bbox.size
    return {
        "bbox": {"center": [p.x, p.y, p.z], "size": [s.x, s.y, s.z], "yaw": yaw},
        "class": best.hypothesis.class_id,
        "score": best.hypothesis.score,
        "velocity": None,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bag", required=True)
    ap.add_argument("--topic", default="/points")
    ap.add_argument("--ns", default="/lidar_ptq_node")
    ap.add_argument("--node-pid", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--rate", type=float, default=10.0)
    ap.add_argument("--burst-factor", type=float, default=5.0)
    ap.add_argument("--burst-frames", type=int, default=20)
    ap.add_argument("--after-frames", type=int, default=10)
    ap.add_argument("--wait-s", type=float, default=120.0, help="how long to wait for the node")
    a = ap.parse_args()

    clouds = read_clouds(a.bag, a.topic)
    n = len(clouds)
    steady = n - a.burst_frames - a.after_frames
    if steady < 10:
        raise SystemExit(f"player: {n} frames are too few for the phases")

    rclpy.init()
    node = Player(a.ns)
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()

    t0 = time.time()
    while (node.pub.get_subscription_count() == 0 or node.count_publishers(node.det_topic) == 0) and time.time() - t0 < a.wait_s:
        if not alive(a.node_pid):
            raise SystemExit("player: the node exited before subscribing (see node.log)")
        time.sleep(0.1)
    if node.pub.get_subscription_count() == 0:
        raise SystemExit("player: the node never subscribed")
    time.sleep(1.0)  # let discovery settle both ways

    period = 1.0 / a.rate
    rss = {"start": rss_mb(a.node_pid)}
    broken = malformed_variants(clouds[0][1])
    malformed_at = {5: 0, 15: 1, 25: 2}
    malformed_sent = []
    next_t = time.time()

    def play(i, phase, step):
        nonlocal next_t
        delay = next_t - time.time()
        if delay > 0:
            time.sleep(delay)
        bag_stamp, msg = clouds[i]
        node.publish(msg, bag_stamp, phase)
        next_t += step

    for i in range(steady):
        play(i, "steady", period)
        if i in malformed_at:
            time.sleep(0.02)
            kind, m = broken[malformed_at[i]]
            node.publish(m, None, "malformed")
            malformed_sent.append(kind)
    time.sleep(max(0.0, next_t - time.time()))
    rss["before_burst"] = rss_mb(a.node_pid)
    for i in range(steady, steady + a.burst_frames):
        play(i, "burst", period / a.burst_factor)
    time.sleep(max(0.0, next_t - time.time()) + period)
    rss["after_burst"] = rss_mb(a.node_pid)
    for i in range(steady + a.burst_frames, n):
        play(i, "after", period)

    # Wait for the last answers: until 3 s pass without one (or the overall limit).
    last, quiet_since = node.answered(), time.time()
    while time.time() - quiet_since < 3.0 and time.time() - t0 < a.wait_s + 120:
        time.sleep(0.2)
        if node.answered() != last:
            last, quiet_since = node.answered(), time.time()
    time.sleep(1.5)  # one more diagnostics period
    rss["end"] = rss_mb(a.node_pid)

    with node.lock:
        answers = list(node.answers)
        sent = dict(node.sent)
        processing = list(node.processing)
        diagnostics = dict(node.diagnostics or {})
        malformed_stamps = set(node.malformed_stamps)
    executor.shutdown()
    node.destroy_node()
    rclpy.shutdown()

    collected, latency, by_phase = [], [], {}
    unexpected = answered_malformed = frame_mismatch = 0
    seen = set()
    for recv, msg in answers:
        stamp = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
        if stamp in malformed_stamps:
            answered_malformed += 1
            continue
        if stamp not in sent or stamp in seen:
            unexpected += 1
            continue
        seen.add(stamp)
        bag_stamp, frame_id, phase = sent[stamp]
        if msg.header.frame_id != frame_id or any(
            d.header.frame_id != frame_id or (d.header.stamp.sec, d.header.stamp.nanosec) != (msg.header.stamp.sec, msg.header.stamp.nanosec)
            for d in msg.detections
        ):
            frame_mismatch += 1
        ms = (recv - stamp) / 1e6
        latency.append(ms)
        by_phase.setdefault(phase, []).append(ms)
        collected.append({"stamp_ns": bag_stamp, "frame_id": msg.header.frame_id,
                          "detections": [detection_json(d) for d in msg.detections]})

    answered_phase = {p: len(v) for p, v in by_phase.items()}
    sent_phase = {}
    for _, _, phase in sent.values():
        sent_phase[phase] = sent_phase.get(phase, 0) + 1
    report = {
        "frames_in": len(sent),
        "frames_out": len(collected),
        "sent_by_phase": sent_phase,
        "answered_by_phase": answered_phase,
        "malformed_sent": malformed_sent,
        "answered_malformed": answered_malformed,
        "unexpected_outputs": unexpected,
        "header_mismatches": frame_mismatch,
        "latency_p50_ms": percentile(latency, 0.5),
        "latency_p99_ms": percentile(latency, 0.99),
        "latency_max_ms": max(latency) if latency else None,
        "latency_p99_ms_by_phase": {p: percentile(v, 0.99) for p, v in by_phase.items()},
        "processing_p50_ms": percentile(processing, 0.5),
        "processing_p99_ms": percentile(processing, 0.99),
        "node_rss_mb": rss,
        "node_diagnostics": diagnostics,
    }
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "collected.json"), "w") as f:
        json.dump(collected, f)
    with open(os.path.join(a.out, "player.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps({k: report[k] for k in ("frames_in", "frames_out", "latency_p50_ms", "latency_p99_ms")}))


if __name__ == "__main__":
    main()
