//! Confining remote paths to a session's directory.

use std::path::{Component, Path, PathBuf};

use crate::wire::error::WireError;

/// Resolves `remote` inside `root`. Absolute paths, `..`, NUL bytes and (unless
/// `allow_root`) paths naming the root itself are rejected.
pub(crate) fn resolve(root: &Path, remote: &str, allow_root: bool) -> Result<PathBuf, WireError> {
    let reject =
        |reason: &str| WireError::BadPath { path: remote.to_owned(), reason: reason.to_owned() };
    if remote.contains('\0') {
        return Err(reject("contains a NUL byte"));
    }
    let mut out = root.to_path_buf();
    let mut depth = 0usize;
    for comp in Path::new(remote).components() {
        match comp {
            Component::Normal(part) => {
                out.push(part);
                depth += 1;
            }
            Component::CurDir => {}
            Component::ParentDir => return Err(reject("'..' is not allowed")),
            Component::RootDir | Component::Prefix(_) => {
                return Err(reject(
                    "absolute paths are not allowed; paths are relative to the session directory",
                ));
            }
        }
    }
    if depth == 0 && !allow_root {
        return Err(reject("names the session directory itself"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confines_paths() {
        let root = Path::new("/tmp/s");
        assert_eq!(resolve(root, "a/b.so", false).unwrap(), Path::new("/tmp/s/a/b.so"));
        assert_eq!(resolve(root, "./a", false).unwrap(), Path::new("/tmp/s/a"));
        assert_eq!(resolve(root, "", true).unwrap(), Path::new("/tmp/s"));
        for bad in ["/etc/passwd", "../x", "a/../../x", "a/..", "", ".", "a\0b"] {
            assert!(resolve(root, bad, false).is_err(), "{bad:?} must be rejected");
        }
        match resolve(root, "../../etc/shadow", false) {
            Err(WireError::BadPath { path, reason }) => {
                assert_eq!(path, "../../etc/shadow");
                assert!(reason.contains(".."));
            }
            other => panic!("{other:?}"),
        }
    }
}
