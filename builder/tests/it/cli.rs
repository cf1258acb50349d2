//! `layerwright::cli` as a user's xtask runs it: in a process of its own, started in a
//! subdirectory of a workspace, on an image whose declaration names its context relative to the
//! workspace root. The child is this test binary on an entry point that hands its arguments to
//! `cli::run`.

use std::path::Path;
use std::process::{ExitCode, Output};

use layerwright::cli::{self, DeclareResult, Images};
use layerwright::{Builder, Context, Image};

use crate::support::subprocess::{self, entry_point};
use crate::support::write;

const PARENT: &str = "cli::a_workspace_builds_lists_and_inspects_its_images_from_a_subdirectory";

/// The declaration the child registers: a context relative to the workspace root.
fn tiny() -> DeclareResult {
    let files = Context::dir("files")?;
    Ok(Image::scratch()
        .copy(&files, "greeting.txt", "/srv/greeting.txt")
        .write_file("/etc/motd", "hi\n")
        .env("GREETING", "hello")
        .entrypoint(["/bin/true"]))
}

#[test]
#[ignore = "subprocess entry point of cli::a_workspace_builds_lists_and_inspects_its_images_from_a_subdirectory"]
fn helper_cli() {
    let arguments = subprocess::variable("LAYERWRIGHT_TEST_CLI_ARGUMENTS", PARENT);
    let arguments = arguments.to_str().expect("UTF-8 arguments").split('\n').map(str::to_owned);
    let images = Images::new().add("tiny", tiny);
    let code = cli::run(&images, std::iter::once("xtask".to_owned()).chain(arguments));
    println!("\nCLI-SUCCEEDED {}", code == ExitCode::SUCCESS);
}

/// Runs the cli in a child process started in `dir`, outside any cargo environment.
fn cli_in(dir: &Path, arguments: &[&str]) -> (bool, String, String) {
    let Output { stdout, stderr, .. } = entry_point!(helper_cli)
        .command()
        .current_dir(dir)
        .env("LAYERWRIGHT_TEST_CLI_ARGUMENTS", arguments.join("\n"))
        .env_remove("CARGO_MANIFEST_DIR")
        .env_remove("CARGO_WORKSPACE_DIR")
        .output()
        .unwrap();
    let (stdout, stderr) =
        (String::from_utf8_lossy(&stdout).into_owned(), String::from_utf8_lossy(&stderr).into_owned());
    let succeeded = match stdout.lines().find_map(|line| line.strip_prefix("CLI-SUCCEEDED ")) {
        Some(flag) => flag == "true",
        None => panic!("the child ran no cli:\n{stdout}\n{stderr}"),
    };
    (succeeded, stdout, stderr)
}

#[test]
fn a_workspace_builds_lists_and_inspects_its_images_from_a_subdirectory() {
    let workspace = tempfile::tempdir().unwrap();
    let root = workspace.path();
    write(&root.join("Cargo.toml"), "[workspace]\nmembers = [\"deep/er\"]\n");
    write(&root.join("deep/er/Cargo.toml"), "[package]\nname = \"er\"\n");
    write(&root.join("files/greeting.txt"), "hello\n");
    let subdirectory = root.join("deep/er");

    let (succeeded, stdout, stderr) = cli_in(&subdirectory, &["build-image", "tiny", "--output", "oci:out"]);
    assert!(succeeded, "{stdout}\n{stderr}");
    // The same image as built here, from the absolute path: the declaration's relative path
    // resolved against the workspace root, not the directory the command started in.
    let expected = Builder::new(root.join("expected-cache")).unwrap().build(&tiny_at(root)).unwrap().manifest_digest();
    assert!(stdout.contains(&format!("digest  {expected}")), "{stdout}");
    // `--output` is relative to where the command started; the cache defaults to the root's.
    let index = std::fs::read_to_string(subdirectory.join("out/index.json")).unwrap();
    assert!(index.contains(&expected), "{index}");
    assert!(root.join("target/layerwright/blobs/sha256").is_dir());

    // The default output, under the workspace root; everything cached now.
    let (succeeded, stdout, stderr) = cli_in(&root.join("files"), &["build-image", "tiny"]);
    assert!(succeeded, "{stdout}\n{stderr}");
    assert!(stdout.contains("steps   5 cached, 0 built"), "{stdout}");
    assert!(root.join("target/images/tiny.tar").is_file());

    let (succeeded, stdout, _) = cli_in(&subdirectory, &["list"]);
    // (The test harness prints its own text before the output, on the same line.)
    assert!(succeeded && stdout.lines().any(|line| line.ends_with(" ... tiny") || line == "tiny"), "{stdout}");

    let (succeeded, stdout, stderr) = cli_in(&subdirectory, &["inspect", "tiny", "--files"]);
    assert!(succeeded, "{stdout}\n{stderr}");
    // The config, then one line per layer (position, size, step, cached) and what it adds.
    let layer_line = |step: &str| {
        stdout.lines().any(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            line.contains(step) && line.ends_with("cached") && fields[1].parse::<u64>().is_ok()
        })
    };
    for expected_line in [
        format!("digest      {expected}"),
        "entrypoint  [\"/bin/true\"]".to_owned(),
        "env         GREETING=hello".to_owned(),
        "layers      2 (".to_owned(),
        "+            6 /srv/greeting.txt".to_owned(),
        "+            3 /etc/motd".to_owned(),
    ] {
        assert!(stdout.lines().any(|line| line.trim_start().starts_with(&expected_line)), "{expected_line}:\n{stdout}");
    }
    assert!(layer_line("COPY greeting.txt /srv/greeting.txt") && layer_line("/etc/motd"), "{stdout}");

    // Attestations of a single image are asked for by name: an index of the image (the same
    // digest as above) and its attestation manifest; a docker-archive cannot hold that.
    let (succeeded, stdout, stderr) =
        cli_in(&subdirectory, &["build-image", "tiny", "--attest", "--output", "oci:att"]);
    assert!(succeeded, "{stdout}\n{stderr}");
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(subdirectory.join("att/index.json")).unwrap()).unwrap();
    let index_digest = index["manifests"][0]["digest"].as_str().unwrap();
    assert!(stdout.contains(&format!("digest  {index_digest}")), "{stdout}");
    let blob = |digest: &str| -> serde_json::Value {
        let path = subdirectory.join("att/blobs/sha256").join(digest.strip_prefix("sha256:").unwrap());
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    };
    let manifests = blob(index_digest)["manifests"].clone();
    assert_eq!(manifests[0]["digest"], expected.as_str(), "{manifests}");
    assert_eq!(manifests[1]["annotations"]["vnd.docker.reference.type"], "attestation-manifest");
    let (succeeded, _, stderr) = cli_in(&subdirectory, &["build-image", "tiny", "--attest"]);
    assert!(!succeeded && stderr.contains("cannot hold an image index"), "{stderr}");

    let (succeeded, stdout, _) = cli_in(&subdirectory, &["cache", "du"]);
    assert!(
        succeeded && stdout.contains(&format!("cache    {}", root.join("target/layerwright").display())),
        "{stdout}"
    );

    let (succeeded, _, stderr) = cli_in(&subdirectory, &["build-image", "nope"]);
    assert!(!succeeded);
    assert!(stderr.contains("error: unknown image \"nope\"; the images are: tiny"), "{stderr}");
}

/// [`tiny`] with its context at an absolute path.
fn tiny_at(root: &Path) -> Image {
    let files = Context::dir(root.join("files")).unwrap();
    Image::scratch()
        .copy(&files, "greeting.txt", "/srv/greeting.txt")
        .write_file("/etc/motd", "hi\n")
        .env("GREETING", "hello")
        .entrypoint(["/bin/true"])
}
