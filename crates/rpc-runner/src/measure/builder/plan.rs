//! The worker side of a build: the [`BuilderInput`] a caller gives, the
//! [`BuildPlan`] the parent resolves it into, the build task ([`CompileC`])
//! that runs the plan in a worker, and what it returns
//! ([`BuildTaskOutput`]).

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use popen_pool::{Task, TaskFailure, WorkerContext};
use serde::{Deserialize, Serialize};

use super::tvm::TvmExport;

/// The longest candidate name accepted, in bytes.
pub const MAX_NAME_LEN: usize = 128;

/// At most this much compiler stderr is kept (the end is cut, with a note).
const MAX_STDERR_BYTES: usize = 64 * 1024;

/// One candidate to build.
///
/// # Examples
///
/// ```
/// use rpc_runner::measure::BuilderInput;
///
/// let input = BuilderInput::new("matmul_t32", "int32_t entry(void) { return 0; }")
///     .with_flags(["-DTILE=32"]);
/// assert_eq!(input.extra_flags, ["-DTILE=32"]);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuilderInput {
    /// The candidate's id; names the files `<out_dir>/<name>.c` and
    /// `<out_dir>/<name>.so`. At most [`MAX_NAME_LEN`] bytes of ASCII letters,
    /// digits, `_`, `-` and `.`, not starting with `.` (so no path separators
    /// and no `..`), and unique within a batch.
    pub name: String,
    /// The C source.
    pub source: String,
    /// Flags added after the builder's own flags for this candidate only
    /// (`-DTILE=32`, `-funroll-loops`...).
    pub extra_flags: Vec<String>,
}

impl BuilderInput {
    /// An input without extra flags.
    pub fn new(name: impl Into<String>, source: impl Into<String>) -> Self {
        BuilderInput { name: name.into(), source: source.into(), extra_flags: Vec::new() }
    }

    /// Appends extra compiler flags for this input.
    #[must_use]
    pub fn with_flags<I, S>(mut self, flags: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.extra_flags.extend(flags.into_iter().map(Into::into));
        self
    }
}

/// A built artifact: what a build task returns on success.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuildOutput {
    /// The shared library, as an absolute path.
    pub artifact_path: PathBuf,
    /// How long the build took inside the worker (queueing excluded), in seconds.
    pub build_secs: f64,
}

impl BuildOutput {
    /// An output at `artifact_path` for a build that began at `started`.
    pub fn since(artifact_path: impl Into<PathBuf>, started: Instant) -> Self {
        BuildOutput {
            artifact_path: artifact_path.into(),
            build_secs: started.elapsed().as_secs_f64(),
        }
    }
}

/// How a build failed inside the worker; the error half of [`BuildTaskOutput`].
///
/// It travels from the worker to the parent, so it holds text, not error values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum BuildFailure {
    /// The compiler ran and failed.
    #[error("compilation failed ({}){}", StatusText(*status), ErrorLine(stderr))]
    Compile {
        /// The compiler's stderr (lossily decoded, at most 64 KiB kept). When the
        /// compiler was killed by a signal, a last line says which.
        stderr: String,
        /// The compiler's exit code; `None` if a signal ended it.
        status: Option<i32>,
    },
    /// The source could not be written, the compiler could not be started,
    /// or it reported success without writing the artifact.
    #[error("{message}")]
    Io {
        /// What failed, with the path and the OS error.
        message: String,
    },
}

impl BuildFailure {
    /// An [`Io`](BuildFailure::Io) failure: `what` failed with `err`.
    pub fn io(what: impl fmt::Display, err: impl fmt::Display) -> Self {
        BuildFailure::Io { message: format!("{what}: {err}") }
    }
}

/// What every build task returns to the parent.
pub type BuildTaskOutput = Result<BuildOutput, BuildFailure>;

/// A task type that [`LocalBuilder`](super::LocalBuilder) can run: any [`Task`] whose output is
/// [`BuildTaskOutput`] (implemented for all of them). Its type must be
/// registered in the worker program the builder runs.
pub trait BuildTask: Task<Output = BuildTaskOutput> {}

impl<T: Task<Output = BuildTaskOutput>> BuildTask for T {}

/// One input resolved by the builder: everything a build task needs.
///
/// A custom build task gets the plan from [`LocalBuilder::with_task`](super::LocalBuilder::with_task)'s
/// constructor; it may change it (add a flag, swap the compiler) and call
/// [`BuildPlan::compile`], or do something else entirely, as long as it
/// returns a [`BuildOutput`] or a [`BuildFailure`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct BuildPlan {
    /// The input's (validated) name.
    pub name: String,
    /// The C source.
    pub source: String,
    /// The compiler program.
    pub compiler: String,
    /// The builder's flags followed by the input's extra flags.
    pub flags: Vec<String>,
    /// Where the source is written: `<out_dir>/<name>.c` (absolute).
    pub source_path: PathBuf,
    /// Where the shared library goes: `<out_dir>/<name>.so` (absolute).
    pub artifact_path: PathBuf,
    /// The TVM export to compile into the library too (the builder's
    /// [`tvm_export`](super::LocalBuilderConfig::tvm_export)); `None`: none.
    pub tvm_export: Option<TvmExport>,
}

impl BuildPlan {
    /// Runs the plan in this process: writes the source to `source_path`,
    /// removes a stale artifact, then runs
    /// `compiler flags... -o artifact_path source_path` with stdin closed and
    /// stdout and stderr captured (stdout is discarded). This is what
    /// [`CompileC`] does in a worker.
    ///
    /// With a [`tvm_export`](Self::tvm_export), its shim
    /// ([`TvmExport::shim_source`]) is written to
    /// `<scratch_dir>/tvm_export.c` and compiled with the same flags into
    /// the same library: `... -o artifact_path source_path <scratch_dir>/tvm_export.c`.
    ///
    /// # Errors
    ///
    /// [`BuildFailure::Compile`] if the compiler fails; [`BuildFailure::Io`]
    /// if the source cannot be written, the compiler cannot be started, or it
    /// succeeds without writing the artifact.
    pub fn compile(&self) -> BuildTaskOutput {
        let started = Instant::now();
        // The compiler's own temp files go to a scratch dir next to the
        // artifact: a compiler killed on timeout cannot clean them up, the
        // builder removes the scratch dir instead.
        let scratch = self.scratch_dir();
        std::fs::create_dir_all(&scratch).map_err(|e| {
            BuildFailure::io(format_args!("cannot create {}", scratch.display()), e)
        })?;
        let result = self.compile_in(&scratch, started);
        let _ = std::fs::remove_dir_all(&scratch);
        result
    }

    /// Where the compiler's temp files go while this plan is compiled
    /// (`TMPDIR`); removed afterwards, also after a timeout.
    pub fn scratch_dir(&self) -> PathBuf {
        let dir = self.artifact_path.parent().unwrap_or(Path::new("."));
        dir.join(format!(".tmp-{}", self.name))
    }

    fn compile_in(&self, scratch: &Path, started: Instant) -> BuildTaskOutput {
        if let Some(dir) = self.source_path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| {
                BuildFailure::io(format_args!("cannot create {}", dir.display()), e)
            })?;
        }
        std::fs::write(&self.source_path, &self.source).map_err(|e| {
            BuildFailure::io(format_args!("cannot write {}", self.source_path.display()), e)
        })?;
        match std::fs::remove_file(&self.artifact_path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(BuildFailure::io(
                    format_args!("cannot remove the old {}", self.artifact_path.display()),
                    e,
                ));
            }
            _ => {}
        }
        let mut command = Command::new(&self.compiler);
        command.args(&self.flags).arg("-o").arg(&self.artifact_path).arg(&self.source_path);
        if let Some(export) = &self.tvm_export {
            let shim = scratch.join("tvm_export.c");
            std::fs::write(&shim, export.shim_source()).map_err(|e| {
                BuildFailure::io(format_args!("cannot write {}", shim.display()), e)
            })?;
            command.arg(shim);
        }
        let output = command
            .env("TMPDIR", scratch)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .map_err(|e| {
                BuildFailure::io(format_args!("cannot run the compiler {:?}", self.compiler), e)
            })?;
        if !output.status.success() {
            use std::os::unix::process::ExitStatusExt;
            let mut stderr = truncated_text(&output.stderr, MAX_STDERR_BYTES);
            if let Some(sig) = output.status.signal() {
                if !stderr.is_empty() && !stderr.ends_with('\n') {
                    stderr.push('\n');
                }
                stderr.push_str(&format!("(the compiler was terminated by signal {sig})"));
            }
            return Err(BuildFailure::Compile { stderr, status: output.status.code() });
        }
        if !self.artifact_path.is_file() {
            return Err(BuildFailure::Io {
                message: format!(
                    "the compiler {:?} succeeded but wrote no {}",
                    self.compiler,
                    self.artifact_path.display()
                ),
            });
        }
        Ok(BuildOutput::since(&self.artifact_path, started))
    }
}

/// The default build task: compiles a [`BuildPlan`]'s C source into a shared
/// library with [`BuildPlan::compile`].
///
/// Registered as `"rpc_runner.compile_c"` in
/// [`tasks::registry`](crate::tasks::registry); a worker program that serves
/// a [`LocalBuilder`](super::LocalBuilder) must register it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompileC {
    /// What to compile, and where.
    pub plan: BuildPlan,
}

impl CompileC {
    /// The task for `plan`.
    pub fn new(plan: BuildPlan) -> Self {
        CompileC { plan }
    }
}

impl Task for CompileC {
    const NAME: &'static str = "rpc_runner.compile_c";
    type Output = BuildTaskOutput;
    fn run(self, _ctx: &mut WorkerContext) -> Result<BuildTaskOutput, TaskFailure> {
        Ok(self.plan.compile())
    }
}

/// Checks a candidate name: it becomes a file name under the output directory.
pub(crate) fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the name is empty".into());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!("the name is longer than {MAX_NAME_LEN} bytes"));
    }
    if name.contains(['/', '\\']) {
        return Err("the name contains a path separator".into());
    }
    if name.starts_with('.') {
        return Err("the name starts with '.' (no '.', '..' or hidden files)".into());
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || "_-.".contains(*c))) {
        return Err(format!(
            "the name contains {c:?}; only ASCII letters, digits, '_', '-' and '.' are allowed"
        ));
    }
    Ok(())
}

/// Lossily decodes `bytes`, keeping at most `max` bytes and saying how many were cut.
fn truncated_text(bytes: &[u8], max: usize) -> String {
    if bytes.len() <= max {
        return String::from_utf8_lossy(bytes).into_owned();
    }
    let mut text = String::from_utf8_lossy(&bytes[..max]).into_owned();
    text.push_str(&format!("\n[... {} more bytes of compiler output cut]", bytes.len() - max));
    text
}

/// Displays an exit status: `exit code 1`, or `killed by a signal`.
pub(crate) struct StatusText(pub(crate) Option<i32>);

impl fmt::Display for StatusText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(code) => write!(f, "exit code {code}"),
            None => f.write_str("killed by a signal"),
        }
    }
}

/// Displays `: <the compiler's first error line>` (at most 160 bytes), or
/// nothing: a compile error's `Display` stays one line.
pub(crate) struct ErrorLine<'a>(pub(crate) &'a str);

impl fmt::Display for ErrorLine<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut lines = self.0.lines().map(str::trim).filter(|l| !l.is_empty());
        let Some(first) = lines.clone().find(|l| l.contains("error")).or_else(|| lines.next())
        else {
            return Ok(());
        };
        let mut cut = first.len().min(160);
        while !first.is_char_boundary(cut) {
            cut -= 1;
        }
        let more = if cut < first.len() { "..." } else { "" };
        write!(f, ": {}{more}", &first[..cut])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_are_plain_file_names_pass() {
        for name in ["a", "matmul_t32_i4-u2", "v1.2", "X", &"n".repeat(MAX_NAME_LEN)] {
            assert_eq!(check_name(name), Ok(()), "{name:?}");
        }
    }

    #[test]
    fn names_that_could_escape_or_confuse_are_rejected() {
        let long = "n".repeat(MAX_NAME_LEN + 1);
        for name in
            ["", ".", "..", "../x", "a/b", "/abs", "a\\b", ".hidden", "sp ace", "nul\0", "é", &long]
        {
            assert!(check_name(name).is_err(), "{name:?} passed");
        }
    }

    #[test]
    fn long_compiler_output_is_cut_with_a_note() {
        let text = truncated_text(&[b'x'; 100], 10);
        assert!(text.starts_with("xxxxxxxxxx\n[... 90 more bytes"), "{text}");
        assert_eq!(truncated_text(b"short", 10), "short");
    }

    #[test]
    fn a_compile_error_displays_one_line_with_the_first_error() {
        let stderr = "x.c: In function 'entry':\nx.c:3:5: error: expected ';'\n  3 | return }\n";
        let e = BuildFailure::Compile { stderr: stderr.into(), status: Some(1) };
        assert_eq!(e.to_string(), "compilation failed (exit code 1): x.c:3:5: error: expected ';'");
        let quiet = BuildFailure::Compile { stderr: String::new(), status: None };
        assert_eq!(quiet.to_string(), "compilation failed (killed by a signal)");
    }
}
