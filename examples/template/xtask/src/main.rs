use layerwright::{Context, Image, cli::Images};
use std::process::{Command, ExitCode};

fn main() -> ExitCode {
    layerwright::cli::main(Images::new().add("app", app))
}

/// The `app` binary, linked statically, on an empty base. Paths are relative to the workspace root.
fn app() -> Result<Image, Box<dyn std::error::Error + Send + Sync>> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let build = ["build", "--release", "--package", "app", "--target-dir", "target/static"];
    let status = Command::new(cargo).args(build).env("RUSTFLAGS", "-C target-feature=+crt-static").status()?;
    if !status.success() {
        return Err(format!("cargo {} failed", build.join(" ")).into());
    }
    let bin = Context::dir("target/static/release")?;
    Ok(Image::scratch().copy(&bin, "app", "/usr/local/bin/app").entrypoint(["/usr/local/bin/app"]))
}

#[cfg(test)]
mod tests;
