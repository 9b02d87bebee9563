//! The benchmark's own child programs, both C compiled once with `cc -O2`:
//! the harness-free driver (dlopen + a bare timing loop, no pool, no session,
//! no Rust) and the neighbour "hog" (streams over a 256 MiB buffer). Every
//! child is held by a [`Child`] guard that kills and reaps it on drop, so no
//! exit path (error, panic unwinding, early return) leaves one behind; both
//! also ask the kernel to kill them if the bench dies (`PR_SET_PDEATHSIG`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::kernels::Kernel;

const DRIVER_C: &str = r#"#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <time.h>
#include "tuning_harness_kernel.h"

typedef int32_t (*entry_fn)(DLTensor*, int32_t);

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static uint64_t rng_state;
static float uniform_1_10(void) {  /* xorshift64*, uniform in [1, 10) */
  rng_state ^= rng_state >> 12; rng_state ^= rng_state << 25; rng_state ^= rng_state >> 27;
  uint64_t r = rng_state * 2685821657736338717ULL;
  return 1.0f + 9.0f * (float)((double)(r >> 40) / (double)(1ULL << 24));
}

static int fail(const char* what, const char* detail) {
  fprintf(stderr, "driver: %s: %s\n", what, detail);
  return 2;
}

static double batch(entry_fn f, DLTensor* t, int n, long number, int* rc) {
  double t0 = now();
  for (long i = 0; i < number; i++) *rc |= f(t, n);
  return now() - t0;
}

int main(int argc, char** argv) {
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (argc < 6) return fail("usage", "driver <cpu|-1> <min_repeat_ms> <repeat> <seed> <so>:<shapes> ...");
  int cpu = atoi(argv[1]);
  double min_ms = atof(argv[2]);
  int repeat = atoi(argv[3]);
  rng_state = strtoull(argv[4], NULL, 10) * 2 + 1;
  if (repeat < 1 || repeat > 1000 || min_ms < 0 || min_ms > 10000) return fail("usage", "repeat in 1..1000, min_repeat_ms in 0..10000");
  if (cpu >= 0) {
    cpu_set_t set; CPU_ZERO(&set); CPU_SET(cpu, &set);
    if (sched_setaffinity(0, sizeof set, &set) != 0) return fail("sched_setaffinity", strerror(errno));
  }
  printf("{\"costs\": [");
  for (int a = 5; a < argc; a++) {
    /* <so>:<d0>x<d1>,<d0>,... : float32 tensors */
    char* spec = argv[a];
    char* colon = strrchr(spec, ':');
    if (!colon) return fail("bad kernel spec", spec);
    *colon = 0;
    DLTensor t[8]; int64_t shapes[8][4]; int n = 0;
    memset(t, 0, sizeof t);
    for (char* tok = strtok(colon + 1, ","); tok; tok = strtok(NULL, ",")) {
      if (n == 8) return fail("too many arguments", spec);
      int nd = 0; size_t elems = 1;
      for (char* d = tok; *d && nd < 4; nd++) {
        char* end; long long v = strtoll(d, &end, 10);
        if (end == d || v <= 0 || v > (1 << 28)) return fail("bad shape", tok);
        shapes[n][nd] = v; elems *= (size_t)v;
        d = (*end == 'x') ? end + 1 : end;
      }
      float* data = aligned_alloc(64, (elems * sizeof(float) + 63) / 64 * 64);
      if (!data) return fail("out of memory", tok);
      for (size_t i = 0; i < elems; i++) data[i] = uniform_1_10();
      t[n].data = data; t[n].device.device_type = kDLCPU; t[n].device.device_id = 0;
      t[n].ndim = nd; t[n].dtype.code = kDLFloat; t[n].dtype.bits = 32; t[n].dtype.lanes = 1;
      t[n].shape = shapes[n]; t[n].strides = NULL; t[n].byte_offset = 0;
      n++;
    }
    void* so = dlopen(spec, RTLD_NOW | RTLD_LOCAL);
    if (!so) return fail("dlopen", dlerror());
    entry_fn f = (entry_fn)dlsym(so, "entry");
    if (!f) return fail("dlsym", dlerror());
    int rc = 0;
    batch(f, t, n, 1, &rc); /* warm-up */
    long number = 1;
    for (int tries = 0;; tries++) { /* TVM's calibration */
      double secs = batch(f, t, n, number, &rc);
      if (secs * 1e3 >= min_ms || tries > 60) break;
      double per_ms = secs * 1e3 / (double)number;
      double grown = per_ms > 0 ? min_ms / per_ms + 1 : 0;
      double golden = (double)number * 1.618;
      number = (long)(grown > golden ? grown : golden);
      if (number < 1) number = 1;
    }
    printf(a > 5 ? ", [" : "[");
    for (int r = 0; r < repeat; r++) {
      double secs = batch(f, t, n, number, &rc);
      printf(r ? ", %.9e" : "%.9e", secs / (double)number);
    }
    printf("]");
    if (rc != 0) return fail("kernel returned an error", spec);
    for (int i = 0; i < n; i++) free(t[i].data);
    dlclose(so);
  }
  printf("]}\n");
  return 0;
}
"#;

const HOG_C: &str = r#"#define _GNU_SOURCE
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>

int main(int argc, char** argv) {
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  cpu_set_t set; CPU_ZERO(&set);
  for (int a = 1; a < argc; a++) CPU_SET(atoi(argv[a]), &set);
  if (argc > 1 && sched_setaffinity(0, sizeof set, &set) != 0) { perror("hog: sched_setaffinity"); return 2; }
  size_t n = (256u << 20) / sizeof(uint64_t);
  volatile uint64_t* buf = malloc(n * sizeof(uint64_t));
  if (!buf) { perror("hog: malloc"); return 2; }
  memset((void*)buf, 1, n * sizeof(uint64_t));
  printf("ready\n");
  fflush(stdout);
  for (;;)
    for (size_t i = 0; i < n; i += 8) buf[i] += 1; /* one write per cache line */
}
"#;

/// A child process, killed (SIGKILL) and reaped when dropped.
#[derive(Debug)]
pub(crate) struct Child {
    child: std::process::Child,
    what: &'static str,
}

impl Child {
    fn spawn(cmd: &mut Command, what: &'static str) -> anyhow::Result<Child> {
        let child = cmd.spawn().with_context(|| format!("cannot start the {what}"))?;
        Ok(Child { child, what })
    }

    /// The child's pid.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until it exits, at most `limit` (then it is killed); fails
    /// unless it exited with status 0.
    fn wait_success(mut self, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    bail!("the {} failed: {status}", self.what);
                }
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("the {} did not finish within {limit:?}", self.what);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        // Either fails only if it already exited (then `wait` reaps it).
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The compiled helper programs.
#[derive(Debug)]
pub(crate) struct Programs {
    driver: PathBuf,
    hog: PathBuf,
}

impl Programs {
    /// Compiles the driver and the hog into `dir` with `cc -O2`, against the
    /// kernel header in `include`.
    pub(crate) fn compile(dir: &Path, include: &Path) -> anyhow::Result<Programs> {
        let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
        let mut out = Vec::new();
        for (name, src) in [("driver", DRIVER_C), ("hog", HOG_C)] {
            let c = dir.join(format!("{name}.c"));
            let exe = dir.join(name);
            std::fs::write(&c, src)?;
            let status = Command::new(&cc)
                .args(["-O2", "-Wall", "-o"])
                .arg(&exe)
                .arg(&c)
                .arg("-I")
                .arg(include)
                .arg("-ldl")
                .stdin(Stdio::null())
                .status()
                .with_context(|| format!("cannot run {cc}"))?;
            if !status.success() {
                bail!("{cc} failed to compile the {name}: {status}");
            }
            out.push(exe);
        }
        let hog = out.pop().context("two programs")?;
        let driver = out.pop().context("two programs")?;
        Ok(Programs { driver, hog })
    }

    /// Starts the hog pinned to `cpus`; returns once it streams.
    pub(crate) fn start_hog(&self, cpus: &[usize]) -> anyhow::Result<Child> {
        use std::io::BufRead as _;
        let mut cmd = Command::new(&self.hog);
        cmd.args(cpus.iter().map(usize::to_string)).stdin(Stdio::null()).stdout(Stdio::piped());
        let mut hog = Child::spawn(&mut cmd, "hog")?;
        let stdout = hog.child.stdout.take().context("piped stdout")?;
        let mut line = String::new();
        std::io::BufReader::new(stdout).read_line(&mut line)?;
        if line.trim() != "ready" {
            bail!("the hog did not start: {line:?}");
        }
        Ok(hog)
    }

    /// One harness-free pass: a new driver process measures `kernels` (built
    /// at `paths`) pinned to `cpu` (`None`: not pinned); its batch costs per
    /// kernel, in order.
    pub(crate) fn run_driver(
        &self,
        dir: &Path,
        cpu: Option<usize>,
        min_repeat_ms: u64,
        repeat: u32,
        seed: u64,
        kernels: &[(&Kernel, &Path)],
    ) -> anyhow::Result<Vec<Vec<f64>>> {
        let out_path = dir.join("driver_out.json");
        let out = std::fs::File::create(&out_path)?;
        let mut cmd = Command::new(&self.driver);
        cmd.arg(cpu.map_or_else(|| "-1".to_owned(), |c| c.to_string()))
            .arg(min_repeat_ms.to_string())
            .arg(repeat.to_string())
            .arg(seed.to_string());
        for (k, path) in kernels {
            let shapes: Vec<String> = k
                .shapes
                .iter()
                .map(|s| s.iter().map(i64::to_string).collect::<Vec<_>>().join("x"))
                .collect();
            cmd.arg(format!("{}:{}", path.display(), shapes.join(",")));
        }
        cmd.stdin(Stdio::null()).stdout(out);
        Child::spawn(&mut cmd, "driver")?.wait_success(Duration::from_secs(300))?;
        #[derive(serde::Deserialize)]
        struct Out {
            costs: Vec<Vec<f64>>,
        }
        let text = std::fs::read_to_string(&out_path)?;
        let out: Out =
            serde_json::from_str(&text).with_context(|| format!("the driver printed {text:?}"))?;
        if out.costs.len() != kernels.len() {
            bail!("the driver measured {} kernels of {}", out.costs.len(), kernels.len());
        }
        Ok(out.costs)
    }
}

/// TVM's Python RPC server (`python -m tvm.exec.rpc_server`) registered
/// with a tracker, in its own process group: the whole group (the server
/// and any session process it forked) is killed and reaped when dropped.
#[derive(Debug)]
pub(crate) struct TvmServer {
    child: std::process::Child,
}

impl TvmServer {
    /// Starts it for `key` at `tracker` (`host:port`).
    pub(crate) fn start(python: &Path, tracker: &str, key: &str) -> anyhow::Result<TvmServer> {
        use std::os::unix::process::CommandExt as _;
        let child = Command::new(python)
            .args(["-m", "tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", "9300"])
            .args(["--port-end", "9499", &format!("--tracker={tracker}"), &format!("--key={key}")])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .process_group(0)
            .spawn()
            .context("cannot start TVM's rpc_server")?;
        Ok(TvmServer { child })
    }
}

impl Drop for TvmServer {
    fn drop(&mut self) {
        if let Ok(pgid) = i32::try_from(self.child.id()) {
            // SAFETY: a plain syscall; the group is this child's own.
            unsafe { nix::libc::kill(-pgid, nix::libc::SIGKILL) };
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// TVM's Python: `$TVM_PYTHON`, else the workspace's `bench/.venv` (built
/// by `bench/setup_tvm.sh`) if it exists.
pub(crate) fn tvm_python() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("TVM_PYTHON") {
        return Some(PathBuf::from(p));
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench/.venv/bin/python");
    venv.exists().then_some(venv)
}
