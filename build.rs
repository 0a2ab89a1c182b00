//! Rebuilds when a migration changes: `sqlx::migrate!` embeds them at compile time, and without
//! this an incremental build could keep an old schema.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
