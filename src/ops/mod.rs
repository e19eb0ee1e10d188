//! CPU operators of CenterPoint-Pillar, each with a forward and a backward pass.
//!
//! # Tensor representation
//! [`Tensor`] is a dense, row-major `f32` array with an explicit shape: `data[i]` is the
//! element whose multi-index is `i` written in the mixed radix of `shape` (last axis
//! fastest). Images are NCHW (`[N, C, H, W]`), point features are `[P, N, C]` (pillars,
//! points per pillar, channels), matrices and weights follow the PyTorch layouts
//! (linear `[Cout, Cin]`, conv `[Cout, Cin, kh, kw]`, transposed conv `[Cin, Cout, kh, kw]`),
//! so weights ported from the reference implementations drop in unchanged.
//! A plain struct rather than `ndarray` keeps the engines and the quantizer free to
//! treat buffers as flat slices; `as_array`/`from_array` bridge to `ndarray` as glue.
//!
//! # Op interface
//! Each op lives in its own module with free functions:
//! - `forward(inputs.., params..) -> Result<(output, Cache)>` where `Cache` holds only what
//!   the forward computed and the backward needs again (argmax, normalised values, ...);
//!   ops that need nothing return the output alone.
//! - `backward(inputs.., params.., &cache, grad_output) -> Result<Grads>` returning the
//!   gradients of every input and parameter. Backward functions take the forward's inputs by
//!   reference instead of copying them into the cache, because the graph keeps activations
//!   alive for the backward pass anyway.
//! - Losses are scalar-valued, so `forward_backward` returns the loss and the gradient of
//!   its input together.
//!
//! Ops: [`linear`], [`batchnorm`] (train/eval, BN folding), [`relu`], [`sigmoid`],
//! [`pillar_max`], [`repeat_points`], [`scatter`] (and gather), [`conv2d`], [`conv_transpose2d`], [`concat`](mod@concat)
//! (and split), [`focal_loss`], [`reg_l1_loss`], and for the voxel branch [`sparse_conv`]
//! (over a `sparse::Rulebook`) and [`height_compress`]. Inference-only forwards for 3x3
//! stride-1 convolutions: [`winograd`] and [`conv_narrow`] (few output channels). Convolutions and linear run on the `gemm`
//! crate through a safe strided wrapper; parallelism comes from the global rayon pool.
//!
//! Shapes are validated on every call; a mismatch is an [`OpsError`] naming the op and the
//! offending argument, never a panic.

pub mod batchnorm;
pub mod concat;
pub mod conv2d;
pub mod conv_narrow;
pub mod conv_transpose2d;
pub mod focal_loss;
pub mod height_compress;
mod im2col;
pub mod linear;
mod matmul;
pub mod pillar_linear_max;
pub mod pillar_max;
pub mod reg_l1_loss;
pub mod relu;
pub mod repeat_points;
pub mod scatter;
pub mod sigmoid;
pub mod sparse_conv;
pub mod winograd;

#[cfg(test)]
pub(crate) mod testutil;

use ndarray::{ArrayD, IxDyn};

/// Errors of the operators: which op, which argument, what was wrong.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum OpsError {
    #[error("{op}: argument `{arg}` has shape {got:?}, expected {expected}")]
    Shape {
        op: &'static str,
        arg: &'static str,
        got: Vec<usize>,
        expected: String,
    },
    #[error("{op}: argument `{arg}` is invalid: {detail}")]
    Invalid {
        op: &'static str,
        arg: &'static str,
        detail: String,
    },
    #[error("tensor: shape {shape:?} needs {expected} elements, data has {got}")]
    DataLength {
        shape: Vec<usize>,
        expected: usize,
        got: usize,
    },
}

pub type Result<T> = std::result::Result<T, OpsError>;

/// Dense row-major f32 tensor (see the module docs for the layout conventions).
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Tensor {
    /// Wraps `data` as a tensor of `shape`; the length must match the shape's product.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Result<Self> {
        let expected = shape.iter().product::<usize>();
        if expected != data.len() {
            return Err(OpsError::DataLength {
                shape,
                expected,
                got: data.len(),
            });
        }
        Ok(Self { shape, data })
    }

    pub fn zeros(shape: &[usize]) -> Self {
        Self {
            shape: shape.to_vec(),
            data: vec![0.0; shape.iter().product()],
        }
    }

    /// Tensor whose element at flat index `i` is `f(i)`.
    pub fn from_fn(shape: &[usize], f: impl FnMut(usize) -> f32) -> Self {
        let n = shape.iter().product();
        Self {
            shape: shape.to_vec(),
            data: (0..n).map(f).collect(),
        }
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Same data under a new shape with the same number of elements.
    pub fn reshape(self, shape: Vec<usize>) -> Result<Self> {
        Self::new(shape, self.data)
    }

    /// Copy as an `ndarray` array (glue for callers that prefer ndarray).
    pub fn as_array(&self) -> ArrayD<f32> {
        ArrayD::from_shape_vec(IxDyn(&self.shape), self.data.clone())
            .expect("Tensor invariant: data length equals shape product")
    }

    /// Tensor from an `ndarray` array in logical (row-major) order.
    pub fn from_array(a: &ArrayD<f32>) -> Self {
        Self {
            shape: a.shape().to_vec(),
            data: a.iter().copied().collect(),
        }
    }
}

/// Checks that `t` has exactly `rank` axes and returns them.
pub(crate) fn dims<const R: usize>(
    op: &'static str,
    arg: &'static str,
    t: &Tensor,
) -> Result<[usize; R]> {
    <[usize; R]>::try_from(t.shape.as_slice()).map_err(|_| OpsError::Shape {
        op,
        arg,
        got: t.shape.clone(),
        expected: format!("{R} axes"),
    })
}

/// Checks that `t` has exactly the shape `expected`.
pub(crate) fn expect_shape(
    op: &'static str,
    arg: &'static str,
    t: &Tensor,
    expected: &[usize],
) -> Result<()> {
    if t.shape != expected {
        return Err(OpsError::Shape {
            op,
            arg,
            got: t.shape.clone(),
            expected: format!("{expected:?}"),
        });
    }
    Ok(())
}

/// Checks the length of a per-channel (or per-item) slice parameter.
pub(crate) fn expect_len(
    op: &'static str,
    arg: &'static str,
    len: usize,
    expected: usize,
) -> Result<()> {
    if len != expected {
        return Err(OpsError::Shape {
            op,
            arg,
            got: vec![len],
            expected: format!("[{expected}]"),
        });
    }
    Ok(())
}
