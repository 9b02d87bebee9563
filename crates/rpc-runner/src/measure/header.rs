//! The C headers shipped with the crate, so kernel authors don't copy the
//! DLPack structs (or TVM-FFI's) by hand.

use std::path::{Path, PathBuf};

/// File name of the kernel ABI header.
pub const KERNEL_HEADER_NAME: &str = "tuning_harness_kernel.h";

/// The kernel ABI header (`include/tuning_harness_kernel.h` of this crate):
/// the DLPack structs a kernel receives, the entry signature and an export
/// macro. `rpc-runner kernel-header` prints it.
pub const KERNEL_HEADER: &str = include_str!("../../include/tuning_harness_kernel.h");

/// File name of the TVM-FFI header.
pub const TVM_FFI_HEADER_NAME: &str = "tuning_harness_tvm_ffi.h";

/// The few TVM-FFI declarations a TVM export uses
/// (`include/tuning_harness_tvm_ffi.h` of this crate): the packed value
/// `THFFIAny`, the object header, the type indices of tensors, the
/// safe-call signature; written for this project (prefixed `THFFI`, so it
/// coexists with TVM's `<tvm/ffi/c_api.h>`), no TVM install needed. It
/// includes [`KERNEL_HEADER`]. The shim of
/// [`TvmExport`](crate::measure::TvmExport) is built against it.
pub const TVM_FFI_HEADER: &str = include_str!("../../include/tuning_harness_tvm_ffi.h");

/// Writes [`KERNEL_HEADER`] into `dir` (created if needed) unless an
/// identical copy is there; returns the header's path. Pass `-I dir` to the
/// compiler.
///
/// # Errors
///
/// If `dir` or the file cannot be written.
pub fn write_kernel_header(dir: &Path) -> std::io::Result<PathBuf> {
    write_header(dir, KERNEL_HEADER_NAME, KERNEL_HEADER)
}

/// Writes [`TVM_FFI_HEADER`] and the [`KERNEL_HEADER`] it includes into
/// `dir`, as [`write_kernel_header`] does; returns the TVM-FFI header's path.
///
/// # Errors
///
/// If `dir` or a file cannot be written.
pub fn write_tvm_ffi_header(dir: &Path) -> std::io::Result<PathBuf> {
    write_kernel_header(dir)?;
    write_header(dir, TVM_FFI_HEADER_NAME, TVM_FFI_HEADER)
}

fn write_header(dir: &Path, name: &str, text: &str) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(name);
    if std::fs::read(&path).ok().as_deref() != Some(text.as_bytes()) {
        // Write a sibling and rename it, so a concurrent compiler never
        // reads a half-written header.
        let tmp = dir.join(format!(".{name}.{}", std::process::id()));
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, &path)?;
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use popen_pool::{Task, WorkerContext};

    use super::*;
    use crate::measure::{AllocArgs, ArgInfo, DType, LoadKernel, ReadArg};

    /// A kernel written against the header sees the tensors the worker
    /// allocates: the header's layout is the ABI's.
    #[test]
    fn a_kernel_built_against_the_header_reads_the_abi_correctly() {
        let dir = tempfile::tempdir().unwrap();
        let include = dir.path().join("include");
        write_kernel_header(&include).unwrap();
        // Idempotent.
        write_kernel_header(&include).unwrap();
        let src = dir.path().join("k.c");
        std::fs::write(
            &src,
            r#"#include "tuning_harness_kernel.h"
TUNING_HARNESS_EXPORT int32_t entry(DLTensor* args, int32_t num_args) {
  if (num_args != 2) return 10;
  if (args[0].device.device_type != kDLCPU || args[0].strides != 0) return 11;
  if (args[0].dtype.code != kDLFloat || args[0].dtype.bits != 32) return 12;
  if (args[1].dtype.code != kDLInt || args[1].dtype.bits != 64) return 13;
  int64_t* out = (int64_t*)args[1].data;
  out[0] = args[0].ndim; out[1] = args[0].shape[0]; out[2] = args[0].shape[1];
  out[3] = (int64_t)((uintptr_t)args[0].data % 64);
  return 0;
}
"#,
        )
        .unwrap();
        let so = dir.path().join("k.so");
        let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
        let status = std::process::Command::new(cc)
            .args(["-O2", "-shared", "-fPIC", "-fvisibility=hidden", "-Wall", "-Werror", "-I"])
            .arg(&include)
            .arg("-o")
            .arg(&so)
            .arg(&src)
            .status()
            .unwrap();
        assert!(status.success(), "the header compiles cleanly");
        let mut ctx = WorkerContext::default();
        LoadKernel::new(so.to_str().unwrap()).run(&mut ctx).unwrap();
        let args = vec![ArgInfo::tensor(DType::F32, [3, 7]), ArgInfo::tensor(DType::I64, [4])];
        AllocArgs { args, alloc_repeat: 1, seed: 1 }.run(&mut ctx).unwrap();
        let cfg =
            crate::measure::EvaluatorConfig { number: 1, min_repeat_ms: 0, ..Default::default() };
        crate::measure::TimeKernel { config: cfg }.run(&mut ctx).expect("the kernel returns 0");
        let out = ReadArg { set: 0, index: 1 }.run(&mut ctx).unwrap().into_vec();
        let got: Vec<i64> =
            out.chunks_exact(8).map(|c| i64::from_ne_bytes(c.try_into().unwrap())).collect();
        assert_eq!(got, [2, 3, 7, 0]);
    }
}
