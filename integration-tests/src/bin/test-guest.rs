//! `test-guest`: the test guests for scripts (the demo), from the same code the tests use, so the
//! compiler flags and the guests' time base live in one place.
//!
//! - `test-guest image NAME`: builds guest NAME if it is missing or stale and prints its path.
//! - `test-guest cmdline [PARAMETERS]`: prints a guest command line, PARAMETERS plus `tsc_khz=`
//!   with this host's TSC rate (KVM_GET_TSC_KHZ).
//!
//! Exit codes: 0 done, 1 the guest could not be built or KVM could not be asked, 2 usage.

use std::process::ExitCode;

use integration_tests::guests::{guest_image, GUEST_NAMES};
use integration_tests::harness::cmdline_with_tsc;

const USAGE: &str = "usage: test-guest image NAME | test-guest cmdline [PARAMETERS]";

fn main() -> ExitCode {
    let arguments: Vec<String> = std::env::args().skip(1).collect();
    match arguments.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["image", name] => match guest_image(name) {
            Ok(path) => {
                println!("{}", path.display());
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("test-guest: building {name}: {error}");
                ExitCode::from(1)
            }
        },
        ["cmdline", ref parameters @ ..] => match integration_tests::tsc::guest_tsc_khz() {
            Ok(khz) => {
                println!("{}", cmdline_with_tsc(&parameters.join(" "), khz));
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("test-guest: reading the TSC rate: {error}");
                ExitCode::from(1)
            }
        },
        _ => {
            eprintln!("{USAGE}\nguests: {}", GUEST_NAMES.join(", "));
            ExitCode::from(2)
        }
    }
}
