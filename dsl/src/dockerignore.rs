//! `.dockerignore` patterns with Docker's semantics.
//!
//! Docker's rules, which differ from `.gitignore`: every pattern is anchored at the context
//! root (`foo` matches only `./foo`, not `./a/foo`); a leading `/` is dropped; `*` and `?` never
//! match `/`; `**` matches any number of directories; a pattern that matches a directory
//! excludes everything below it; `!` re-includes; the last matching pattern wins; blank lines
//! and lines starting with `#` are ignored.
//!
//! This module only matches strings. Reading the file and walking the context is the builder's
//! job.

use globset::{Glob, GlobBuilder, GlobMatcher};
use thiserror::Error;

/// Why a `.dockerignore` was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum DockerIgnoreError {
    /// A line is not a valid glob pattern.
    #[error(".dockerignore line {line}: invalid pattern {pattern:?}: {reason}")]
    InvalidPattern {
        /// The 1-based line number.
        line: usize,
        /// The pattern as written on that line (without a leading `!`).
        pattern: String,
        /// What is wrong with it.
        reason: String,
    },
}

#[derive(Debug, Clone)]
struct Pattern {
    matcher: GlobMatcher,
    exception: bool,
}

/// A parsed `.dockerignore`.
///
/// ```
/// use layerwright_dsl::DockerIgnore;
///
/// let ignore = DockerIgnore::parse("target\n*.md\n!README.md\n")?;
/// assert!(ignore.is_excluded("target/debug/app"));
/// assert!(ignore.is_excluded("CHANGES.md"));
/// assert!(!ignore.is_excluded("README.md"));
/// assert!(!ignore.is_excluded("docs/a.md"), "patterns are anchored at the context root");
/// # Ok::<(), layerwright_dsl::DockerIgnoreError>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct DockerIgnore {
    patterns: Vec<Pattern>,
    /// The text it was parsed from, whitespace-trimmed, so that a cache key can include it.
    canonical: String,
}

impl DockerIgnore {
    /// The matcher of a context without a `.dockerignore`: it excludes nothing.
    pub fn empty() -> DockerIgnore {
        DockerIgnore::default()
    }

    /// Parses the text of a `.dockerignore`.
    ///
    /// # Errors
    ///
    /// [`DockerIgnoreError::InvalidPattern`] for the first line that is not a valid pattern.
    pub fn parse(text: &str) -> Result<DockerIgnore, DockerIgnoreError> {
        let mut patterns = Vec::new();
        let mut canonical = String::new();
        for (index, raw_line) in text.lines().enumerate() {
            let line = raw_line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (exception, pattern) = match line.strip_prefix('!') {
                Some(rest) => (true, rest.trim()),
                None => (false, line),
            };
            // Docker cleans each pattern like Go's `filepath.Clean` and drops a leading `/`.
            let cleaned = crate::clean_lexically(pattern);
            if cleaned.is_empty() {
                continue;
            }
            let glob: Glob =
                GlobBuilder::new(&cleaned).literal_separator(true).backslash_escape(true).build().map_err(|error| {
                    DockerIgnoreError::InvalidPattern {
                        line: index + 1,
                        pattern: pattern.to_owned(),
                        reason: error.kind().to_string(),
                    }
                })?;
            canonical.push_str(if exception { "!" } else { "" });
            canonical.push_str(&cleaned);
            canonical.push('\n');
            patterns.push(Pattern { matcher: glob.compile_matcher(), exception });
        }
        Ok(DockerIgnore { patterns, canonical })
    }

    /// Whether the context-relative `path` (normalised, `/`-separated) is excluded.
    pub fn is_excluded(&self, path: &str) -> bool {
        let mut excluded = false;
        for pattern in &self.patterns {
            // An exception can only change the verdict for a path already excluded, and an
            // exclusion only for one not yet excluded; skipping the rest saves matching.
            if pattern.exception != excluded {
                continue;
            }
            if matches_path_or_parent(&pattern.matcher, path) {
                excluded = !pattern.exception;
            }
        }
        excluded
    }

    /// Whether an excluded directory must still be walked because an exception may re-include
    /// something below it.
    pub fn has_exceptions(&self) -> bool {
        self.patterns.iter().any(|pattern| pattern.exception)
    }

    /// The normalised patterns, one per line, for cache keys.
    pub fn canonical(&self) -> &str {
        &self.canonical
    }
}

fn matches_path_or_parent(matcher: &GlobMatcher, path: &str) -> bool {
    if matcher.is_match(path) {
        return true;
    }
    path.match_indices('/').any(|(end, _)| matcher.is_match(&path[..end]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(dockerignore: &str, cases: &[(&str, bool)]) {
        let parsed = DockerIgnore::parse(dockerignore).unwrap();
        for (path, expected) in cases {
            assert_eq!(parsed.is_excluded(path), *expected, "pattern {dockerignore:?} path {path:?}");
        }
    }

    #[test]
    fn patterns_are_anchored_at_the_root() {
        check("foo\n", &[("foo", true), ("foo/bar", true), ("a/foo", false), ("foobar", false)]);
        check("/foo/bar\n", &[("foo/bar", true), ("foo/bar/baz", true), ("foo", false)]);
    }

    #[test]
    fn stars_do_not_cross_directories_but_double_stars_do() {
        check("*.log\n", &[("a.log", true), ("dir/a.log", false)]);
        check("*/*.log\n", &[("dir/a.log", true), ("a.log", false), ("a/b/c.log", false)]);
        check("**/*.log\n", &[("a.log", true), ("dir/a.log", true), ("a/b/c.log", true), ("a.txt", false)]);
        check("target/**\n", &[("target/x", true), ("target/a/b", true)]);
        check("a?c\n", &[("abc", true), ("a/c", false)]);
    }

    #[test]
    fn exceptions_and_last_match_wins() {
        check("*.md\n!README.md\n", &[("CHANGES.md", true), ("README.md", false)]);
        check("!README.md\n*.md\n", &[("README.md", true)]);
        check("docs\n!docs/keep\n", &[("docs/a", true), ("docs/keep", false), ("docs/keep/x", false)]);
        assert!(DockerIgnore::parse("a\n!b").unwrap().has_exceptions());
    }

    #[test]
    fn comments_blank_lines_and_cleaning() {
        check("# comment\n\n  ./a/../b/  \n", &[("b", true), ("a", false), ("# comment", false)]);
        let parsed = DockerIgnore::parse("x\n!y\n").unwrap();
        assert_eq!(parsed.canonical(), "x\n!y\n");
    }

    #[test]
    fn invalid_patterns_are_errors_with_the_line() {
        let error = DockerIgnore::parse("ok\n[unclosed\n").unwrap_err();
        assert!(matches!(error, DockerIgnoreError::InvalidPattern { line: 2, .. }), "{error}");
    }
}
