//! `nv-fuzz <target|all> [--seconds N] [--seed S]`: fuzzes for longer than the test suite does and
//! writes each finding to `fuzz/findings/<target>-<n>` (add it to `fuzz/corpus/<target>/` once
//! fixed, so it is replayed by every test run).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use nv_fuzz::targets::{by_name, NAMES};
use nv_fuzz::{fuzz, load_corpus};

fn main() -> anyhow::Result<()> {
    let mut arguments = std::env::args().skip(1);
    // `nv-fuzz seeds <target> <dir>`: writes the target's built-in seeds there (to start a corpus).
    if std::env::args().nth(1).as_deref() == Some("seeds") {
        let name = std::env::args().nth(2).context("seeds <target> <dir>")?;
        let dir =
            std::path::PathBuf::from(std::env::args().nth(3).context("seeds <target> <dir>")?);
        std::fs::create_dir_all(&dir)?;
        for (index, seed) in by_name(&name)?.seeds().iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{index}")), seed)?;
        }
        return Ok(());
    }
    let mut which = None;
    let mut seconds = 60u64;
    let mut seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    while let Some(argument) = arguments.next() {
        match argument.as_str() {
            "--seconds" => seconds = arguments.next().context("--seconds N")?.parse()?,
            "--seed" => seed = arguments.next().context("--seed S")?.parse()?,
            name if which.is_none() => which = Some(name.to_string()),
            other => bail!("unexpected argument {other:?}"),
        }
    }
    let Some(which) = which else {
        bail!(
            "usage: nv-fuzz <{}|all> [--seconds N] [--seed S]",
            NAMES.join("|")
        );
    };
    let names: Vec<&str> = if which == "all" {
        NAMES.to_vec()
    } else {
        vec![which.as_str()]
    };
    let findings_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("findings");
    let mut total = 0;
    for name in names {
        let mut target = by_name(name)?;
        let mut corpus = target.seeds();
        corpus.extend(load_corpus(name));
        let report = fuzz(target.as_mut(), corpus, Duration::from_secs(seconds), seed);
        println!("{report} (seed {seed})");
        for (index, finding) in report.findings.iter().enumerate() {
            std::fs::create_dir_all(&findings_dir)?;
            let path = findings_dir.join(format!("{name}-{index}"));
            std::fs::write(&path, &finding.input)?;
            println!("  {}: {}", path.display(), finding.message);
        }
        total += report.findings.len();
    }
    if total > 0 {
        bail!("{total} findings");
    }
    Ok(())
}
