//! Every fuzz target in the suite: its committed corpus (`fuzz/corpus/<target>/`) replayed as
//! regression inputs, then a bounded fuzz run (`FUZZ_SECONDS`, default 3 s per target; the seed
//! is `FUZZ_SEED`, default fixed so that CI runs the same inputs first). No panic, no broken
//! promise.

use std::time::Duration;

use nv_fuzz::targets::by_name;
use nv_fuzz::{fuzz, load_corpus, replay};

fn budget() -> Duration {
    let seconds = std::env::var("FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(3.0);
    Duration::from_secs_f64(seconds)
}

fn seed() -> u64 {
    std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x6e76_6675_7a7a)
}

fn check(name: &str) {
    let mut target = by_name(name).expect("target");
    let committed = load_corpus(name);
    assert!(!committed.is_empty(), "no committed corpus for {name}");
    let findings = replay(target.as_mut(), &committed);
    assert!(
        findings.is_empty(),
        "{name}: committed corpus inputs fail: {:?}",
        findings
            .iter()
            .map(|f| (
                &f.message,
                String::from_utf8_lossy(&f.input[..f.input.len().min(200)])
            ))
            .collect::<Vec<_>>()
    );
    let mut corpus = target.seeds();
    corpus.extend(committed);
    let report = fuzz(target.as_mut(), corpus, budget(), seed());
    println!("{report}");
    assert!(report.execs > 0);
    assert!(
        report.findings.is_empty(),
        "{report}\n{:#?}",
        report
            .findings
            .iter()
            .map(|f| (
                &f.message,
                String::from_utf8_lossy(&f.input[..f.input.len().min(300)])
            ))
            .collect::<Vec<_>>()
    );
}

#[test]
fn fuzz_http() {
    check("http");
}

#[test]
fn fuzz_vm_config() {
    check("vm_config");
}

#[test]
fn fuzz_cli() {
    check("cli");
}

#[test]
fn fuzz_region() {
    check("region");
}

#[test]
fn fuzz_state_json() {
    check("state_json");
}

#[test]
fn fuzz_virtio_blk() {
    check("virtio_blk");
}
