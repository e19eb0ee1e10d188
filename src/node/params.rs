//! The node's parameters: their names, defaults and descriptions (declared on the ROS
//! node), and validation into [`NodeParams`]. Plain Rust: the ROS edge converts its
//! parameter values into [`ParamValue`] and back, so every rule here is unit-tested
//! without ROS. A bad value is refused with a message naming the parameter, the value
//! and what is allowed.

use serde_json::Value;
use std::collections::BTreeMap;
use std::path::PathBuf;
use thiserror::Error;

/// A parameter value, mirroring `rcl_interfaces/ParameterValue`.
#[derive(Debug, Clone, PartialEq)]
pub enum ParamValue {
    NotSet,
    Bool(bool),
    Integer(i64),
    Double(f64),
    String(String),
    BoolArray(Vec<bool>),
    IntegerArray(Vec<i64>),
    DoubleArray(Vec<f64>),
    StringArray(Vec<String>),
}

impl ParamValue {
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::NotSet => "not set",
            Self::Bool(_) => "bool",
            Self::Integer(_) => "integer",
            Self::Double(_) => "double",
            Self::String(_) => "string",
            Self::BoolArray(_) => "bool array",
            Self::IntegerArray(_) => "integer array",
            Self::DoubleArray(_) => "double array",
            Self::StringArray(_) => "string array",
        }
    }
}

#[derive(Debug, Error, PartialEq)]
pub enum ParamError {
    #[error("unknown parameter `{name}` (known: {known})")]
    Unknown { name: String, known: String },
    #[error("parameter `{name}` must be a {expected}, got a {got}")]
    Type {
        name: String,
        expected: &'static str,
        got: &'static str,
    },
    #[error("parameter `{name}` = {value}: {reason}")]
    Invalid {
        name: String,
        value: String,
        reason: String,
    },
    #[error("parameter file: {0}")]
    File(String),
}

/// One declared parameter.
#[derive(Debug, Clone)]
pub struct ParamSpec {
    pub name: &'static str,
    pub default: ParamValue,
    pub description: &'static str,
}

fn spec(name: &'static str, default: ParamValue, description: &'static str) -> ParamSpec {
    ParamSpec {
        name,
        default,
        description,
    }
}

fn s(v: &str) -> ParamValue {
    ParamValue::String(v.to_owned())
}

/// Every parameter the node declares, with its default and description.
pub fn specs() -> Vec<ParamSpec> {
    use ParamValue::*;
    vec![
        spec(
            "model_path",
            s("models/default.safetensors"),
            "FP32 model: safetensors weights with the model config YAML embedded in metadata key `config`",
        ),
        spec(
            "int8_model_path",
            s(""),
            "INT8 model to load instead of calibrating (empty: none; the calibration cache is used)",
        ),
        spec(
            "precision",
            s("auto"),
            "fp32 | int8 | auto (FP32 until an INT8 model matching the FP32 weights is available)",
        ),
        spec(
            "device",
            s("cpu"),
            "Compute device: cpu, or cuda[:N] for GPU N (builds with the `cuda` feature); calibration runs on the CPU either way",
        ),
        spec(
            "score_threshold",
            Double(0.3),
            "Minimum detection score for every class without its own threshold",
        ),
        spec(
            "class_score_thresholds",
            StringArray(vec![]),
            "Per-class minimum scores as `class=value` entries, e.g. [\"pedestrian=0.25\"]",
        ),
        spec(
            "max_range",
            Double(0.0),
            "Drop detections farther than this BEV distance in metres (0: the model's range)",
        ),
        spec(
            "nms_iou_threshold",
            Double(-1.0),
            "BEV IoU above which NMS suppresses a box (negative: the model's value)",
        ),
        spec(
            "input_topic",
            s("~/input/pointcloud"),
            "sensor_msgs/PointCloud2 input (sensor-data QoS); remapping works as well",
        ),
        spec(
            "output_topic",
            s("~/output/detections"),
            "vision_msgs/Detection3DArray output",
        ),
        spec(
            "markers_topic",
            s("~/output/markers"),
            "visualization_msgs/MarkerArray output for RViz",
        ),
        spec(
            "frame_id",
            s(""),
            "Frame of the outputs (empty: the input cloud's frame_id)",
        ),
        spec(
            "intensity_field",
            s("intensity"),
            "PointCloud2 field read as intensity (e.g. `reflectivity` for Ouster); missing: 0",
        ),
        spec(
            "intensity_scale",
            Double(1.0),
            "Multiplies raw intensity to reach the scale the model was trained with",
        ),
        spec(
            "processing_budget_ms",
            Double(100.0),
            "Frames slower than this count as over budget (diagnostics warn)",
        ),
        spec(
            "calibration.mode",
            s("off"),
            "INT8 calibration: off | online (from the first live scans) | from-bag",
        ),
        spec(
            "calibration.frames",
            Integer(32),
            "Number of distinct scans to calibrate with",
        ),
        spec(
            "calibration.spacing_s",
            Double(0.5),
            "Minimum time between two collected calibration scans, in seconds",
        ),
        spec(
            "calibration.max_similarity",
            Double(0.9),
            "A scan whose occupied-cell overlap (Jaccard) with the last collected one exceeds this is a near-duplicate and skipped",
        ),
        spec(
            "calibration.method",
            s("lidar-ptq"),
            "Calibration method: lidar-ptq | minmax | percentile | entropy",
        ),
        spec(
            "calibration.iters",
            Integer(100),
            "LiDAR-PTQ reconstruction iterations per unit (fewer: faster, coarser rounding)",
        ),
        spec(
            "calibration.cache_path",
            s(""),
            "Where the calibrated INT8 model is written and looked for at start (empty: beside the model, `<model>.int8.safetensors`)",
        ),
        spec(
            "calibration.bag_path",
            s(""),
            "rosbag2 recording to calibrate from (mode from-bag)",
        ),
    ]
}

/// Precision the node runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    Fp32,
    Int8,
    Auto,
}

impl Precision {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fp32 => "fp32",
            Self::Int8 => "int8",
            Self::Auto => "auto",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    /// A GPU by ordinal (builds with the `cuda` feature).
    Cuda(usize),
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CalibrationMode {
    Off,
    Online,
    FromBag,
}

impl CalibrationMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Online => "online",
            Self::FromBag => "from-bag",
        }
    }
}

/// Calibration methods the quantization code knows.
pub const CALIBRATION_METHODS: [&str; 4] = ["lidar-ptq", "minmax", "percentile", "entropy"];

#[derive(Debug, Clone, PartialEq)]
pub struct CalibrationParams {
    pub mode: CalibrationMode,
    pub frames: usize,
    pub spacing_s: f64,
    pub max_similarity: f64,
    pub method: String,
    /// LiDAR-PTQ reconstruction iterations per unit.
    pub iters: usize,
    /// Resolved cache path (the default derived from the model path).
    pub cache_path: PathBuf,
    pub bag_path: Option<PathBuf>,
}

/// Validated parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeParams {
    pub model_path: PathBuf,
    pub int8_model_path: Option<PathBuf>,
    pub precision: Precision,
    pub device: Device,
    pub score_threshold: f32,
    pub class_score_thresholds: BTreeMap<String, f32>,
    pub max_range: Option<f32>,
    pub nms_iou_threshold: Option<f32>,
    pub input_topic: String,
    pub output_topic: String,
    pub markers_topic: String,
    pub frame_id: Option<String>,
    pub intensity_field: String,
    pub intensity_scale: f32,
    pub processing_budget_ms: f64,
    pub calibration: CalibrationParams,
}

/// Reads values by name, falling back to the declared defaults, with typed accessors
/// whose errors name the parameter.
struct Reader<'a> {
    values: &'a BTreeMap<String, ParamValue>,
    defaults: BTreeMap<&'static str, ParamValue>,
}

fn invalid(name: &str, value: impl std::fmt::Display, reason: impl Into<String>) -> ParamError {
    ParamError::Invalid {
        name: name.to_owned(),
        value: value.to_string(),
        reason: reason.into(),
    }
}

impl Reader<'_> {
    fn get(&self, name: &str) -> &ParamValue {
        match self.values.get(name) {
            Some(ParamValue::NotSet) | None => &self.defaults[name],
            Some(v) => v,
        }
    }

    fn type_err(name: &str, expected: &'static str, got: &ParamValue) -> ParamError {
        ParamError::Type {
            name: name.to_owned(),
            expected,
            got: got.type_name(),
        }
    }

    fn string(&self, name: &str) -> Result<String, ParamError> {
        match self.get(name) {
            ParamValue::String(s) => Ok(s.trim().to_owned()),
            v => Err(Self::type_err(name, "string", v)),
        }
    }

    /// A double; integers are accepted (YAML `1` for `1.0` is a common slip).
    fn double(&self, name: &str) -> Result<f64, ParamError> {
        let v = match self.get(name) {
            ParamValue::Double(d) => *d,
            ParamValue::Integer(i) => *i as f64,
            v => return Err(Self::type_err(name, "double", v)),
        };
        if !v.is_finite() {
            return Err(invalid(name, v, "must be finite"));
        }
        Ok(v)
    }

    fn integer(&self, name: &str) -> Result<i64, ParamError> {
        match self.get(name) {
            ParamValue::Integer(i) => Ok(*i),
            v => Err(Self::type_err(name, "integer", v)),
        }
    }

    fn strings(&self, name: &str) -> Result<Vec<String>, ParamError> {
        match self.get(name) {
            ParamValue::StringArray(v) => Ok(v.clone()),
            // An empty YAML list cannot carry a type; rcl reads it as not set or as any
            // empty array.
            ParamValue::BoolArray(v) if v.is_empty() => Ok(vec![]),
            ParamValue::IntegerArray(v) if v.is_empty() => Ok(vec![]),
            ParamValue::DoubleArray(v) if v.is_empty() => Ok(vec![]),
            v => Err(Self::type_err(name, "string array", v)),
        }
    }

    fn choice<T: Copy>(&self, name: &str, options: &[(&str, T)]) -> Result<T, ParamError> {
        let v = self.string(name)?;
        options
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(&v))
            .map(|(_, t)| *t)
            .ok_or_else(|| {
                let allowed: Vec<&str> = options.iter().map(|(k, _)| *k).collect();
                invalid(
                    name,
                    format!("{v:?}"),
                    format!("must be one of {}", allowed.join(" | ")),
                )
            })
    }

    fn probability(&self, name: &str) -> Result<f32, ParamError> {
        let v = self.double(name)?;
        if !(0.0..=1.0).contains(&v) {
            return Err(invalid(name, v, "must be in [0, 1]"));
        }
        Ok(v as f32)
    }

    fn topic(&self, name: &str) -> Result<String, ParamError> {
        let t = self.string(name)?;
        let ok = !t.is_empty()
            && t.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '/' | '~'))
            && !t.contains("//")
            && !t.ends_with('/')
            && !t.chars().next().is_some_and(|c| c.is_ascii_digit())
            && t.find('~').is_none_or(|i| i == 0);
        if !ok {
            return Err(invalid(
                name,
                format!("{t:?}"),
                "not a valid ROS topic name (letters, digits, `_`, `/`, a leading `~`)",
            ));
        }
        Ok(t)
    }

    fn optional_path(&self, name: &str) -> Result<Option<PathBuf>, ParamError> {
        let p = self.string(name)?;
        Ok((!p.is_empty()).then(|| PathBuf::from(p)))
    }
}

/// The default calibration cache of a model: `<model stem>.int8.safetensors` beside it.
pub fn default_cache_path(model: &std::path::Path) -> PathBuf {
    let stem = model
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    model.with_file_name(format!("{stem}.int8.safetensors"))
}

impl NodeParams {
    /// Validates a full set of values (missing ones take their defaults). Unknown names
    /// are refused: a misspelt parameter would otherwise be silently ignored.
    pub fn from_values(values: &BTreeMap<String, ParamValue>) -> Result<Self, ParamError> {
        let specs = specs();
        if let Some(name) = values
            .keys()
            .find(|k| !specs.iter().any(|s| s.name == k.as_str()) && !is_ros_builtin(k))
        {
            let known: Vec<&str> = specs.iter().map(|s| s.name).collect();
            return Err(ParamError::Unknown {
                name: name.clone(),
                known: known.join(", "),
            });
        }
        let r = Reader {
            values,
            defaults: specs.into_iter().map(|s| (s.name, s.default)).collect(),
        };

        let model_path = r.optional_path("model_path")?.ok_or_else(|| {
            invalid(
                "model_path",
                "\"\"",
                "a model is required (safetensors with its config embedded)",
            )
        })?;
        let precision = r.choice(
            "precision",
            &[
                ("fp32", Precision::Fp32),
                ("int8", Precision::Int8),
                ("auto", Precision::Auto),
            ],
        )?;
        let device_name = r.string("device")?;
        let lower = device_name.to_ascii_lowercase();
        let device = match lower.as_str() {
            "cpu" => Device::Cpu,
            d if d == "cuda" || d.starts_with("cuda:") => {
                let ordinal = match d.strip_prefix("cuda:") {
                    None => 0,
                    Some(n) => n.parse().map_err(|_| {
                        invalid(
                            "device",
                            format!("{device_name:?}"),
                            "cuda:N needs a GPU number N >= 0",
                        )
                    })?,
                };
                if !cfg!(feature = "cuda") {
                    return Err(invalid(
                        "device",
                        format!("{device_name:?}"),
                        "not supported by this build (built without the `cuda` feature); use cpu",
                    ));
                }
                Device::Cuda(ordinal)
            }
            _ => {
                return Err(invalid(
                    "device",
                    format!("{device_name:?}"),
                    "must be cpu or cuda[:N]",
                ));
            }
        };
        let score_threshold = r.probability("score_threshold")?;
        let mut class_score_thresholds = BTreeMap::new();
        for entry in r.strings("class_score_thresholds")? {
            let bad = |why: &str| invalid("class_score_thresholds", format!("{entry:?}"), why);
            let (class, value) = entry
                .split_once('=')
                .ok_or_else(|| bad("entries are `class=value`"))?;
            let class = class.trim();
            if class.is_empty() {
                return Err(bad("the class name is empty"));
            }
            let v: f32 = value
                .trim()
                .parse()
                .map_err(|_| bad("the value is not a number"))?;
            if !(0.0..=1.0).contains(&v) {
                return Err(bad("the value must be in [0, 1]"));
            }
            if class_score_thresholds.insert(class.to_owned(), v).is_some() {
                return Err(bad("the class appears twice"));
            }
        }
        let max_range = r.double("max_range")?;
        if max_range < 0.0 {
            return Err(invalid(
                "max_range",
                max_range,
                "must be >= 0 (0: the model's range)",
            ));
        }
        let nms = r.double("nms_iou_threshold")?;
        if nms > 1.0 {
            return Err(invalid(
                "nms_iou_threshold",
                nms,
                "must be <= 1 (negative: the model's value)",
            ));
        }
        let intensity_field = r.string("intensity_field")?;
        if intensity_field.is_empty() {
            return Err(invalid("intensity_field", "\"\"", "must name a field"));
        }
        let intensity_scale = r.double("intensity_scale")?;
        if intensity_scale <= 0.0 {
            return Err(invalid("intensity_scale", intensity_scale, "must be > 0"));
        }
        let budget = r.double("processing_budget_ms")?;
        if budget <= 0.0 {
            return Err(invalid("processing_budget_ms", budget, "must be > 0"));
        }
        let frame_id = r.string("frame_id")?;
        if frame_id.chars().any(char::is_whitespace) {
            return Err(invalid(
                "frame_id",
                format!("{frame_id:?}"),
                "must not contain whitespace",
            ));
        }

        // YAML 1.1 reads an unquoted `off` as false; take it as meant.
        let mode = if r.get("calibration.mode") == &ParamValue::Bool(false) {
            CalibrationMode::Off
        } else {
            r.choice(
                "calibration.mode",
                &[
                    ("off", CalibrationMode::Off),
                    ("online", CalibrationMode::Online),
                    ("from-bag", CalibrationMode::FromBag),
                ],
            )?
        };
        let frames = r.integer("calibration.frames")?;
        if !(1..=10_000).contains(&frames) {
            return Err(invalid(
                "calibration.frames",
                frames,
                "must be in 1..=10000",
            ));
        }
        let spacing_s = r.double("calibration.spacing_s")?;
        if spacing_s < 0.0 {
            return Err(invalid("calibration.spacing_s", spacing_s, "must be >= 0"));
        }
        let max_similarity = r.double("calibration.max_similarity")?;
        if !(0.0..=1.0).contains(&max_similarity) {
            return Err(invalid(
                "calibration.max_similarity",
                max_similarity,
                "must be in [0, 1]",
            ));
        }
        let method = r.string("calibration.method")?.to_ascii_lowercase();
        if !CALIBRATION_METHODS.contains(&method.as_str()) {
            return Err(invalid(
                "calibration.method",
                format!("{method:?}"),
                format!("must be one of {}", CALIBRATION_METHODS.join(" | ")),
            ));
        }
        let iters = r.integer("calibration.iters")?;
        if !(1..=100_000).contains(&iters) {
            return Err(invalid("calibration.iters", iters, "must be in 1..=100000"));
        }
        let bag_path = r.optional_path("calibration.bag_path")?;
        if mode == CalibrationMode::FromBag && bag_path.is_none() {
            return Err(invalid(
                "calibration.bag_path",
                "\"\"",
                "calibration.mode from-bag needs a bag",
            ));
        }
        let cache_path = r
            .optional_path("calibration.cache_path")?
            .unwrap_or_else(|| default_cache_path(&model_path));

        Ok(Self {
            model_path,
            int8_model_path: r.optional_path("int8_model_path")?,
            precision,
            device,
            score_threshold,
            class_score_thresholds,
            max_range: (max_range > 0.0).then_some(max_range as f32),
            nms_iou_threshold: (nms >= 0.0).then_some(nms as f32),
            input_topic: r.topic("input_topic")?,
            output_topic: r.topic("output_topic")?,
            markers_topic: r.topic("markers_topic")?,
            frame_id: (!frame_id.is_empty()).then_some(frame_id),
            intensity_field,
            intensity_scale: intensity_scale as f32,
            processing_budget_ms: budget,
            calibration: CalibrationParams {
                mode,
                frames: frames as usize,
                spacing_s,
                max_similarity,
                method,
                iters: iters as usize,
                cache_path,
                bag_path,
            },
        })
    }

    /// How input clouds are decoded: the configured intensity field and scale, the
    /// decoder's defaults for everything else.
    pub fn decode_options(&self) -> crate::cloud::DecodeOptions {
        crate::cloud::DecodeOptions {
            intensity: vec![self.intensity_field.clone()],
            intensity_scale: self.intensity_scale,
            ..Default::default()
        }
    }

    /// The score threshold of `class`.
    pub fn threshold_of(&self, class: &str) -> f32 {
        self.class_score_thresholds
            .get(class)
            .copied()
            .unwrap_or(self.score_threshold)
    }

    /// Refuses per-class thresholds for classes the model does not predict.
    pub fn check_classes(&self, model_classes: &[&str]) -> Result<(), ParamError> {
        for class in self.class_score_thresholds.keys() {
            if !model_classes.contains(&class.as_str()) {
                return Err(invalid(
                    "class_score_thresholds",
                    format!("{class:?}"),
                    format!(
                        "the model has no such class (classes: {})",
                        model_classes.join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Parameters every ROS node has; they are not ours to validate.
fn is_ros_builtin(name: &str) -> bool {
    matches!(name, "use_sim_time" | "start_type_description_service")
        || name.starts_with("qos_overrides.")
}

/// The parameters of `node` in a ROS 2 parameter file (`node: ros__parameters: ...`,
/// `/**` wildcard sections apply too), nested maps flattened with `.` as rcl does.
pub fn from_ros_yaml(text: &str, node: &str) -> Result<BTreeMap<String, ParamValue>, ParamError> {
    let doc: Value =
        serde_saphyr::from_str(text).map_err(|e| ParamError::File(format!("not YAML: {e}")))?;
    let Value::Object(top) = doc else {
        return Err(ParamError::File(
            "the top level must be a map of node names".into(),
        ));
    };
    let mut out = BTreeMap::new();
    let wanted = [
        "/**".to_owned(),
        node.to_owned(),
        format!("/{}", node.trim_start_matches('/')),
    ];
    for (key, section) in &top {
        if !wanted.contains(key) {
            continue;
        }
        let params = section
            .get("ros__parameters")
            .ok_or_else(|| ParamError::File(format!("section `{key}` has no `ros__parameters`")))?;
        flatten("", params, &mut out)?;
    }
    Ok(out)
}

fn flatten(
    prefix: &str,
    v: &Value,
    out: &mut BTreeMap<String, ParamValue>,
) -> Result<(), ParamError> {
    let Value::Object(map) = v else {
        return Err(ParamError::File(format!(
            "`{prefix}` must be a map of parameters"
        )));
    };
    for (k, v) in map {
        let name = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        if v.is_object() {
            flatten(&name, v, out)?;
        } else {
            let pv = json_to_param(v).ok_or_else(|| {
                ParamError::File(format!(
                    "`{name}`: arrays must hold one type of scalar (got {v})"
                ))
            })?;
            out.insert(name, pv);
        }
    }
    Ok(())
}

fn json_to_param(v: &Value) -> Option<ParamValue> {
    Some(match v {
        Value::Null => ParamValue::NotSet,
        Value::Bool(b) => ParamValue::Bool(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => ParamValue::Integer(i),
            None => ParamValue::Double(n.as_f64()?),
        },
        Value::String(s) => ParamValue::String(s.clone()),
        Value::Array(a) if a.is_empty() => ParamValue::StringArray(vec![]),
        Value::Array(a) => {
            if let Some(v) = a.iter().map(Value::as_bool).collect::<Option<Vec<_>>>() {
                ParamValue::BoolArray(v)
            } else if let Some(v) = a.iter().map(Value::as_i64).collect::<Option<Vec<_>>>() {
                ParamValue::IntegerArray(v)
            } else if let Some(v) = a.iter().map(Value::as_f64).collect::<Option<Vec<_>>>() {
                ParamValue::DoubleArray(v)
            } else {
                ParamValue::StringArray(
                    a.iter()
                        .map(|x| x.as_str().map(str::to_owned))
                        .collect::<Option<Vec<_>>>()?,
                )
            }
        }
        Value::Object(_) => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(pairs: &[(&str, ParamValue)]) -> Result<NodeParams, ParamError> {
        let m = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        NodeParams::from_values(&m)
    }

    #[test]
    fn defaults_validate() {
        let p = with(&[]).unwrap();
        assert_eq!(p.model_path, PathBuf::from("models/default.safetensors"));
        assert_eq!(p.precision, Precision::Auto);
        assert_eq!(p.calibration.mode, CalibrationMode::Off);
        assert_eq!(
            p.calibration.cache_path,
            PathBuf::from("models/default.int8.safetensors")
        );
        assert_eq!(p.max_range, None);
        assert_eq!(p.nms_iou_threshold, None);
        assert_eq!(p.frame_id, None);
        assert_eq!(p.threshold_of("car"), 0.3);
        // Every spec has a description and a distinct name.
        let specs = specs();
        assert!(specs.iter().all(|s| !s.description.is_empty()));
        let mut names: Vec<_> = specs.iter().map(|s| s.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), specs.len());
    }

    #[test]
    fn bad_values_are_refused_by_name() {
        let cases: Vec<(&str, ParamValue, &str)> = vec![
            ("precision", s("int4"), "fp32 | int8 | auto"),
            ("device", s("tpu"), "must be cpu"),
            ("device", s("cuda:x"), "GPU number"),
            ("score_threshold", ParamValue::Double(1.5), "[0, 1]"),
            ("score_threshold", s("high"), "must be a double"),
            (
                "class_score_thresholds",
                ParamValue::StringArray(vec!["car:0.3".into()]),
                "class=value",
            ),
            (
                "class_score_thresholds",
                ParamValue::StringArray(vec!["car=x".into()]),
                "not a number",
            ),
            (
                "class_score_thresholds",
                ParamValue::StringArray(vec!["car=0.3".into(), "car=0.4".into()]),
                "twice",
            ),
            ("max_range", ParamValue::Double(-1.0), ">= 0"),
            ("nms_iou_threshold", ParamValue::Double(2.0), "<= 1"),
            ("intensity_scale", ParamValue::Double(0.0), "> 0"),
            ("input_topic", s("points with space"), "topic name"),
            ("input_topic", s("/a//b"), "topic name"),
            (
                "calibration.mode",
                s("sometimes"),
                "off | online | from-bag",
            ),
            ("calibration.mode", s("from-bag"), "needs a bag"),
            ("calibration.frames", ParamValue::Integer(0), "1..=10000"),
            (
                "calibration.frames",
                ParamValue::Double(3.0),
                "must be a integer",
            ),
            (
                "calibration.spacing_s",
                ParamValue::Double(f64::NAN),
                "finite",
            ),
            ("calibration.method", s("magic"), "lidar-ptq | minmax"),
            ("calibration.iters", ParamValue::Integer(0), "1..=100000"),
            ("model_path", s(""), "a model is required"),
            ("processing_budget_ms", ParamValue::Integer(0), "> 0"),
        ];
        for (name, value, want) in cases {
            let e = with(&[(name, value.clone())]).unwrap_err().to_string();
            assert!(
                e.contains(name) && e.contains(want),
                "{name}={value:?}: {e}"
            );
        }
        let e = with(&[("scor_threshold", ParamValue::Double(0.2))])
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown parameter `scor_threshold`"), "{e}");
    }

    /// `device: cuda[:N]` selects a GPU in a `cuda` build and is refused, saying why, in
    /// one without it.
    #[test]
    fn device_selection() {
        assert_eq!(with(&[]).unwrap().device, Device::Cpu);
        for (value, ordinal) in [("cuda", 0), ("CUDA:1", 1)] {
            let r = with(&[("device", s(value))]);
            if cfg!(feature = "cuda") {
                assert_eq!(r.unwrap().device, Device::Cuda(ordinal));
            } else {
                let e = r.unwrap_err().to_string();
                assert!(e.contains("without the `cuda` feature"), "{e}");
            }
        }
        assert_eq!(Device::Cuda(2).to_string(), "cuda:2");
    }

    #[test]
    fn values_are_converted() {
        let p = with(&[
            ("precision", s("INT8")),
            ("score_threshold", ParamValue::Integer(1)),
            (
                "class_score_thresholds",
                ParamValue::StringArray(vec!["pedestrian = 0.25".into()]),
            ),
            ("max_range", ParamValue::Double(40.0)),
            ("frame_id", s("base_link")),
            ("calibration.mode", s("from-bag")),
            ("calibration.bag_path", s("/tmp/bag")),
            ("calibration.cache_path", s("/tmp/c.safetensors")),
            ("use_sim_time", ParamValue::Bool(false)),
        ])
        .unwrap();
        assert_eq!(p.precision, Precision::Int8);
        assert_eq!(p.score_threshold, 1.0);
        assert_eq!(p.threshold_of("pedestrian"), 0.25);
        assert_eq!(p.threshold_of("car"), 1.0);
        assert_eq!(p.max_range, Some(40.0));
        assert_eq!(p.frame_id.as_deref(), Some("base_link"));
        assert_eq!(p.calibration.bag_path, Some(PathBuf::from("/tmp/bag")));
        assert_eq!(
            p.calibration.cache_path,
            PathBuf::from("/tmp/c.safetensors")
        );
        assert!(p.check_classes(&["car", "pedestrian"]).is_ok());
        let e = p.check_classes(&["car"]).unwrap_err().to_string();
        assert!(e.contains("no such class"), "{e}");
    }

    #[test]
    fn ros_parameter_files_are_flattened() {
        let text = "
/**:
  ros__parameters:
    use_sim_time: false
lidar_ptq_node:
  ros__parameters:
    model_path: m.safetensors
    score_threshold: 0.4
    class_score_thresholds: [\"car=0.5\"]
    calibration:
      mode: online
      frames: 16
other_node:
  ros__parameters:
    score_threshold: 0.9
";
        let v = from_ros_yaml(text, "lidar_ptq_node").unwrap();
        assert_eq!(v["calibration.mode"], s("online"));
        assert_eq!(v["calibration.frames"], ParamValue::Integer(16));
        assert_eq!(v["use_sim_time"], ParamValue::Bool(false));
        let p = NodeParams::from_values(&v).unwrap();
        assert_eq!(p.score_threshold, 0.4);
        assert_eq!(p.threshold_of("car"), 0.5);
        assert_eq!(p.calibration.frames, 16);
        assert!(from_ros_yaml("- a\n- b\n", "n").is_err());
        let off = from_ros_yaml(
            "n:\n  ros__parameters:\n    calibration: {mode: off}\n",
            "n",
        )
        .unwrap();
        let p = NodeParams::from_values(&off).unwrap();
        assert_eq!(p.calibration.mode, CalibrationMode::Off);
        assert!(from_ros_yaml("n: {x: 1}\n", "n").is_err());
    }

    #[test]
    fn the_shipped_parameter_file_is_valid() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/lidar_ptq_node.yaml");
        let text = std::fs::read_to_string(&path).unwrap();
        let v = from_ros_yaml(&text, "lidar_ptq_node").unwrap();
        // Every declared parameter is written out in the shipped file, documented there.
        for spec in specs() {
            assert!(v.contains_key(spec.name), "config file lacks {}", spec.name);
        }
        NodeParams::from_values(&v).unwrap();
    }
}
