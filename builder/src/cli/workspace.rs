//! Finding the root of the user's workspace, which relative paths in declarations, the default
//! cache directory and the default outputs resolve against.
//!
//! `cargo run` (and so `cargo xtask`, an alias of `cargo run -p xtask --`) starts the binary in
//! the directory cargo was started in, which may be any subdirectory of the workspace; it sets
//! `CARGO_MANIFEST_DIR` to the running package's directory. The root is, first found:
//!
//! 1. `CARGO_WORKSPACE_DIR`, when set (a `[env]` entry of `.cargo/config.toml` often sets it;
//!    relative to the working directory);
//! 2. the nearest ancestor of `CARGO_MANIFEST_DIR` (else of the working directory) whose
//!    `Cargo.toml` has a `[workspace]` table;
//! 3. else the nearest ancestor holding a `Cargo.toml` (a single-package project).
//!
//! What it deliberately is not: a manifest parser. A `[workspace]` table is recognised by its
//! header line, which is how every workspace manifest starts it.

use std::path::{Path, PathBuf};

use super::error::CliError;

/// The root of the workspace this process runs in (see the module docs), from the environment
/// and the working directory.
pub fn workspace_root() -> Result<PathBuf, CliError> {
    let cwd = std::env::current_dir().map_err(|source| CliError::Io {
        action: "reading the working directory",
        path: PathBuf::from("."),
        source,
    })?;
    let variable = |name: &str| std::env::var_os(name).filter(|value| !value.is_empty()).map(PathBuf::from);
    find_workspace_root(variable("CARGO_WORKSPACE_DIR").as_deref(), variable("CARGO_MANIFEST_DIR").as_deref(), &cwd)
        .ok_or(CliError::NoWorkspace { dir: cwd })
}

/// The workspace root from `CARGO_WORKSPACE_DIR`, `CARGO_MANIFEST_DIR` and the working
/// directory `cwd` (see the module docs); `None` when no ancestor holds a `Cargo.toml`.
pub(crate) fn find_workspace_root(
    workspace_dir: Option<&Path>,
    manifest_dir: Option<&Path>,
    cwd: &Path,
) -> Option<PathBuf> {
    if let Some(dir) = workspace_dir {
        return Some(cwd.join(dir));
    }
    let start = manifest_dir.map_or_else(|| cwd.to_owned(), |dir| cwd.join(dir));
    let manifests = || start.ancestors().filter(|dir| dir.join("Cargo.toml").is_file());
    manifests()
        .find(|dir| declares_workspace(&dir.join("Cargo.toml")))
        .or_else(|| manifests().next())
        .map(Path::to_owned)
}

/// Whether the manifest at `path` has a `[workspace]` table (or a `[workspace.…]` one).
fn declares_workspace(path: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(path) else { return false };
    text.lines().map(str::trim_start).any(|line| line.starts_with("[workspace]") || line.starts_with("[workspace."))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A workspace with a member and a nested single-package project, in a temp dir.
    fn tree() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let files = [
            ("Cargo.toml", "[workspace]\nmembers = [\"app\", \"xtask\"]\n"),
            ("app/Cargo.toml", "[package]\nname = \"app\"\n"),
            ("xtask/Cargo.toml", "[package]\nname = \"xtask\"\n# [workspace] in a comment is not a table\n"),
            ("app/src/deep/x.rs", ""),
            ("loose/Cargo.toml", "[package]\nname = \"loose\"\n"),
            ("loose/sub/x", ""),
        ];
        for (path, content) in files {
            let path = dir.path().join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, content).unwrap();
        }
        dir
    }

    #[test]
    fn the_root_is_the_nearest_workspace_above_the_working_directory() {
        let dir = tree();
        let root = dir.path();
        for cwd in ["", "app", "app/src/deep", "xtask"] {
            assert_eq!(find_workspace_root(None, None, &root.join(cwd)).as_deref(), Some(root), "{cwd}");
        }
    }

    #[test]
    fn cargo_run_manifest_dir_wins_over_the_working_directory() {
        let dir = tree();
        let root = dir.path();
        let elsewhere = tempfile::tempdir().unwrap();
        let found = find_workspace_root(None, Some(&root.join("xtask")), elsewhere.path());
        assert_eq!(found.as_deref(), Some(root));
    }

    #[test]
    fn cargo_workspace_dir_wins_and_is_relative_to_the_working_directory() {
        let dir = tree();
        let root = dir.path();
        let found = find_workspace_root(Some(Path::new("..")), Some(&root.join("xtask")), &root.join("app"));
        assert_eq!(found, Some(root.join("app/..")));
    }

    #[test]
    fn without_a_workspace_table_the_nearest_package_is_the_root() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("p/src")).unwrap();
        std::fs::write(dir.path().join("p/Cargo.toml"), "[package]\nname = \"p\"\n").unwrap();
        let found = find_workspace_root(None, None, &dir.path().join("p/src"));
        assert_eq!(found, Some(dir.path().join("p")));
        // Inside a workspace, a package without its own table still resolves to the workspace.
        let tree = tree();
        assert_eq!(find_workspace_root(None, None, &tree.path().join("loose/sub")).as_deref(), Some(tree.path()));
    }

    #[test]
    fn nothing_above_is_none() {
        let dir = tempfile::tempdir().unwrap();
        // The temp dir itself may sit below a Cargo.toml on odd machines; only assert when not.
        if dir.path().ancestors().all(|ancestor| !ancestor.join("Cargo.toml").is_file()) {
            assert_eq!(find_workspace_root(None, None, dir.path()), None);
        }
    }
}
