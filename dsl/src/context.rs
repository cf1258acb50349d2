//! A build context: a directory whose files `copy` steps select.
//!
//! This type only holds the directory's path. The builder opens it with cap-std (so that no
//! path, `..` or symlink can leave it), reads its `.dockerignore` and walks it; the cache keys
//! the files a step selects by their content digests, never by where the context lives, so the
//! same declaration keys the same from any working directory.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::ImagePathError;

/// A build context directory. Cheap to clone; `Send + Sync`.
///
/// `copy` steps select files from it by paths relative to its root; what its `.dockerignore`
/// excludes is never copied, and no path, `..` or symlink can reach outside it.
///
/// ```
/// use layerwright_dsl::{Context, Image};
///
/// let context = Context::dir("app")?;
/// assert_eq!(context.root(), std::path::Path::new("app"));
/// let image = Image::scratch().copy(&context, "src", "/app/src");
/// # let _ = image;
/// # Ok::<(), layerwright_dsl::ImagePathError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Context {
    root: Arc<Path>,
}

impl Context {
    /// A context rooted at `root`. The directory is opened when a build reads it, so a missing
    /// directory is reported then, naming the step that copies from it.
    ///
    /// # Errors
    ///
    /// [`ImagePathError::Empty`] when `root` is the empty path.
    ///
    /// ```
    /// use layerwright_dsl::{Context, ImagePathError};
    ///
    /// assert!(Context::dir("app").is_ok());
    /// assert_eq!(Context::dir(""), Err(ImagePathError::Empty));
    /// ```
    pub fn dir(root: impl Into<PathBuf>) -> Result<Context, ImagePathError> {
        let root: PathBuf = root.into();
        if root.as_os_str().is_empty() {
            return Err(ImagePathError::Empty);
        }
        Ok(Context { root: Arc::from(root.into_boxed_path()) })
    }

    /// The directory, as given to [`Context::dir`].
    pub fn root(&self) -> &Path {
        &self.root
    }
}
