//! Build glue for the `ros` feature only (the default build does nothing here).
//!
//! ROS 2 from the PyPI wheels: their librcl depends on the `*__rosidl_generator_py`
//! libraries, which use libpython symbols without linking libpython. Anything linking
//! rcl must therefore link libpython itself, or it fails at load time with
//! `undefined symbol: PyExc_RuntimeError`. A ROS install from packages does not need
//! this, but linking libpython there is harmless.
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=PYTHON");
    if std::env::var_os("CARGO_FEATURE_ROS").is_none() {
        return;
    }
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let out = Command::new(&python)
        .args([
            "-c",
            "import sysconfig as s; print(s.get_config_var('LIBDIR')); print(s.get_config_var('INSTSONAME'))",
        ])
        .output();
    let text = match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
        _ => panic!(
            "feature `ros`: cannot run `{python}` to locate libpython; source scripts/ros-env.sh \
             (or set PYTHON to the ROS environment's python3)"
        ),
    };
    let mut lines = text.lines();
    let (Some(libdir), Some(soname)) = (lines.next(), lines.next()) else {
        panic!("feature `ros`: `{python}` did not report LIBDIR and INSTSONAME");
    };
    println!("cargo:rustc-link-search=native={libdir}");
    // --no-as-needed: nothing in our code references libpython, the loader needs it anyway.
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-l:{soname},--as-needed");
}
