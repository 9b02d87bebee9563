//! [`LocalBuilderConfig`]: a [`LocalBuilder`](super::LocalBuilder)'s settings.

use std::path::PathBuf;
use std::time::Duration;

use super::error::BuildError;
use super::tvm::TvmExport;

/// A [`LocalBuilder`](super::LocalBuilder)'s settings.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use rpc_runner::measure::LocalBuilderConfig;
///
/// let cfg = LocalBuilderConfig::default()
///     .max_workers(4)
///     .timeout(Duration::from_secs(10))
///     .out_dir("/tmp/my-tuning-run/builds");
/// assert_eq!(cfg.flags, ["-O3", "-shared", "-fPIC"]);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LocalBuilderConfig {
    /// Worker processes compiling at once (default: the available parallelism).
    pub max_workers: usize,
    /// Time limit of each build, from the moment a worker takes it (default 30 s).
    pub timeout: Duration,
    /// The compiler program (default: `$CC`, or `cc`). If `$CC` holds several
    /// words (`ccache gcc`), the first is the program and the others are
    /// put in front of [`flags`](Self::flags).
    pub compiler: String,
    /// Flags of every build (default `-O3 -shared -fPIC`; add `-march=native`
    /// to tune for the building machine).
    pub flags: Vec<String>,
    /// Where sources and artifacts go (created if missing). `None` (the
    /// default): a fresh private temp dir that lives as long as the builder
    /// and is removed with it; set a directory to keep the artifacts.
    pub out_dir: Option<PathBuf>,
    /// CPUs the build workers (and the compilers they run) are pinned to
    /// (default: the process's own affinity).
    pub cpus: Option<Vec<usize>>,
    /// Memory ceiling of a build worker while it compiles (default: none); a
    /// build over it fails as a crash of its worker, the builder goes on.
    pub memory_limit: Option<u64>,
    /// Also export every build as a TVM function, so TVM's runtime and RPC
    /// servers can load and time the same artifact (default: off). See
    /// [`TvmExport`].
    pub tvm_export: Option<TvmExport>,
}

impl Default for LocalBuilderConfig {
    fn default() -> Self {
        let mut flags: Vec<String> = Vec::new();
        let compiler = match std::env::var("CC") {
            Ok(cc) if !cc.trim().is_empty() => {
                let mut words = cc.split_whitespace().map(str::to_owned);
                let program = words.next().unwrap_or_default();
                flags.extend(words);
                program
            }
            _ => "cc".to_owned(),
        };
        flags.extend(["-O3", "-shared", "-fPIC"].map(String::from));
        LocalBuilderConfig {
            max_workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
            timeout: Duration::from_secs(30),
            compiler,
            flags,
            out_dir: None,
            cpus: None,
            memory_limit: None,
            tvm_export: None,
        }
    }
}

impl LocalBuilderConfig {
    /// Pins the build workers to these CPUs (e.g. the cores not used for
    /// measuring).
    #[must_use]
    pub fn cpu_affinity(mut self, cpus: impl IntoIterator<Item = usize>) -> Self {
        self.cpus = Some(cpus.into_iter().collect());
        self
    }

    /// Sets [`memory_limit`](Self::memory_limit).
    #[must_use]
    pub fn memory_limit(mut self, bytes: u64) -> Self {
        self.memory_limit = Some(bytes);
        self
    }

    /// Makes every build also export the TVM function `export` (a name, or
    /// a [`TvmExport`] with another entry symbol): the symbol
    /// `__tvm_ffi_<name>`, next to the kernel's entry point.
    #[must_use]
    pub fn tvm_export(mut self, export: impl Into<TvmExport>) -> Self {
        self.tvm_export = Some(export.into());
        self
    }

    /// Turns [`tvm_export`](Self::tvm_export) off again (the default).
    #[must_use]
    pub fn no_tvm_export(mut self) -> Self {
        self.tvm_export = None;
        self
    }

    /// Sets [`max_workers`](Self::max_workers).
    #[must_use]
    pub fn max_workers(mut self, n: usize) -> Self {
        self.max_workers = n;
        self
    }

    /// Sets [`timeout`](Self::timeout).
    #[must_use]
    pub fn timeout(mut self, limit: Duration) -> Self {
        self.timeout = limit;
        self
    }

    /// Sets [`compiler`](Self::compiler).
    #[must_use]
    pub fn compiler(mut self, program: impl Into<String>) -> Self {
        self.compiler = program.into();
        self
    }

    /// Replaces [`flags`](Self::flags).
    #[must_use]
    pub fn flags<I, S>(mut self, flags: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.flags = flags.into_iter().map(Into::into).collect();
        self
    }

    /// Appends flags to [`flags`](Self::flags).
    #[must_use]
    pub fn add_flags<I, S>(mut self, flags: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.flags.extend(flags.into_iter().map(Into::into));
        self
    }

    /// Sets [`out_dir`](Self::out_dir).
    #[must_use]
    pub fn out_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.out_dir = Some(dir.into());
        self
    }

    /// Goes back to a private temp output directory (the default).
    #[must_use]
    pub fn temp_out_dir(mut self) -> Self {
        self.out_dir = None;
        self
    }

    pub(crate) fn validate(&self) -> Result<(), BuildError> {
        let bad = |message: &str| Err(BuildError::Config { message: message.to_owned() });
        if self.max_workers == 0 {
            return bad("max_workers must be >= 1");
        }
        if self.timeout.is_zero() {
            return bad("timeout must be > 0");
        }
        if self.compiler.trim().is_empty() {
            return bad("compiler must not be empty");
        }
        if let Some(export) = &self.tvm_export {
            export.validate().map_err(|message| BuildError::Config { message })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_tvm() {
        let cfg = LocalBuilderConfig::default();
        assert_eq!(cfg.timeout, Duration::from_secs(30));
        assert!(cfg.flags.ends_with(&["-O3".into(), "-shared".into(), "-fPIC".into()]));
        assert!(!cfg.flags.iter().any(|f| f == "-march=native"));
        assert!(cfg.max_workers >= 1);
        assert_eq!(cfg.out_dir, None);
        assert_eq!(cfg.validate().map_err(|e| e.to_string()), Ok(()));
        assert!(cfg.clone().max_workers(0).validate().is_err());
        assert!(cfg.clone().timeout(Duration::ZERO).validate().is_err());
        assert_eq!(cfg.clone().out_dir("x").temp_out_dir().out_dir, None);
        assert!(cfg.clone().add_flags(["-g"]).flags.ends_with(&["-fPIC".into(), "-g".into()]));
        assert_eq!(cfg.tvm_export, None);
        assert!(cfg.clone().tvm_export("vadd").validate().is_ok());
        assert!(cfg.clone().tvm_export("v-add").validate().is_err());
        assert_eq!(cfg.clone().tvm_export("vadd").no_tvm_export().tvm_export, None);
        assert!(cfg.compiler(" ").validate().is_err());
    }
}
