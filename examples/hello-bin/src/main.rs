//! The entrypoint of the `hello` example image: a static binary that greets, so that
//! `docker run` of an image built from scratch shows something.

#![forbid(unsafe_code)]

fn main() {
    let who = std::env::args().nth(1).unwrap_or_else(|| "layerwright".to_owned());
    println!("Hello from {who}!");
}
