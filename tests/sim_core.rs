//! Simulator behaviour users rely on: determinism, ground truth consistent with the
//! points, occlusion, ring/time fields and beam layouts.

use lidar_ptq::sim::{Class, LidarModel, Scene, SimConfig, World};

fn small_config(model: LidarModel) -> SimConfig {
    let mut c = SimConfig::new(model);
    c.world.agent_density = 1.0;
    c
}

fn point_bits(f: &lidar_ptq::sim::Frame) -> Vec<u32> {
    let p = &f.points;
    let mut v = Vec::new();
    for i in 0..p.len() {
        v.extend([
            p.x[i].to_bits(),
            p.y[i].to_bits(),
            p.z[i].to_bits(),
            p.intensity[i].to_bits(),
        ]);
        v.push(p.time.as_ref().unwrap()[i].to_bits());
        v.push(p.ring.as_ref().unwrap()[i] as u32);
    }
    v
}

#[test]
fn same_seed_same_frames_different_seed_different() {
    let cfg = small_config(LidarModel::Vlp16);
    let a = Scene::new(cfg.clone(), 7);
    let b = Scene::new(cfg.clone(), 7);
    let c = Scene::new(cfg.clone(), 8);
    let (fa, fb, fc) = (a.frame(3), b.frame(3), c.frame(3));
    assert!(fa.points.len() > 5000, "only {} points", fa.points.len());
    assert_eq!(point_bits(&fa), point_bits(&fb));
    assert_eq!(fa.objects, fb.objects);
    assert_ne!(point_bits(&fa), point_bits(&fc));
    // Serial and parallel casting give the same bytes.
    let mut serial = cfg.clone();
    serial.parallel = false;
    let fs = Scene::new(serial, 7).frame(3);
    assert_eq!(point_bits(&fa), point_bits(&fs));
    // Frames are a function of their index, whatever order they are drawn in.
    let mut seq = Scene::new(cfg, 7);
    let f0 = seq.next_frame();
    assert_eq!(point_bits(&f0), point_bits(&a.frame(0)));
}

#[test]
fn num_points_equals_points_inside_each_box() {
    let mut cfg = SimConfig::new(LidarModel::Hdl32);
    cfg.sensor.range_sigma = 0.0;
    cfg.motion_distortion = false;
    let mut w = World::empty();
    w.push_agent(Class::Car, Class::Car.mean_size(), 10.0, 3.0, 0.4, 0.0, 1);
    w.push_agent(
        Class::Pedestrian,
        Class::Pedestrian.mean_size(),
        6.0,
        -4.0,
        1.0,
        1.2,
        2,
    );
    w.push_agent(
        Class::Cyclist,
        Class::Cyclist.mean_size(),
        -8.0,
        2.0,
        2.0,
        4.0,
        3,
    );
    w.push_agent(
        Class::TrafficCone,
        Class::TrafficCone.mean_size(),
        5.0,
        5.0,
        0.0,
        0.0,
        4,
    );
    w.push_agent(Class::Bus, Class::Bus.mean_size(), -5.0, -15.0, 0.1, 8.0, 5);
    let f = Scene::from_world(cfg, w, 11).frame(0);
    assert_eq!(f.objects.len(), 5);
    for (i, o) in f.objects.iter().enumerate() {
        let n = o.num_points.unwrap();
        assert!(n > 5, "{} has {n} points", o.class);
        let inside = (0..f.points.len())
            .filter(|&p| o.bbox.contains(f.points.xyz(p)))
            .count();

        assert_eq!(
            inside as u32, n,
            "{}: {inside} points inside its box, num_points {n}",
            o.class
        );
        let labelled = f.point_object.iter().filter(|&&x| x == i as u32).count();
        assert_eq!(labelled as u32, n);
    }
}

#[test]
fn object_points_stay_in_their_boxes_with_noise() {
    let mut cfg = small_config(LidarModel::Hdl32);
    cfg.motion_distortion = false;
    let f = Scene::new(cfg.clone(), 5).frame(0);
    let pad = 3.0 * cfg.sensor.range_sigma + 1e-3;
    let mut hits = 0;
    for (p, &o) in f.point_object.iter().enumerate() {
        if o == u32::MAX {
            continue;
        }
        hits += 1;
        let mut b = f.objects[o as usize].bbox;
        b.size = b.size.map(|s| s + 2.0 * pad);
        assert!(
            b.contains(f.points.xyz(p)),
            "point {p} of object {o} outside its box"
        );
    }
    assert!(hits > 100, "only {hits} object points");
    // Objects without returns are kept.
    assert!(f.objects.iter().any(|o| o.num_points == Some(0)));
}

#[test]
fn objects_behind_a_wall_get_no_points() {
    let mut cfg = SimConfig::new(LidarModel::Hdl32);
    cfg.motion_distortion = false;
    let mut open = World::empty();
    open.push_agent(Class::Car, Class::Car.mean_size(), 20.0, 0.0, 0.0, 0.0, 1);
    let mut walled = open.clone();
    walled.push_wall(
        10.0,
        0.0,
        std::f32::consts::FRAC_PI_2,
        12.0,
        0.3,
        -0.5,
        5.0,
        0.4,
    );
    let seen = Scene::from_world(cfg.clone(), open, 1).frame(0);
    let hidden = Scene::from_world(cfg, walled, 1).frame(0);
    assert!(seen.objects[0].num_points.unwrap() > 50);
    assert_eq!(hidden.objects[0].num_points, Some(0));
    // No point lies beyond the wall inside its shadow.
    for i in 0..hidden.points.len() {
        let [x, y, _] = hidden.points.xyz(i);
        assert!(
            !(x > 10.5 && (y / x).abs() < 0.4),
            "point ({x}, {y}) behind the wall"
        );
    }
}

#[test]
fn ring_and_time_are_plausible_and_beams_appear() {
    for model in [LidarModel::Vlp16, LidarModel::Hdl32] {
        let mut cfg = small_config(model);
        // Without the ego vehicle, so that every downward beam sees the ground all round.
        cfg.mount.body.clear();
        let spec = cfg.sensor.clone();
        let f = Scene::new(cfg, 21).frame(0);
        let time = f.points.time.as_ref().unwrap();
        let ring = f.points.ring.as_ref().unwrap();
        let mut seen = vec![0usize; spec.beams()];
        for i in 0..f.points.len() {
            assert!(
                time[i] >= 0.0 && time[i] < spec.period_s(),
                "time {}",
                time[i]
            );
            if i > 0 {
                assert!(time[i] >= time[i - 1], "times go back at point {i}");
            }
            let r = ring[i] as usize;
            seen[r] += 1;
            let [x, y, z] = f.points.xyz(i);
            let el = z.atan2(x.hypot(y)).to_degrees();
            assert!(
                (el - spec.elevations_deg[r]).abs() < 0.02,
                "{model:?} ring {r}: elevation {el}"
            );
        }
        // Every downward beam reaches the ground somewhere.
        for (r, &e) in spec.elevations_deg.iter().enumerate() {
            if e < -1.0 {
                assert!(
                    seen[r] > spec.columns / 4,
                    "{model:?} ring {r} ({e} deg): {} points",
                    seen[r]
                );
            }
        }
        // The time span covers (nearly) a whole revolution.
        assert!(time[time.len() - 1] - time[0] > 0.9 * spec.period_s());
    }
}

#[test]
fn scenes_evolve_over_time() {
    let cfg = small_config(LidarModel::Vlp16);
    let s = Scene::new(cfg, 3);
    let (a, b) = (s.frame(0), s.frame(5));
    let moving: Vec<_> = a
        .objects
        .iter()
        .filter(|o| o.velocity.is_some_and(|v| v[0].hypot(v[1]) > 1.0))
        .collect();
    assert!(!moving.is_empty());
    assert_ne!(a.objects, b.objects);
    assert_eq!(b.stamp_ns - a.stamp_ns, 500_000_000);
}

#[test]
fn ego_roof_hides_the_lowest_beams_near_the_car() {
    let mut bare = SimConfig::new(LidarModel::Hdl32);
    bare.mount.body.clear();
    let with_body = SimConfig::new(LidarModel::Hdl32);
    let lowest = |cfg: SimConfig| {
        let f = Scene::from_world(cfg, World::empty(), 1).frame(0);
        f.points.ring.unwrap().iter().filter(|&&r| r == 0).count()
    };
    let (a, b) = (lowest(bare), lowest(with_body));
    // On open flat ground the bare sensor's lowest beam returns nearly everywhere.
    assert!(a > 1000, "{a}");
    assert!(b < a / 2 && b > 0, "with body {b}, without {a}");
}
