"""Plays a simulated bag to lidar_ptq_node over ROS 2 and records what it answers.

Used by scripts/test-node-e2e (inside a loopback-only network namespace). Scenarios:

calibrate  The node starts without an INT8 model and calibrates online.
  calibrating  frames at the sensor rate (the bag looped) until the node's /rosout says
               it switched to INT8, with three malformed clouds (truncated data, no `x`
               field, absurd point_step) slipped in early;
  int8         more frames at the sensor rate on the INT8 engine;
  burst        frames at BURST_FACTOR x the rate (the node must drop, not queue);
  after        frames at the rate again (the node must still answer).
replay     The bag at the sensor rate (phase `replay`): the restarted node must answer
           with the cached INT8 model from its first scan. When the node is slower than
           the sensor, newest-scan-wins skips scans; the scans not answered are played
           again (at the same rate) until each has an answer, at most --replay-passes
           times, so that the answers cover the bag as `lidar_ptq eval` does.

Every cloud is re-stamped with the current time when published (so latency = receive
time - stamp); answers are mapped back to the bag's stamps for scoring. Writes
<prefix>collected.json (answers with bag stamps; in `calibrate`, only the first pass over
the bag) and <prefix>player.json (counts, latencies, gaps, memory, the node's /rosout and
last diagnostics).
"""

import argparse
import glob
import json
import math
import os
import re
import threading
import time

import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from mcap.reader import make_reader
from rcl_interfaces.msg import Log
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from rclpy.serialization import deserialize_message
from sensor_msgs.msg import PointCloud2
from std_msgs.msg import Float64
from vision_msgs.msg import Detection3DArray

NODE_LOGGER = "lidar_ptq_node"
SWITCH_RE = re.compile(r"switched engine fp32 -> int8 from the scan stamped (\d+)\.(\d{9})")


def percentile(values, q):
    """Nearest rank, as lidar_ptq::node::stats::percentile_sorted."""
    if not values:
        return None
    v = sorted(values)
    rank = min(max(math.ceil(q * len(v)), 1), len(v))
    return v[rank - 1]


def summary(values):
    return {
        "n": len(values),
        "p50": percentile(values, 0.5),
        "p90": percentile(values, 0.9),
        "p99": percentile(values, 0.99),
        "max": max(values) if values else None,
    }


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


def broken_copy(template, **changes):
    m = PointCloud2()
    m.header.frame_id = template.header.frame_id
    m.height, m.width = template.height, template.width
    m.fields, m.is_bigendian = template.fields, template.is_bigendian
    m.point_step, m.row_step, m.is_dense = template.point_step, template.row_step, template.is_dense
    m.data = template.data
    for k, v in changes.items():
        setattr(m, k, v)
    return m


def malformed_variants(template):
    """Three broken copies of a real cloud."""
    no_x = [type(f)(name=("q" if f.name == "x" else f.name), offset=f.offset, datatype=f.datatype,
                    count=f.count) for f in template.fields]
    return [
        ("truncated", broken_copy(template, data=bytes(template.data)[: len(template.data) // 2])),
        ("missing_x", broken_copy(template, fields=no_x)),
        ("absurd_point_step", broken_copy(template, point_step=1_000_000_000)),
    ]


class Player(Node):
    def __init__(self, ns):
        super().__init__("lidar_ptq_e2e_player")
        self.lock = threading.Lock()
        self.sent = {}  # published stamp -> (bag stamp, frame_id, phase, first pass over the bag)
        self.malformed_stamps = set()
        self.answers = []  # (recv ns, msg)
        self.processing = []
        self.node_latency = []  # the node's own receive-to-publish latency, one per answer
        self.rosout = []  # (level, text)
        self.switch_stamp = None
        self.diagnostics = None
        self.diagnostics_seen = []  # (precision_active, calibration) in arrival order
        self.pub = self.create_publisher(PointCloud2, f"{ns}/input/pointcloud", qos_profile_sensor_data)
        reliable = QoSProfile(depth=1000)
        self.create_subscription(Detection3DArray, f"{ns}/output/detections", self.on_detections, reliable)
        self.create_subscription(Float64, f"{ns}/debug/processing_time_ms", self.on_processing, reliable)
        self.create_subscription(Float64, f"{ns}/debug/pipeline_latency_ms", self.on_node_latency, reliable)
        self.create_subscription(DiagnosticArray, "/diagnostics", self.on_diagnostics, reliable)
        rosout_qos = QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE,
                                durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self.create_subscription(Log, "/rosout", self.on_rosout, rosout_qos)
        self.det_topic = f"{ns}/output/detections"
        # Autoware's objects (a node built with the `autoware` feature): one message per
        # Detection3DArray, same header, same boxes.
        self.objects = []  # (stamp ns, frame_id, object count)
        try:
            from autoware_perception_msgs.msg import DetectedObjects
        except ImportError:
            DetectedObjects = None
        if DetectedObjects is not None:
            self.create_subscription(DetectedObjects, f"{ns}/output/objects", self.on_objects, reliable)

    def on_objects(self, msg):
        with self.lock:
            self.objects.append((msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec,
                                 msg.header.frame_id, len(msg.objects)))

    def on_detections(self, msg):
        now = time.time_ns()
        with self.lock:
            self.answers.append((now, msg))

    def on_processing(self, msg):
        with self.lock:
            self.processing.append(msg.data)

    def on_node_latency(self, msg):
        with self.lock:
            self.node_latency.append(msg.data)

    def on_rosout(self, msg):
        if msg.name != NODE_LOGGER:
            return
        with self.lock:
            self.rosout.append((int(msg.level), msg.msg))
            m = SWITCH_RE.search(msg.msg)
            if m and self.switch_stamp is None:
                self.switch_stamp = int(m.group(1)) * 1_000_000_000 + int(m.group(2))

    def on_diagnostics(self, msg):
        for st in msg.status:
            if NODE_LOGGER in st.name:
                with self.lock:
                    self.diagnostics = {kv.key: kv.value for kv in st.values}
                    self.diagnostics["_level"] = int.from_bytes(st.level, "little") if isinstance(st.level, bytes) else int(st.level)
                    self.diagnostics["_message"] = st.message
                    self.diagnostics_seen.append((self.diagnostics.get("precision_active"),
                                                  self.diagnostics.get("calibration")))

    def publish(self, msg, bag_stamp, phase, first_pass=False):
        now = time.time_ns()
        msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(now, 1_000_000_000)
        with self.lock:
            if bag_stamp is None:
                self.malformed_stamps.add(now)
            else:
                self.sent[now] = (bag_stamp, msg.header.frame_id, phase, first_pass)
        self.pub.publish(msg)

    def answered(self):
        with self.lock:
            return len(self.answers)

    def switched(self):
        with self.lock:
            return self.switch_stamp is not None


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
    ap.add_argument("--scenario", choices=["calibrate", "replay"], required=True)
    ap.add_argument("--topic", default="/points")
    ap.add_argument("--ns", default="/lidar_ptq_node")
    ap.add_argument("--node-pid", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--prefix", default="", help="prefix of the output file names")
    ap.add_argument("--rate", type=float, default=10.0)
    ap.add_argument("--burst-factor", type=float, default=5.0)
    ap.add_argument("--burst-frames", type=int, default=40)
    ap.add_argument("--int8-frames", type=int, default=30)
    ap.add_argument("--after-frames", type=int, default=20)
    ap.add_argument("--replay-passes", type=int, default=6)
    ap.add_argument("--calibration-timeout-s", type=float, default=900.0)
    ap.add_argument("--wait-s", type=float, default=120.0, help="how long to wait for the node")
    a = ap.parse_args()

    clouds = read_clouds(a.bag, a.topic)
    n = len(clouds)
    if n < 10:
        raise SystemExit(f"player: {n} frames are too few")

    rclpy.init()
    node = Player(a.ns)
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()

    t0 = time.time()
    while (node.pub.get_subscription_count() == 0 or node.count_publishers(node.det_topic) == 0) and time.time() - t0 < a.wait_s:
        if not alive(a.node_pid):
            raise SystemExit("player: the node exited before subscribing (see its log)")
        time.sleep(0.1)
    if node.pub.get_subscription_count() == 0:
        raise SystemExit("player: the node never subscribed")
    time.sleep(1.0)  # let discovery settle both ways

    period = 1.0 / a.rate
    rss = {"start": rss_mb(a.node_pid)}
    next_t = time.time()
    played = 0  # frames published so far (the bag index is played % n)
    malformed_sent = []

    def play(phase, step, index=None):
        nonlocal next_t, played
        delay = next_t - time.time()
        if delay > 0:
            time.sleep(delay)
        bag_stamp, msg = clouds[played % n if index is None else index]
        node.publish(msg, bag_stamp, phase, played < n or index is not None)
        played += 1
        next_t += step

    def answered_bag_stamps():
        with node.lock:
            stamps = {a_.header.stamp.sec * 1_000_000_000 + a_.header.stamp.nanosec for _, a_ in node.answers}
            return {node.sent[s][0] for s in stamps if s in node.sent}

    timed_out = False
    replay_passes = 0
    if a.scenario == "replay":
        todo = list(range(n))
        while todo and replay_passes < a.replay_passes:
            replay_passes += 1
            for i in todo:
                play("replay", period, i)
            time.sleep(max(0.0, next_t - time.time()) + 1.0)  # the last answers
            done = answered_bag_stamps()
            todo = [i for i in range(n) if clouds[i][0] not in done]
            next_t = time.time()
    else:
        broken = malformed_variants(clouds[0][1])
        malformed_at = {5: 0, 15: 1, 25: 2}
        while not node.switched() or played < 30:
            if time.time() - t0 > a.calibration_timeout_s or not alive(a.node_pid):
                timed_out = True
                break
            play("calibrating", period)
            if played - 1 in malformed_at:
                time.sleep(0.02)
                kind, m = broken[malformed_at[played - 1]]
                node.publish(m, None, "malformed")
                malformed_sent.append(kind)
        if not timed_out:
            for _ in range(a.int8_frames):
                play("int8", period)
            time.sleep(max(0.0, next_t - time.time()))
            rss["before_burst"] = rss_mb(a.node_pid)
            for _ in range(a.burst_frames):
                play("burst", period / a.burst_factor)
            time.sleep(max(0.0, next_t - time.time()) + period)
            rss["after_burst"] = rss_mb(a.node_pid)
            for _ in range(a.after_frames):
                play("after", period)

    # Wait for the last answers: until 3 s pass without one (or the overall limit).
    last, quiet_since = node.answered(), time.time()
    while time.time() - quiet_since < 3.0 and time.time() - t0 < a.calibration_timeout_s + 120:
        time.sleep(0.2)
        if node.answered() != last:
            last, quiet_since = node.answered(), time.time()
    time.sleep(1.5)  # one more diagnostics period
    rss["end"] = rss_mb(a.node_pid)

    with node.lock:
        answers = list(node.answers)
        objects = list(node.objects)
        sent = dict(node.sent)
        processing = list(node.processing)
        node_latency = list(node.node_latency)
        diagnostics = dict(node.diagnostics or {})
        diagnostics_seen = list(node.diagnostics_seen)
        malformed_stamps = set(node.malformed_stamps)
        rosout = list(node.rosout)
        switch_stamp = node.switch_stamp
    executor.shutdown()
    node.destroy_node()
    rclpy.shutdown()

    collected, seen, collected_stamps = [], set(), set()
    unexpected = answered_malformed = frame_mismatch = 0
    latency = {"all": [], "fp32": [], "int8": []}
    latency_by_phase, answered_by_phase = {}, {}
    steady_recv = []  # receive times of answers to sensor-rate frames (for gaps)
    switch_gap_ms = None
    prev_recv = None
    processing_by_precision = {"fp32": [], "int8": []}
    pair_processing = len(processing) == len(answers)
    # The node publishes its own latency (stamp -> publish) right after each answer, on
    # the same thread: the k-th value belongs to the k-th answer. Unlike the receive time
    # here, it does not include this player's own scheduling (publishing a burst of
    # clouds from Python can delay the thread that receives the answers).
    pair_node_latency = len(node_latency) == len(answers)
    node_latency_by_phase = {}
    for k, (recv, msg) in enumerate(answers):
        stamp = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
        if stamp in malformed_stamps:
            answered_malformed += 1
            continue
        if stamp not in sent or stamp in seen:
            unexpected += 1
            continue
        seen.add(stamp)
        bag_stamp, frame_id, phase, first_pass = sent[stamp]
        if msg.header.frame_id != frame_id or any(
            d.header.frame_id != frame_id or (d.header.stamp.sec, d.header.stamp.nanosec) != (msg.header.stamp.sec, msg.header.stamp.nanosec)
            for d in msg.detections
        ):
            frame_mismatch += 1
        ms = (recv - stamp) / 1e6
        if a.scenario == "replay":
            precision = "int8" if diagnostics.get("precision_active") == "int8" else "fp32"
        else:
            precision = "int8" if switch_stamp is not None and stamp >= switch_stamp else "fp32"
        latency["all"].append(ms)
        latency[precision].append(ms)
        if pair_processing:
            processing_by_precision[precision].append(processing[k])
        latency_by_phase.setdefault(phase, []).append(ms)
        if pair_node_latency:
            node_latency_by_phase.setdefault(phase, []).append(node_latency[k])
        answered_by_phase[phase] = answered_by_phase.get(phase, 0) + 1
        if phase in ("calibrating", "int8", "replay"):
            steady_recv.append(recv)
        if switch_stamp is not None and stamp == switch_stamp and prev_recv is not None:
            switch_gap_ms = (recv - prev_recv) / 1e6
        prev_recv = recv
        # Every bag stamp at most once: in `calibrate` the first pass over the bag, in
        # `replay` the first answer to each scan.
        if first_pass and bag_stamp not in collected_stamps:
            collected_stamps.add(bag_stamp)
            collected.append({"stamp_ns": bag_stamp, "frame_id": msg.header.frame_id,
                              "detections": [detection_json(d) for d in msg.detections]})

    gaps = [(b - a_) / 1e6 for a_, b in zip(steady_recv, steady_recv[1:])]
    sent_phase = {}
    for _, _, phase, _ in sent.values():
        sent_phase[phase] = sent_phase.get(phase, 0) + 1
    det_by_stamp = {m.header.stamp.sec * 1_000_000_000 + m.header.stamp.nanosec:
                    (m.header.frame_id, len(m.detections)) for _, m in answers}
    report = {
        "scenario": a.scenario,
        "timed_out": timed_out,
        "frames_in": len(sent),
        "frames_out": len(seen),
        "bag_frames": n,
        "bag_frames_answered": len(collected_stamps),
        "replay_passes": replay_passes,
        "sent_by_phase": sent_phase,
        "answered_by_phase": answered_by_phase,
        "malformed_sent": malformed_sent,
        "answered_malformed": answered_malformed,
        "unexpected_outputs": unexpected,
        "header_mismatches": frame_mismatch,
        "latency_ms": summary(latency["all"]),
        "latency_ms_fp32": summary(latency["fp32"]),
        "latency_ms_int8": summary(latency["int8"]),
        "latency_ms_by_phase": {p: summary(v) for p, v in latency_by_phase.items()},
        "node_latency_ms_by_phase": {p: summary(v) for p, v in node_latency_by_phase.items()},
        "processing_ms": summary(processing),
        "processing_ms_fp32": summary(processing_by_precision["fp32"]),
        "processing_ms_int8": summary(processing_by_precision["int8"]),
        "max_output_gap_ms": max(gaps) if gaps else None,
        "switch_stamp_ns": switch_stamp,
        "switch_gap_ms": switch_gap_ms,
        "node_rss_mb": rss,
        "node_diagnostics": diagnostics,
        "diagnostics_seen": diagnostics_seen,
        "rosout": rosout,
        "detections": sum(len(c["detections"]) for c in collected),
        "autoware_objects": {
            "messages": len(objects),
            "matching_detections": sum(1 for s, f, k in objects if det_by_stamp.get(s) == (f, k)),
        },
    }
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, f"{a.prefix}collected.json"), "w") as f:
        json.dump(collected, f)
    with open(os.path.join(a.out, f"{a.prefix}player.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps({k: report[k] for k in ("scenario", "frames_in", "frames_out", "switch_gap_ms")}))


if __name__ == "__main__":
    main()
