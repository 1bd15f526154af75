//! The workspace's own binaries, as the end-to-end tests run them.
//!
//! They live in other crates of the workspace, so `CARGO_BIN_EXE_*` does not exist here. The
//! first test to need one runs `cargo build -p cloud-hypervisor -p ch-remote --features
//! cloud-hypervisor/fault-injection` (the profile of this test build; the feature gives the
//! power-fail tests their `NV_FAULT_AFTER_PHASE` fault points) and uses
//! `<target dir>/<profile>/<name>`: that keeps the binaries in step with the sources. `CLOUD_HYPERVISOR_BIN=/path` or `CH_REMOTE_BIN=/path` tests that binary
//! instead, without a build.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// `cloud-hypervisor`, or what `CLOUD_HYPERVISOR_BIN` names.
pub fn cloud_hypervisor() -> PathBuf {
    given_or_built("CLOUD_HYPERVISOR_BIN", "cloud-hypervisor")
}

/// `nv-vhost-user-blk` (our vhost-user-blk backend), or what `NV_VHOST_USER_BLK_BIN` names.
pub fn nv_vhost_user_blk() -> PathBuf {
    given_or_built("NV_VHOST_USER_BLK_BIN", "nv-vhost-user-blk")
}

/// `nv-vhost-user-net` (our vhost-user-net backend), or what `NV_VHOST_USER_NET_BIN` names.
pub fn nv_vhost_user_net() -> PathBuf {
    given_or_built("NV_VHOST_USER_NET_BIN", "nv-vhost-user-net")
}

/// `ch-remote`, or what `CH_REMOTE_BIN` names.
pub fn ch_remote() -> PathBuf {
    given_or_built("CH_REMOTE_BIN", "ch-remote")
}

fn given_or_built(variable: &str, name: &str) -> PathBuf {
    match std::env::var_os(variable) {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => built_profile_dir().join(name),
    }
}

/// Builds both binaries once per test process; returns the directory they are in.
fn built_profile_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let workspace = workspace_root();
        let release = !cfg!(debug_assertions);
        let mut build = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        build.current_dir(&workspace).args([
            "build",
            "--quiet",
            "-p",
            "cloud-hypervisor",
            "-p",
            "ch-remote",
            "-p",
            "nv-vhost-user-blk",
            "-p",
            "nv-vhost-user-net",
            "--features",
            "cloud-hypervisor/fault-injection",
        ]);
        if release {
            build.arg("--release");
        }
        let status = build.status().expect("running cargo build");
        assert!(
            status.success(),
            "cargo build -p cloud-hypervisor -p ch-remote -p nv-vhost-user-blk -p \
             nv-vhost-user-net --features cloud-hypervisor/fault-injection failed"
        );
        cargo_target_dir().join(if release { "release" } else { "debug" })
    })
}

/// The workspace root: the directory above this crate.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Cargo's target directory: `CARGO_TARGET_DIR` (a relative one is taken from the workspace
/// root, where cargo runs), else the workspace's `target`.
pub fn cargo_target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => workspace_root().join(dir),
        _ => workspace_root().join("target"),
    }
}
