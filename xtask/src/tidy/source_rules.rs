//! The source rules besides module cycles: unsafe code only in the sandbox crate (and
//! `#![forbid(unsafe_code)]` on the root of every other crate), no printing from library code,
//! and documented library crates.
//!
//! They read the syntax, not the compiled code: an `unsafe` or a `println!` that a macro of
//! another crate produces is not seen (the compiler's `unsafe_code` lint covers the first), and
//! writing to `std::io::stdout()` by hand is not printing as far as tidy knows.

use std::collections::BTreeSet;
use std::path::Path;

use proc_macro2::{TokenStream, TokenTree};
use syn::visit::{self, Visit};
use syn::{AttrStyle, ImplItem, Item, Safety, TraitItem};

use super::module_tree::{ModuleTree, unraw};
use super::{
    CrateKind, Rule, Sources, Violation, has_crate_lint_level, impl_item_attributes, is_test_only, item_attributes,
    trait_item_attributes,
};

/// The macros library code does not use: it returns what it has to say to its caller.
const PRINTING_MACROS: &[&str] = &["println", "eprintln", "print", "eprint", "dbg"];

/// The builder's command-line front, which may print: `cli.rs` and everything under `cli/`.
const PRINTING_ALLOWED_FILE: &str = "builder/src/cli.rs";
const PRINTING_ALLOWED_FOLDER: &str = "builder/src/cli";

/// Every `unsafe` outside the sandbox crate (in any of a crate's files, tests included), and
/// every other crate root without `#![forbid(unsafe_code)]`.
pub fn check_unsafe_code(sources: &Sources, trees: &[ModuleTree]) -> Vec<Violation> {
    let mut violations = Vec::new();
    let checked_crates = sources.crates.iter().filter(|(directory, _)| directory.kind != CrateKind::Sandbox);
    for path in checked_crates.flat_map(|(_, paths)| paths) {
        let Some(file) = sources.files.get(path) else { continue };
        let mut finder = UnsafeFinder::default();
        finder.visit_file(&file.syntax);
        violations.extend(finder.found.into_iter().map(|(line, what)| {
            let message = format!("{what} outside the sandbox crate: unsafe code belongs in `sandbox/`");
            Violation::at(Rule::UnsafeCode, path, line, message)
        }));
    }
    for tree in trees.iter().filter(|tree| tree.crate_directory.kind != CrateKind::Sandbox) {
        let root = &tree.files[0].0;
        if !has_crate_lint_level(&sources.files[root].syntax, &["forbid"], "unsafe_code") {
            let message = "crate root without `#![forbid(unsafe_code)]` (only the sandbox crate may use unsafe code)";
            violations.push(Violation::at(Rule::UnsafeCode, root, 1, message));
        }
    }
    violations
}

/// The `unsafe` blocks, functions, impls, traits, extern blocks and `#[unsafe(..)]` attributes
/// of a file, and any `unsafe` in the tokens of a macro invocation or definition. (An `unsafe
/// fn()` pointer type is not unsafe code.)
#[derive(Default)]
struct UnsafeFinder {
    found: Vec<(usize, String)>,
}

impl<'ast> Visit<'ast> for UnsafeFinder {
    fn visit_expr_unsafe(&mut self, block: &'ast syn::ExprUnsafe) {
        self.found.push((block.unsafe_token.span.start().line, "`unsafe` block".to_owned()));
        visit::visit_expr_unsafe(self, block);
    }

    fn visit_signature(&mut self, signature: &'ast syn::Signature) {
        if let Safety::Unsafe(token) = &signature.safety {
            self.found.push((token.span.start().line, format!("`unsafe fn {}`", signature.ident)));
        }
        visit::visit_signature(self, signature);
    }

    fn visit_item_impl(&mut self, item: &'ast syn::ItemImpl) {
        if let Some(token) = &item.unsafety {
            self.found.push((token.span.start().line, "`unsafe impl`".to_owned()));
        }
        visit::visit_item_impl(self, item);
    }

    fn visit_item_trait(&mut self, item: &'ast syn::ItemTrait) {
        if let Some(token) = &item.unsafety {
            self.found.push((token.span.start().line, format!("`unsafe trait {}`", item.ident)));
        }
        visit::visit_item_trait(self, item);
    }

    fn visit_item_foreign_mod(&mut self, item: &'ast syn::ItemForeignMod) {
        if let Some(token) = &item.unsafety {
            self.found.push((token.span.start().line, "`unsafe extern` block".to_owned()));
        }
        visit::visit_item_foreign_mod(self, item);
    }

    fn visit_item_mod(&mut self, item: &'ast syn::ItemMod) {
        if let Some(token) = &item.unsafety {
            self.found.push((token.span.start().line, format!("`unsafe mod {}`", item.ident)));
        }
        visit::visit_item_mod(self, item);
    }

    fn visit_attribute(&mut self, attribute: &'ast syn::Attribute) {
        if let Some(first) = attribute.path().segments.first().filter(|first| first.ident == "unsafe") {
            self.found.push((first.ident.span().start().line, "`#[unsafe(..)]` attribute".to_owned()));
        }
        visit::visit_attribute(self, attribute);
    }

    fn visit_macro(&mut self, invocation: &'ast syn::Macro) {
        let name = invocation.path.segments.last().map(|segment| unraw(&segment.ident)).unwrap_or_default();
        for line in unsafe_token_lines(invocation.tokens.clone()) {
            self.found.push((line, format!("`unsafe` inside `{name}!`")));
        }
        visit::visit_macro(self, invocation);
    }
}

fn unsafe_token_lines(tokens: TokenStream) -> Vec<usize> {
    let mut lines = Vec::new();
    for token in tokens {
        match token {
            TokenTree::Ident(ident) if ident == "unsafe" => lines.push(ident.span().start().line),
            TokenTree::Group(group) => lines.extend(unsafe_token_lines(group.stream())),
            _ => {}
        }
    }
    lines
}

/// Every printing macro in the library crates' code, outside the command-line front and tests.
pub fn check_printing(sources: &Sources, trees: &[ModuleTree]) -> Vec<Violation> {
    let library_files = trees.iter().filter(|tree| tree.crate_directory.kind.is_library()).flat_map(|tree| &tree.files);
    let files: BTreeSet<&Path> = library_files
        .filter(|(path, test_only)| !test_only && !may_print(path))
        .map(|(path, _)| path.as_path())
        .collect();
    let mut violations = Vec::new();
    for path in files {
        let mut finder = PrintingFinder::default();
        finder.visit_file(&sources.files[path].syntax);
        violations.extend(finder.found.into_iter().map(|(line, name)| {
            let message = format!(
                "`{name}!` in library code: only the command-line front ({PRINTING_ALLOWED_FILE}, \
                 {PRINTING_ALLOWED_FOLDER}/) and tests print; return what there is to say to the caller"
            );
            Violation::at(Rule::PrintingInLibrary, path, line, message)
        }));
    }
    violations
}

fn may_print(path: &Path) -> bool {
    path == Path::new(PRINTING_ALLOWED_FILE) || path.starts_with(PRINTING_ALLOWED_FOLDER)
}

/// The printing macros of a file, outside test-only code, including those in the tokens of other
/// macro invocations and definitions.
#[derive(Default)]
struct PrintingFinder {
    found: Vec<(usize, String)>,
}

impl<'ast> Visit<'ast> for PrintingFinder {
    fn visit_item(&mut self, item: &'ast Item) {
        if !is_test_only(item_attributes(item)) {
            visit::visit_item(self, item);
        }
    }

    fn visit_impl_item(&mut self, item: &'ast ImplItem) {
        if !is_test_only(impl_item_attributes(item)) {
            visit::visit_impl_item(self, item);
        }
    }

    fn visit_trait_item(&mut self, item: &'ast TraitItem) {
        if !is_test_only(trait_item_attributes(item)) {
            visit::visit_trait_item(self, item);
        }
    }

    fn visit_macro(&mut self, invocation: &'ast syn::Macro) {
        if let Some(last) = invocation.path.segments.last() {
            let name = unraw(&last.ident);
            if PRINTING_MACROS.contains(&name.as_str()) {
                self.found.push((last.ident.span().start().line, name));
            }
        }
        collect_printing_macros_in_tokens(invocation.tokens.clone(), &mut self.found);
        visit::visit_macro(self, invocation);
    }
}

/// The `name!` runs in macro tokens whose name is a printing macro.
fn collect_printing_macros_in_tokens(tokens: TokenStream, found: &mut Vec<(usize, String)>) {
    let tokens: Vec<TokenTree> = tokens.into_iter().collect();
    for (index, token) in tokens.iter().enumerate() {
        match token {
            TokenTree::Group(group) => collect_printing_macros_in_tokens(group.stream(), found),
            TokenTree::Ident(ident) => {
                let name = unraw(ident);
                let is_invoked = matches!(tokens.get(index + 1), Some(TokenTree::Punct(bang)) if bang.as_char() == '!');
                if is_invoked && PRINTING_MACROS.contains(&name.as_str()) {
                    found.push((ident.span().start().line, name));
                }
            }
            _ => {}
        }
    }
}

/// Every library crate root without `#![deny(missing_docs)]` (or `warn`/`forbid`), and every
/// file in a library crate's `src/` that does not open with a `//!` comment.
pub fn check_docs(sources: &Sources, trees: &[ModuleTree]) -> Vec<Violation> {
    let mut violations = Vec::new();
    for tree in trees.iter().filter(|tree| tree.crate_directory.kind.is_library()) {
        let root = &tree.files[0].0;
        let is_library_root = root.ends_with("lib.rs");
        if is_library_root
            && !has_crate_lint_level(&sources.files[root].syntax, &["deny", "warn", "forbid"], "missing_docs")
        {
            let message = "library crate root without `#![deny(missing_docs)]` (or `warn`, which clippy's \
                           `-D warnings` makes fatal)";
            violations.push(Violation::at(Rule::MissingDocs, root, 1, message));
        }
    }
    let library_crates = sources.crates.iter().filter(|(directory, _)| directory.kind.is_library());
    for (directory, paths) in library_crates {
        let source_directory = Path::new(directory.path).join("src");
        for path in paths.iter().filter(|path| path.starts_with(&source_directory)) {
            let Some(file) = sources.files.get(path) else { continue };
            if !opens_with_module_doc(&file.syntax) {
                let message = "file does not open with a `//!` comment saying what the module is (and \
                               deliberately is not)";
                violations.push(Violation::at(Rule::MissingDocs, path, 1, message));
            }
        }
    }
    violations
}

/// Whether a file's first attribute is an inner doc comment (`//!`, `/*! */` or `#![doc = ..]`);
/// plain comments before it do not count, being no tokens.
fn opens_with_module_doc(file: &syn::File) -> bool {
    file.attrs
        .first()
        .is_some_and(|attribute| matches!(attribute.style, AttrStyle::Inner(_)) && attribute.path().is_ident("doc"))
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::super::{CrateDirectory, CrateKind, source_violations};

    #[test]
    fn unsafe_printing_and_docs_are_reported_with_their_lines() {
        let workspace = tempfile::tempdir().unwrap();
        let files = [
            ("Cargo.toml", "[package]\nname = \"library\"\n"),
            ("src/lib.rs", "//! Library.\n#![deny(missing_docs)]\nmod quiet;\nmod loud;\n"),
            ("src/quiet.rs", "//! Quiet.\n/// Says \"println!\" // eprintln!\npub fn quiet() {}\n"),
            (
                "src/loud.rs",
                "pub fn loud() {\n    let _ = vec![dbg!(1)];\n    unsafe { core::hint::unreachable_unchecked() }\n}\n\
                 #[cfg(test)]\nmod tests {\n    fn t() {\n        println!(\"tests print\");\n        unsafe {}\n    }\n}\n",
            ),
        ];
        for (path, text) in files {
            let path = workspace.path().join("library").join(path);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, text).unwrap();
        }
        let directories = [CrateDirectory { path: "library", kind: CrateKind::Library }];
        let violations = source_violations(workspace.path(), &directories).unwrap();
        let reports: Vec<String> = violations.iter().map(|violation| violation.to_string()).collect();
        let first_line = |report: &str| report.split(':').take(3).collect::<Vec<_>>().join(":");
        assert_eq!(
            reports.iter().map(|report| first_line(report)).collect::<Vec<_>>(),
            [
                "library/src/lib.rs:1: unsafe code",
                "library/src/loud.rs:3: unsafe code",
                "library/src/loud.rs:9: unsafe code",
                "library/src/loud.rs:2: printing in library code",
                "library/src/loud.rs:1: missing docs",
            ],
            "{reports:#?}"
        );
    }
}
