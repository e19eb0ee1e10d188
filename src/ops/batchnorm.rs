//! Batch normalisation over a channel axis, in training mode (batch statistics) and
//! inference mode (running statistics), and folding of inference BN into the preceding
//! linear / conv layer.
//!
//! Two layouts cover CenterPoint: BN1d over point features `[.., C]` (channels last, every
//! leading index is one sample, padded point slots included as in the reference PFN) and
//! BN2d over NCHW images (`[N, C, spatial..]`, statistics over N and the spatial axes).

use super::{OpsError, Result, Tensor, expect_len, expect_shape};

const OP: &str = "batchnorm";

/// Where the channel axis is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `[.., C]`: BN1d over points (e.g. `[P, N, C]` pillar point features).
    ChannelsLast,
    /// `[N, C, ..]`: BN2d over NCHW images.
    ChannelsFirst,
}

/// The parameters and running statistics of one BN layer (PyTorch semantics).
#[derive(Debug, Clone, PartialEq)]
pub struct BatchNorm {
    pub gamma: Vec<f32>,
    pub beta: Vec<f32>,
    pub running_mean: Vec<f32>,
    pub running_var: Vec<f32>,
    pub eps: f32,
    /// Weight of the new batch statistic in the running average (PyTorch default 0.1).
    pub momentum: f32,
}

impl BatchNorm {
    /// Identity-initialised BN (gamma 1, beta 0, mean 0, var 1), as freshly constructed in
    /// PyTorch; CenterPoint uses eps 1e-3 and momentum 0.01.
    pub fn new(channels: usize, eps: f32, momentum: f32) -> Self {
        Self {
            gamma: vec![1.0; channels],
            beta: vec![0.0; channels],
            running_mean: vec![0.0; channels],
            running_var: vec![1.0; channels],
            eps,
            momentum,
        }
    }

    pub fn channels(&self) -> usize {
        self.gamma.len()
    }

    fn check(&self) -> Result<usize> {
        let c = self.gamma.len();
        expect_len(OP, "beta", self.beta.len(), c)?;
        expect_len(OP, "running_mean", self.running_mean.len(), c)?;
        expect_len(OP, "running_var", self.running_var.len(), c)?;
        if self.eps.is_nan() || self.eps <= 0.0 {
            return Err(OpsError::Invalid {
                op: OP,
                arg: "eps",
                detail: format!("must be > 0, is {}", self.eps),
            });
        }
        Ok(c)
    }

    /// Per-channel `(scale, shift)` with `BN_eval(x) = scale * x + shift`.
    pub fn eval_affine(&self) -> Result<(Vec<f32>, Vec<f32>)> {
        let c = self.check()?;
        let scale: Vec<f32> = (0..c)
            .map(|i| self.gamma[i] / (self.running_var[i] + self.eps).sqrt())
            .collect();
        let shift = (0..c)
            .map(|i| self.beta[i] - self.running_mean[i] * scale[i])
            .collect();
        Ok((scale, shift))
    }
}

/// The tensor viewed as `[outer, C, inner]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct View {
    outer: usize,
    c: usize,
    inner: usize,
}

impl View {
    fn of(x: &Tensor, layout: Layout, c: usize) -> Result<Self> {
        let bad = || OpsError::Shape {
            op: OP,
            arg: "input",
            got: x.shape.clone(),
            expected: match layout {
                Layout::ChannelsLast => format!("[.., {c}]"),
                Layout::ChannelsFirst => format!("[N, {c}, ..]"),
            },
        };
        match layout {
            Layout::ChannelsLast => {
                let (&last, lead) = x.shape.split_last().ok_or_else(bad)?;
                if last != c {
                    return Err(bad());
                }
                Ok(Self {
                    outer: lead.iter().product(),
                    c,
                    inner: 1,
                })
            }
            Layout::ChannelsFirst => {
                if x.shape.len() < 2 || x.shape[1] != c {
                    return Err(bad());
                }
                Ok(Self {
                    outer: x.shape[0],
                    c,
                    inner: x.shape[2..].iter().product(),
                })
            }
        }
    }

    /// Number of values per channel.
    fn count(&self) -> usize {
        self.outer * self.inner
    }

    /// Calls `f(flat_index)` for every element of channel `ch`.
    fn for_channel(&self, ch: usize, mut f: impl FnMut(usize)) {
        for o in 0..self.outer {
            let base = (o * self.c + ch) * self.inner;
            for i in base..base + self.inner {
                f(i);
            }
        }
    }
}

/// Sets `out[i] = f(channel, i)` for every element, in parallel over rows of the view.
fn fill_by_channel(view: View, out: &mut [f32], f: impl Fn(usize, usize) -> f32 + Sync) {
    use rayon::prelude::*;
    if view.inner > 1 {
        out.par_chunks_mut(view.inner)
            .enumerate()
            .for_each(|(r, row)| {
                let ch = r % view.c;
                let base = r * view.inner;
                row.iter_mut()
                    .enumerate()
                    .for_each(|(k, v)| *v = f(ch, base + k));
            });
    } else {
        // Channels last: one row holds every channel once.
        out.par_chunks_mut(view.c.max(1) * 256)
            .enumerate()
            .for_each(|(r, chunk)| {
                let base = r * view.c.max(1) * 256;
                chunk
                    .iter_mut()
                    .enumerate()
                    .for_each(|(k, v)| *v = f((base + k) % view.c, base + k));
            });
    }
}

/// Per-channel reductions `g(channel) -> T`, in parallel over channels.
fn per_channel<T: Send>(c: usize, g: impl Fn(usize) -> T + Sync + Send) -> Vec<T> {
    use rayon::prelude::*;
    (0..c).into_par_iter().map(&g).collect()
}

/// What the training-mode backward needs.
#[derive(Debug, Clone)]
pub struct TrainCache {
    view: View,
    /// Normalised input `(x - mean) / sqrt(var + eps)`.
    x_hat: Vec<f32>,
    inv_std: Vec<f32>,
}

/// The running statistics after one training step (the layer itself is left untouched).
#[derive(Debug, Clone, PartialEq)]
pub struct RunningUpdate {
    pub running_mean: Vec<f32>,
    pub running_var: Vec<f32>,
}

/// Gradients of a BN layer.
#[derive(Debug, Clone)]
pub struct BnGrads {
    pub input: Tensor,
    pub gamma: Vec<f32>,
    pub beta: Vec<f32>,
}

/// Training mode: normalise with the batch mean and biased variance; the running statistics
/// move towards the batch mean and the unbiased variance (PyTorch semantics).
pub fn forward_train(
    bn: &BatchNorm,
    x: &Tensor,
    layout: Layout,
) -> Result<(Tensor, TrainCache, RunningUpdate)> {
    let c = bn.check()?;
    let view = View::of(x, layout, c)?;
    let m = view.count();
    if m == 0 {
        return Err(OpsError::Invalid {
            op: OP,
            arg: "input",
            detail: "training mode needs at least one value per channel".into(),
        });
    }
    // Accumulate in f64: channels of big BEV maps hold ~1e5 values.
    let stats = per_channel(c, |ch| {
        let mut sum = 0.0f64;
        view.for_channel(ch, |i| sum += x.data[i] as f64);
        let mean = sum / m as f64;
        let mut sq = 0.0f64;
        view.for_channel(ch, |i| sq += (x.data[i] as f64 - mean).powi(2));
        (mean, sq / m as f64)
    });
    let istd: Vec<f64> = stats
        .iter()
        .map(|&(_, var)| 1.0 / (var + bn.eps as f64).sqrt())
        .collect();
    let inv_std: Vec<f32> = istd.iter().map(|&v| v as f32).collect();
    let mut x_hat = vec![0.0f32; x.len()];
    fill_by_channel(view, &mut x_hat, |ch, i| {
        ((x.data[i] as f64 - stats[ch].0) * istd[ch]) as f32
    });
    let mut y = Tensor::zeros(&x.shape);
    fill_by_channel(view, &mut y.data, |ch, i| {
        bn.gamma[ch] * x_hat[i] + bn.beta[ch]
    });
    let mut update = RunningUpdate {
        running_mean: bn.running_mean.clone(),
        running_var: bn.running_var.clone(),
    };
    for (ch, &(mean, var)) in stats.iter().enumerate() {
        let unbiased = if m > 1 {
            var * m as f64 / (m - 1) as f64
        } else {
            var
        };
        let mo = bn.momentum;
        update.running_mean[ch] = (1.0 - mo) * bn.running_mean[ch] + mo * mean as f32;
        update.running_var[ch] = (1.0 - mo) * bn.running_var[ch] + mo * unbiased as f32;
    }
    Ok((
        y,
        TrainCache {
            view,
            x_hat,
            inv_std,
        },
        update,
    ))
}

/// Training-mode backward (the batch statistics depend on the input, hence the two
/// correction terms).
pub fn backward_train(bn: &BatchNorm, cache: &TrainCache, grad_out: &Tensor) -> Result<BnGrads> {
    let c = bn.check()?;
    let v = cache.view;
    if v.c != c || grad_out.len() != cache.x_hat.len() {
        return Err(OpsError::Shape {
            op: OP,
            arg: "grad_out",
            got: grad_out.shape.clone(),
            expected: format!(
                "{} elements over {} channels (the forward's shape)",
                cache.x_hat.len(),
                v.c
            ),
        });
    }
    let m = v.count() as f64;
    let sums = per_channel(c, |ch| {
        let (mut sdy, mut sdyx) = (0.0f64, 0.0f64);
        v.for_channel(ch, |i| {
            sdy += grad_out.data[i] as f64;
            sdyx += grad_out.data[i] as f64 * cache.x_hat[i] as f64;
        });
        (sdy, sdyx)
    });
    let gg: Vec<f32> = sums.iter().map(|s| s.1 as f32).collect();
    let gb: Vec<f32> = sums.iter().map(|s| s.0 as f32).collect();
    let mut gx = Tensor::zeros(&grad_out.shape);
    fill_by_channel(v, &mut gx.data, |ch, i| {
        let k = bn.gamma[ch] as f64 * cache.inv_std[ch] as f64;
        let (mdy, mdyx) = (sums[ch].0 / m, sums[ch].1 / m);
        (k * (grad_out.data[i] as f64 - mdy - cache.x_hat[i] as f64 * mdyx)) as f32
    });
    Ok(BnGrads {
        input: gx,
        gamma: gg,
        beta: gb,
    })
}

/// Inference mode: `gamma (x - running_mean) / sqrt(running_var + eps) + beta`.
pub fn forward_eval(bn: &BatchNorm, x: &Tensor, layout: Layout) -> Result<Tensor> {
    let (scale, shift) = bn.eval_affine()?;
    let view = View::of(x, layout, scale.len())?;
    let mut y = Tensor::zeros(&x.shape);
    for ch in 0..view.c {
        view.for_channel(ch, |i| y.data[i] = scale[ch] * x.data[i] + shift[ch]);
    }
    Ok(y)
}

/// Inference-mode backward (statistics are constants): gradients for input, gamma, beta.
pub fn backward_eval(
    bn: &BatchNorm,
    x: &Tensor,
    layout: Layout,
    grad_out: &Tensor,
) -> Result<BnGrads> {
    let c = bn.check()?;
    let view = View::of(x, layout, c)?;
    expect_shape(OP, "grad_out", grad_out, &x.shape)?;
    let mut gx = Tensor::zeros(&x.shape);
    let mut gg = vec![0.0f32; c];
    let mut gb = vec![0.0f32; c];
    for ch in 0..c {
        let istd = 1.0 / (bn.running_var[ch] + bn.eps).sqrt();
        let k = bn.gamma[ch] * istd;
        let mean = bn.running_mean[ch];
        let (mut sg, mut sb) = (0.0f64, 0.0f64);
        view.for_channel(ch, |i| {
            let d = grad_out.data[i];
            gx.data[i] = d * k;
            sg += d as f64 * ((x.data[i] - mean) * istd) as f64;
            sb += d as f64;
        });
        gg[ch] = sg as f32;
        gb[ch] = sb as f32;
    }
    Ok(BnGrads {
        input: gx,
        gamma: gg,
        beta: gb,
    })
}

/// Folds inference BN into the preceding layer: returns `(weight', bias')` with
/// `layer'(x) = BN_eval(layer(x))`. `out_axis` is the weight's output-channel axis: 0 for
/// linear `[Cout, Cin]` and conv `[Cout, Cin, kh, kw]`, 1 for transposed conv
/// `[Cin, Cout, kh, kw]`.
pub fn fold(
    bn: &BatchNorm,
    weight: &Tensor,
    bias: Option<&[f32]>,
    out_axis: usize,
) -> Result<(Tensor, Vec<f32>)> {
    let (scale, shift) = bn.eval_affine()?;
    let c = scale.len();
    if weight.shape.get(out_axis) != Some(&c) {
        return Err(OpsError::Shape {
            op: "batchnorm fold",
            arg: "weight",
            got: weight.shape.clone(),
            expected: format!("{c} output channels on axis {out_axis}"),
        });
    }
    if let Some(b) = bias {
        expect_len("batchnorm fold", "bias", b.len(), c)?;
    }
    let inner: usize = weight.shape[out_axis + 1..].iter().product();
    let mut w = weight.clone();
    for (blk, chunk) in w.data.chunks_exact_mut(inner.max(1)).enumerate() {
        let s = scale[blk % c];
        chunk.iter_mut().for_each(|v| *v *= s);
    }
    let b = (0..c)
        .map(|i| bias.map_or(0.0, |b| b[i]) * scale[i] + shift[i])
        .collect();
    Ok((w, b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testutil::*;
    use crate::ops::{conv_transpose2d, conv2d, linear};

    fn random_bn(r: &mut rand_chacha::ChaCha8Rng, c: usize) -> BatchNorm {
        use rand::RngExt;
        BatchNorm {
            gamma: (0..c).map(|_| r.random_range(0.5..1.5)).collect(),
            beta: uniform_vec(r, c, 1.0),
            running_mean: uniform_vec(r, c, 1.0),
            running_var: (0..c).map(|_| r.random_range(0.2..2.0)).collect(),
            eps: 1e-3,
            momentum: 0.1,
        }
    }

    /// Naive f64 BN in training mode over an `[outer, C, inner]` view.
    fn naive_train(
        x: &[f64],
        g: &[f64],
        b: &[f64],
        v: View,
        eps: f64,
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let mut y = vec![0.0; x.len()];
        let (mut means, mut vars) = (vec![], vec![]);
        for ch in 0..v.c {
            let idx: Vec<usize> = (0..v.outer)
                .flat_map(|o| (0..v.inner).map(move |i| (o * v.c + ch) * v.inner + i))
                .collect();
            let m = idx.len() as f64;
            let mean = idx.iter().map(|&i| x[i]).sum::<f64>() / m;
            let var = idx.iter().map(|&i| (x[i] - mean).powi(2)).sum::<f64>() / m;
            for &i in &idx {
                y[i] = g[ch] * (x[i] - mean) / (var + eps).sqrt() + b[ch];
            }
            means.push(mean);
            vars.push(var);
        }
        (y, means, vars)
    }

    fn naive_eval(x: &[f64], g: &[f64], b: &[f64], bn: &BatchNorm, v: View) -> Vec<f64> {
        let mut y = vec![0.0; x.len()];
        for o in 0..v.outer {
            for ch in 0..v.c {
                for i in 0..v.inner {
                    let k = (o * v.c + ch) * v.inner + i;
                    let (mu, var) = (bn.running_mean[ch] as f64, bn.running_var[ch] as f64);
                    y[k] = g[ch] * (x[k] - mu) / (var + bn.eps as f64).sqrt() + b[ch];
                }
            }
        }
        y
    }

    const CASES: &[(&[usize], Layout)] = &[
        (&[3, 5, 4], Layout::ChannelsLast),
        (&[7, 3], Layout::ChannelsLast),
        (&[2, 3, 5, 3], Layout::ChannelsFirst),
        (&[1, 4, 3, 7], Layout::ChannelsFirst),
    ];

    #[test]
    fn train_mode_matches_reference_with_gradients() {
        let mut r = rng(21);
        for &(shape, layout) in CASES {
            let c = match layout {
                Layout::ChannelsLast => *shape.last().unwrap(),
                Layout::ChannelsFirst => shape[1],
            };
            let bn = random_bn(&mut r, c);
            // Offset and scale the input so the normalisation is not a no-op.
            let mut x = uniform(&mut r, shape, 2.0);
            x.data.iter_mut().for_each(|v| *v = *v * 1.7 + 0.4);
            let (y, cache, upd) = forward_train(&bn, &x, layout).unwrap();
            let v = View::of(&x, layout, c).unwrap();
            let (xd, gd, bd) = (to_f64(&x.data), to_f64(&bn.gamma), to_f64(&bn.beta));
            let (yr, means, vars) = naive_train(&xd, &gd, &bd, v, 1e-3);
            assert_close("y", &y.data, &yr, 1e-5);
            let m = v.count() as f64;
            let want_mean: Vec<f64> = (0..c)
                .map(|i| 0.9 * bn.running_mean[i] as f64 + 0.1 * means[i])
                .collect();
            let want_var: Vec<f64> = (0..c)
                .map(|i| 0.9 * bn.running_var[i] as f64 + 0.1 * vars[i] * m / (m - 1.0))
                .collect();
            assert_close("running_mean", &upd.running_mean, &want_mean, 1e-6);
            assert_close("running_var", &upd.running_var, &want_var, 1e-6);

            let gy = uniform(&mut r, shape, 1.0);
            let g = backward_train(&bn, &cache, &gy).unwrap();
            let fx = fd_grad(&xd, |p| dot(&gy.data, &naive_train(p, &gd, &bd, v, 1e-3).0));
            let fg = fd_grad(&gd, |p| dot(&gy.data, &naive_train(&xd, p, &bd, v, 1e-3).0));
            let fb = fd_grad(&bd, |p| dot(&gy.data, &naive_train(&xd, &gd, p, v, 1e-3).0));
            assert_close("dx", &g.input.data, &fx, 1e-4);
            assert_close("dgamma", &g.gamma, &fg, 1e-5);
            assert_close("dbeta", &g.beta, &fb, 1e-5);
        }
    }

    #[test]
    fn eval_mode_matches_reference_with_gradients() {
        let mut r = rng(22);
        for &(shape, layout) in CASES {
            let c = match layout {
                Layout::ChannelsLast => *shape.last().unwrap(),
                Layout::ChannelsFirst => shape[1],
            };
            let bn = random_bn(&mut r, c);
            let x = uniform(&mut r, shape, 2.0);
            let y = forward_eval(&bn, &x, layout).unwrap();
            let v = View::of(&x, layout, c).unwrap();
            let (xd, gd, bd) = (to_f64(&x.data), to_f64(&bn.gamma), to_f64(&bn.beta));
            assert_close("y", &y.data, &naive_eval(&xd, &gd, &bd, &bn, v), 1e-5);
            let gy = uniform(&mut r, shape, 1.0);
            let g = backward_eval(&bn, &x, layout, &gy).unwrap();
            let fx = fd_grad(&xd, |p| dot(&gy.data, &naive_eval(p, &gd, &bd, &bn, v)));
            let fg = fd_grad(&gd, |p| dot(&gy.data, &naive_eval(&xd, p, &bd, &bn, v)));
            let fb = fd_grad(&bd, |p| dot(&gy.data, &naive_eval(&xd, &gd, p, &bn, v)));
            assert_close("dx", &g.input.data, &fx, 1e-5);
            assert_close("dgamma", &g.gamma, &fg, 1e-5);
            assert_close("dbeta", &g.beta, &fb, 1e-5);
        }
    }

    #[test]
    fn folded_conv_equals_conv_then_bn() {
        let mut r = rng(23);
        let x = uniform(&mut r, &[2, 3, 9, 8], 1.0);
        for with_bias in [false, true] {
            let w = uniform(&mut r, &[5, 3, 3, 3], 1.0);
            let b = with_bias.then(|| uniform_vec(&mut r, 5, 1.0));
            let bn = random_bn(&mut r, 5);
            let p = conv2d::Conv2dParams::new(2, 1);
            let conv = conv2d::forward(&x, &w, b.as_deref(), p).unwrap();
            let want = forward_eval(&bn, &conv, Layout::ChannelsFirst).unwrap();
            let (fw, fb) = fold(&bn, &w, b.as_deref(), 0).unwrap();
            let got = conv2d::forward(&x, &fw, Some(&fb), p).unwrap();
            assert_close("folded conv", &got.data, &to_f64(&want.data), 1e-5);
        }
    }

    #[test]
    fn folded_linear_and_transposed_conv_equal_layer_then_bn() {
        let mut r = rng(24);
        let x = uniform(&mut r, &[4, 6, 7], 1.0);
        let w = uniform(&mut r, &[5, 7], 1.0);
        let bn = random_bn(&mut r, 5);
        let want = forward_eval(
            &bn,
            &linear::forward(&x, &w, None).unwrap(),
            Layout::ChannelsLast,
        )
        .unwrap();
        let (fw, fb) = fold(&bn, &w, None, 0).unwrap();
        let got = linear::forward(&x, &fw, Some(&fb)).unwrap();
        assert_close("folded linear", &got.data, &to_f64(&want.data), 1e-5);

        let x = uniform(&mut r, &[1, 3, 4, 5], 1.0);
        let w = uniform(&mut r, &[3, 5, 2, 2], 1.0);
        let p = conv_transpose2d::ConvTranspose2dParams::new(2, 0);
        let want = forward_eval(
            &bn,
            &conv_transpose2d::forward(&x, &w, None, p).unwrap(),
            Layout::ChannelsFirst,
        )
        .unwrap();
        let (fw, fb) = fold(&bn, &w, None, 1).unwrap();
        let got = conv_transpose2d::forward(&x, &fw, Some(&fb), p).unwrap();
        assert_close(
            "folded transposed conv",
            &got.data,
            &to_f64(&want.data),
            1e-5,
        );
    }

    #[test]
    fn rejects_bad_shapes() {
        let bn = BatchNorm::new(4, 1e-3, 0.1);
        let x = Tensor::zeros(&[2, 3, 5]);
        assert!(matches!(
            forward_eval(&bn, &x, Layout::ChannelsLast),
            Err(OpsError::Shape { arg: "input", .. })
        ));
        assert!(matches!(
            forward_train(&bn, &x, Layout::ChannelsFirst),
            Err(OpsError::Shape { arg: "input", .. })
        ));
        let mut bad = bn.clone();
        bad.beta.pop();
        assert!(matches!(
            forward_eval(&bad, &Tensor::zeros(&[2, 4]), Layout::ChannelsLast),
            Err(OpsError::Shape { arg: "beta", .. })
        ));
        assert!(fold(&bn, &Tensor::zeros(&[3, 4]), None, 0).is_err());
    }
}
