//! Hostile inputs: crafted base archives and build contexts. Each case either builds a correct
//! image or fails with a clear error naming the step and the offending entry, and nothing is
//! ever written outside the cache and output directories. `docs/hostile-inputs.md` lists every
//! case with its outcome; keep the two in step.

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use layerwright::{Builder, Context, Image};

use crate::support::archive::{Raw, crafted_archive};

/// Everything below `dir`, for checking that nothing appeared outside the sandbox.
fn all_paths(dir: &Path) -> Vec<PathBuf> {
    let mut paths = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(next) = pending.pop() {
        for entry in fs::read_dir(&next).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() && !path.is_symlink() {
                pending.push(path.clone());
            }
            paths.push(path);
        }
    }
    paths.sort();
    paths
}

enum Expected<'a> {
    /// The build fails and the error mentions each fragment.
    Refused(&'a [&'a str]),
    /// The build succeeds and the listing contains each line fragment.
    Built(&'a [&'a str]),
}

/// Builds a base from the crafted archive (plus a file step on top) in a sandbox dir, checks the
/// outcome, and checks that nothing was written outside the sandbox's cache.
fn check_base(case: &str, layers: &[&[Raw]], expected: Expected) {
    let dir = tempfile::tempdir().unwrap();
    let sandbox = dir.path().join("sandbox");
    fs::create_dir(&sandbox).unwrap();
    let archive = sandbox.join(format!("{case}.tar"));
    crafted_archive(&archive, layers);
    let before_outside = all_paths(dir.path()).into_iter().filter(|path| !path.starts_with(&sandbox)).count();
    let image = Image::from_archive(&archive).write_file("/marker", "on top\n");
    let result = Builder::new(sandbox.join("cache")).unwrap().build(&image);
    match (expected, result) {
        (Expected::Refused(fragments), Err(error)) => {
            let message = error.to_string();
            eprintln!("{case}: refused: {message}");
            assert!(message.contains("FROM archive") && message.contains(&format!("{case}.tar")), "{case}: {message}");
            for fragment in fragments {
                assert!(message.contains(fragment), "{case}: {message:?} does not mention {fragment:?}");
            }
        }
        (Expected::Built(fragments), Ok(built)) => {
            let listing = built.listing().unwrap();
            for fragment in fragments {
                assert!(listing.contains(fragment), "{case}: {fragment:?} not in\n{listing}");
            }
        }
        (Expected::Refused(_), Ok(built)) => panic!("{case}: built, listing:\n{}", built.listing().unwrap()),
        (Expected::Built(_), Err(error)) => panic!("{case}: refused: {error}"),
    }
    let after_outside: Vec<PathBuf> =
        all_paths(dir.path()).into_iter().filter(|path| !path.starts_with(&sandbox)).collect();
    assert_eq!(after_outside.len(), before_outside, "{case}: written outside the sandbox: {after_outside:?}");
    assert!(!Path::new("/x-layerwright-escape").exists(), "{case}: escaped to /");
}

#[test]
fn entries_leaving_the_root_are_refused() {
    check_base(
        "dotdot",
        &[&[Raw::File("../../x-layerwright-escape", b"x")]],
        Expected::Refused(&["../../x-layerwright-escape"]),
    );
    check_base(
        "absolute",
        &[&[Raw::File("/x-layerwright-escape", b"x")]],
        Expected::Refused(&["/x-layerwright-escape"]),
    );
    check_base("inner-dotdot", &[&[Raw::File("etc/../../x", b"x")]], Expected::Refused(&["etc/../../x"]));
    check_base("whiteout-dotdot", &[&[Raw::File("etc/.wh...", b"")]], Expected::Refused(&[".wh.."]));
    check_base(
        "hardlink-out",
        &[&[Raw::HardLink("etc/passwd", "../../etc/passwd")]],
        Expected::Refused(&["etc/passwd => ../../etc/passwd", "outside the image root"]),
    );
}

#[test]
fn writes_through_symlinks_are_refused() {
    check_base(
        "symlink-same-layer",
        &[&[Raw::Symlink("escape", "/etc"), Raw::File("escape/x", b"x")]],
        Expected::Refused(&["escape/x", "symlink"]),
    );
    check_base(
        "symlink-across-layers",
        &[&[Raw::Symlink("escape", "../../../../tmp")], &[Raw::File("escape/x", b"x")]],
        Expected::Refused(&["escape/x", "symlink"]),
    );
    check_base(
        "dir-replaced-by-symlink",
        &[
            &[Raw::Dir("data"), Raw::File("data/a", b"a")],
            &[Raw::Symlink("data", "/etc")],
            &[Raw::File("data/b", b"b")],
        ],
        Expected::Refused(&["data/b", "symlink"]),
    );
}

#[test]
fn odd_but_harmless_entries_are_kept_as_data() {
    // A symlink pointing outside is only data: it is never followed while building.
    check_base(
        "symlink-out",
        &[&[Raw::Symlink("link", "/etc/shadow")]],
        Expected::Built(&["symlink 0644 0:0 - -> /etc/shadow /link\n"]),
    );
    // Device nodes are recorded, never created on the host by a file step.
    check_base(
        "device",
        &[&[Raw::Dir("dev"), Raw::CharDevice("dev/null", 1, 3)]],
        Expected::Built(&["char 0644 0:0 - 1,3 /dev/null\n"]),
    );
    // A later duplicate wins, as when a tar is extracted.
    check_base(
        "duplicate",
        &[&[Raw::File("dup", b"first"), Raw::File("dup", b"second!")]],
        Expected::Built(&["file 0644 0:0 7 "]),
    );
    check_base(
        "hardlink-inside",
        &[&[Raw::File("a", b"shared"), Raw::HardLink("b", "a")]],
        Expected::Built(&["=> /a /b\n"]),
    );
}

#[test]
fn a_header_claiming_a_huge_size_is_a_clear_error() {
    check_base("huge-size", &[&[Raw::FileClaimingSize("big", 1 << 40)]], Expected::Refused(&["layer"]));
}

/// Builds `copy(context, source, /dst)` and returns the error text or the listing.
fn build_copy(context: &Path, source: &str) -> Result<String, String> {
    let cache = tempfile::tempdir().unwrap();
    let image = Image::scratch().copy(&Context::dir(context).unwrap(), source, "/dst");
    match Builder::new(cache.path()).unwrap().build(&image) {
        Ok(built) => Ok(built.listing().unwrap()),
        Err(error) => Err(error.to_string()),
    }
}

#[test]
fn hostile_contexts_give_a_correct_layer_or_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let context = dir.path().join("ctx");
    fs::create_dir_all(context.join("tree")).unwrap();

    // Symlink loops below the source are copied as links, never followed.
    symlink("b", context.join("tree/a")).unwrap();
    symlink("a", context.join("tree/b")).unwrap();
    let listing = build_copy(&context, "tree").unwrap();
    assert!(listing.contains("symlink 0777 0:0 - -> b /dst/a\n"), "{listing}");
    // As the source itself, a loop cannot be resolved: an error naming it.
    let error = build_copy(&context, "tree/a").unwrap_err();
    eprintln!("symlink loop as source: {error}");
    assert!(
        error.contains("COPY tree/a /dst") && error.contains("\"tree/a\"") && error.contains("symlink loop"),
        "{error}"
    );

    // A name with a newline is kept, and listed escaped on one line.
    fs::write(context.join("tree/new\nline"), "x").unwrap();
    let listing = build_copy(&context, "tree").unwrap();
    assert!(listing.contains("/dst/new\\nline\n"), "{listing}");
    fs::remove_file(context.join("tree/new\nline")).unwrap();

    // A 255-byte name (the longest a filesystem allows) goes through PAX headers.
    let long_name = "n".repeat(255);
    fs::write(context.join("tree").join(&long_name), "long").unwrap();
    let listing = build_copy(&context, "tree").unwrap();
    assert!(listing.contains(&format!("/dst/{long_name}\n")), "{listing}");

    // A very deep tree.
    let mut deep = context.join("deep");
    for _ in 0..300 {
        deep = deep.join("d");
    }
    fs::create_dir_all(&deep).unwrap();
    fs::write(deep.join("leaf"), "leaf").unwrap();
    let listing = build_copy(&context, "deep").unwrap();
    assert!(listing.contains(&format!("/dst/{}leaf\n", "d/".repeat(300))), "deep tree listing");

    // A name that is not UTF-8: a clear error naming the directory.
    let odd = context.join("odd");
    fs::create_dir(&odd).unwrap();
    fs::write(odd.join(std::ffi::OsStr::from_bytes(b"bad\xffname")), "x").unwrap();
    let error = build_copy(&context, "odd").unwrap_err();
    eprintln!("non-UTF-8 name: {error}");
    assert!(error.contains("COPY odd /dst") && error.contains("not valid UTF-8"), "{error}");

    // A fifo cannot be in a layer: a clear error.
    let special = context.join("special");
    fs::create_dir(&special).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        special.join("fifo"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap();
    let error = build_copy(&context, "special").unwrap_err();
    eprintln!("fifo: {error}");
    assert!(error.contains("COPY special /dst") && error.contains("socket or device"), "{error}");
}
