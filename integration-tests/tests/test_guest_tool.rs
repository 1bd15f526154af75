//! `test-guest`, the binary the demo builds its guest with: it must print what the tests' own
//! code builds (the same image, the same command line) and fail with the documented exit codes.

use std::path::Path;
use std::process::{Command, Output};

use integration_tests::guests::{guest_image, pvh_entry_point};
use integration_tests::harness::guest_cmdline;

fn test_guest(arguments: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_test-guest"))
        .args(arguments)
        .output()
        .expect("running test-guest")
}

fn stdout_line(output: &Output) -> String {
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone())
        .expect("UTF-8 output")
        .trim_end_matches('\n')
        .to_string()
}

#[test]
fn image_prints_the_path_the_tests_build() {
    let printed = stdout_line(&test_guest(&["image", "counter"]));
    assert_eq!(Path::new(&printed), guest_image("counter").unwrap());
    let image = std::fs::read(&printed).unwrap();
    assert!(
        pvh_entry_point(&image).is_some(),
        "no PVH entry in {printed}"
    );
}

#[test]
fn cmdline_carries_the_tsc_rate_the_tests_pass() {
    integration_tests::require_kvm!();
    let printed = stdout_line(&test_guest(&["cmdline", "area_mb=16"]));
    assert_eq!(printed, guest_cmdline("area_mb=16"));
}

#[test]
fn bad_use_fails_with_its_exit_code() {
    let usage = test_guest(&[]);
    assert_eq!(usage.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&usage.stderr).contains("usage: test-guest"));
    let unknown = test_guest(&["image", "nope"]);
    assert_eq!(unknown.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("nope"));
}
