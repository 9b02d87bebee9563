//! Kernels TVM's runtime can load: `LocalBuilderConfig::tvm_export` compiles
//! a TVM-FFI export (`__tvm_ffi_<name>`) next to `entry`. Checked against
//! TVM's own header and runtime (apache-tvm 0.27 in its virtualenv; those
//! tests are skipped with a note without it) and through our own pipeline.

use crate::chaos::children_of;
use crate::tracker_interop::{require_tvm, tvm_python};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use rpc_runner::measure::{
    ArgInfo, BuilderInput, DType, EvaluatorConfig, LocalBuilder, LocalBuilderConfig, LocalRunner,
    Runner as _, RunnerInput, TVM_FFI_HEADER_NAME, TvmExport,
};

use crate::common::{eventually, free_port, within};

/// How long TVM's Python (a slow import, an RPC server) may take for a script.
const TVM_LIMIT: Duration = Duration::from_secs(120);

/// The TVM function name the tests export.
const NAME: &str = "kernel";

/// `c = a + b` over three float32 vectors of one length; 3 if not 3 args.
const VADD: &str = r#"#include "tuning_harness_kernel.h"
TUNING_HARNESS_EXPORT int32_t entry(DLTensor* args, int32_t num_args) {
  if (num_args != 3) return 3;
  for (int i = 0; i < 3; ++i)
    if (args[i].ndim != 1 || args[i].dtype.code != kDLFloat || args[i].dtype.bits != 32 ||
        args[i].shape[0] != args[0].shape[0] || args[i].strides || args[i].byte_offset)
      return 4;
  const float* a = args[0].data;
  const float* b = args[1].data;
  float* c = args[2].data;
  for (int64_t i = 0; i < args[0].shape[0]; ++i) c[i] = a[i] + b[i];
  return 0;
}
"#;

/// Spins for 200 us of wall-clock time per call.
const BUSY_200US: &str = r#"#include <time.h>
#include "tuning_harness_kernel.h"
static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}
TUNING_HARNESS_EXPORT int32_t entry(DLTensor* args, int32_t num_args) {
  double end = now() + 200e-6;
  (void)args;
  (void)num_args;
  while (now() < end) {}
  return 0;
}
"#;

/// Runs `python script args...` in its own process group to completion
/// (the whole group is killed if it overruns or the test fails) and
/// returns its stdout.
async fn run_python(python: &Path, script: &Path, args: &[&str]) -> String {
    let mut cmd = tokio::process::Command::new(python);
    cmd.arg(script).args(args).stdin(Stdio::null()).kill_on_drop(true);
    // Also the RPC server process TVM's Python starts.
    cmd.as_std_mut().process_group(0);
    let child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("run python");
    let pgid = child.id().expect("pid");
    struct KillGroup(u32);
    impl Drop for KillGroup {
        fn drop(&mut self) {
            // The group is gone once the script exited and reaped its
            // server; ESRCH is fine.
            let pgid = nix::unistd::Pid::from_raw(i32::try_from(self.0).unwrap_or(i32::MAX));
            let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        }
    }
    let _group = KillGroup(pgid);
    let out = match tokio::time::timeout(TVM_LIMIT, child.wait_with_output()).await {
        Ok(out) => out.expect("wait for python"),
        Err(_) => panic!("python {script:?} did not finish within {TVM_LIMIT:?}"),
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "python {script:?} failed: {}\n{stderr}", out.status);
    String::from_utf8(out.stdout).expect("utf-8 stdout")
}

/// The include directory of the `apache-tvm-ffi` wheel of `python`.
async fn tvm_ffi_include(python: &Path, dir: &Path) -> PathBuf {
    let script = dir.join("include.py");
    std::fs::write(
        &script,
        "import os, tvm_ffi\nprint(os.path.join(os.path.dirname(tvm_ffi.__file__), 'include'))\n",
    )
    .unwrap();
    PathBuf::from(run_python(python, &script, &[]).await.trim())
}

pub(crate) fn builder(out_dir: &Path, export: Option<&str>) -> LocalBuilder {
    let mut cfg = LocalBuilderConfig::default()
        .max_workers(2)
        .timeout(Duration::from_secs(60))
        .out_dir(out_dir)
        .add_flags(["-Wall", "-Werror"]);
    if let Some(name) = export {
        cfg = cfg.tvm_export(name);
    }
    LocalBuilder::new(crate::test_worker_program(), cfg).expect("builder")
}

/// Builds `vadd.so` and `busy.so` with `builder`.
pub(crate) async fn build_kernels(builder: &LocalBuilder) -> (PathBuf, PathBuf) {
    let inputs = vec![BuilderInput::new("vadd", VADD), BuilderInput::new("busy", BUSY_200US)];
    let results = within("builds", builder.build(inputs).collect_ordered()).await;
    let mut paths = results.into_iter().map(|r| match r.result {
        Ok(out) => out.artifact_path,
        Err(e) => panic!("{}: {e}\n{}", r.input_name, e.stderr().unwrap_or_default()),
    });
    (paths.next().unwrap(), paths.next().unwrap())
}

fn cc(args: &[&std::ffi::OsStr]) {
    let compiler = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let out = Command::new(compiler).args(args).output().expect("run cc");
    assert!(out.status.success(), "cc {args:?}:\n{}", String::from_utf8_lossy(&out.stderr));
}

/// Static assertions that our declarations agree with TVM's `c_api.h`.
const LAYOUT_CHECK: &str = r#"#include <stddef.h>
#include <tvm/ffi/c_api.h>
#include "tuning_harness_tvm_ffi.h"

#define SAME(a, b) _Static_assert((long)(a) == (long)(b), #a " == " #b)
SAME(sizeof(THFFIAny), sizeof(TVMFFIAny));
SAME(_Alignof(THFFIAny), _Alignof(TVMFFIAny));
SAME(offsetof(THFFIAny, type_index), offsetof(TVMFFIAny, type_index));
SAME(offsetof(THFFIAny, zero_padding), offsetof(TVMFFIAny, zero_padding));
SAME(offsetof(THFFIAny, v.v_int64), offsetof(TVMFFIAny, v_int64));
SAME(offsetof(THFFIAny, v.v_ptr), offsetof(TVMFFIAny, v_ptr));
SAME(offsetof(THFFIAny, v.v_obj), offsetof(TVMFFIAny, v_obj));
SAME(sizeof(THFFIObject), sizeof(TVMFFIObject));
SAME(offsetof(THFFIObject, combined_ref_count), offsetof(TVMFFIObject, combined_ref_count));
SAME(offsetof(THFFIObject, type_index), offsetof(TVMFFIObject, type_index));
SAME(offsetof(THFFIObject, tail), offsetof(TVMFFIObject, deleter));
SAME(kTHFFINone, kTVMFFINone);
SAME(kTHFFIInt, kTVMFFIInt);
SAME(kTHFFIDLTensorPtr, kTVMFFIDLTensorPtr);
SAME(kTHFFIStaticObjectBegin, kTVMFFIStaticObjectBegin);
SAME(kTHFFITensor, kTVMFFITensor);
/* The kernel header takes DLPack's own structs once dlpack.h is in. */
SAME(sizeof(DLTensor), 48);

/* Same signature, up to the (layout-equal) value type. */
static int f(void* self, const TVMFFIAny* args, int32_t num_args, TVMFFIAny* result) {
  (void)self; (void)args; (void)num_args; (void)result;
  return 0;
}
static int g(void* self, const THFFIAny* args, int32_t num_args, THFFIAny* result) {
  (void)self; (void)args; (void)num_args; (void)result;
  return 0;
}
TVMFFISafeCallType tvm_fn = f;
THFFISafeCallType our_fn = g;
int main(void) { return tvm_fn(0, 0, 0, 0) + our_fn(0, 0, 0, 0); }
"#;

#[tokio::test]
async fn the_tvm_ffi_header_agrees_with_tvms_c_api() {
    let python = require_tvm!();
    let dir = tempfile::tempdir().unwrap();
    let tvm_include = tvm_ffi_include(&python, dir.path()).await;
    assert!(tvm_include.join("tvm/ffi/c_api.h").is_file(), "no c_api.h in {tvm_include:?}");
    let ours = dir.path().join("include");
    let header = rpc_runner::measure::write_tvm_ffi_header(&ours).unwrap();
    assert_eq!(header, ours.join(TVM_FFI_HEADER_NAME));
    let src = dir.path().join("layout.c");
    std::fs::write(&src, LAYOUT_CHECK).unwrap();
    let prog = dir.path().join("layout");
    // C11 for _Static_assert; the TVMFFIErrorSetRaisedFromCStr redeclaration
    // must agree with TVM's too.
    cc(&[
        "-std=c11".as_ref(),
        "-Wall".as_ref(),
        "-Werror".as_ref(),
        "-I".as_ref(),
        tvm_include.as_os_str(),
        "-I".as_ref(),
        ours.as_os_str(),
        "-o".as_ref(),
        prog.as_os_str(),
        src.as_os_str(),
    ]);
}

/// Loads, calls and times the kernels in TVM's Python: directly and through
/// TVM's own RPC server on 127.0.0.1 (which passes `DLTensor` pointers where
/// Python passes tensor objects). Prints one JSON object.
const TVM_SCRIPT: &str = r#"
import json, sys
import numpy as np
import tvm
from tvm import rpc

vadd_path, busy_path, name, port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
n = 1000
a = np.arange(n, dtype="float32")
b = np.full(n, 0.5, dtype="float32")
out = {}

def error_of(call):
    try:
        call()
        return "no error"
    except Exception as e:
        return f"{type(e).__name__}: {e}"

def run(dev, load):
    vadd, busy = load(vadd_path), load(busy_path)
    ta, tb, tc = (tvm.runtime.tensor(x, dev) for x in (a, b, np.zeros(n, dtype="float32")))
    vadd[name](ta, tb, tc)
    res = {"vadd_ok": bool(np.array_equal(tc.numpy(), a + b))}
    res["two_args"] = error_of(lambda: vadd[name](ta, tb))
    res["vadd_times"] = list(vadd.time_evaluator(name, dev, number=5, repeat=3)(ta, tb, tc).results)
    res["busy_times"] = list(busy.time_evaluator(name, dev, number=5, repeat=3)(ta).results)
    return res

out["direct"] = run(tvm.cpu(), tvm.runtime.load_module)
out["direct"]["int_arg"] = error_of(lambda: tvm.runtime.load_module(vadd_path)[name](1, 2, 3))

server = rpc.Server(host="127.0.0.1", port=port, port_end=port + 100, silent=True)
try:
    remote = rpc.connect("127.0.0.1", server.port)
    def load(path):
        remote.upload(path)
        return remote.load_module(path.rsplit("/", 1)[-1])
    out["rpc"] = run(remote.cpu(), load)
    del remote
finally:
    server.terminate()
print(json.dumps(out))
"#;

#[tokio::test]
async fn tvm_loads_calls_and_times_kernels_built_with_the_export() {
    let python = require_tvm!();
    let dir = tempfile::tempdir().unwrap();
    let builder = builder(&dir.path().join("builds"), Some(NAME));
    let (vadd, busy) = build_kernels(&builder).await;
    builder.shutdown().await;
    let script = dir.path().join("tvm_shim.py");
    std::fs::write(&script, TVM_SCRIPT).unwrap();
    let port = free_port().to_string();
    let args = [vadd.to_str().unwrap(), busy.to_str().unwrap(), NAME, &port];
    let stdout = run_python(&python, &script, &args).await;
    eprintln!("{stdout}");
    let out: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON line");
    let times = |v: &serde_json::Value| -> Vec<f64> {
        v.as_array().expect("a list").iter().map(|t| t.as_f64().expect("seconds")).collect()
    };
    for path in ["direct", "rpc"] {
        let res = &out[path];
        assert_eq!(res["vadd_ok"], true, "{path}: c == a + b");
        // The entry's nonzero code comes back as TVM's error, with the name.
        let err = res["two_args"].as_str().unwrap();
        assert!(err.contains("kernel: the kernel's entry returned 3"), "{path}: {err}");
        let vadd_times = times(&res["vadd_times"]);
        assert_eq!(vadd_times.len(), 3, "{path}: repeat=3");
        assert!(vadd_times.iter().all(|t| *t > 0.0 && *t < 0.1), "{path}: {vadd_times:?}");
        let busy_times = times(&res["busy_times"]);
        assert_eq!(busy_times.len(), 3, "{path}: repeat=3");
        // 200 us of wall clock per call, averaged over number=5; slower under load.
        assert!(busy_times.iter().all(|t| *t >= 195e-6 && *t < 0.5), "{path}: {busy_times:?}");
    }
    let err = out["direct"]["int_arg"].as_str().unwrap();
    assert!(err.contains("RuntimeError") && err.contains("argument 0 is not a tensor"), "{err}");
}

/// Calls `__tvm_ffi_kernel` of a library the way TVM's RPC server does
/// (`DLTensor` pointers), in a process without TVM: the weak error setter is
/// NULL, a failure is just -1.
const DLOPEN_HARNESS: &str = r#"#include <dlfcn.h>
#include <stdio.h>
#include <string.h>
#include "tuning_harness_tvm_ffi.h"

int main(int argc, char** argv) {
  float a[4] = {1, 2, 3, 4}, b[4] = {10, 20, 30, 40}, c[4] = {0};
  float* data[3] = {a, b, c};
  int64_t shape[1] = {4};
  DLTensor t[3];
  THFFIAny args[3], result;
  THFFISafeCallType f;
  void* lib;
  int i, rc;
  if (argc != 2) return 2;
  lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
  if (!lib) { printf("dlopen: %s\n", dlerror()); return 1; }
  *(void**)(&f) = dlsym(lib, "__tvm_ffi_kernel");
  if (!f) { printf("no export\n"); return 0; }
  memset(t, 0, sizeof t);
  memset(args, 0, sizeof args);
  for (i = 0; i < 3; ++i) {
    t[i].data = data[i];
    t[i].device.device_type = kDLCPU;
    t[i].ndim = 1;
    t[i].shape = shape;
    t[i].dtype.code = kDLFloat;
    t[i].dtype.bits = 32;
    t[i].dtype.lanes = 1;
    args[i].type_index = kTHFFIDLTensorPtr;
    args[i].v.v_ptr = &t[i];
  }
  memset(&result, 0, sizeof result);
  rc = f(NULL, args, 3, &result);
  printf("ok %d %g %g %g %g %d\n", rc, c[0], c[1], c[2], c[3], result.type_index);
  printf("fail %d\n", f(NULL, args, 2, &result));
  return 0;
}
"#;

/// Runs [`DLOPEN_HARNESS`] (built once into `dir`) on `library`.
fn call_export(dir: &Path, library: &Path) -> String {
    let prog = dir.join("dlopen_harness");
    if !prog.exists() {
        let include = dir.join("include");
        rpc_runner::measure::write_tvm_ffi_header(&include).unwrap();
        let src = dir.join("dlopen_harness.c");
        std::fs::write(&src, DLOPEN_HARNESS).unwrap();
        cc(&[
            "-Wall".as_ref(),
            "-Werror".as_ref(),
            "-I".as_ref(),
            include.as_os_str(),
            "-o".as_ref(),
            prog.as_os_str(),
            src.as_os_str(),
            "-ldl".as_ref(),
        ]);
    }
    let out = Command::new(&prog).arg(library).output().expect("run the harness");
    assert!(out.status.success(), "harness on {library:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test]
async fn an_exported_kernel_still_runs_through_our_pipeline_and_the_export_calls_entry() {
    let dir = tempfile::tempdir().unwrap();
    let builder = builder(&dir.path().join("builds"), Some(NAME));
    let (vadd, busy) = build_kernels(&builder).await;
    builder.shutdown().await;

    // TVM's calling convention, without TVM.
    let text = call_export(dir.path(), &vadd);
    assert_eq!(text, "ok 0 11 22 33 44 0\nfail -1\n");

    // Our own pipeline: the same library, through `entry`.
    let runner = LocalRunner::builder(crate::test_worker_program())
        .evaluator(EvaluatorConfig { number: 5, repeat: 3, min_repeat_ms: 0, ..Default::default() })
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let vec = || ArgInfo::tensor(DType::F32, [1000]);
    let inputs = vec![
        RunnerInput::new(&vadd, vec![vec(), vec(), vec()]).read_args([0, 1, 2]),
        RunnerInput::new(&busy, vec![vec()]),
    ];
    let results = within("measurements", runner.run(inputs).collect_ordered()).await;
    let m = results[0].as_ref().expect("vadd measured");
    let (a, b, c): (Vec<f32>, Vec<f32>, Vec<f32>) =
        (m.output_as(0).unwrap(), m.output_as(1).unwrap(), m.output_as(2).unwrap());
    assert_eq!(c.len(), 1000);
    assert!(a.iter().zip(&b).zip(&c).all(|((a, b), c)| a + b == *c), "c == a + b");
    let m = results[1].as_ref().expect("busy measured");
    assert_eq!(m.run_secs.len(), 3);
    assert!(m.run_secs.iter().all(|t| *t >= 195e-6 && *t < 0.5), "{:?}", m.run_secs);
    runner.shutdown().await;
    let me = std::process::id();
    eventually("no worker left", async || children_of(me) == 0).await;
}

#[tokio::test]
async fn without_the_option_a_build_has_no_tvm_export() {
    let dir = tempfile::tempdir().unwrap();
    let builder = builder(&dir.path().join("builds"), None);
    assert_eq!(builder.config().tvm_export, None);
    let (vadd, _) = build_kernels(&builder).await;
    builder.shutdown().await;
    assert_eq!(call_export(dir.path(), &vadd), "no export\n");
    // An invalid name is a configuration error, before anything runs.
    let bad = LocalBuilderConfig::default().tvm_export(TvmExport::new("k").entry("not-a-symbol"));
    let err = LocalBuilder::new(crate::test_worker_program(), bad).unwrap_err();
    assert!(err.to_string().contains("tvm_export entry \"not-a-symbol\""), "{err}");
}
