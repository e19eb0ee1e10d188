//! The launch files are well-formed and consistent with the package: `ros2 launch` is not
//! available here, so Python's own parsers read them (ast for .launch.py, ElementTree
//! for .launch.xml) and report what they reference; the checks are made here against
//! Cargo.toml, package.xml, the repository's files and the node's declared parameters.

use lidar_ptq::node::params::specs;
use std::path::Path;
use std::process::Command;

/// Prints a JSON description of both launch files.
const INSPECT: &str = r#"
import ast, json, sys, xml.etree.ElementTree as ET

def const(n):
    return n.value if isinstance(n, ast.Constant) and isinstance(n.value, str) else None

def call_name(c):
    f = c.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None

py_path, xml_path = sys.argv[1], sys.argv[2]
tree = ast.parse(open(py_path).read(), py_path)
out = {"py": {"args": [], "nodes": [], "param_names": [], "configs": [], "share_files": [], "remaps": [],
              "has_generate": any(isinstance(n, ast.FunctionDef) and n.name == "generate_launch_description"
                                  for n in tree.body)}}
py = out["py"]
for n in ast.walk(tree):
    if isinstance(n, ast.Call):
        name = call_name(n)
        if name == "DeclareLaunchArgument":
            py["args"].append(const(n.args[0]))
        elif name == "Node":
            py["nodes"].append({k.arg: const(k.value) for k in n.keywords if const(k.value) is not None})
            for k in n.keywords:
                if k.arg == "remappings":
                    for t in k.value.elts:
                        py["remaps"].append(const(t.elts[0]))
        elif name == "LaunchConfiguration":
            py["configs"].append(const(n.args[0]))
        elif name == "PathJoinSubstitution":
            parts = [const(e) for e in n.args[0].elts]
            py["share_files"].append("/".join(p for p in parts if p is not None))
    elif isinstance(n, ast.Dict):
        py["param_names"] += [const(k) for k in n.keys if const(k) is not None]

root = ET.parse(xml_path).getroot()
x = {"root": root.tag, "args": [a.get("name") for a in root.iter("arg")], "nodes": [], "param_names": [],
     "remaps": [r.get("from") for r in root.iter("remap")], "defaults": [a.get("default") for a in root.iter("arg")]}
for node in root.iter("node"):
    x["nodes"].append({"package": node.get("pkg"), "executable": node.get("exec"), "name": node.get("name")})
    x["param_names"] += [p.get("name") for p in node.iter("param") if p.get("name")]
out["xml"] = x
print(json.dumps(out))
"#;

fn inspect() -> serde_json::Value {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("python3")
        .arg("-c")
        .arg(INSPECT)
        .arg(root.join("launch/lidar_ptq.launch.py"))
        .arg(root.join("launch/lidar_ptq.launch.xml"))
        .output()
        .expect("python3 is needed to parse the launch files");
    assert!(
        out.status.success(),
        "the launch files do not parse:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap_or("<not a literal>").to_owned())
        .collect()
}

#[test]
fn launch_files_reference_the_package_executable_parameters_and_files() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cargo = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let package = std::fs::read_to_string(root.join("package.xml")).unwrap();
    let v = inspect();
    let declared: Vec<&str> = specs().iter().map(|s| s.name).collect();
    let want_args = [
        "input_topic",
        "params_file",
        "precision",
        "calibration_mode",
    ];

    for (kind, l) in [("py", &v["py"]), ("xml", &v["xml"])] {
        let nodes = l["nodes"].as_array().unwrap();
        assert_eq!(nodes.len(), 1, "{kind}: one node");
        let node = &nodes[0];
        let pkg = node["package"].as_str().unwrap();
        let exe = node["executable"].as_str().unwrap();
        assert!(
            package.contains(&format!("<name>{pkg}</name>")),
            "{kind}: package {pkg} is not package.xml's"
        );
        assert!(
            cargo.contains(&format!("name = \"{exe}\"")) && exe == "lidar_ptq_node",
            "{kind}: executable {exe} is not a [[bin]] of Cargo.toml"
        );
        assert!(
            root.join("src/bin").join(format!("{exe}.rs")).exists(),
            "{kind}: no source for {exe}"
        );
        assert_eq!(node["name"], "lidar_ptq_node", "{kind}: node name");
        let mut args = strings(&l["args"]);
        args.sort();
        let mut want: Vec<String> = want_args.iter().map(|s| s.to_string()).collect();
        want.sort();
        assert_eq!(args, want, "{kind}: launch arguments");
        for p in strings(&l["param_names"]) {
            assert!(
                declared.contains(&p.as_str()),
                "{kind}: sets undeclared parameter {p}"
            );
        }
        assert_eq!(
            strings(&l["remaps"]),
            vec!["~/input/pointcloud".to_string()],
            "{kind}: remaps the declared input"
        );
    }
    let py = &v["py"];
    assert_eq!(py["has_generate"], true);
    // Every LaunchConfiguration refers to a declared argument.
    for c in strings(&py["configs"]) {
        assert!(want_args.contains(&c.as_str()), "py: unknown argument {c}");
    }
    // Files found through the package share exist in the repository and are installed.
    let share = strings(&py["share_files"]);
    assert_eq!(share, vec!["config/lidar_ptq_node.yaml".to_string()]);
    let xml_default = strings(&v["xml"]["defaults"])
        .into_iter()
        .find(|d| d.contains("find-pkg-share"))
        .unwrap();
    for f in &share {
        assert!(root.join(f).exists(), "{f} missing");
        assert!(
            xml_default.ends_with(f.as_str()),
            "xml default {xml_default}"
        );
        let dir = f.split('/').next().unwrap();
        assert!(
            cargo.contains(&format!("\"{dir}\"")),
            "{dir} is not in install_to_share"
        );
    }
    assert_eq!(v["xml"]["root"], "launch");
}
