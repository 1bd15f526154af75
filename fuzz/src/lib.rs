//! Fuzz targets for the VMM's parsers of untrusted input, on stable Rust with crates.io only.
//!
//! cargo-fuzz needs a nightly toolchain and cargo-afl its own compiler wrapper; neither fits a CI
//! run on the stable toolchain in bounded time. This crate is a small mutation fuzzer instead: a
//! seeded RNG, byte- and token-level mutations of a corpus, and, in place of coverage, an outcome
//! signature per input (which error, which request): an input with a signature not seen before
//! joins the corpus. Each target checks more than "no panic": what a parser accepts must make
//! sense (a config accepted by `vm.create` must survive its own JSON round trip, a CLI config must
//! be accepted by the API, a virtio-blk request never changes the disk's size, ...).
//!
//! `cargo test -p nv-fuzz` replays the committed corpora (`fuzz/corpus/<target>/`) and fuzzes
//! each target for `FUZZ_SECONDS` (default 3); `cargo run --release -p nv-fuzz -- <target|all>
//! --seconds N [--seed S]` runs longer and saves what it finds under `fuzz/findings/`.

pub mod targets;

use std::collections::HashSet;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A small, fast, seeded generator (splitmix64): the same seed gives the same inputs.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }
}

/// Bytes that often sit on a parser's edges.
const INTERESTING_BYTES: &[u8] = &[0, 1, 0x7f, 0x80, 0xff, b'"', b'\\', b',', b'=', b':', b'\n'];
/// Numbers that often sit on a parser's edges, as text.
const INTERESTING_NUMBERS: &[&[u8]] = &[
    b"0",
    b"-1",
    b"1",
    b"255",
    b"256",
    b"4096",
    b"65535",
    b"4294967295",
    b"4294967296",
    b"9223372036854775807",
    b"18446744073709551615",
    b"18446744073709551616",
    b"1e309",
    b"0x10",
    b"1G",
    b"16E",
];

/// One fuzz target: a parser of untrusted input and what its answers must satisfy.
pub trait Target {
    fn name(&self) -> &'static str;
    /// Inputs built in code (always valid starting points), before the committed corpus.
    fn seeds(&mut self) -> Vec<Vec<u8>>;
    /// Tokens the mutator inserts: keywords of the format.
    fn dictionary(&self) -> &'static [&'static [u8]] {
        &[]
    }
    fn max_len(&self) -> usize {
        4096
    }
    /// Binary formats of a fixed layout: mutate in place only (no insertions or deletions).
    fn fixed_size(&self) -> bool {
        false
    }
    /// Runs one input. `Ok(signature)`: the outcome's kind (inputs with new kinds join the
    /// corpus). `Err(message)`: the parser accepted garbage or broke a promise.
    fn execute(&mut self, input: &[u8]) -> Result<u64, String>;
}

/// One input that panicked or broke an invariant.
#[derive(Clone, Debug)]
pub struct Finding {
    pub input: Vec<u8>,
    pub message: String,
}

/// What a run did.
#[derive(Debug)]
pub struct Report {
    pub target: &'static str,
    pub execs: u64,
    pub elapsed: Duration,
    pub corpus: usize,
    pub signatures: usize,
    pub findings: Vec<Finding>,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {} execs in {:.1} s ({:.0}/s), corpus {}, {} outcome kinds, {} findings",
            self.target,
            self.execs,
            self.elapsed.as_secs_f64(),
            self.execs as f64 / self.elapsed.as_secs_f64().max(1e-9),
            self.corpus,
            self.signatures,
            self.findings.len()
        )
    }
}

/// Runs one input, turning a panic into a finding.
fn execute_caught(target: &mut dyn Target, input: &[u8]) -> Result<u64, String> {
    match panic::catch_unwind(AssertUnwindSafe(|| target.execute(input))) {
        Ok(outcome) => outcome,
        Err(payload) => {
            let text = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "non-string panic".to_string());
            Err(format!("panic: {text}"))
        }
    }
}

thread_local! {
    static QUIET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Silences panic messages of this thread while `run` runs (panics there are findings, reported
/// once); other threads, such as other tests of the same binary, keep theirs.
fn quietly<T>(run: impl FnOnce() -> T) -> T {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if !QUIET.with(|quiet| quiet.get()) {
                previous(info);
            }
        }));
    });
    QUIET.with(|quiet| quiet.set(true));
    let result = run();
    QUIET.with(|quiet| quiet.set(false));
    result
}

/// Runs every input once; returns the findings.
pub fn replay(target: &mut dyn Target, inputs: &[Vec<u8>]) -> Vec<Finding> {
    quietly(|| {
        inputs
            .iter()
            .filter_map(|input| {
                execute_caught(target, input).err().map(|message| Finding {
                    input: input.clone(),
                    message,
                })
            })
            .collect()
    })
}

/// Mutates `input` in place with 1 to 4 stacked mutations.
pub fn mutate(
    rng: &mut Rng,
    input: &mut Vec<u8>,
    corpus: &[Vec<u8>],
    dictionary: &[&[u8]],
    max_len: usize,
    fixed_size: bool,
) {
    let rounds = 1 + rng.below(4);
    for _ in 0..rounds {
        let len = input.len();
        let position = if len == 0 { 0 } else { rng.below(len) };
        let choice = if fixed_size {
            rng.below(4)
        } else {
            rng.below(12)
        };
        match choice {
            0 if len > 0 => input[position] ^= 1 << rng.below(8),
            1 if len > 0 => input[position] = rng.next_u64() as u8,
            2 if len > 0 => input[position] = INTERESTING_BYTES[rng.below(INTERESTING_BYTES.len())],
            3 if len >= 8 => {
                // Overwrite a little-endian word with an edge value.
                let at = rng.below(len - 7);
                let value: u64 = match rng.below(6) {
                    0 => 0,
                    1 => u64::MAX,
                    2 => u64::from(u32::MAX),
                    3 => 1 << rng.below(64),
                    4 => rng.next_u64(),
                    _ => (len as u64).wrapping_add(rng.below(16) as u64),
                };
                let width = [1, 2, 4, 8][rng.below(4)];
                input[at..at + width].copy_from_slice(&value.to_le_bytes()[..width]);
            }
            4 => {
                let count = 1 + rng.below(8);
                for _ in 0..count {
                    input.insert(position.min(input.len()), rng.next_u64() as u8);
                }
            }
            5 if len > 0 => {
                let end = (position + 1 + rng.below(16)).min(len);
                input.drain(position..end);
            }
            6 if !dictionary.is_empty() => {
                let token = dictionary[rng.below(dictionary.len())];
                let at = position.min(input.len());
                input.splice(at..at, token.iter().copied());
            }
            7 if !dictionary.is_empty() && len > 0 => {
                let token = dictionary[rng.below(dictionary.len())];
                let end = (position + token.len()).min(len);
                input.splice(position..end, token.iter().copied());
            }
            8 => {
                // Replace a run of digits (or insert) with an edge number.
                let number = INTERESTING_NUMBERS[rng.below(INTERESTING_NUMBERS.len())];
                let mut start = position.min(input.len());
                while start > 0 && input[start - 1].is_ascii_digit() {
                    start -= 1;
                }
                let mut end = start;
                while end < input.len() && input[end].is_ascii_digit() {
                    end += 1;
                }
                input.splice(start..end, number.iter().copied());
            }
            9 if len > 1 => {
                // Duplicate a slice (repeated keys, nested structures).
                let end = (position + 1 + rng.below(64)).min(len);
                let piece = input[position..end].to_vec();
                let at = rng.below(input.len());
                input.splice(at..at, piece);
            }
            10 if !corpus.is_empty() => {
                // Splice: our head, another input's tail.
                let other = &corpus[rng.below(corpus.len())];
                if !other.is_empty() {
                    let from = rng.below(other.len());
                    input.truncate(position);
                    input.extend_from_slice(&other[from..]);
                }
            }
            11 if len > 0 => input.truncate(position),
            _ => {}
        }
    }
    input.truncate(max_len);
}

/// Fuzzes `target` for `budget`, starting from `corpus`; stops early after 10 findings.
pub fn fuzz(
    target: &mut dyn Target,
    mut corpus: Vec<Vec<u8>>,
    budget: Duration,
    seed: u64,
) -> Report {
    let mut rng = Rng::new(seed);
    let dictionary = target.dictionary();
    let max_len = target.max_len();
    let fixed_size = target.fixed_size();
    let mut seen = HashSet::new();
    let mut findings = Vec::new();
    let mut execs = 0u64;
    let started = Instant::now();
    quietly(|| {
        for input in &corpus {
            execs += 1;
            match execute_caught(target, input) {
                Ok(signature) => {
                    seen.insert(signature);
                }
                Err(message) => findings.push(Finding {
                    input: input.clone(),
                    message,
                }),
            }
        }
        if corpus.is_empty() {
            corpus.push(Vec::new());
        }
        while started.elapsed() < budget && findings.len() < 10 {
            let mut input = corpus[rng.below(corpus.len())].clone();
            mutate(
                &mut rng, &mut input, &corpus, dictionary, max_len, fixed_size,
            );
            execs += 1;
            match execute_caught(target, &input) {
                Ok(signature) => {
                    if seen.insert(signature) && corpus.len() < 4096 {
                        corpus.push(input);
                    }
                }
                Err(message) => findings.push(Finding { input, message }),
            }
        }
    });
    Report {
        target: target.name(),
        execs,
        elapsed: started.elapsed(),
        corpus: corpus.len(),
        signatures: seen.len(),
        findings,
    }
}

/// Seeds of a text format, as the byte strings [`Target::seeds`] returns.
pub fn text_seeds(seeds: &[&str]) -> Vec<Vec<u8>> {
    seeds.iter().map(|seed| seed.as_bytes().to_vec()).collect()
}

/// The committed corpus of a target: every file in `fuzz/corpus/<name>/`, sorted by name.
pub fn corpus_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(name)
}

pub fn load_corpus(name: &str) -> Vec<Vec<u8>> {
    let Ok(entries) = std::fs::read_dir(corpus_dir(name)) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = entries.flatten().map(|entry| entry.path()).collect();
    paths.sort();
    paths
        .iter()
        .filter_map(|path| std::fs::read(path).ok())
        .collect()
}

/// A stable 64-bit hash of an outcome description (FNV-1a): the signature of an input.
pub fn signature(parts: &[&[u8]]) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for part in parts {
        for byte in part.iter().chain(std::iter::once(&0xffu8)) {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    hash
}

/// The first `words` words of an error message with quoted text and digits dropped: its kind,
/// without the values in it (so that a corpus grows by kinds of outcome, not by values).
pub fn message_kind(message: &str, words: usize) -> String {
    let mut plain = String::with_capacity(message.len());
    let mut quote = None;
    for c in message.chars() {
        match quote {
            Some(open) if c == open => quote = None,
            Some(_) => {}
            None if c == '"' || c == '`' => quote = Some(c),
            None if c.is_ascii_digit() => {}
            None => plain.push(c),
        }
    }
    plain
        .split_whitespace()
        .take(words)
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    struct PanicsOnZ;
    impl Target for PanicsOnZ {
        fn name(&self) -> &'static str {
            "panics-on-z"
        }
        fn seeds(&mut self) -> Vec<Vec<u8>> {
            vec![b"abc".to_vec()]
        }
        fn dictionary(&self) -> &'static [&'static [u8]] {
            &[b"z"]
        }
        fn execute(&mut self, input: &[u8]) -> Result<u64, String> {
            assert!(!input.contains(&b'z'), "found z");
            if input.starts_with(b"bad") {
                return Err("accepted bad".into());
            }
            Ok(input.len() as u64)
        }
    }

    #[test]
    fn the_loop_finds_a_panic_and_reports_it_with_its_input() {
        let mut target = PanicsOnZ;
        let seeds = target.seeds();
        let report = fuzz(&mut target, seeds, Duration::from_secs(2), 1);
        assert!(!report.findings.is_empty(), "{report}");
        let finding = &report.findings[0];
        assert!(finding.input.contains(&b'z'));
        assert_eq!(finding.message, "panic: found z");
        assert!(report.execs > 1);
    }

    #[test]
    fn replay_reports_broken_promises() {
        let mut target = PanicsOnZ;
        let findings = replay(&mut target, &[b"ok".to_vec(), b"bad".to_vec()]);
        assert_eq!(findings.len(), 1);
        assert_eq!(findings[0].message, "accepted bad");
    }

    #[test]
    fn mutation_is_seeded_and_bounded() {
        let run = |seed| {
            let mut rng = Rng::new(seed);
            let mut input = b"cpus=boot=2".to_vec();
            for _ in 0..100 {
                mutate(&mut rng, &mut input, &[], &[b"max="], 32, false);
                assert!(input.len() <= 32);
            }
            input
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
        let mut rng = Rng::new(3);
        let mut fixed = vec![0u8; 64];
        for _ in 0..100 {
            mutate(&mut rng, &mut fixed, &[], &[], 64, true);
            assert_eq!(fixed.len(), 64);
        }
    }
}
