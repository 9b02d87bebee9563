//! Loading a kernel library and resolving its entry.

use super::*;

/// A kernel's entry and the library that keeps it valid.
pub(super) struct LoadedKernel {
    pub(super) entry: EntryFn,
    /// `None` only for a kernel linked into the worker program (unit tests).
    pub(super) _lib: Option<libloading::os::unix::Library>,
}

impl LoadedKernel {
    pub(super) fn open(path: &str, entry: &str) -> Result<Self, KernelError> {
        let full = resolve(path);
        let flags = libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_LOCAL;
        // SAFETY: loading runs the library's initializers, i.e. code we
        // cannot check. Running untrusted kernels is what session workers
        // are for: at worst the library crashes this disposable process,
        // which the parent reports as a dead worker.
        let lib = unsafe { libloading::os::unix::Library::open(Some(&full), flags) }
            .map_err(|e| KernelError::Load { path: path.to_owned(), message: e.to_string() })?;
        // SAFETY: the kernel ABI says the symbol is an `EntryFn`; we cannot
        // check that, and a kernel breaking its ABI can only crash this
        // worker. The pointer is copied out and stays valid as long as `lib`,
        // which `LoadedKernel` owns beside it.
        let entry =
            unsafe { lib.get::<EntryFn>(entry.as_bytes()) }.map(|symbol| *symbol).map_err(|e| {
                KernelError::MissingSymbol {
                    path: path.to_owned(),
                    symbol: entry.to_owned(),
                    message: e.to_string(),
                }
            })?;
        Ok(LoadedKernel { entry, _lib: Some(lib) })
    }
}

/// An absolute path for dlopen: a relative name without a `/` would make
/// dlopen search the library path instead of the working directory.
pub(super) fn resolve(path: &str) -> PathBuf {
    let p = Path::new(path);
    if p.is_absolute() {
        return p.to_owned();
    }
    match std::env::current_dir() {
        Ok(cwd) => cwd.join(p),
        Err(_) => Path::new(".").join(p),
    }
}

// ---------------------------------------------------------------------------
