//! Normalisation of the two kinds of path a declaration names: paths inside an image
//! (`/app/src`) and paths inside a build context (`src/main.rs`).
//!
//! Both normalise to a relative, `/`-separated form without `.` components or trailing slashes,
//! which is also how they are spelled in tar headers. Neither function touches the disk; whether
//! a context path escapes through a symlink is decided by the builder when it opens the path.

use thiserror::Error;

/// Why a declared path was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ImagePathError {
    /// The path has a `..` component.
    #[error("path {path:?} contains `..`, which could leave the image or context root")]
    ParentComponent {
        /// The path as declared.
        path: String,
    },
    /// A context path starts with `/`.
    #[error("context path {path:?} is absolute; context paths are relative to the context root")]
    AbsoluteContextPath {
        /// The path as declared.
        path: String,
    },
    /// The path contains a NUL byte, which no file name can.
    #[error("path {path:?} contains a NUL byte")]
    NulByte {
        /// The path as declared.
        path: String,
    },
    /// The path is the empty string.
    #[error("path is empty")]
    Empty,
}

/// Normalises a path inside an image: `/app//src/./x/` becomes `app/src/x`, `/` becomes the
/// empty string (the root). A relative path is taken as relative to the root, as Docker does for
/// `COPY` destinations without a `WORKDIR`. `..` is refused rather than resolved, because a
/// declaration that needs it is almost always a mistake and resolving it hides where it points.
///
/// ```
/// use layerwright_dsl::{ImagePathError, normalize_image_path};
///
/// assert_eq!(normalize_image_path("/app//src/./x/").unwrap(), "app/src/x");
/// assert_eq!(normalize_image_path("/").unwrap(), "");
/// assert!(matches!(normalize_image_path("/a/../b"), Err(ImagePathError::ParentComponent { .. })));
/// ```
pub fn normalize_image_path(path: &str) -> Result<String, ImagePathError> {
    if path.is_empty() {
        return Err(ImagePathError::Empty);
    }
    normalize_components(path)
}

/// Normalises a path inside a build context: `./src/` becomes `src`, `.` becomes the empty
/// string (the whole context). Absolute paths and `..` are refused: a context path can never
/// name anything outside the context.
///
/// ```
/// use layerwright_dsl::normalize_context_path;
///
/// assert_eq!(normalize_context_path("./src/").unwrap(), "src");
/// assert!(normalize_context_path("/etc").is_err());
/// ```
pub fn normalize_context_path(path: &str) -> Result<String, ImagePathError> {
    if path.is_empty() {
        return Err(ImagePathError::Empty);
    }
    if path.starts_with('/') {
        return Err(ImagePathError::AbsoluteContextPath { path: path.to_owned() });
    }
    normalize_components(path)
}

fn normalize_components(path: &str) -> Result<String, ImagePathError> {
    if path.contains('\0') {
        return Err(ImagePathError::NulByte { path: path.to_owned() });
    }
    let mut components = Vec::new();
    for component in path.split('/') {
        match component {
            "" | "." => continue,
            ".." => return Err(ImagePathError::ParentComponent { path: path.to_owned() }),
            other => components.push(other),
        }
    }
    Ok(components.join("/"))
}

/// Resolves `.`, `..` and repeated `/` lexically, as Go's `filepath.Clean` does (`./a//b/../c/`
/// becomes `a/c`; `..` above the start is dropped). For matching names against each other only
/// (patterns, archive member names), never for reaching the disk: `..` through a symlink means
/// something else there.
///
/// ```
/// assert_eq!(layerwright_dsl::clean_lexically("./a//b/../c/"), "a/c");
/// ```
pub fn clean_lexically(path: &str) -> String {
    let mut components: Vec<&str> = Vec::new();
    for component in path.split('/') {
        match component {
            "" | "." => {}
            ".." => {
                components.pop();
            }
            other => components.push(other),
        }
    }
    components.join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_image(input: &str, expected: Result<&str, ImagePathError>) {
        assert_eq!(normalize_image_path(input), expected.map(str::to_owned), "input {input:?}");
    }

    fn check_context(input: &str, expected: Result<&str, ImagePathError>) {
        assert_eq!(normalize_context_path(input), expected.map(str::to_owned), "input {input:?}");
    }

    #[test]
    fn image_paths() {
        check_image("/", Ok(""));
        check_image("/app//src/./x/", Ok("app/src/x"));
        check_image("etc/passwd", Ok("etc/passwd"));
        check_image("/a/../b", Err(ImagePathError::ParentComponent { path: "/a/../b".into() }));
        check_image("", Err(ImagePathError::Empty));
        check_image("/a\0", Err(ImagePathError::NulByte { path: "/a\0".into() }));
    }

    #[test]
    fn lexical_cleaning() {
        assert_eq!(clean_lexically("./a//b/../c/"), "a/c");
        assert_eq!(clean_lexically("../../x"), "x");
        assert_eq!(clean_lexically("/"), "");
    }

    #[test]
    fn context_paths() {
        check_context(".", Ok(""));
        check_context("./src/", Ok("src"));
        check_context("/etc", Err(ImagePathError::AbsoluteContextPath { path: "/etc".into() }));
        check_context("../x", Err(ImagePathError::ParentComponent { path: "../x".into() }));
    }
}
