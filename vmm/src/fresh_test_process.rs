//! For unit tests that need a process of their own (no other test's threads in it, nothing
//! asked of the kernel before them): the test runs itself again, alone, in a new process.

/// In the test process: runs the test `path` (its full name, `module::tests::name`) alone in a
/// new process with `marker` set in its environment and asserts that it passed; returns
/// `false`. In that new process (`marker` is set): returns `true`, and the test goes on with
/// its body.
pub(crate) fn in_a_fresh_process(path: &str, marker: &str) -> bool {
    if std::env::var_os(marker).is_some() {
        return true;
    }
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args([path, "--exact", "--test-threads=1"])
        .env(marker, "1")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    false
}
