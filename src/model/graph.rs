//! The network as data: a list of nodes in topological order, each a layer (linear or
//! convolution with optional BatchNorm and ReLU) or a glue op, with named parameters.
//!
//! Every backend (FP32 training, fake-quant, INT8, CUDA) interprets this one description.
//! A layer node is also LiDAR-PTQ's reconstruction unit. Parameter names follow OpenPCDet's
//! state-dict keys (`vfe.pfn_layers.0.linear.weight`, `backbone_2d.blocks.0.1.weight`,
//! `dense_head.heads_list.0.hm.1.bias`, ...), so imported checkpoints map one to one.

use super::config::{Encoder, ModelConfig};

/// Index of a value (a node's output) in the graph.
pub type ValueId = usize;

/// The weighted operation of a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerKind {
    /// Per-point linear map over `[P, N, C]`.
    Linear,
    /// 2D convolution, square kernel, zero padding.
    Conv2d {
        kernel: usize,
        stride: usize,
        padding: usize,
    },
    /// 2D transposed convolution (kernel == stride in CenterPoint's neck).
    ConvTranspose2d { kernel: usize, stride: usize },
    /// Sparse 3D convolution over active sites `[N, Cin] -> [N', Cout]`, kernel (z, y, x);
    /// stride, padding and the input/output sites are those of `Graph::sparse`'s rulebook
    /// `rulebook` (layers of one resolution share one).
    SparseConv3d { kernel: [usize; 3], rulebook: usize },
}

/// A layer: weighted op, then optional BatchNorm (eval: folded), then optional ReLU.
#[derive(Debug, Clone, PartialEq)]
pub struct Layer {
    pub kind: LayerKind,
    pub in_channels: usize,
    pub out_channels: usize,
    /// Parameter name prefix of the weighted op (`<prefix>.weight`, `<prefix>.bias`).
    pub param: String,
    pub bias: bool,
    /// BatchNorm parameter prefix and eps (`<prefix>.weight|bias|running_mean|running_var`).
    pub bn: Option<(String, f32)>,
    pub relu: bool,
    /// Initial value of the bias (the heatmap prior), when not zero.
    pub bias_init: f32,
}

impl Layer {
    /// Shape of the weight tensor, in PyTorch layout.
    pub fn weight_shape(&self) -> Vec<usize> {
        match self.kind {
            LayerKind::Linear => vec![self.out_channels, self.in_channels],
            LayerKind::Conv2d { kernel, .. } => {
                vec![self.out_channels, self.in_channels, kernel, kernel]
            }
            LayerKind::ConvTranspose2d { kernel, .. } => {
                vec![self.in_channels, self.out_channels, kernel, kernel]
            }
            // spconv 2.x layout, so OpenPCDet checkpoints map directly.
            LayerKind::SparseConv3d {
                kernel: [kz, ky, kx],
                ..
            } => {
                vec![self.out_channels, kz, ky, kx, self.in_channels]
            }
        }
    }

    fn kernel_area(&self) -> usize {
        match self.kind {
            LayerKind::Linear => 1,
            LayerKind::Conv2d { kernel, .. } | LayerKind::ConvTranspose2d { kernel, .. } => {
                kernel * kernel
            }
            LayerKind::SparseConv3d { kernel, .. } => kernel.iter().product(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    Layer(Layer),
    /// Max over the points of each pillar `[P, N, C] -> [P, C]`; with `concat_back`, the
    /// max is instead repeated and concatenated onto every point: `[P, N, 2C]`.
    PillarMax {
        concat_back: bool,
        include_padding: bool,
    },
    /// Pillar features `[P, C]` to the dense BEV image `[1, C, ny, nx]`.
    Scatter {
        channels: usize,
    },
    /// Concatenation along channels.
    Concat,
    /// Element-wise sum of two values of the same shape (and, when sparse, the same
    /// sites), then ReLU when `relu`: the residual join of a sparse basic block.
    Add {
        relu: bool,
    },
    /// Sparse features `[N, C]` on the sites of set `sites` to the dense BEV image
    /// `[1, C * D, H, W]`, depth folded into channels (channel `c * D + z`).
    HeightCompress {
        sites: usize,
        channels: usize,
    },
}

/// A rulebook of the sparse backbone: the convolution geometry applied to one site set.
/// A submanifold rulebook keeps its input sites; a regular one creates a new site set.
#[derive(Debug, Clone, PartialEq)]
pub struct RulebookSpec {
    pub input: usize,
    pub output: usize,
    pub kernel: [usize; 3],
    pub stride: [usize; 3],
    pub padding: [usize; 3],
    pub submanifold: bool,
}

/// The sparse part of a voxel model. Site set 0 holds the input voxels; engines build the
/// rulebooks once per frame, in order (each reads a site set an earlier one produced).
#[derive(Debug, Clone, PartialEq)]
pub struct SparseSpec {
    /// Grid (D, H, W) of each site set.
    pub grids: Vec<[usize; 3]>,
    pub rulebooks: Vec<RulebookSpec>,
}

impl SparseSpec {
    /// The submanifold 3x3x3 rulebook of site set `sites`, added on first use.
    fn submanifold(&mut self, sites: usize) -> usize {
        if let Some(i) = self
            .rulebooks
            .iter()
            .position(|r| r.submanifold && r.input == sites)
        {
            return i;
        }
        self.rulebooks.push(RulebookSpec {
            input: sites,
            output: sites,
            kernel: [3; 3],
            stride: [1; 3],
            padding: [1; 3],
            submanifold: true,
        });
        self.rulebooks.len() - 1
    }

    /// A regular (strided) rulebook from site set `sites` to a new site set.
    fn regular(
        &mut self,
        sites: usize,
        kernel: [usize; 3],
        stride: [usize; 3],
        padding: [usize; 3],
    ) -> Result<usize, String> {
        let g = self.grids[sites];
        let mut out = [0; 3];
        for a in 0..3 {
            let padded = g[a] + 2 * padding[a];
            if padded < kernel[a] {
                return Err(format!(
                    "sparse conv kernel {kernel:?} does not fit the grid {g:?} padded by {padding:?}"
                ));
            }
            out[a] = (padded - kernel[a]) / stride[a] + 1;
        }
        self.grids.push(out);
        self.rulebooks.push(RulebookSpec {
            input: sites,
            output: self.grids.len() - 1,
            kernel,
            stride,
            padding,
            submanifold: false,
        });
        Ok(self.rulebooks.len() - 1)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub name: String,
    pub op: Op,
    pub inputs: Vec<ValueId>,
}

/// Output values of one head task.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskHeads {
    pub heatmap: ValueId,
    /// One value per regression sub-head, in config order.
    pub regression: Vec<ValueId>,
}

/// A parameter tensor the graph needs.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
}

/// The network. Value 0 is the input: decorated pillar points `[P, N, F]` with the pillar
/// coordinates alongside, or for a voxel model the voxel features `[V, F]` on site set 0;
/// value `i + 1` is the output of node `i`.
#[derive(Debug, Clone, PartialEq)]
pub struct Graph {
    pub nodes: Vec<Node>,
    pub tasks: Vec<TaskHeads>,
    /// BEV size (ny, nx) where the 2D part starts (the scatter's image, or the height
    /// compression's).
    pub bev: (usize, usize),
    /// The sparse backbone of a voxel model; `None` for pillars.
    pub sparse: Option<SparseSpec>,
}

/// Multiply-accumulates of one node for a given input map size, and its output size.
#[derive(Debug, Clone, Copy)]
struct Dims {
    channels: usize,
    h: usize,
    w: usize,
}

impl Graph {
    /// Builds the network of a model description.
    pub fn build(cfg: &ModelConfig) -> Result<Graph, String> {
        let mut g = GraphBuilder::default();
        let (x, width, bev, sparse) = match cfg.voxelization.encoder {
            Encoder::Pillar => {
                let (x, width) = pillar_encoder(cfg, &mut g)?;
                let [nx, ny, _] = cfg.grid_size();
                (x, width, (ny, nx), None)
            }
            Encoder::Voxel => {
                let (x, width, bev, sparse) = sparse_backbone(cfg, &mut g)?;
                (x, width, bev, Some(sparse))
            }
        };
        let mut x = x;

        // 2D backbone levels and the upsampling neck.
        let b = &cfg.backbone_2d;
        let mut ups = Vec::new();
        let mut c = width;
        for (l, (level, up)) in b.levels.iter().zip(&b.upsample).enumerate() {
            for j in 0..=level.layers {
                // OpenPCDet numbering: block = [ZeroPad, conv, bn, relu, conv, bn, relu, ...].
                let idx = 1 + 3 * j;
                x = g.layer(
                    &format!("backbone_2d.blocks.{l}.{idx}"),
                    Layer {
                        kind: LayerKind::Conv2d {
                            kernel: 3,
                            stride: if j == 0 { level.stride } else { 1 },
                            padding: 1,
                        },
                        in_channels: c,
                        out_channels: level.channels,
                        param: format!("backbone_2d.blocks.{l}.{idx}"),
                        bias: false,
                        bn: Some((format!("backbone_2d.blocks.{l}.{}", idx + 1), b.bn_eps)),
                        relu: true,
                        bias_init: 0.0,
                    },
                    x,
                );
                c = level.channels;
            }
            let kind = if up.stride < 1.0 {
                let k = (1.0 / up.stride).round() as usize;
                LayerKind::Conv2d {
                    kernel: k,
                    stride: k,
                    padding: 0,
                }
            } else {
                let k = up.stride.round() as usize;
                LayerKind::ConvTranspose2d {
                    kernel: k,
                    stride: k,
                }
            };
            ups.push(g.layer(
                &format!("backbone_2d.deblocks.{l}"),
                Layer {
                    kind,
                    in_channels: c,
                    out_channels: up.channels,
                    param: format!("backbone_2d.deblocks.{l}.0"),
                    bias: false,
                    bn: Some((format!("backbone_2d.deblocks.{l}.1"), b.bn_eps)),
                    relu: true,
                    bias_init: 0.0,
                },
                x,
            ));
        }
        let neck_c: usize = b.upsample.iter().map(|u| u.channels).sum();
        let neck = if ups.len() == 1 {
            ups[0]
        } else {
            g.node("backbone_2d.concat", Op::Concat, ups)
        };

        // Head: shared conv, then per task the separate sub-heads and the heatmap.
        let h = &cfg.head;
        let conv3 = LayerKind::Conv2d {
            kernel: 3,
            stride: 1,
            padding: 1,
        };
        let shared = g.layer(
            "dense_head.shared_conv",
            Layer {
                kind: conv3,
                in_channels: neck_c,
                out_channels: h.shared_channels,
                param: "dense_head.shared_conv.0".into(),
                bias: h.bias_before_norm,
                bn: Some(("dense_head.shared_conv.1".into(), h.bn_eps)),
                relu: true,
                bias_init: 0.0,
            },
            neck,
        );
        let mut tasks = Vec::new();
        for (t, classes) in h.tasks.iter().enumerate() {
            let branch = |g: &mut GraphBuilder, name: &str, out: usize, num_conv: usize| {
                let p = format!("dense_head.heads_list.{t}.{name}");
                let mut v = shared;
                for k in 0..num_conv - 1 {
                    v = g.layer(
                        &format!("{p}.{k}"),
                        Layer {
                            kind: conv3,
                            in_channels: h.shared_channels,
                            out_channels: h.shared_channels,
                            param: format!("{p}.{k}.0"),
                            bias: h.bias_before_norm,
                            bn: Some((format!("{p}.{k}.1"), h.bn_eps)),
                            relu: true,
                            bias_init: 0.0,
                        },
                        v,
                    );
                }
                let hm = name == "hm";
                g.layer(
                    &format!("{p}.{}", num_conv - 1),
                    Layer {
                        kind: conv3,
                        in_channels: h.shared_channels,
                        out_channels: out,
                        param: format!("{p}.{}", num_conv - 1),
                        bias: true,
                        bn: None,
                        relu: false,
                        bias_init: if hm { h.hm_init_bias } else { 0.0 },
                    },
                    v,
                )
            };
            let regression = h
                .sub_heads
                .iter()
                .map(|s| branch(&mut g, &s.name, s.out, s.num_conv))
                .collect();
            let heatmap = branch(&mut g, "hm", classes.len(), h.hm_num_conv);
            tasks.push(TaskHeads {
                heatmap,
                regression,
            });
        }
        Ok(Graph {
            nodes: g.nodes,
            tasks,
            bev,
            sparse,
        })
    }

    /// Every parameter tensor, in node order.
    pub fn params(&self) -> Vec<ParamSpec> {
        let mut out = Vec::new();
        for n in &self.nodes {
            if let Op::Layer(l) = &n.op {
                out.push(ParamSpec {
                    name: format!("{}.weight", l.param),
                    shape: l.weight_shape(),
                });
                if l.bias {
                    out.push(ParamSpec {
                        name: format!("{}.bias", l.param),
                        shape: vec![l.out_channels],
                    });
                }
                if let Some((bn, _)) = &l.bn {
                    for s in ["weight", "bias", "running_mean", "running_var"] {
                        out.push(ParamSpec {
                            name: format!("{bn}.{s}"),
                            shape: vec![l.out_channels],
                        });
                    }
                }
            }
        }
        out
    }

    /// Trainable parameter count (BatchNorm running statistics excluded).
    pub fn num_trainable(&self) -> usize {
        self.params()
            .iter()
            .filter(|p| !p.name.ends_with("running_mean") && !p.name.ends_with("running_var"))
            .map(|p| p.shape.iter().product::<usize>())
            .sum()
    }

    /// Multiply-accumulates of the dense part (backbone, neck, head) per frame, split as
    /// (backbone + neck, head).
    pub fn dense_macs(&self) -> (u64, u64) {
        let (ny, nx) = self.bev;
        let mut dims: Vec<Option<Dims>> = vec![None; self.nodes.len() + 1];
        let (mut backbone, mut head) = (0u64, 0u64);
        for (i, n) in self.nodes.iter().enumerate() {
            let d = match &n.op {
                Op::Scatter { channels } => Some(Dims {
                    channels: *channels,
                    h: ny,
                    w: nx,
                }),
                Op::Concat => {
                    let ins: Vec<Dims> = n.inputs.iter().filter_map(|&v| dims[v]).collect();
                    ins.first().map(|f| Dims {
                        channels: ins.iter().map(|d| d.channels).sum(),
                        ..*f
                    })
                }
                Op::PillarMax { .. } => None,
                // Sparse values have no dense size; an add keeps its input's.
                Op::Add { .. } => dims[n.inputs[0]],
                Op::HeightCompress { sites, channels } => self.sparse.as_ref().map(|sp| {
                    let [d, h, w] = sp.grids[*sites];
                    Dims {
                        channels: channels * d,
                        h,
                        w,
                    }
                }),
                Op::Layer(l) => dims[n.inputs[0]].map(|inp| {
                    let (h, w) = match l.kind {
                        LayerKind::Linear => (0, 0),
                        LayerKind::Conv2d {
                            kernel,
                            stride,
                            padding,
                        } => (
                            (inp.h + 2 * padding - kernel) / stride + 1,
                            (inp.w + 2 * padding - kernel) / stride + 1,
                        ),
                        LayerKind::ConvTranspose2d { stride, .. } => {
                            (inp.h * stride, inp.w * stride)
                        }
                        LayerKind::SparseConv3d { .. } => (0, 0),
                    };
                    // A transposed conv does its MACs per input pixel.
                    let pixels = match l.kind {
                        LayerKind::ConvTranspose2d { .. } => inp.h * inp.w,
                        _ => h * w,
                    };
                    let macs = (pixels * l.in_channels * l.out_channels * l.kernel_area()) as u64;
                    if n.name.starts_with("dense_head") {
                        head += macs;
                    } else {
                        backbone += macs;
                    }
                    Dims {
                        channels: l.out_channels,
                        h,
                        w,
                    }
                }),
            };
            dims[i + 1] = d;
        }
        (backbone, head)
    }
}

/// The pillar feature net and the scatter: value 0 (decorated points) to the BEV image.
/// Returns the image's value and channels.
fn pillar_encoder(cfg: &ModelConfig, g: &mut GraphBuilder) -> Result<(ValueId, usize), String> {
    let pf = cfg
        .pillar_features
        .as_ref()
        .ok_or("pillar encoder without pillar_features")?;
    let mut x: ValueId = 0;
    let mut width = cfg
        .pillar_input_width()
        .ok_or("pillar encoder without pillar_features")?;
    for (i, &w) in pf.widths.iter().enumerate() {
        let last = i + 1 == pf.widths.len();
        let out = if last { w } else { w / 2 };
        x = g.layer(
            &format!("vfe.pfn_layers.{i}"),
            Layer {
                kind: LayerKind::Linear,
                in_channels: width,
                out_channels: out,
                param: format!("vfe.pfn_layers.{i}.linear"),
                bias: false,
                bn: Some((format!("vfe.pfn_layers.{i}.norm"), pf.bn_eps)),
                relu: true,
                bias_init: 0.0,
            },
            x,
        );
        x = g.node(
            &format!("vfe.pfn_layers.{i}.max"),
            Op::PillarMax {
                concat_back: !last,
                include_padding: pf.max_includes_padding,
            },
            vec![x],
        );
        width = if last { out } else { 2 * out };
    }
    x = g.node("map_to_bev", Op::Scatter { channels: width }, vec![x]);
    Ok((x, width))
}

/// The sparse 3D backbone of the voxel model (OpenPCDet's VoxelResBackBone8x, parameter
/// names included): a submanifold stem, stages of a stride-2 sparse conv (the first stage
/// has none; the last pads z by 0) and residual blocks, a (3,1,1) stride-(2,1,1) sparse
/// conv, then height compression. Value 0 holds the voxel features `[V, F]` on a grid of
/// `nz + 1` layers (spconv's convention, which makes 40 z cells come out as 2).
/// Returns the BEV image's value, channels, size (ny, nx) and the sparse spec.
fn sparse_backbone(
    cfg: &ModelConfig,
    g: &mut GraphBuilder,
) -> Result<(ValueId, usize, (usize, usize), SparseSpec), String> {
    let b = cfg
        .backbone_3d
        .as_ref()
        .ok_or("voxel encoder without backbone_3d")?;
    let [nx, ny, nz] = cfg.grid_size();
    let mut sp = SparseSpec {
        grids: vec![[nz + 1, ny, nx]],
        rulebooks: Vec::new(),
    };
    let conv = |g: &mut GraphBuilder,
                name: &str,
                param: &str,
                bn: &str,
                kernel: [usize; 3],
                rulebook: usize,
                (cin, cout): (usize, usize),
                (bias, relu): (bool, bool),
                x: ValueId| {
        g.layer(
            name,
            Layer {
                kind: LayerKind::SparseConv3d { kernel, rulebook },
                in_channels: cin,
                out_channels: cout,
                param: param.to_owned(),
                bias,
                bn: Some((bn.to_owned(), b.bn_eps)),
                relu,
                bias_init: 0.0,
            },
            x,
        )
    };
    let mut sites = 0;
    let f = cfg.input.point_features.len();
    let rb = sp.submanifold(sites);
    let mut x = conv(
        g,
        "backbone_3d.conv_input",
        "backbone_3d.conv_input.0",
        "backbone_3d.conv_input.1",
        [3; 3],
        rb,
        (f, b.stem_channels),
        (false, true),
        0,
    );
    let mut c = b.stem_channels;
    let stages = b.stage_channels.len();
    for (s, (&blocks, &ch)) in b.blocks_per_stage.iter().zip(&b.stage_channels).enumerate() {
        let name = format!("backbone_3d.conv{}", s + 1);
        let mut first = 0;
        if s > 0 {
            let pad_z = if s + 1 == stages { 0 } else { 1 };
            let rb = sp.regular(sites, [3; 3], [2; 3], [pad_z, 1, 1])?;
            sites = sp.rulebooks[rb].output;
            x = conv(
                g,
                &format!("{name}.0"),
                &format!("{name}.0.0"),
                &format!("{name}.0.1"),
                [3; 3],
                rb,
                (c, ch),
                (false, true),
                x,
            );
            first = 1;
        } else if ch != c {
            return Err(format!(
                "backbone_3d: the first stage has no downsampling conv, so its {ch} channels must equal stem_channels {c}"
            ));
        }
        c = ch;
        for k in 0..blocks {
            // SparseBasicBlock: conv-bn-relu, conv-bn, + identity, relu. OpenPCDet gives
            // its convs a bias (bias = norm_fn is not None).
            let p = format!("{name}.{}", first + k);
            let rb = sp.submanifold(sites);
            let h = conv(
                g,
                &format!("{p}.conv1"),
                &format!("{p}.conv1"),
                &format!("{p}.bn1"),
                [3; 3],
                rb,
                (c, c),
                (true, true),
                x,
            );
            let h = conv(
                g,
                &format!("{p}.conv2"),
                &format!("{p}.conv2"),
                &format!("{p}.bn2"),
                [3; 3],
                rb,
                (c, c),
                (true, false),
                h,
            );
            x = g.node(&format!("{p}.add"), Op::Add { relu: true }, vec![h, x]);
        }
    }
    let rb = sp.regular(sites, [3, 1, 1], [2, 1, 1], [0; 3])?;
    sites = sp.rulebooks[rb].output;
    x = conv(
        g,
        "backbone_3d.conv_out",
        "backbone_3d.conv_out.0",
        "backbone_3d.conv_out.1",
        [3, 1, 1],
        rb,
        (c, b.out_channels),
        (false, true),
        x,
    );
    let [d, h, w] = sp.grids[sites];
    x = g.node(
        "map_to_bev",
        Op::HeightCompress {
            sites,
            channels: b.out_channels,
        },
        vec![x],
    );
    Ok((x, b.out_channels * d, (h, w), sp))
}

#[derive(Default)]
struct GraphBuilder {
    nodes: Vec<Node>,
}

impl GraphBuilder {
    fn node(&mut self, name: &str, op: Op, inputs: Vec<ValueId>) -> ValueId {
        self.nodes.push(Node {
            name: name.to_owned(),
            op,
            inputs,
        });
        self.nodes.len()
    }

    fn layer(&mut self, name: &str, layer: Layer, input: ValueId) -> ValueId {
        self.node(name, Op::Layer(layer), vec![input])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn load(name: &str) -> ModelConfig {
        ModelConfig::load(
            &Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("config/models")
                .join(name),
        )
        .unwrap()
    }

    /// The spec's published sizes of the nuScenes pillar model: ~6.0 M parameters,
    /// ~38 GMAC backbone + neck and ~26 GMAC head.
    #[test]
    fn nuscenes_pillar_matches_published_size() {
        let g = Graph::build(&load("nuscenes_pillar.yaml")).unwrap();
        let params = g.num_trainable() as f64 / 1e6;
        assert!((params - 6.0).abs() < 0.3, "{params} M parameters");
        let (bb, head) = g.dense_macs();
        let (bb, head) = (bb as f64 / 1e9, head as f64 / 1e9);
        assert!((bb - 38.0).abs() < 3.0, "{bb} GMAC backbone");
        assert!((head - 26.0).abs() < 3.0, "{head} GMAC head");
    }

    /// The nuScenes voxel model: the spec's grids ([41,1440,1440] down to [2,180,180], 256
    /// BEV channels), OpenPCDet's VoxelResBackBone8x parameter names and layouts, and the
    /// published size (~8.9 M parameters, ~63 GMAC 2D part, ~54 GMAC head).
    #[test]
    fn nuscenes_voxel_matches_the_reference() {
        let g = Graph::build(&load("nuscenes_voxel.yaml")).unwrap();
        let sp = g.sparse.as_ref().unwrap();
        assert_eq!(
            sp.grids,
            vec![
                [41, 1440, 1440],
                [21, 720, 720],
                [11, 360, 360],
                [5, 180, 180],
                [2, 180, 180]
            ]
        );
        // One submanifold rulebook per resolution before conv_out, shared by its layers.
        assert_eq!(sp.rulebooks.iter().filter(|r| r.submanifold).count(), 4);
        assert_eq!(sp.rulebooks.len(), 8);
        assert_eq!(g.bev, (180, 180));
        let params: Vec<ParamSpec> = g.params();
        let shape = |n: &str| {
            params
                .iter()
                .find(|p| p.name == n)
                .unwrap_or_else(|| panic!("missing {n}"))
                .shape
                .clone()
        };
        assert_eq!(
            shape("backbone_3d.conv_input.0.weight"),
            vec![16, 3, 3, 3, 5]
        );
        assert_eq!(shape("backbone_3d.conv1.1.conv2.bias"), vec![16]);
        assert_eq!(shape("backbone_3d.conv2.0.0.weight"), vec![32, 3, 3, 3, 16]);
        assert_eq!(shape("backbone_3d.conv4.2.bn2.running_var"), vec![128]);
        assert_eq!(
            shape("backbone_3d.conv_out.0.weight"),
            vec![128, 3, 1, 1, 128]
        );
        assert_eq!(shape("backbone_2d.blocks.0.1.weight"), vec![128, 256, 3, 3]);
        assert_eq!(
            shape("dense_head.shared_conv.0.weight"),
            vec![64, 512, 3, 3]
        );
        let m = g.num_trainable() as f64 / 1e6;
        assert!((m - 8.9).abs() < 0.4, "{m} M parameters");
        let (bb, head) = g.dense_macs();
        let (bb, head) = (bb as f64 / 1e9, head as f64 / 1e9);
        assert!((bb - 63.0).abs() < 5.0, "{bb} GMAC 2D part");
        assert!((head - 54.0).abs() < 5.0, "{head} GMAC head");
    }

    #[test]
    fn parameter_names_follow_openpcdet() {
        let g = Graph::build(&load("nuscenes_pillar.yaml")).unwrap();
        let names: Vec<String> = g.params().into_iter().map(|p| p.name).collect();
        for want in [
            "vfe.pfn_layers.0.linear.weight",
            "vfe.pfn_layers.0.norm.running_var",
            "backbone_2d.blocks.0.1.weight",
            "backbone_2d.blocks.0.2.weight",
            "backbone_2d.blocks.2.16.weight",
            "backbone_2d.deblocks.0.0.weight",
            "backbone_2d.deblocks.2.1.running_mean",
            "dense_head.shared_conv.0.bias",
            "dense_head.heads_list.5.hm.1.bias",
            "dense_head.heads_list.0.vel.0.1.weight",
        ] {
            assert!(names.iter().any(|n| n == want), "missing {want}");
        }
        assert_eq!(g.tasks.len(), 6);
        // 6 tasks x (5 sub-heads + hm) x 2 convs + shared conv.
        let head_layers = g
            .nodes
            .iter()
            .filter(|n| n.name.starts_with("dense_head"))
            .count();
        assert_eq!(head_layers, 6 * 6 * 2 + 1);
    }
}
