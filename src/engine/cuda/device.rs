//! The GPU a CUDA engine runs on: opening it (with clear errors when there is no driver,
//! no GPU or no CUDA library), the kernels compiled by NVRTC (cached on disk per GPU
//! architecture), device buffers, launches and the cuBLAS GEMMs.

use super::super::EngineError;
use cudarc::cublas::{CudaBlas, result as blas, sys as blas_sys};
use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr,
    LaunchConfig, PushKernelArg, result as drv,
};
use cudarc::nvrtc::{CompileOptions, Ptx};
use sha2::{Digest, Sha256};
use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_void;
use std::path::PathBuf;
use std::sync::Arc;

const SOURCE: &str = include_str!("kernels.cu");

const KERNELS: &[&str] = &[
    "cast_f16",
    "dequant_u8",
    "dequant_u8_pf",
    "quant_f32",
    "quant_f32_pf",
    "fill_f32",
    "im2col_f32",
    "im2col_f16",
    "im2col_s8",
    "im2col_s8_tile",
    "nchw_to_nhwc_u8",
    "im2col_nhwc_s8",
    "rows_s8",
    "gemm_s8_tn",
    "epi_f32",
    "epi_requant",
    "epi_dequant",
    "epi_requant4",
    "epi_dequant4",
    "epi_f32_4",
    "epi_rows4",
    "head_candidates",
    "pillar_max_f32",
    "pillar_max_u8",
    "scatter_f32",
    "scatter_u8",
    "branch_conv_f32_1",
    "branch_conv_f32_2",
    "branch_conv_f32_3",
    "branch_conv_f32_4",
    "branch_conv_f32_5",
    "branch_conv_f32_6",
    "branch_conv_f32_7",
    "branch_conv_f32_8",
    "branch_conv_s8_1",
    "branch_conv_s8_2",
    "branch_conv_s8_3",
    "branch_conv_s8_4",
    "branch_conv_s8_5",
    "branch_conv_s8_6",
    "branch_conv_s8_7",
    "branch_conv_s8_8",
    "sparse_conv_s8",
    "sparse_conv_f32",
    "add_u8",
    "add_f32",
    "hcomp_f32",
    "hcomp_u8",
];

fn dev_err(what: &str, e: impl std::fmt::Display) -> EngineError {
    EngineError::Device(format!("{what}: {e}"))
}

/// Whether the CUDA driver library can be loaded (no GPU call is made).
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the library.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// An opened GPU with its stream, cuBLAS handle and compiled kernels.
pub struct Gpu {
    pub(super) ctx: Arc<CudaContext>,
    pub(super) stream: Arc<CudaStream>,
    blas: CudaBlas,
    _module: Arc<CudaModule>,
    funcs: HashMap<&'static str, CudaFunction>,
    name: String,
    arch: (i32, i32),
    /// Per-kernel timing (profiling only): events around every launch and GEMM.
    kernel_events: RefCell<Option<Vec<(String, CudaEvent, CudaEvent)>>>,
}

impl Gpu {
    /// Opens GPU `ordinal`. Errors name what is missing: the driver library, a GPU,
    /// NVRTC or cuBLAS.
    pub fn open(ordinal: usize) -> Result<Gpu, EngineError> {
        if !driver_present() {
            return Err(EngineError::Device(
                "no CUDA driver: libcuda.so could not be loaded (install the NVIDIA driver, \
                 or use the cpu device)"
                    .into(),
            ));
        }
        let count = CudaContext::device_count().map_err(|e| dev_err("CUDA driver", e))?;
        if count <= 0 {
            return Err(EngineError::Device("the CUDA driver sees no GPU".into()));
        }
        if ordinal >= count as usize {
            return Err(EngineError::Device(format!(
                "GPU {ordinal} requested, but the driver sees {count}"
            )));
        }
        if !nvrtc_present() {
            return Err(EngineError::Device(
                "NVRTC (libnvrtc.so) not found: install the CUDA toolkit's runtime compiler \
                 or add its lib directory to LD_LIBRARY_PATH"
                    .into(),
            ));
        }
        // SAFETY: only tries to dlopen the library.
        if !unsafe { blas_sys::is_culib_present() } {
            return Err(EngineError::Device(
                "cuBLAS (libcublas.so) not found: install CUDA's cuBLAS or add its lib \
                 directory to LD_LIBRARY_PATH"
                    .into(),
            ));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| dev_err("opening the GPU", e))?;
        // One stream per engine and raw pointers: cudarc's cross-stream event tracking
        // would only add work.
        // SAFETY: every buffer of an engine is used on its one stream only.
        unsafe { ctx.disable_event_tracking() };
        let name = ctx.name().map_err(|e| dev_err("GPU name", e))?;
        let arch = ctx
            .compute_capability()
            .map_err(|e| dev_err("compute capability", e))?;
        let stream = ctx.new_stream().map_err(|e| dev_err("CUDA stream", e))?;
        let blas = CudaBlas::new(stream.clone()).map_err(|e| dev_err("cuBLAS", e))?;
        // Plain FP32 GEMMs (no TF32) so FP32 matches the CPU engine to 1e-4.
        // SAFETY: valid handle.
        unsafe {
            blas_sys::cublasSetMathMode(*blas.handle(), blas_sys::cublasMath_t::CUBLAS_DEFAULT_MATH)
        }
        .result()
        .map_err(|e| dev_err("cuBLAS math mode", e))?;
        let ptx = kernels_ptx(arch)?;
        let module = ctx
            .load_module(ptx)
            .map_err(|e| dev_err("loading the kernels", e))?;
        let mut funcs = HashMap::new();
        for &k in KERNELS {
            let f = module
                .load_function(k)
                .map_err(|e| dev_err(&format!("kernel {k}"), e))?;
            funcs.insert(k, f);
        }
        log::info!(
            "CUDA: {name} (sm_{}{}), GPU {ordinal} of {count}",
            arch.0,
            arch.1
        );
        Ok(Gpu {
            ctx,
            stream,
            blas,
            _module: module,
            funcs,
            name,
            arch,
            kernel_events: RefCell::new(None),
        })
    }

    /// Makes the GPU's context current on this thread (raw copies need it).
    pub fn bind(&self) -> Result<(), EngineError> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| dev_err("CUDA context", e))
    }

    /// "NVIDIA H100 80GB HBM3 (sm_90)".
    pub fn describe(&self) -> String {
        format!("{} (sm_{}{})", self.name, self.arch.0, self.arch.1)
    }

    pub(super) fn func(&self, name: &str) -> Result<&CudaFunction, EngineError> {
        self.funcs
            .get(name)
            .ok_or_else(|| EngineError::Internal(format!("no kernel {name}")))
    }

    /// Waits for the stream's work.
    pub fn sync(&self) -> Result<(), EngineError> {
        self.stream
            .synchronize()
            .map_err(|e| dev_err("GPU execution", e))
    }

    /// Starts (or stops) timing every kernel launch and GEMM with CUDA events.
    pub(super) fn set_kernel_timing(&self, on: bool) {
        *self.kernel_events.borrow_mut() = on.then(Vec::new);
    }

    /// Records an event pair around `f` under `name` when kernel timing is on.
    fn timed<R>(
        &self,
        name: &dyn Fn() -> String,
        f: impl FnOnce() -> Result<R, EngineError>,
    ) -> Result<R, EngineError> {
        if self.kernel_events.borrow().is_none() {
            return f();
        }
        let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let ev = || {
            self.ctx
                .new_event(flags)
                .and_then(|e| e.record(&self.stream).map(|_| e))
                .map_err(|e| dev_err("event", e))
        };
        let a = ev()?;
        let r = f()?;
        let b = ev()?;
        if let Some(v) = self.kernel_events.borrow_mut().as_mut() {
            v.push((name(), a, b));
        }
        Ok(r)
    }

    /// GPU milliseconds per kernel name since the last call (synchronizes), summed, with
    /// launch counts.
    pub(super) fn take_kernel_times(&self) -> Result<Vec<(String, f64, usize)>, EngineError> {
        self.sync()?;
        let mut out: Vec<(String, f64, usize)> = Vec::new();
        if let Some(v) = self.kernel_events.borrow_mut().as_mut() {
            for (name, a, b) in v.drain(..) {
                let ms = a.elapsed_ms(&b).unwrap_or(0.0) as f64;
                match out.iter_mut().find(|o| o.0 == name) {
                    Some(o) => {
                        o.1 += ms;
                        o.2 += 1;
                    }
                    None => out.push((name, ms, 1)),
                }
            }
        }
        Ok(out)
    }

    /// Launches `name` over `n` elements (grid-stride kernels).
    pub(super) fn launch(&self, name: &str, n: usize, args: &[Arg]) -> Result<(), EngineError> {
        if n == 0 {
            return Ok(());
        }
        // The kernels index with 32-bit integers.
        if n > i32::MAX as usize {
            return Err(EngineError::Internal(format!(
                "kernel {name}: {n} elements exceed the 32-bit indexing"
            )));
        }
        self.timed(&|| name.to_string(), || self.launch_now(name, n, args))
    }

    fn launch_now(&self, name: &str, n: usize, args: &[Arg]) -> Result<(), EngineError> {
        let threads = 256u32;
        let blocks = n.div_ceil(threads as usize).min(1 << 20) as u32;
        self.launch_grid_now(name, (blocks, 1, 1), (threads, 0), args)
    }

    /// Launches `name` on a `grid` of blocks of `threads` with `smem` bytes of dynamic
    /// shared memory (tiled and 3D-gridded kernels).
    pub(super) fn launch_grid(
        &self,
        name: &str,
        grid: (usize, usize, usize),
        threads: u32,
        smem: u32,
        args: &[Arg],
    ) -> Result<(), EngineError> {
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            return Ok(());
        }
        // CUDA's limits: 2^31 - 1 blocks in x, 65535 in y and z.
        let dim = |v: usize, max: usize| {
            if v <= max {
                Ok(v as u32)
            } else {
                Err(EngineError::Internal(format!(
                    "kernel {name}: grid {grid:?} beyond CUDA's limits"
                )))
            }
        };
        let grid = (
            dim(grid.0, i32::MAX as usize)?,
            dim(grid.1, 65535)?,
            dim(grid.2, 65535)?,
        );
        self.timed(&|| name.to_string(), || {
            self.launch_grid_now(name, grid, (threads, smem), args)
        })
    }

    fn launch_grid_now(
        &self,
        name: &str,
        grid: (u32, u32, u32),
        (threads, smem): (u32, u32),
        args: &[Arg],
    ) -> Result<(), EngineError> {
        let f = self.func(name)?;
        let cfg = LaunchConfig {
            grid_dim: grid,
            block_dim: (threads, 1, 1),
            shared_mem_bytes: smem,
        };
        let mut b = self.stream.launch_builder(f);
        for a in args {
            match a {
                Arg::P(v) => b.arg(v),
                Arg::I(v) => b.arg(v),
                Arg::L(v) => b.arg(v),
                Arg::F(v) => b.arg(v),
                Arg::B(v) => b.arg(v),
            };
        }
        // SAFETY: the argument lists match the kernels' signatures in kernels.cu, every
        // pointer is a live buffer sized by the engine's plan, and a kernel's dynamic
        // shared memory use is bounded by `smem`.
        unsafe { b.launch(cfg) }
            .map(|_| ())
            .map_err(|e| dev_err(&format!("kernel {name}"), e))
    }

    pub(super) fn upload<T: Copy>(&self, dst: &DBuf, src: &[T]) -> Result<(), EngineError> {
        let bytes = std::mem::size_of_val(src);
        if bytes > dst.bytes {
            return Err(EngineError::Internal(format!(
                "upload of {bytes} bytes into a {}-byte buffer",
                dst.bytes
            )));
        }
        if bytes == 0 {
            return Ok(());
        }
        // SAFETY: dst holds at least `bytes` bytes; src stays alive until the stream is
        // synchronized (the engine synchronizes before returning from a run).
        unsafe { drv::memcpy_htod_async(dst.ptr, src, self.stream.cu_stream()) }
            .map_err(|e| dev_err("upload", e))
    }

    pub(super) fn download<T: Copy>(
        &self,
        dst: &mut [T],
        src: u64,
        src_bytes: usize,
    ) -> Result<(), EngineError> {
        let bytes = std::mem::size_of_val(dst);
        if bytes > src_bytes {
            return Err(EngineError::Internal("download past a buffer".into()));
        }
        // SAFETY: src holds at least `bytes` bytes; the stream is synchronized at once.
        unsafe { drv::memcpy_dtoh_async(dst, src, self.stream.cu_stream()) }
            .map_err(|e| dev_err("download", e))?;
        self.sync()
    }

    pub(super) fn copy(&self, dst: u64, src: u64, bytes: usize) -> Result<(), EngineError> {
        // SAFETY: both ranges lie in live buffers (checked by the caller's plan).
        unsafe { drv::memcpy_dtod_async(dst, src, bytes, self.stream.cu_stream()) }
            .map_err(|e| dev_err("device copy", e))
    }

    pub(super) fn memset(&self, dst: u64, byte: u8, bytes: usize) -> Result<(), EngineError> {
        // SAFETY: as `copy`.
        unsafe { drv::memset_d8_async(dst, byte, bytes, self.stream.cu_stream()) }
            .map_err(|e| dev_err("memset", e))
    }

    /// `C[m x n] = op(A) op(B)` in cuBLAS's column-major convention, with the operand
    /// and compute types of `kind`. Returns `Ok(false)` when cuBLAS refuses the shape
    /// (NOT_SUPPORTED), so the caller can fall back.
    pub(super) fn gemm(
        &self,
        kind: GemmKind,
        t: (bool, bool),
        mnk: (usize, usize, usize),
        a: (u64, usize),
        b: (u64, usize),
        c: (u64, usize),
    ) -> Result<bool, EngineError> {
        self.gemm_batched(kind, t, mnk, (a.0, a.1, 0), (b.0, b.1, 0), (c.0, c.1, 0), 1)
    }

    /// `batch` GEMMs whose operands are `stride` elements apart (strided batched).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn gemm_batched(
        &self,
        kind: GemmKind,
        (ta, tb): (bool, bool),
        (m, n, k): (usize, usize, usize),
        (a, lda, sa): (u64, usize, usize),
        (b, ldb, sb): (u64, usize, usize),
        (c, ldc, scc): (u64, usize, usize),
        batch: usize,
    ) -> Result<bool, EngineError> {
        self.timed(&|| format!("GEMM {kind:?} x{batch} ({m}x{n}x{k})"), || {
            self.gemm_now(
                kind,
                (ta, tb),
                (m, n, k),
                (a, lda, sa),
                (b, ldb, sb),
                (c, ldc, scc),
                batch,
            )
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn gemm_now(
        &self,
        kind: GemmKind,
        (ta, tb): (bool, bool),
        (m, n, k): (usize, usize, usize),
        (a, lda, sa): (u64, usize, usize),
        (b, ldb, sb): (u64, usize, usize),
        (c, ldc, scc): (u64, usize, usize),
        batch: usize,
    ) -> Result<bool, EngineError> {
        use blas_sys::cublasComputeType_t as Ct;
        use blas_sys::cublasOperation_t as Op;
        use blas_sys::cudaDataType_t as Dt;
        let op = |t| if t { Op::CUBLAS_OP_T } else { Op::CUBLAS_OP_N };
        let (ab, ct, comp) = match kind {
            GemmKind::F32 => (Dt::CUDA_R_32F, Dt::CUDA_R_32F, Ct::CUBLAS_COMPUTE_32F),
            GemmKind::F16 => (Dt::CUDA_R_16F, Dt::CUDA_R_32F, Ct::CUBLAS_COMPUTE_32F),
            GemmKind::I8 => (Dt::CUDA_R_8I, Dt::CUDA_R_32I, Ct::CUBLAS_COMPUTE_32I),
        };
        let (af, bf) = (1.0f32, 0.0f32);
        let (ai, bi) = (1i32, 0i32);
        let (alpha, beta): (*const c_void, *const c_void) = match kind {
            GemmKind::I8 => (
                &ai as *const i32 as *const c_void,
                &bi as *const i32 as *const c_void,
            ),
            _ => (
                &af as *const f32 as *const c_void,
                &bf as *const f32 as *const c_void,
            ),
        };
        let int = |v: usize| -> Result<i32, EngineError> {
            i32::try_from(v).map_err(|_| EngineError::Internal(format!("GEMM size {v}")))
        };
        let long = |v: usize| -> Result<i64, EngineError> {
            i64::try_from(v).map_err(|_| EngineError::Internal(format!("GEMM stride {v}")))
        };
        // SAFETY: the operands are live device buffers sized for these dimensions by the
        // engine's plan; alpha and beta are host scalars of the compute type.
        let r = unsafe {
            if batch == 1 {
                blas::gemm_ex(
                    *self.blas.handle(),
                    op(ta),
                    op(tb),
                    int(m)?,
                    int(n)?,
                    int(k)?,
                    alpha,
                    a as *const c_void,
                    ab,
                    int(lda)?,
                    b as *const c_void,
                    ab,
                    int(ldb)?,
                    beta,
                    c as *mut c_void,
                    ct,
                    int(ldc)?,
                    comp,
                    blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DFALT,
                )
            } else {
                blas::gemm_strided_batched_ex(
                    *self.blas.handle(),
                    op(ta),
                    op(tb),
                    int(m)?,
                    int(n)?,
                    int(k)?,
                    alpha,
                    a as *const c_void,
                    ab,
                    int(lda)?,
                    long(sa)?,
                    b as *const c_void,
                    ab,
                    int(ldb)?,
                    long(sb)?,
                    beta,
                    c as *mut c_void,
                    ct,
                    int(ldc)?,
                    long(scc)?,
                    int(batch)?,
                    comp,
                    blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DFALT,
                )
            }
        };
        match r {
            Ok(()) => Ok(true),
            Err(e) if e.0 == blas_sys::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED => Ok(false),
            Err(e) => Err(dev_err("cuBLAS GEMM", e)),
        }
    }

    /// Allocates `bytes` (at least 4) of device memory.
    pub(super) fn alloc(&self, bytes: usize) -> Result<DBuf, EngineError> {
        self.bind()?;
        let bytes = bytes.max(4).next_multiple_of(256);
        let mem: CudaSlice<u8> = self
            .stream
            .alloc_zeros(bytes)
            .map_err(|e| dev_err(&format!("allocating {bytes} bytes"), e))?;
        let ptr = {
            let (ptr, _sync) = mem.device_ptr(&self.stream);
            ptr
        };
        Ok(DBuf {
            ptr,
            bytes,
            _mem: Some(mem),
        })
    }

    /// Grows `buf` to hold `bytes` (contents are not kept); no-op when it is big enough,
    /// so steady-state frames allocate nothing.
    pub(super) fn ensure(&self, buf: &mut DBuf, bytes: usize) -> Result<(), EngineError> {
        if buf.bytes < bytes {
            // Grow with headroom so a slowly growing pillar count does not reallocate
            // on every frame.
            *buf = self.alloc(bytes + bytes / 4)?;
        }
        Ok(())
    }

    pub(super) fn alloc_from<T: Copy>(&self, data: &[T]) -> Result<DBuf, EngineError> {
        let b = self.alloc(std::mem::size_of_val(data))?;
        self.upload(&b, data)?;
        Ok(b)
    }
}

/// A kernel argument, in the C type of the kernel's parameter.
#[derive(Debug, Clone, Copy)]
pub(super) enum Arg {
    /// A device pointer.
    P(u64),
    I(i32),
    L(i64),
    F(f32),
    B(u8),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum GemmKind {
    F32,
    /// f16 operands, f32 accumulation and output.
    F16,
    /// s8 operands, i32 accumulation and output.
    I8,
}

/// A device buffer, addressed by raw pointer (kernels and cuBLAS take raw pointers).
#[derive(Debug, Default)]
pub struct DBuf {
    pub(super) ptr: u64,
    pub(super) bytes: usize,
    _mem: Option<CudaSlice<u8>>,
}

impl DBuf {
    /// A view of `bytes` bytes at `ptr` inside a buffer owned elsewhere (which must
    /// outlive the view's use).
    pub(super) fn view(ptr: u64, bytes: usize) -> DBuf {
        DBuf {
            ptr,
            bytes,
            _mem: None,
        }
    }
}

/// Compiles the kernels for `arch` with NVRTC (no GPU needed): the PTX text.
pub fn compile_kernels((major, minor): (i32, i32)) -> Result<String, EngineError> {
    let opts = CompileOptions {
        // Products and sums are rounded as written: no fused multiply-add contraction.
        fmad: Some(false),
        options: vec![format!("--gpu-architecture=compute_{major}{minor}")],
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(SOURCE, opts)
        .map(|p| p.to_src())
        .map_err(|e| dev_err("compiling the CUDA kernels with NVRTC", format!("{e:?}")))
}

/// Whether NVRTC can be loaded.
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to dlopen the library.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// PTX of the kernels for `arch`: compiled once per process and cached on disk, keyed by
/// the source and the architecture.
fn kernels_ptx((major, minor): (i32, i32)) -> Result<Ptx, EngineError> {
    let arch_opt = format!("--gpu-architecture=compute_{major}{minor}");
    let mut h = Sha256::new();
    h.update(SOURCE.as_bytes());
    h.update(arch_opt.as_bytes());
    let key: String = h
        .finalize()
        .iter()
        .take(12)
        .map(|b| format!("{b:02x}"))
        .collect();
    let cache = cache_dir().map(|d| d.join(format!("kernels-sm{major}{minor}-{key}.ptx")));
    if let Some(p) = &cache
        && let Ok(src) = std::fs::read_to_string(p)
    {
        log::debug!("CUDA kernels from the cache {}", p.display());
        return Ok(Ptx::from_src(src));
    }
    let t = std::time::Instant::now();
    let ptx = Ptx::from_src(compile_kernels((major, minor))?);
    log::info!(
        "CUDA kernels compiled by NVRTC in {:.2} s",
        t.elapsed().as_secs_f64()
    );
    if let Some(p) = &cache {
        let r = std::fs::create_dir_all(p.parent().expect("cache file has a parent"))
            .and_then(|_| crate::fsutil::write_atomic(p, ptx.to_src().as_bytes()));
        if let Err(e) = r {
            log::warn!("could not cache the CUDA kernels in {}: {e}", p.display());
        }
    }
    Ok(ptx)
}

/// `$LIDAR_PTQ_CACHE`, else `$XDG_CACHE_HOME/lidar_ptq`, else `~/.cache/lidar_ptq`.
fn cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("LIDAR_PTQ_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("lidar_ptq")))
        .or_else(|| {
            std::env::var_os("HOME").map(|d| PathBuf::from(d).join(".cache").join("lidar_ptq"))
        })?;
    Some(base.join("cuda"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kernel compiles for the GPU generations we target and is in the PTX. Needs
    /// NVRTC only, no GPU; reported as skipped (ignored) where NVRTC is missing.
    #[test]
    #[ignore = "needs NVRTC (libnvrtc.so): run with --ignored where CUDA is installed"]
    fn kernels_compile_with_nvrtc() {
        assert!(nvrtc_present(), "libnvrtc.so not found");
        for arch in [(7, 5), (8, 7), (9, 0)] {
            let ptx = compile_kernels(arch).unwrap();
            for k in KERNELS {
                assert!(
                    ptx.contains(&format!(".entry {k}(")),
                    "{k} missing for {arch:?}"
                );
            }
        }
    }
}
