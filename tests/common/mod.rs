//! Helpers shared by integration tests: where the real data and the reference Python
//! tools live. Both are required: a test that needs them fails, never skips.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Python of the reference tools venv (`mcap`, `mcap-ros2-support`, `rosbags`):
/// `$LIDAR_PTQ_TOOLS_PYTHON`, else `.venv-tools/bin/python` in the repo root.
pub fn tools_python() -> PathBuf {
    let python = match std::env::var_os("LIDAR_PTQ_TOOLS_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => repo_root().join(".venv-tools/bin/python"),
    };
    assert!(
        python.is_file(),
        "reference Python tools not found at {}: run scripts/setup-pytools.sh \
         (or set LIDAR_PTQ_TOOLS_PYTHON)",
        python.display()
    );
    python
}

/// Runs `script` with the tools Python and `args`; panics with its output if it fails.
/// Returns stdout.
pub fn run_python(script: &str, args: &[&Path]) -> String {
    let out = std::process::Command::new(tools_python())
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("failed to start the tools Python");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "python check failed ({}):\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The project's shared real data (`shared/data` beside the repo): `$LIDAR_PTQ_DATA`,
/// else the first of `../shared/data`, `../../shared/data` that exists.
pub fn data_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("LIDAR_PTQ_DATA") {
        return PathBuf::from(p);
    }
    let root = repo_root();
    for up in ["../shared/data", "../../shared/data"] {
        let p = root.join(up);
        if p.is_dir() {
            return p;
        }
    }
    panic!(
        "shared data not found beside {} (../shared/data); set LIDAR_PTQ_DATA",
        root.display()
    );
}

/// Copies a directory's files (not recursive) into `dst`, which is created.
pub fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
            // Shared data is read-only; copies must be writable to be damaged on purpose.
            let mut perm = std::fs::metadata(dst.join(e.file_name()))
                .unwrap()
                .permissions();
            #[allow(clippy::permissions_set_readonly_false)]
            perm.set_readonly(false);
            std::fs::set_permissions(dst.join(e.file_name()), perm).unwrap();
        }
    }
}
