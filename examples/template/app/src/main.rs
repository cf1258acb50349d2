//! The application the `app` image runs.

fn main() {
    println!("hello from app");
}
