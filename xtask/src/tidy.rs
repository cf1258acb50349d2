//! `cargo xtask tidy`: the repository's structural rules, checked from the sources, then the
//! workspace's formatting, lints and docs, checked by their own tools.
//!
//! The source rules, each reported with the file and line of every violation:
//! - no module cycles: within every module folder (a crate root, or a module with child
//!   modules), no child module depends on a sibling that depends back on it (`cycles`);
//! - `unsafe` code only in the sandbox crate (`sandbox/`), and `#![forbid(unsafe_code)]` on the
//!   root of every other crate;
//! - no printing macros (`println!`, `eprintln!`, `print!`, `eprint!`, `dbg!`) in library code,
//!   except the command-line front (`builder/src/cli.rs`, `builder/src/cli/`) and test code;
//! - library crate roots deny (or warn about) missing docs, and every library source file opens
//!   with a `//!` module comment (`source_rules` has these three).
//!
//! Then, unless `--no-cargo`: `cargo fmt --all --check`, `cargo clippy --workspace
//! --all-targets -- -D warnings` and `cargo doc --workspace --no-deps` with rustdoc warnings
//! denied; a failure of any of them is a violation, shown with the tool's output.
//!
//! What it deliberately is not: a compiler or a style linter. It reads each file with syn,
//! without expanding macros or evaluating `cfg`s beyond recognising test-only code, and resolves
//! paths by their names alone (`cycles` says what that misses). It fixes nothing, and it leaves
//! to rustfmt, clippy and rustdoc everything they check themselves.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result};
use syn::punctuated::Punctuated;
use syn::{AttrStyle, Attribute, ImplItem, Item, Meta, Token, TraitItem};

mod cycles;
mod module_tree;
mod source_rules;

/// What `cargo xtask tidy` runs.
pub struct TidyOptions {
    /// Also run cargo fmt, clippy and doc (`--no-cargo` turns this off).
    pub cargo_checks: bool,
}

/// The crates whose sources tidy reads, by directory relative to the workspace root. A
/// directory that does not exist (yet) is skipped.
const CRATE_DIRECTORIES: &[CrateDirectory] = &[
    CrateDirectory { path: "dsl", kind: CrateKind::Library },
    CrateDirectory { path: "cache", kind: CrateKind::Library },
    CrateDirectory { path: "builder", kind: CrateKind::Library },
    CrateDirectory { path: "sandbox", kind: CrateKind::Sandbox },
    CrateDirectory { path: "examples", kind: CrateKind::Tool },
    CrateDirectory { path: "examples/hello-bin", kind: CrateKind::Tool },
    CrateDirectory { path: "examples/build-rs", kind: CrateKind::Tool },
    CrateDirectory { path: "bench", kind: CrateKind::Tool },
    CrateDirectory { path: "xtask", kind: CrateKind::Tool },
];

/// A crate of the workspace, by its directory, and the kind that says which rules apply.
#[derive(Clone, Copy, Debug)]
pub struct CrateDirectory {
    /// Relative to the workspace root.
    pub path: &'static str,
    pub kind: CrateKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrateKind {
    /// A library crate: documented, silent (no printing), without unsafe code.
    Library,
    /// The sandbox crate: a library too, and the only crate allowed unsafe code.
    Sandbox,
    /// Examples, benchmarks and tools: without unsafe code.
    Tool,
}

impl CrateKind {
    fn is_library(self) -> bool {
        matches!(self, CrateKind::Library | CrateKind::Sandbox)
    }
}

/// One source file, parsed.
pub struct SourceFile {
    pub syntax: syn::File,
}

/// Every `.rs` file of the crates tidy reads, parsed once.
pub struct Sources {
    /// Each present crate, with the paths of its files (nested crates excluded).
    pub crates: Vec<(CrateDirectory, Vec<PathBuf>)>,
    /// Every parsed file, by its path relative to the workspace root (how it is reported).
    pub files: BTreeMap<PathBuf, SourceFile>,
    /// The files that could not be read or parsed.
    pub unreadable: Vec<Violation>,
}

/// A broken rule: what, where and why.
#[derive(Debug)]
pub struct Violation {
    pub rule: Rule,
    pub location: Option<Location>,
    /// The explanation; further lines (indented when shown) carry the details.
    pub message: String,
}

/// A file and a line in it (1-based).
#[derive(Debug, Clone)]
pub struct Location {
    pub path: PathBuf,
    pub line: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Rule {
    UnreadableSource,
    ModuleCycle,
    UnsafeCode,
    PrintingInLibrary,
    MissingDocs,
    CargoCheck,
}

impl Rule {
    fn name(self) -> &'static str {
        match self {
            Rule::UnreadableSource => "unreadable source",
            Rule::ModuleCycle => "module cycle",
            Rule::UnsafeCode => "unsafe code",
            Rule::PrintingInLibrary => "printing in library code",
            Rule::MissingDocs => "missing docs",
            Rule::CargoCheck => "cargo check",
        }
    }
}

impl Violation {
    pub fn at(rule: Rule, path: &Path, line: usize, message: impl Into<String>) -> Violation {
        Violation { rule, location: Some(Location { path: path.to_owned(), line }), message: message.into() }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}:{}", self.path.display(), self.line)
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(location) = &self.location {
            write!(formatter, "{location}: ")?;
        }
        let mut lines = self.message.lines();
        write!(formatter, "{}: {}", self.rule.name(), lines.next().unwrap_or_default())?;
        for line in lines {
            write!(formatter, "\n    {line}")?;
        }
        Ok(())
    }
}

/// Runs every check, prints every violation, and says whether there were none.
pub fn run(workspace: &Path, options: &TidyOptions) -> Result<bool> {
    let violations = source_violations(workspace, CRATE_DIRECTORIES)?;
    let mut count = violations.len();
    print_violations(&violations);
    if options.cargo_checks {
        let cargo_violations = cargo_violations(workspace)?;
        count += cargo_violations.len();
        print_violations(&cargo_violations);
    }
    if count == 0 {
        eprintln!("xtask tidy: no violations");
    } else {
        eprintln!("xtask tidy: {count} violation{}", if count == 1 { "" } else { "s" });
    }
    Ok(count == 0)
}

/// The violations of the source rules, in the order of `Rule`, then by file and line.
fn source_violations(workspace: &Path, crate_directories: &[CrateDirectory]) -> Result<Vec<Violation>> {
    let mut sources = Sources::load(workspace, crate_directories)?;
    let mut violations = std::mem::take(&mut sources.unreadable);
    let trees = module_tree::build_all(&sources, &mut violations);
    violations.extend(cycles::check(&trees));
    violations.extend(source_rules::check_unsafe_code(&sources, &trees));
    violations.extend(source_rules::check_printing(&sources, &trees));
    violations.extend(source_rules::check_docs(&sources, &trees));
    violations.sort_by(|left, right| {
        let position =
            |violation: &Violation| violation.location.as_ref().map(|location| (location.path.clone(), location.line));
        (left.rule, position(left)).cmp(&(right.rule, position(right)))
    });
    Ok(violations)
}

fn print_violations(violations: &[Violation]) {
    for violation in violations {
        println!("{violation}");
    }
}

impl Sources {
    /// Reads and parses every `.rs` file under the crate directories that exist.
    fn load(workspace: &Path, crate_directories: &[CrateDirectory]) -> Result<Sources> {
        let mut sources = Sources { crates: Vec::new(), files: BTreeMap::new(), unreadable: Vec::new() };
        for directory in crate_directories {
            if !workspace.join(directory.path).join("Cargo.toml").is_file() {
                continue;
            }
            let mut paths = Vec::new();
            collect_rust_files(workspace, Path::new(directory.path), &mut paths)?;
            for path in &paths {
                sources.parse_file(workspace, path)?;
            }
            sources.crates.push((*directory, paths));
        }
        Ok(sources)
    }

    fn parse_file(&mut self, workspace: &Path, path: &Path) -> Result<()> {
        let text =
            std::fs::read_to_string(workspace.join(path)).with_context(|| format!("reading {}", path.display()))?;
        match syn::parse_file(&text) {
            Ok(syntax) => {
                self.files.insert(path.to_owned(), SourceFile { syntax });
            }
            Err(error) => self.unreadable.push(Violation::at(
                Rule::UnreadableSource,
                path,
                error.span().start().line,
                format!("syn cannot parse this file, so no rule was checked in it: {error}"),
            )),
        }
        Ok(())
    }
}

/// Collects the `.rs` files under `directory` (relative to `workspace`), leaving out `target`,
/// hidden directories and nested crates (directories with their own Cargo.toml).
fn collect_rust_files(workspace: &Path, directory: &Path, paths: &mut Vec<PathBuf>) -> Result<()> {
    let absolute = workspace.join(directory);
    let mut entries = std::fs::read_dir(&absolute)
        .with_context(|| format!("listing {}", absolute.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("listing {}", absolute.display()))?;
    entries.sort_by_key(|entry| entry.file_name());
    for entry in entries {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let path = directory.join(&*name);
        let file_type = entry.file_type().with_context(|| format!("inspecting {}", path.display()))?;
        if file_type.is_dir() {
            let skipped = name.starts_with('.') || name == "target" || entry.path().join("Cargo.toml").exists();
            if !skipped {
                collect_rust_files(workspace, &path, paths)?;
            }
        } else if name.ends_with(".rs") {
            paths.push(path);
        }
    }
    Ok(())
}

/// The attributes of an item (none for the kinds syn does not model).
pub fn item_attributes(item: &Item) -> &[Attribute] {
    match item {
        Item::Const(item) => &item.attrs,
        Item::Enum(item) => &item.attrs,
        Item::ExternCrate(item) => &item.attrs,
        Item::Fn(item) => &item.attrs,
        Item::ForeignMod(item) => &item.attrs,
        Item::Impl(item) => &item.attrs,
        Item::Macro(item) => &item.attrs,
        Item::Mod(item) => &item.attrs,
        Item::Static(item) => &item.attrs,
        Item::Struct(item) => &item.attrs,
        Item::Trait(item) => &item.attrs,
        Item::TraitAlias(item) => &item.attrs,
        Item::Type(item) => &item.attrs,
        Item::Union(item) => &item.attrs,
        Item::Use(item) => &item.attrs,
        _ => &[],
    }
}

/// The attributes of an associated item in an `impl`.
pub fn impl_item_attributes(item: &ImplItem) -> &[Attribute] {
    match item {
        ImplItem::Const(item) => &item.attrs,
        ImplItem::Fn(item) => &item.attrs,
        ImplItem::Type(item) => &item.attrs,
        ImplItem::Macro(item) => &item.attrs,
        _ => &[],
    }
}

/// The attributes of an associated item in a trait.
pub fn trait_item_attributes(item: &TraitItem) -> &[Attribute] {
    match item {
        TraitItem::Const(item) => &item.attrs,
        TraitItem::Fn(item) => &item.attrs,
        TraitItem::Type(item) => &item.attrs,
        TraitItem::Macro(item) => &item.attrs,
        _ => &[],
    }
}

/// Whether attributes make their item test-only: `#[test]` (or `#[tokio::test]` and the like),
/// or a `#[cfg(..)]` that can only hold under `test`.
pub fn is_test_only(attributes: &[Attribute]) -> bool {
    attributes.iter().any(|attribute| {
        let path = attribute.path();
        let is_test_attribute = path.segments.last().is_some_and(|segment| segment.ident == "test");
        let is_test_cfg =
            path.is_ident("cfg") && attribute.parse_args::<Meta>().is_ok_and(|predicate| cfg_requires_test(&predicate));
        is_test_attribute || is_test_cfg
    })
}

/// Whether a `cfg` predicate can only be true when compiling tests.
fn cfg_requires_test(predicate: &Meta) -> bool {
    let Meta::List(list) = predicate else { return predicate.path().is_ident("test") };
    let Ok(operands) = list.parse_args_with(Punctuated::<Meta, Token![,]>::parse_terminated) else { return false };
    if list.path.is_ident("all") {
        operands.iter().any(cfg_requires_test)
    } else if list.path.is_ident("any") {
        !operands.is_empty() && operands.iter().all(cfg_requires_test)
    } else {
        false
    }
}

/// Whether a crate root sets `lint` to one of `levels` (`#![forbid(unsafe_code)]`).
pub fn has_crate_lint_level(file: &syn::File, levels: &[&str], lint: &str) -> bool {
    file.attrs.iter().filter(|attribute| matches!(attribute.style, AttrStyle::Inner(_))).any(|attribute| {
        let is_level = levels.iter().any(|level| attribute.path().is_ident(level));
        let mut names_lint = false;
        if is_level {
            // A `reason = ".."` after the lints ends the parse; what came before counts.
            let _ = attribute.parse_nested_meta(|meta| {
                names_lint |= meta.path.is_ident(lint);
                Ok(())
            });
        }
        names_lint
    })
}

/// A cargo command tidy runs in the workspace root.
struct CargoCheck {
    /// How it is shown: the command line.
    description: &'static str,
    arguments: &'static [&'static str],
    /// `RUSTDOCFLAGS` for it, if set.
    rustdoc_flags: Option<&'static str>,
}

const CARGO_CHECKS: &[CargoCheck] = &[
    CargoCheck { description: "cargo fmt --all --check", arguments: &["fmt", "--all", "--check"], rustdoc_flags: None },
    CargoCheck {
        description: "cargo clippy --workspace --all-targets -- -D warnings",
        arguments: &["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"],
        rustdoc_flags: None,
    },
    CargoCheck {
        description: "RUSTDOCFLAGS=\"-D warnings\" cargo doc --workspace --no-deps",
        arguments: &["doc", "--workspace", "--no-deps"],
        rustdoc_flags: Some("-D warnings"),
    },
];

/// Runs the cargo checks; each failure is a violation carrying the command's output (without
/// cargo's progress lines).
fn cargo_violations(workspace: &Path) -> Result<Vec<Violation>> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut violations = Vec::new();
    for check in CARGO_CHECKS {
        eprintln!("xtask tidy: {}", check.description);
        let mut command = Command::new(&cargo);
        command.current_dir(workspace).args(check.arguments);
        if let Some(flags) = check.rustdoc_flags {
            command.env("RUSTDOCFLAGS", flags);
        }
        let output = command.output().with_context(|| format!("running {}", check.description))?;
        if !output.status.success() {
            let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&output.stderr));
            violations.push(Violation {
                rule: Rule::CargoCheck,
                location: None,
                message: format!(
                    "`{}` failed ({}):\n{}",
                    check.description,
                    output.status,
                    without_progress_lines(&text)
                ),
            });
        }
    }
    Ok(violations)
}

/// Cargo's progress lines (`   Compiling x`, `    Checking x`, ...) dropped from its output.
fn without_progress_lines(output: &str) -> String {
    const PROGRESS: &[&str] = &[
        "Compiling",
        "Checking",
        "Documenting",
        "Blocking",
        "Finished",
        "Generated",
        "Locking",
        "Updating",
        "Downloading",
        "Downloaded",
        "Adding",
        "Fresh",
    ];
    output
        .lines()
        .filter(|line| {
            let word = line.trim_start().split(' ').next().unwrap_or_default();
            !(line.starts_with(' ') && PROGRESS.contains(&word))
        })
        .collect::<Vec<_>>()
        .join("\n")
}
